"""Compile time of the trainer's steps with the decoder unrolled vs scanned, by depth.

    python scripts/bench_compile.py                    # depths 4, 12, 28; 3 rounds
    python scripts/bench_compile.py --depths 28 --reps 5 --hidden 256
    python scripts/bench_compile.py --platform tpu --depths 4,28 --reps 2   # libtpu's compiler
    python scripts/bench_compile.py --full 7b:v5p:64 --reps 1   # the real 7B, 64 v5p chips

Each measurement is `tempo_jax.plan.aot.compile_phases` on this machine's CPU: the trainer's
own steps (the SFT gradient, the PIR-GRPO rollout's sampling program, the GRPO update's
gradient, the optimizer apply) traced, lowered and compiled with abstract arguments, in a
fresh process (no trace or compilation cache carried over). Rounds are interleaved: in each
round every depth runs unrolled then scanned. The model is the tiny config at `--hidden`
width with `num_hidden_layers` = the depth (28 is Qwen2.5-VL-7B's depth); width changes the
compiled kernels' sizes, not their number, which is what grows with depth. Prints, per phase
and depth, the median (min, max) seconds of each layout and the per-round ratio
unrolled / scanned; writes `--out` (JSON).

`--full CONFIG:CHIP:DEVICES` measures the real thing instead: the default config's model
(`configs/tempo_r0.py:CONFIG`, full width and depth, its vision tower included) compiled by
libtpu for the slice, exactly as `python -m tempo_jax.plan --method aot` compiles it, with
`model.scan_layers` off and on (the switch scans the decoder's layers and the vision tower's
blocks). Each measurement compiles the SFT step, the rollout's sampling program and the GRPO
update (`--phases`); the unrolled 7B takes about 20 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchlib import ratio_spread, spread


def child(depth: int, scan: bool, hidden: int, platform: str) -> None:
    """One measurement: print {phase: seconds} as the last line."""
    import jax
    import numpy as np
    from jax.sharding import Mesh

    from tempo_jax import cli
    from tempo_jax import sharding as shd
    from tempo_jax.configs.tempo_r0 import get_config
    from tempo_jax.plan.aot import compile_phases

    cfg = cli.set_fields(get_config("tiny"), {
        "model.tiny_overrides.num_hidden_layers": depth,
        "model.tiny_overrides.hidden_size": hidden,
        "model.tiny_overrides.intermediate_size": 2 * hidden,
        "model.scan_layers": scan, "model.remat": "full",
    })
    if platform == "tpu":  # libtpu's compiler, for a 4-chip v5p slice, as pods run it
        from jax.experimental import topologies

        cfg.model.attention_backend = "auto"  # splash
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name="v5:2x2x1", chip_config_name="megacore",
            chips_per_host_bounds=(2, 2, 1), num_slices=1)
        mesh = Mesh(np.asarray(topo.devices[:4]).reshape(1, 4, 1), shd.MESH_AXES)
    else:
        mesh = shd.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])
    phases = [p for p in PHASES_TIMED if p in PHASES_BY_PLATFORM[platform]]
    print(json.dumps(compile_phases(cfg, mesh, platform=platform,
                                    phases=phases)["compile_seconds"]))


# the TPU compiler is ~4x slower: there the three programs the issue names (the optimizer
# apply does not depend on depth beyond its parameter count)
PHASES_TIMED = ("sft step", "grpo rollout", "grpo update", "optimizer apply")
PHASES_BY_PLATFORM = {"cpu": PHASES_TIMED, "tpu": PHASES_TIMED[:3]}


def measure(depth: int, scan: bool, hidden: int, platform: str) -> dict[str, float]:
    env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu", "TPU_SKIP_MDS_QUERY": "1",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", str(depth), str(int(scan)),
                          str(hidden), platform], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_full(spec: str, scan: bool, phases: str) -> dict[str, float]:
    """One planner run (`--method aot`) of a default config on a TPU slice: {phase: s}."""
    config, chip, devices = spec.split(":")
    out = subprocess.run(
        [sys.executable, "-m", "tempo_jax.plan", "--config", f"configs/tempo_r0.py:{config}",
         f"--config.model.scan_layers={scan}", "--mesh", f"fsdp={devices}", "--chip", chip,
         "--method", "aot", "--phases", phases, "--aot-timeout", "7200", "--json"],
        capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(lines[-1])["aot"]["compile_seconds"]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]), bool(int(sys.argv[3])), int(sys.argv[4]), sys.argv[5])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="4,12,28")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--platform", default="cpu", choices=("cpu", "tpu"),
                    help="tpu: libtpu's compiler for a 4-chip v5p slice (fsdp=4, splash), "
                         "from this CPU machine (needs the tpu extra)")
    ap.add_argument("--full", default="",
                    help="CONFIG:CHIP:DEVICES, e.g. 7b:v5p:64: the default config's real model "
                         "compiled by libtpu for that slice (--depths and --hidden unused)")
    ap.add_argument("--phases", default="sft step,grpo rollout,grpo update",
                    help="--full: the phases to compile")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    name = args.full.replace(":", "_") if args.full else args.platform
    args.out = args.out or Path(f"runs/bench_compile_{name}.json")
    # --full: one "depth", the config's own (its layer count is the model's)
    depths = [0] if args.full else [int(d) for d in args.depths.split(",")]
    raw: dict[str, dict[int, list[dict]]] = {"unrolled": {}, "scanned": {}}
    for r in range(args.reps):
        for depth in depths:
            for layout in ("unrolled", "scanned"):
                got = (measure_full(args.full, layout == "scanned", args.phases) if args.full
                       else measure(depth, layout == "scanned", args.hidden, args.platform))
                raw[layout].setdefault(depth, []).append(got)
                print(f"round {r + 1}/{args.reps} depth {depth:2d} {layout:8s} "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in got.items()), flush=True)
    phases = list(raw["unrolled"][depths[0]][0])
    table: dict = {}
    print(f"\n{'phase':16s} {'depth':>5s}  {'unrolled s (min-max)':>22s}  "
          f"{'scanned s (min-max)':>22s}  {'unrolled/scanned (min-max)':>26s}")
    for phase in [*phases, "all phases"]:
        for depth in depths:
            def series(layout, phase=phase, depth=depth):
                rows = raw[layout][depth]
                return [sum(x.values()) if phase == "all phases" else x[phase] for x in rows]
            u, s = spread(series("unrolled"), 2), spread(series("scanned"), 2)
            ratio = ratio_spread(series("unrolled"), series("scanned"))
            table.setdefault(phase, {})[depth] = {"unrolled": u, "scanned": s, "ratio": ratio}
            print(f"{phase:16s} {depth:5d}  {u['median']:8.1f} ({u['min']:.1f}-{u['max']:.1f})"
                  f"{'':4s}{s['median']:8.1f} ({s['min']:.1f}-{s['max']:.1f})"
                  f"{'':6s}{ratio['median']:6.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"hidden": args.hidden, "reps": args.reps,
                                    "platform": "tpu" if args.full else args.platform,
                                    "full": args.full, "table": table, "raw": raw},
                                   indent=2))


if __name__ == "__main__":
    main()
