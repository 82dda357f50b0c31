"""`make demo` (for now): a forward pass of a tiny random Qwen2.5-VL on a synthetic 4-second
video prompt, with the M-RoPE positions and vision metadata prepared on the host.

The training issue replaces this with the SFT -> PIR-GRPO demo.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tempo_jax.models.qwen2_5_vl import Qwen25VL, prepare_inputs, preset


def main() -> None:
    cfg = preset("tiny")
    model = Qwen25VL(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    t, h, w = 4, 8, 12  # 8 frames at 2 fps -> 4 temporal patches of 8x12 patches (112x168 px)
    n_vis = t * h * w // cfg.vision.merge_unit
    text = rng.integers(0, 151_000, size=12)
    ids = np.concatenate([
        text[:6], [cfg.vision_start_token_id], np.full(n_vis, cfg.video_token_id),
        [cfg.vision_end_token_id], text[6:],
    ])[None]
    pixels = rng.standard_normal((t * h * w, cfg.vision.patch_dim)).astype(np.float32)
    inputs = prepare_inputs(cfg, ids, pixel_values_videos=pixels, video_grid_thw=[[t, h, w]],
                            second_per_grid_ts=[1.0])
    print(f"tiny Qwen2.5-VL: {sum(x.size for x in jax.tree.leaves(nnx.state(model))):,} params")
    print(f"prompt: {ids.shape[1]} tokens ({n_vis} video tokens, grid {t}x{h}x{w})")
    print("M-RoPE temporal positions of the video tokens:",
          sorted(set(inputs["position_ids"][0, 0, 7:7 + n_vis].tolist())))
    for i in range(2):
        t0 = time.perf_counter()
        logits = model(ids, pixel_values_videos=pixels, video_grid_thw=[[t, h, w]],
                       second_per_grid_ts=[1.0])
        logits.block_until_ready()
        print(f"forward {i} ({'compile + run' if i == 0 else 'run'}): "
              f"{time.perf_counter() - t0:.2f}s, logits {tuple(logits.shape)}")
    print("next-token argmax:", int(jnp.argmax(logits[0, -1])))


if __name__ == "__main__":
    main()
