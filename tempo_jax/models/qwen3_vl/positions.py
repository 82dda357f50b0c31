"""M-RoPE position ids for Qwen3-VL, computed on the host in numpy.

Why this is a thin layer over the Qwen2.5-VL module: Qwen3-VL carries a video's time as text,
not as positions. Its processor writes temporal patch k of a video as
`<{t_k:.1f} seconds><|vision_start|><|video_pad|>*n<|vision_end|>`, and `get_rope_index` splits
every video grid `(T, h, w)` into T grids `(1, h, w)`, one per such segment; each segment is
then placed exactly like a Qwen2.5-VL item whose grid has t = 1 (temporal coordinate constant
at the segment's start, text after it at `max(previous positions) + 1`). So the layout is
Qwen2.5-VL's stock layout on the split grids, and `rope_index` reuses that module's validation
and placement rather than copying them.

Reference: Qwen3-VL as released (transformers 4.57 `Qwen3VLModel.get_rope_index`).
transformers 5.x rewrote it around `mm_token_type_ids` (text continues at
`+ max(h, w) // merge` after a vision item, padded slots zero-filled). On the valid tokens of
every input the Qwen3-VL processors produce (images and split video frames all have t = 1)
the two give the same positions. They differ in (we follow the released column):

| | released (ours) | transformers 5.x |
| --- | --- | --- |
| padded slots | 1 | 0 |
| `rope_deltas[b]` | `max(valid) + 1 - L` (L = padded length) | `max(valid) + 1 - n_valid(b)` |
| text-only batch | `cumsum(mask) - 1`; delta counts padded slots' 1 | `arange`; delta 0 |
| image grid with t > 1 | temporal `0..t-1`; text at max + 1 | text at `+ max(h, w) // merge` |

The deltas agree on unpadded rows, and generation continues at `max(valid positions) + 1` in
both (released: `cache_position + delta = L + max + 1 - L`; 5.x: `cumsum(mask) + delta =
n_valid + max + 1 - n_valid`), so `decode_start` is the Qwen2.5-VL one, re-exported unchanged.
An image grid with t > 1 (no Qwen3-VL image processor makes one) is rejected rather than
placed by either rule.
"""

from __future__ import annotations

import numpy as np

from tempo_jax.models.positions import decode_start, text_positions
from tempo_jax.models.qwen2_5_vl import positions as _q25

__all__ = ["decode_start", "rope_index", "split_video_grids", "text_positions"]


def split_video_grids(video_grid_thw) -> np.ndarray | None:
    """`[n, 3]` video grids -> one `(1, h, w)` grid per temporal patch, in order (Qwen3-VL's
    `repeat_interleave(grid, grid[:, 0])` with t set to 1): one grid per timestamped segment."""
    grids = _q25._as_grid(video_grid_thw, "video_grid_thw")
    if grids is None:
        return None
    if (grids[:, 0] < 0).any():
        raise ValueError(f"video grid t must be >= 0, got {grids.tolist()}")
    out = np.repeat(grids, grids[:, 0], axis=0)
    out[:, 0] = 1
    return out


def rope_index(
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    video_grid_thw=None,
    *,
    spatial_merge_size: int = 2,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    vision_start_token_id: int = 151652,
) -> tuple[np.ndarray, np.ndarray]:
    """3D (temporal, height, width) positions of a batch, as released Qwen3-VL computes them.

    Returns `(position_ids [3, B, L] int32, rope_deltas [B, 1] int32)`, with
    `rope_deltas[b] = max(valid positions of row b) + 1 - L` and padded slots at 1 (see the
    module docstring for transformers 5.x's conventions). `video_grid_thw` may hold whole
    videos `(T, h, w)` or already-split frames `(1, h, w)`: either way every temporal patch
    must be its own `<|vision_start|>` + pads segment in `input_ids`. Grids are consumed in
    order across the batch.
    """
    images = _q25._as_grid(image_grid_thw, "image_grid_thw")
    if images is not None and (images[:, 0] != 1).any():
        raise ValueError(
            f"Qwen3-VL image grids have t = 1 (its image processor repeats a picture to fill "
            f"one temporal patch), got {images.tolist()}"
        )
    pos, deltas = _q25.rope_index(
        input_ids, attention_mask, images, split_video_grids(video_grid_thw),
        spatial_merge_size=spatial_merge_size, image_token_id=image_token_id,
        video_token_id=video_token_id, vision_start_token_id=vision_start_token_id,
    )
    return pos, deltas[:, None]
