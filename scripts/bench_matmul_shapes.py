"""Where the PIR-GRPO update loses to PyTorch on CPU: the three matrix multiplies of one
linear layer's forward and backward at the `bench` MLP's shape, JAX against torch.

A linear layer y = x W ([M, K] x [K, N]) costs three equal-FLOP dots in a training step: the
forward x W, the input gradient dy W^T and the weight gradient x^T dy (a contraction over the
M = batch x length rows). `scripts/profile_train_step.py` shows the update's dots are the
model's FLOPs (XLA's cost analysis within 2% of the analytic count), so the update's speed
against torch is the speed of these library dots. Each dot is timed interleaved with torch's,
`--reps` rounds; medians with min and max. `--flags` runs the JAX side again under other
`XLA_FLAGS` sets (each in its own process: flags are read when jax starts).

    python scripts/bench_matmul_shapes.py [--reps 7] \
        [--flags "--xla_cpu_experimental_ynn_fusion_type="]

Last line: a JSON object, per flag set and dot: GFLOP/s of both sides and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

M, K, N = 4096, 768, 2048  # 8 x 512 tokens through the `bench` model's MLP (768 -> 2048)

WORKER = r"""
import json, os, sys
sys.path.insert(0, sys.argv[2])
import numpy as np, jax, jax.numpy as jnp, torch
from benchlib import ratio_spread, spread, time_interleaved
torch.set_num_threads(os.cpu_count())
M, K, N, reps = (int(a) for a in sys.argv[3:7])
r = np.random.default_rng(0)
x = r.standard_normal((M, K), np.float32)
w = r.standard_normal((K, N), np.float32)
dy = r.standard_normal((M, N), np.float32)
jx, jw, jdy = map(jnp.asarray, (x, w, dy))
tx, tw, tdy = map(torch.as_tensor, (x, w, dy))
dots = {
    "forward x W": (jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
    "input grad dy W^T": (jax.jit(lambda a, b: a @ b.T), (jdy, jw), lambda: tdy @ tw.T),
    "weight grad x^T dy": (jax.jit(lambda a, b: a.T @ b), (jx, jdy), lambda: tx.T @ tdy),
}
gflop = 2 * M * K * N / 1e9
out = {}
for name, (f, args, t) in dots.items():
    f(*args).block_until_ready(); t()
    times = time_interleaved({"jax": lambda: f(*args).block_until_ready(), "torch": t}, reps)
    out[name] = {"jax_gflops": round(gflop / spread(times["jax"])["median"], 1),
                 "torch_gflops": round(gflop / spread(times["torch"])["median"], 1),
                 "jax_over_torch": ratio_spread(times["torch"], times["jax"])}
print(json.dumps(out))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--flags", action="append", default=[],
                    help="an XLA_FLAGS set to compare with the default (repeatable)")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    res = {}
    for flags in ["", *args.flags]:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        run = subprocess.run([sys.executable, "-c", WORKER, "worker", here, str(M), str(K),
                              str(N), str(args.reps)], env=env, capture_output=True, text=True,
                             check=True)
        res[flags or "default"] = json.loads(run.stdout.strip().splitlines()[-1])
        for name, r in res[flags or "default"].items():
            print(f"  [{flags or 'default'}] {name:20s} jax {r['jax_gflops']:6.1f} GFLOP/s  "
                  f"torch {r['torch_gflops']:6.1f}  ratio {r['jax_over_torch']}")
    print(json.dumps({"shape": [M, K, N], **res}))


if __name__ == "__main__":
    main()
