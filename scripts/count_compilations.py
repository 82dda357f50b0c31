"""How many times does a typical evaluation compile the sampling engine?

Simulates an evaluation over videos of varied length (10 s to 150 s) and aspect ratio, each
planned by SAA under one visual-token budget and split into ETA segments (one grid per
temporal patch), with batched greedy decoding on the tiny model, and counts distinct
compilations of `generate`.

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
    from tempo_jax.data.saa import SAAConfig, plan

    saa = SAAConfig(max_visual_tokens=256, min_pixels=4 * 28 * 28)
    sizes = [(360, 640), (480, 640), (720, 1280), (640, 360)]  # frame (h, w)
    batches = 0
    for start in range(0, args.queries, args.batch):
        rows, pix, grids = [], [], []
        for _ in range(min(args.batch, args.queries - start)):
            frame_hw = sizes[rng.integers(len(sizes))]
            p = plan(float(rng.uniform(10, 150)), frame_hw, cfg=saa)
            t, h, w = p.grid_thw
            text = rng.integers(10, 150_000, size=int(rng.integers(40, 80)))
            row = list(text[:20])
            for _k in range(t):  # ETA: a timestamp then one segment per temporal patch
                row += [11, 12, cfg.vision_start_token_id]
                row += [cfg.video_token_id] * (h * w // 4) + [cfg.vision_end_token_id]
                grids.append((1, h, w))
            rows.append(np.asarray(row + list(text[20:])))
            pix.append(rng.standard_normal((t * h * w, cfg.vision.patch_dim), np.float32))
        width = max(len(r) for r in rows)
        ids = np.zeros((len(rows), width), np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        generate(model, ids, mask, pixel_values_videos=np.concatenate(pix), video_grid_thw=grids,
                 max_new_tokens=8, temperature=0)
        batches += 1
        print(f"batch {batches}: prompt width {width}, {len(grids)} segments, "
              f"compilations so far {compilation_count()}", flush=True)
    print(json.dumps({"queries": args.queries, "batches": batches,
                      "compilations": compilation_count()}))


if __name__ == "__main__":
    main()
