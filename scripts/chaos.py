"""Kill training anywhere: SIGKILL `python -m tempo_jax.train` at random instants, restart it on
the same workdir until it completes, and compare the result with an uninterrupted run.

    python scripts/chaos.py                       # 30 kills, runs/chaos/{reference,chaos0,...}
    python scripts/chaos.py --kills 5 --seed 1 --out /tmp/chaos

The run is a small tiny-model config (both stages, checkpoints every 2 steps, a logging window
of 3 SFT steps so that checkpoints fall inside it, the default `ckpt_keep=2` so that GRPO's
reference must survive the keep policy). Each life draws its kill from a seeded distribution:
with probability `--p-save` it waits for a checkpoint save to start (the child marks each
`Checkpoints.save`, and Orbax's commit is slowed by `--commit-delay` seconds, as on a slow
bucket) and kills it before the commit; otherwise it kills at a uniform instant over the
reference run's wall time, so start-up, steps, saves, evaluations, export and report are all
hit. A life that completes before its kill instant completes the run; while fewer than
`--kills` kills have landed, a new round starts (a fresh workdir, the schedule's seed + the
round), each round checked on its own. Both runs use the same synthetic
videos (the chaos workdir gets a copy of the reference's data; the generator writes each file
aside and renames it, so it is kill-safe too).

Checked against the uninterrupted run: the final checkpoint's parameters, optimizer state,
RNG and metadata bitwise equal; `report.json` equal (but its `wall_time_s`); `predictions.jsonl`
and the exported safetensors byte-equal; `metrics.jsonl` with every (stage, step) row once and
the same values (but the timings); TensorBoard with each scalar once; the same checkpoints
listed, no `*.orbax-checkpoint-tmp` or staging file left; and every restart resumed from the
newest checkpoint committed when it was killed. Figures: kills survived / tried, kills that
landed inside a save (a `-tmp` directory was there after the kill), steps recomputed, wall
overhead (the rounds' wall time over as many uninterrupted runs). Writes `chaos.json` under
`--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CONFIG = {
    "data.synthetic_train": 6, "data.synthetic_val": 4, "data.irrelevant_ratio": 0.34,
    "sft.steps": 12, "sft.batch_size": 4, "rl.steps": 6, "rl.batch_size": 2,
    "rl.num_generations": 2, "rl.max_new_tokens": 6, "eval_max_new_tokens": 6,
    "model.tiny_overrides.hidden_size": 64, "model.tiny_overrides.num_hidden_layers": 2,
    "model.tiny_overrides.intermediate_size": 128, "ckpt_every": 2, "log_every": 3,
    "saa.max_visual_tokens": 32, "saa.max_frames": 12,
}
TIMINGS = ("step_time", "tokens_per_s")  # wall-clock figures: a restarted window differs
MARKER, PROGRESS = "chaos.saving", "chaos.progress"


# ----------------------------------------------------------------------------- the child
def child(delay: float, argv: list[str]) -> None:
    """`python -m tempo_jax.train ARGV` with two hooks: every checkpoint save writes its step to
    `<workdir>/../<name>.chaos.saving` and every finished step to `...chaos.progress` (so
    the driver can aim at a save and count recomputed steps), and Orbax's commit waits
    `delay` seconds (a save is long enough to be hit)."""
    from orbax.checkpoint._src.path import atomicity

    from tempo_jax.train import main
    from tempo_jax.training.checkpoints import Checkpoints
    from tempo_jax.training.trainer import Trainer

    workdir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")))
    marker, progress = side_files(workdir)
    finalize, save, step_done = (atomicity.AtomicRenameTemporaryPath.finalize,
                                 Checkpoints.save, Trainer.checkpoint_step)

    async def slow_finalize(self, *args, **kwargs):
        await asyncio.sleep(delay)
        return await finalize(self, *args, **kwargs)

    def marked_save(self, stage, step, *args, **kwargs):
        marker.write_text(f"{self.global_step(stage, step)}\n")
        return save(self, stage, step, *args, **kwargs)

    def counted(self, stage, step, *args, **kwargs):
        stop = step_done(self, stage, step, *args, **kwargs)
        with open(progress, "a") as f:
            f.write(f"{self.ckpt.global_step(stage, step + 1)}\n")
        return stop

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    Checkpoints.save = marked_save
    Trainer.checkpoint_step = counted
    sys.argv = ["python -m tempo_jax.train", *argv]
    main(argv)


def side_files(workdir: Path) -> tuple[Path, Path]:
    """The hooks' files, beside the workdir (not in it: the workdirs are compared)."""
    return (workdir.with_name(f"{workdir.name}.{MARKER}"),
            workdir.with_name(f"{workdir.name}.{PROGRESS}"))


