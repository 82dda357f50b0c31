"""How many times does a typical evaluation compile the sampling engine?

Simulates an evaluation over videos of varied length and aspect ratio (the grids a token
budget produces: more frames for longer videos, fewer pixels per frame) with batched greedy
decoding on the tiny model, and counts distinct compilations of `generate`.

    python scripts/count_compilations.py [--queries 64] [--batch 4]

Last output line: {"queries", "batches", "compilations"}.
"""

from __future__ import annotations

import argparse
import json

import jax.numpy as jnp
import numpy as np
from flax import nnx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()

    from tempo_jax.generate import compilation_count, generate
    from tempo_jax.models.qwen2_5_vl import Qwen25VL, preset

    cfg = preset("tiny")
    model = Qwen25VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    budget = 256  # merged visual tokens per video
    shapes = [(16, 28), (20, 20), (28, 16), (12, 36)]  # patch grids of 4 aspect ratios
    batches = 0
    for start in range(0, args.queries, args.batch):
        rows, pix, grids = [], [], []
        for _ in range(min(args.batch, args.queries - start)):
            h, w = shapes[rng.integers(len(shapes))]
            t = int(min(budget // (h * w // 4), rng.integers(2, 12)))
            n_vis = t * h * w // 4
            text = rng.integers(10, 150_000, size=int(rng.integers(20, 60)))
            rows.append(np.concatenate([text[:8], [cfg.vision_start_token_id],
                                        np.full(n_vis, cfg.video_token_id),
                                        [cfg.vision_end_token_id], text[8:]]))
            pix.append(rng.standard_normal((t * h * w, cfg.vision.patch_dim), np.float32))
            grids.append((t, h, w))
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        generate(model, ids, mask, pixel_values_videos=np.concatenate(pix), video_grid_thw=grids,
                 max_new_tokens=8, temperature=0)
        batches += 1
        print(f"batch {batches}: prompt width {width}, grids {grids}, "
              f"compilations so far {compilation_count()}", flush=True)
    print(json.dumps({"queries": args.queries, "batches": batches,
                      "compilations": compilation_count()}))


if __name__ == "__main__":
    main()
