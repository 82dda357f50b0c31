"""Does an XLA:CPU setting close the matrix-multiply gap to PyTorch on this machine?

Each candidate `XLA_FLAGS` set runs in its own process (flags are read when jax starts) and
measures a square fp32 matmul (GFLOP/s) and the `bench`-size prefill of
`scripts/bench_forward.py` (seconds); torch's matmul is measured in the same rounds. Rounds
cycle through the candidates (interleaved), `--rounds` times; medians with min and max.

    python scripts/bench_xla_cpu_flags.py [--rounds 3] [--n 2048] [--grid 4,20,44]

Last output line: a JSON object, per candidate its matmul GFLOP/s and prefill seconds, and
torch's matmul GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from benchlib import spread

CANDIDATES = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": ("--xla_cpu_use_onednn=true "
                           "--xla_cpu_experimental_onednn_custom_call=true"),
    "xnnpack": "--xla_cpu_use_xnnpack=true",
    "no_thunk_runtime": "--xla_cpu_use_thunk_runtime=false",
    "prefer_512": "--xla_cpu_prefer_vector_width=512",
    "fast_math": "--xla_cpu_enable_fast_math=true",
}

WORKER = r"""
import json, statistics, sys, time
import numpy as np
n, grid, reps = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def med(fn):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)
out = {}
if sys.argv[4] == "torch":
    import torch
    a = torch.randn(n, n); torch.mm(a, a)
    out["matmul_gflops"] = 2 * n**3 / med(lambda: torch.mm(a, a)) / 1e9
else:
    import jax, jax.numpy as jnp
    from flax import nnx
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x); mm(a).block_until_ready()
    out["matmul_gflops"] = 2 * n**3 / med(lambda: mm(a).block_until_ready()) / 1e9
    if grid != "none":
        from tempo_jax.models.qwen2_5_vl import Qwen25VL, prepare_inputs, preset
        cfg = preset("bench")
        t, h, w = (int(x) for x in grid.split(","))
        nv = t * h * w // cfg.vision.merge_unit
        rng = np.random.default_rng(0)
        text = rng.integers(0, 150_000, size=96)
        ids = np.concatenate([text[:64], [cfg.vision_start_token_id],
                              np.full(nv, cfg.video_token_id), [cfg.vision_end_token_id],
                              text[64:]])[None]
        px = rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32)
        model = Qwen25VL(cfg, rngs=nnx.Rngs(0))
        inputs = jax.device_put(prepare_inputs(
            cfg, ids, pixel_values_videos=px, video_grid_thw=[[t, h, w]],
            second_per_grid_ts=[1.0]))
        g, s = nnx.split(model)
        last = np.asarray([[ids.shape[1] - 1]], np.int32)
        f = jax.jit(lambda s, x, p: nnx.merge(g, s).forward(x, logits_positions=p))
        f(s, inputs, last).block_until_ready()
        out["prefill_s"] = med(lambda: f(s, inputs, last).block_until_ready())
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=5, help="timed calls per process")
    ap.add_argument("--grid", default="4,20,44", help="prefill video grid; 'none' to skip")
    ap.add_argument("--only", default="", help="comma-separated candidate names")
    args = ap.parse_args()
    names = [n for n in CANDIDATES if not args.only or n in args.only.split(",")]
    results: dict[str, dict[str, list[float]]] = {n: {} for n in [*names, "torch"]}
    for r in range(args.rounds):
        for name in [*names, "torch"]:
            env = {**os.environ, "XLA_FLAGS": CANDIDATES.get(name, ""), "JAX_PLATFORMS": "cpu"}
            proc = subprocess.run(
                [sys.executable, "-c", WORKER, str(args.n), args.grid, str(args.reps),
                 "torch" if name == "torch" else "jax"],
                env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                print(f"  round {r} {name}: failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            got = json.loads(proc.stdout.strip().splitlines()[-1])
            for k, v in got.items():
                results[name].setdefault(k, []).append(v)
            print(f"  round {r} {name:20s} {got}", flush=True)
    summary = {name: {k: spread(v, 3) for k, v in res.items()} for name, res in results.items()}
    summary["flags"] = {n: CANDIDATES[n] for n in names}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