def train_command(workdir: Path, delay: float, config: dict) -> list[str]:
    return [sys.executable, str(Path(__file__).absolute()), "child", str(delay), "--",
            f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in config.items())]


# ----------------------------------------------------------------------------- the driver
def committed(workdir: Path) -> list[int]:
    ckpt = workdir / "ckpt"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) \
        if ckpt.is_dir() else []


def uncommitted(workdir: Path) -> list[str]:
    ckpt = workdir / "ckpt"
    return sorted(p.name for p in ckpt.glob("*.orbax-checkpoint-tmp*")) if ckpt.is_dir() else []


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def reference_run(workdir: Path, delay: float, config: dict, log) -> float:
    """The uninterrupted run (generates the synthetic videos); its wall time in seconds."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(workdir.with_name(workdir.name + ".log"), "w") as out:
        rc = subprocess.run(train_command(workdir, delay, config), env=_env(), stdout=out,
                            stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (rc {rc}); see {workdir}.log")
    log(f"uninterrupted run: {wall:.1f} s")
    return wall


def chaos_run(workdir: Path, data: Path, *, kills: int, seed: int, delay: float,
              p_save: float, horizon: float, config: dict, log,
              modes: list[str] | None = None, max_lives: int = 200) -> dict:
    """Kill and restart until the run completes with `kills` SIGKILLs behind it. `modes`
    (e.g. ["save", "anytime"]) fixes each kill's kind instead of drawing it."""
    rng = random.Random(seed)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    shutil.copytree(data, workdir / "data")
    marker, progress = side_files(workdir)
    progress.unlink(missing_ok=True)
    lives: list[dict] = []
    t_start = time.perf_counter()
    while len(lives) < max_lives:
        marker.unlink(missing_ok=True)
        n_killed = sum(life["killed"] for life in lives)
        before = committed(workdir)
        lines_before = len(progress.read_text().split()) if progress.exists() else 0
        mode = None
        if n_killed < kills:
            mode = modes[n_killed] if modes else ("save" if rng.random() < p_save
                                                  else "anytime")
        logfile = workdir.with_name(f"{workdir.name}.life{len(lives):03d}.log")
        t0 = time.perf_counter()
        with open(logfile, "w") as out:
            proc = subprocess.Popen(train_command(workdir, delay, config), env=_env(),
                                    stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            killed = False
            aim = _aim(proc, mode, rng, t0, horizon, marker, workdir, delay)
            if mode is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = True
            rc = proc.wait()
        wall = time.perf_counter() - t0
        left = uncommitted(workdir)
        done = _last_progress(progress)
        text = logfile.read_text(errors="replace")
        m = re.search(r"resuming from checkpoint (\d+)", text)
        life = {"life": len(lives), "mode": mode, "aim_s": aim, "wall_s": round(wall, 2),
                "killed": killed, "rc": rc, "committed_before": before,
                "resumed_from": int(m.group(1)) if m else None,
                "committed_after": committed(workdir), "in_save": killed and bool(left),
                "uncommitted_left": left, "progress": done,
                "steps_run": (len(progress.read_text().split()) if progress.exists() else 0)
                - lines_before}
        lives.append(life)
        log(f"life {life['life']:3d}: {mode or 'to the end':8s} "
            f"{'killed' if killed else f'exit {rc}':8s} at {wall:6.1f} s; resumed from "
            f"{life['resumed_from']}, reached step {done}, committed {life['committed_after']}"
            f"{', inside a save (' + ', '.join(left) + ')' if life['in_save'] else ''}")
        if not killed:
            if rc != 0:
                raise RuntimeError(f"life {life['life']} exited {rc}; see {logfile}")
            break
    total = time.perf_counter() - t_start
    return {"lives": lives, "wall_s": total}


def _aim(proc: subprocess.Popen, mode: str | None, rng: random.Random, t0: float,
         horizon: float, marker: Path, workdir: Path, delay: float) -> float | None:
    """Wait for this life's kill instant (or the process's exit); the seconds it waited."""
    if mode == "anytime":
        aim = rng.uniform(0.0, horizon)
        _wait(proc, lambda: time.perf_counter() - t0 >= aim)
        return aim
    if mode == "save":
        nth = rng.choice([1, 2])  # the first or the second save of this life
        seen: set[str] = set()

        def in_save() -> bool:  # the save marked, its -tmp directory there, not committed
            if marker.exists():
                seen.add(marker.read_text())
            return len(seen) >= nth and bool(uncommitted(workdir))

        if _wait(proc, in_save):
            time.sleep(rng.uniform(0.0, delay * 0.5))
        return time.perf_counter() - t0
    return None


def _wait(proc: subprocess.Popen, until, poll: float = 0.02) -> bool:
    """Poll until `until()` (True) or the process exits (False)."""
    while proc.poll() is None:
        if until():
            return True
        time.sleep(poll)
    return False


def _last_progress(path: Path) -> int | None:
    if not path.exists():
        return None
    lines = path.read_text().split()
    return int(lines[-1]) if lines else None


# ----------------------------------------------------------------------------- the comparison
def final_state(workdir: Path) -> tuple[int, dict, dict]:
    """(step, every array of the final checkpoint by path, its metadata)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((workdir / "ckpt").absolute(),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = mngr.latest_step()
        got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(),
                                                         meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(got["state"])[0]}
    return step, flat, got["meta"]


def compare(reference: Path, other: Path) -> dict[str, tuple[bool, str]]:
    """Each check's (passed, detail)."""
    from tempo_jax.fileio import read_jsonl
    from tempo_jax.training.metrics_logger import tensorboard_scalars

    checks: dict[str, tuple[bool, str]] = {}
    (sa, a, ma), (sb, b, mb) = final_state(reference), final_state(other)
    differ = [k for k in a if k not in b or a[k].dtype != b[k].dtype
              or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes()]
    checks["final state bitwise equal"] = (
        sa == sb and a.keys() == b.keys() and not differ,
        f"step {sa} vs {sb}, {len(a)} arrays, {len(differ)} differ {differ[:3]}")
    checks["final metadata equal"] = (ma == mb, "" if ma == mb else f"{ma} vs {mb}")

    def report(w):
        r = json.loads((w / "report.json").read_text())
        r.pop("wall_time_s", None)
        return r
    ra, rb = report(reference), report(other)
    checks["report.json equal (but wall_time_s)"] = (ra == rb, f"sections {sorted(rb)}")
    for name in ("predictions.jsonl",):
        same = (reference / name).read_bytes() == (other / name).read_bytes()
        checks[f"{name} byte-equal"] = (same, "")
    weights = sorted(p.name for p in (reference / "hf").glob("*.safetensors"))
    same = weights and all((reference / "hf" / n).read_bytes() == (other / "hf" / n).read_bytes()
                           for n in weights)
    checks["export safetensors byte-equal"] = (bool(same), ", ".join(weights))

    rows_a, torn_a = read_jsonl(reference / "metrics.jsonl")
    rows_b, torn_b = read_jsonl(other / "metrics.jsonl")
    keys_a = [(r["stage"], r["step"]) for r in rows_a]
    keys_b = [(r["stage"], r["step"]) for r in rows_b]
    dup = len(keys_b) - len(set(keys_b))
    checks["metrics.jsonl: every row exactly once"] = (
        keys_a == keys_b and dup == 0 and torn_b == 0,
        f"{len(keys_b)} rows ({len(keys_a)} uninterrupted), {dup} duplicated, {torn_b} torn")

    def values(rows):
        return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
    va, vb = values(rows_a), values(rows_b)
    bad = [i for i, (x, y) in enumerate(zip(va, vb, strict=False))
           if json.dumps(x, sort_keys=True) != json.dumps(y, sort_keys=True)]
    checks["metrics.jsonl: same values (but timings)"] = (
        not bad and len(va) == len(vb), f"rows differing: {[keys_b[i] for i in bad[:5]]}")
    tb = sorted(tensorboard_scalars(other / "tb"))
    want = sorted((f"{r['stage']}/{k}".replace("@", "_"), r["step"]) for r in rows_b
                  for k in r if k not in ("stage", "step"))
    checks["TensorBoard: every scalar exactly once"] = (tb == want,
                                                        f"{len(tb)} scalars, {len(want)} rows'")
    left = uncommitted(other) + [p.name for p in other.rglob("*partial*")]
    checks["nothing half-written left"] = (not left, ", ".join(left))
    checks["same checkpoints listed"] = (committed(reference) == committed(other),
                                         f"{committed(reference)} vs {committed(other)}")
    checks["no checkpoint damaged"] = (not (other / "ckpt.damaged").exists(), "")
    return checks


def resumes_ok(lives: list[dict]) -> tuple[bool, str]:
    """Every restart that trained resumed from the newest checkpoint committed when it
    started (a life killed during start-up, before it read its checkpoint, never said where
    it resumed, and trained nothing)."""
    bad = []
    for prev, life in zip(lives, lives[1:], strict=False):
        want = life["committed_before"][-1] if life["committed_before"] else None
        trained = (life["steps_run"] > 0 if "steps_run" in life  # (older records: progress)
                   else (life["progress"] or 0) > (prev["progress"] or 0)) or not life["killed"]
        if trained and life["resumed_from"] != want:
            bad.append((life["life"], life["resumed_from"], life["committed_before"]))
    return not bad, f"mismatches (life, resumed, committed): {bad}"


def summarize(rounds: list[dict], reference_wall: float, steps_total: int) -> dict:
    """The figures over every round (a round: one run killed and restarted to completion)."""
    lives = [life for r in rounds for life in r["lives"]]
    kills = [life for life in lives if life["killed"]]
    recomputed = 0
    for r in rounds:
        for prev, nxt in zip(r["lives"], r["lives"][1:], strict=False):
            if prev["killed"] and prev["progress"] is not None:
                recomputed += max(0, prev["progress"] - (nxt["resumed_from"] or 0))
    wall = sum(r["wall_s"] for r in rounds)
    return {
        "rounds": len(rounds), "kills": len(kills),
        "survived": sum(sum(life["killed"] for life in r["lives"]) for r in rounds
                        if r["lives"][-1]["rc"] == 0 and r["passed"]),
        "kills_in_save": sum(life["in_save"] for life in kills),
        "kills_aimed_at_save": sum(life["mode"] == "save" for life in kills),
        "lives": len(lives), "steps_per_run": steps_total, "steps_recomputed": recomputed,
        "wall_s": round(wall, 1), "reference_wall_s": round(reference_wall, 1),
        "wall_overhead": round(wall / (len(rounds) * reference_wall), 2),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["child"]:
        child(float(argv[1]), argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/chaos"))
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="the kill schedule's seed")
    ap.add_argument("--p-save", type=float, default=0.4,
                    help="share of kills aimed inside a checkpoint save")
    ap.add_argument("--commit-delay", type=float, default=1.0,
                    help="seconds added to each Orbax commit (both runs)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="config override for both runs, e.g. sft.steps=20")
    args = ap.parse_args(argv)
    config = dict(CONFIG)
    for item in args.set:
        k, _, v = item.partition("=")
        config[k] = v
    out = args.out.absolute()

    def log(msg):
        print(msg, flush=True)
    ref = out / "reference"
    ref_wall = reference_run(ref, args.commit_delay, config, log)
    rounds: list[dict] = []
    while sum(r["kills"] for r in rounds) < args.kills:  # a run ends with few kills left
        k = len(rounds)
        result = chaos_run(out / f"chaos{k}", ref / "data",
                           kills=args.kills - sum(r["kills"] for r in rounds),
                           seed=args.seed + k, delay=args.commit_delay, p_save=args.p_save,
                           horizon=ref_wall, config=config, log=log)
        checks = compare(ref, out / f"chaos{k}")
        checks["every restart resumed from the newest committed checkpoint"] = resumes_ok(
            result["lives"])
        result["kills"] = sum(life["killed"] for life in result["lives"])
        result["passed"] = all(ok for ok, _ in checks.values())
        result["checks"] = {name: list(v) for name, v in checks.items()}
        rounds.append(result)
        log(f"round {k}: {result['kills']} kills, "
            f"{'all checks pass' if result['passed'] else 'FAILED'}")
        for name, (ok, detail) in checks.items():
            log(f"  {'PASS' if ok else 'FAIL'}  {name}{'  (' + detail + ')' if detail else ''}")
    steps = int(config["sft.steps"]) + int(config["rl.steps"])
    summary = summarize(rounds, ref_wall, steps)
    log("")
    for k, v in summary.items():
        log(f"{k:>22}: {v}")
    (out / "chaos.json").write_text(json.dumps(
        {"summary": summary, "config": config, "seed": args.seed, "rounds": rounds},
        indent=2))
    return 0 if all(r["passed"] for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
