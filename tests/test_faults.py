"""Faults a pod job meets, each with the outcome asserted: SIGKILL at any instant (training,
evaluation, export), a damaged checkpoint, a full disk, a second writer.

The chaos test is the short version of `scripts/chaos.py` (its harness, imported): 3 SIGKILLs,
2 of them inside a checkpoint save, then bitwise equality with the uninterrupted run."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import _env, _flags, small_config

from tempo_jax import evaluate as evaluate_lib
from tempo_jax import export as export_lib
from tempo_jax import fileio
from tempo_jax import train as train_lib
from tempo_jax.training.checkpoints import Checkpoints
from tempo_jax.training.trainer import NoSpace, NothingToResume

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import chaos  # noqa: E402

SFT_ONLY = {"stages": "sft", "sft.steps": 6, "ckpt_every": 2, "log_every": 4}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A finished SFT-only run (checkpoints 4 and 6, a logging window cut by checkpoint 6):
    the original that damaged copies are compared with."""
    wd = tmp_path_factory.mktemp("faults") / "run"
    train_lib.run(small_config(**SFT_ONLY), wd)
    return wd


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def _state_at(wd: Path, step: int) -> dict:
    import jax
    import orbax.checkpoint as ocp

    mngr = ocp.CheckpointManager((wd / "ckpt").absolute(),
                                 options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
    finally:
        mngr.close()
    return {jax.tree_util.keystr(k): np.asarray(v).tobytes()
            for k, v in jax.tree_util.tree_flatten_with_path(got["state"])[0]}


# ------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_anywhere_then_restart_equals_uninterrupted(tmp_path):
    """3 SIGKILLs (2 aimed inside a checkpoint save, one at a random instant), restarting
    on the same workdir until the run completes: final parameters, optimizer state and RNG
    bitwise equal to the uninterrupted run's, the report equal, every metrics row and
    TensorBoard scalar exactly once with the same values, nothing half-written left, and
    every restart resumed from the newest committed checkpoint."""
    config = {**chaos.CONFIG, "sft.steps": 6, "rl.steps": 3}
    ref = tmp_path / "reference"
    wall = chaos.reference_run(ref, 0.5, config, print)
    # each save kill resumes before the save it hit, so saves remain for the next; the random
    # instant falls in the first quarter of a run (start-up, compilation, the first steps)
    result = chaos.chaos_run(tmp_path / "chaos", ref / "data", kills=3, seed=0, delay=0.5,
                             p_save=0.0, horizon=wall / 4, config=config, log=print,
                             modes=["save", "anytime", "save"])
    lives = result["lives"]
    assert sum(life["killed"] for life in lives) == 3
    assert sum(life["in_save"] for life in lives) >= 1, lives  # a -tmp save left by a kill
    checks = chaos.compare(ref, tmp_path / "chaos")
    checks["resumes"] = chaos.resumes_ok(lives)
    failed = {k: v[1] for k, v in checks.items() if not v[0]}
    assert not failed, failed


# ------------------------------------------------------------------------- a damaged checkpoint
def _damage(wd: Path, step: int, how: str) -> None:
    d = wd / "ckpt" / str(step)
    if how == "metadata":
        (d / "meta" / "metadata").write_text('{"stage": "sft", "st')
        return
    biggest = max((p for p in (d / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    if how == "truncated":
        with open(biggest, "r+b") as f:
            f.truncate(biggest.stat().st_size // 3)
    else:
        biggest.unlink()


@pytest.mark.parametrize("how", ["truncated", "deleted", "metadata"])
def test_damaged_newest_checkpoint_resumes_from_the_previous(sft_run, tmp_path, how, caplog):
    """The newest checkpoint with a truncated or deleted array file or corrupt metadata: the
    restart names it, moves it to ckpt.damaged/, resumes from the previous committed one
    (never from step 0) and recomputes the same state, bit for bit, with each metrics row
    once."""
    wd = _copy_run(sft_run, tmp_path / "wd")
    _damage(wd, 6, how)
    with caplog.at_level("INFO", logger="tempo_jax.train"):
        train_lib.run(small_config(**SFT_ONLY), wd)
    assert "checkpoint 6 cannot be read" in caplog.text
    assert "checkpoint 6 is damaged: moved to" in caplog.text
    assert "resuming from checkpoint 4 (sft step 4)" in caplog.text
    moved = list((wd / "ckpt.damaged").iterdir())
    assert any(p.name.startswith("6-") and p.is_dir() for p in moved), moved
    assert _state_at(wd, 6) == _state_at(sft_run, 6)
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in rows] == [(r["stage"], r["step"]) for r in want]
    assert rows[1]["loss"] == want[1]["loss"]  # the window 5-6 (begun before checkpoint 4)


def test_damaged_only_checkpoint_is_one_error_line(sft_run, tmp_path, capsys):
    """Every committed checkpoint damaged: one `error:` line naming them and how to start
    over, exit status 2, nothing moved or deleted."""
    wd = _copy_run(sft_run, tmp_path / "wd")
    _damage(wd, 6, "deleted")
    _damage(wd, 4, "metadata")
    with pytest.raises(NothingToResume):
        train_lib.run(small_config(**SFT_ONLY), wd)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        __import__("tempo_jax.cli").cli.run_main(
            lambda: train_lib.main([f"--workdir={wd}", *_flags(SFT_ONLY)]),
            user_errors=(NothingToResume,))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: checkpoint 6 cannot be read"), err
    assert "checkpoint 4 cannot be read" in err[0] and "move" in err[0]
    assert sorted(p.name for p in (wd / "ckpt").iterdir()) == ["4", "6"]
    assert not (wd / "ckpt.damaged").exists()


def test_grpo_reference_is_kept_past_the_keep_policy(tmp_path):
    """With ckpt_keep=2 and four GRPO checkpoints, the SFT end (GRPO's frozen reference) is
    still there for a resume in the middle of GRPO."""
    config = small_config(**{"sft.steps": 2, "rl.steps": 8, "ckpt_every": 2})
    ckpt = Checkpoints(tmp_path / "ckpt", config)
    try:
        import jax.numpy as jnp
        from flax import nnx

        params = nnx.State({"w": nnx.Param(jnp.zeros(3))})
        for step in (2, 4, 6, 8, 10):
            stage, s = ("sft", step) if step <= 2 else ("grpo", step - 2)
            ckpt.save(stage, s, params, {}, jnp.zeros(2, jnp.uint32))
            ckpt.manager.wait_until_finished()
    finally:
        ckpt.close()
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir()) == [2, 8, 10]


# --------------------------------------------------------------------------------- a full disk
def _tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                            str(path)], capture_output=True)
    except OSError:  # no mount command
        return False
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 160 MB file system (the small run's data and one checkpoint fit, a second does not):
    a tmpfs where this machine lets the test mount one, else None (the test injects ENOSPC)."""
    mnt = tmp_path / "disk"
    mounted = _tmpfs(mnt, 160)
    yield mnt if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_a_save(sft_run, tmp_path, small_disk, monkeypatch):
    """The disk fills during the second save: one NoSpace error naming the save and the
    intact checkpoint; the half-written save removed, nothing listed that is not whole; the
    previous checkpoint restores and equals an undisturbed run's."""
    wd = (small_disk or tmp_path) / "wd"
    wd.mkdir()
    shutil.copytree(sft_run / "data", wd / "data")
    if small_disk is None:  # no mount here: the write layer says ENOSPC at the second save
        from orbax.checkpoint._src.path import atomicity

        finalize, calls = atomicity.AtomicRenameTemporaryPath.finalize, []

        async def full(self, *args, **kwargs):
            calls.append(1)
            if len(calls) > 3:  # the first save's three commits (state, meta, step) pass
                raise OSError(errno.ENOSPC, "No space left on device")
            return await finalize(self, *args, **kwargs)
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", full)
    with pytest.raises(NoSpace) as err:
        train_lib.run(small_config(**SFT_ONLY), wd)
    msg = str(err.value)
    assert "no space left on device" in msg, msg
    assert "checkpoint 2 (the last committed) is intact" in msg, msg
    assert "while saving checkpoint 4" in msg, msg
    assert export_lib.available_steps(wd) == [2]
    assert not export_lib.uncommitted_steps(wd)
    assert sorted(p.name for p in (wd / "ckpt").iterdir()) == ["2"]
    export_lib.load_workdir(wd, step=2)  # intact and restorable
    monkeypatch.undo()
    assert _state_at(wd, 2) == _state_at_copy(sft_run, tmp_path)


def _state_at_copy(sft_run: Path, tmp_path: Path) -> dict:
    """Checkpoint 2 of an undisturbed run of the same config (the fixture keeps 4 and 6)."""
    wd = tmp_path / "undisturbed"
    wd.mkdir()
    shutil.copytree(sft_run / "data", wd / "data")
    train_lib.run(small_config(**{**SFT_ONLY, "sft.steps": 2}), wd)
    return _state_at(wd, 2)


def test_full_disk_during_an_export_keeps_the_previous_export(sft_run, tmp_path,
                                                               monkeypatch):
    """An export that runs out of space (ENOSPC from the safetensors writer) leaves the
    previous export whole, and no staging directory."""
    out = tmp_path / "hf"
    export_lib.export(sft_run, out, step=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    from tempo_jax import safetensors_io

    written = []

    def full(*args, **kwargs):  # the first tensors land, then the disk is full
        written.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors_io, "_write_arrays", full)
    with pytest.raises(OSError) as err:
        export_lib.export(sft_run, out, step=6)
    assert fileio.no_space(err.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert written and not list(tmp_path.glob(".hf.*"))


# ------------------------------------------------------------------------------ a second writer
def _holding(cmd: list[str], lock: Path, timeout: float = 300) -> subprocess.Popen:
    """Start `cmd` and wait until it holds `lock` (its pid written in it)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if json.loads(lock.read_text())["pid"] == proc.pid:
                return proc
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    raise AssertionError("the first writer never took the lock")


def test_second_trainer_on_a_live_workdir_is_refused(sft_run, tmp_path, capsys):
    """A trainer on a workdir whose trainer is alive: one `error:` line naming the other
    process, exit 2, nothing written. After the first is SIGKILLed the lock is free."""
    wd = tmp_path / "wd"
    wd.mkdir()
    shutil.copytree(sft_run / "data", wd / "data")
    first = _holding([sys.executable, "-m", "tempo_jax.train", f"--workdir={wd}",
                      *_flags({**SFT_ONLY, "sft.steps": 400})], wd / fileio.LOCK_NAME)
    try:
        with pytest.raises(SystemExit) as exit_:
            __import__("tempo_jax.cli").cli.run_main(
                lambda: train_lib.main([f"--workdir={wd}", *_flags(SFT_ONLY)]),
                user_errors=(fileio.Busy,))
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2
        assert len(err) == 1 and err[0].startswith(f"error: {wd} is in use by"), err
        assert f"pid {first.pid}" in err[0] and "tempo_jax.train" in err[0]
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    with fileio.exclusive(wd, "test"):  # a killed holder leaves no stuck lock
        pass


def test_second_evaluation_on_a_live_out_is_refused(sft_run, tmp_path, capsys):
    out = tmp_path / "eval"
    holder = _holding([sys.executable, "-c",
                       "import sys, time; from tempo_jax import fileio\n"
                       f"with fileio.exclusive({str(out)!r}, 'evaluate run'):\n"
                       "    time.sleep(600)"], out / fileio.LOCK_NAME, timeout=60)
    try:
        code = evaluate_lib.main(["run", "--checkpoint", str(sft_run), "--video-root",
                                  str(sft_run / "data"), "--annotations",
                                  str(sft_run / "data" / "val" / "annotations.jsonl"),
                                  "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 1 and f"error: {out} is in use by another evaluate run" in err, err
        assert not (out / "answers.jsonl").exists()
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()


# ----------------------------------------------------------------------- evaluation and export
def _eval_cmd(run: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tempo_jax.evaluate", "run", "--checkpoint", str(run),
            "--video-root", str(run / "data"), "--annotations",
            str(run / "data" / "val" / "annotations.jsonl"), "--out", str(out),
            "--batch-size", "2", "--max-new-tokens", "6"]


def test_evaluation_killed_anywhere_answers_each_query_once(sft_run, tmp_path):
    """`evaluate run` SIGKILLed after 1, then 3 answered queries and once at a random
    instant, restarted each time: every query answered exactly once, the same answers as an
    uninterrupted evaluation, and a torn last line repaired."""
    straight = tmp_path / "straight"
    subprocess.run(_eval_cmd(sft_run, straight), env=_env(), check=True,
                   capture_output=True, timeout=600)
    want = [json.loads(x) for x in (straight / "answers.jsonl").read_text().splitlines()]
    assert len(want) >= 6
    out = tmp_path / "killed"
    answers = out / "answers.jsonl"
    rng = np.random.default_rng(0)
    for rows in (1, 3, None):
        proc = subprocess.Popen(_eval_cmd(sft_run, out), env=_env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        wait = rng.uniform(5, 20)
        while proc.poll() is None:
            n = len(answers.read_text().splitlines()) if answers.exists() else 0
            if (rows is not None and n >= rows) or (rows is None and time.time() - t0 > wait):
                break
            time.sleep(0.02)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    with open(answers, "a") as f:  # a line torn by a kill mid-write
        f.write('{"qid": "torn", "answer": "<answer>1')
    subprocess.run(_eval_cmd(sft_run, out), env=_env(), check=True, capture_output=True,
                   timeout=600)
    got = [json.loads(x) for x in answers.read_text().splitlines()]
    qids = [r["qid"] for r in got]
    assert len(qids) == len(set(qids)) == len(want)
    assert {r["qid"]: r for r in got} == {r["qid"]: r for r in want}
    assert (out / "predictions.jsonl").read_bytes() == (straight / "predictions.jsonl"
                                                        ).read_bytes()


def test_export_killed_mid_write_leaves_the_previous_export(sft_run, tmp_path):
    """`python -m tempo_jax.export` SIGKILLed while writing: the previous export is there,
    whole; the next export removes the dead staging directory and replaces it."""
    out = tmp_path / "hf"
    export_lib.export(sft_run, out, step=4)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = subprocess.Popen([sys.executable, "-m", "tempo_jax.export", "--checkpoint",
                             str(sft_run), "--step", "6", "--out", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staged = []
    while proc.poll() is None and not staged:
        staged = list(tmp_path.glob(".hf.partial-*"))  # the staging directory, being filled
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert staged, "the export finished before it could be killed"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    export_lib.export(sft_run, out, step=6)
    assert not list(tmp_path.glob(".hf.*"))
    assert json.loads((out / "config.json").read_text())
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before


def test_replace_dir_recovers_a_kill_between_its_two_renames(tmp_path):
    """Killed after moving the previous directory aside and before moving the new one in:
    the next writer puts the previous one back before anything else."""
    out = tmp_path / "hf"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    old = tmp_path / f".hf.old-{dead}"
    old.mkdir()
    (old / "config.json").write_text("previous")
    (tmp_path / f".hf.partial-{dead}").mkdir()
    with pytest.raises(RuntimeError), fileio.replace_dir(out) as stage:
        (stage / "config.json").write_text("new")
        raise RuntimeError("the new export fails")
    assert (out / "config.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_torn_metrics_line_is_cut_before_the_next_row(tmp_path):
    from tempo_jax.training.metrics_logger import MetricsLogger

    (tmp_path / "metrics.jsonl").write_text('{"stage": "sft", "step": 1, "loss": 1.0}\n'
                                            '{"stage": "sft", "step": 2, "lo')
    logger = MetricsLogger(tmp_path)
    logger.log("sft", 2, {"loss": 0.5})
    logger.close()
    rows, torn = fileio.read_jsonl(tmp_path / "metrics.jsonl")
    assert torn == 0 and [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.5)]

