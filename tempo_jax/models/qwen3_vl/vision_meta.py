"""Host-side (numpy) metadata for the Qwen3-VL vision tower.

Qwen3-VL has no window attention: every block attends within one temporal patch (a frame
pair), as `cu_seqlens` per frame. What depends on the grids only is computed here and shipped
as small arrays, so device code sees static (bucketed) shapes: the per-frame attention
segments, the 2D rotary ids, and the bilinear taps that resample the learned square position
table to each grid (transformers' `get_vision_interpolation_indices_and_weights`, bilinear,
align_corners, in merge-block patch order).

The segment packing, the rotary ids and the buckets are the same as Qwen2.5-VL's and are
imported from there.
"""

from __future__ import annotations

import numpy as np

from tempo_jax.models.inputs import bucket, pad_segments, patch_budget
from tempo_jax.models.qwen2_5_vl.vision_meta import (
    frame_cu_seqlens,
    pack_segments,
    rot_pos_ids,
)
from tempo_jax.models.qwen3_vl.config import VisionConfig

__all__ = ["bucket", "position_taps", "vision_metadata"]


def _as_grids(grid_thw) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {g.tolist()}")
    return g


def _axis_taps(index: np.ndarray, size: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Two bilinear taps (align_corners) into a `side`-long table for positions `index` on an
    axis of length `size`, computed in fp32 in the reference's order of operations."""
    src = index.astype(np.float32) * np.float32(side - 1)
    src = src / np.maximum(size - 1, 1).astype(np.float32)
    floor = np.floor(src)
    offsets = np.arange(2)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    dist = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - dist, 0).astype(np.float32)


def position_taps(grid_thw, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per patch, 4 rows of the learned position table and their bilinear weights
    (`[N, 4]` int32, `[N, 4]` float32), in the processor's merge-block-major patch order."""
    g = _as_grids(grid_thw)
    side, merge = cfg.num_grid_per_side, cfg.spatial_merge_size
    idx, wts = [], []
    for t, h, w in g:
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} not divisible by spatial_merge_size {merge}")
        rc = rot_pos_ids([(1, h, w)], cfg).astype(np.int64)  # (row, col), block order
        ht, hw = _axis_taps(rc[:, 0], np.int64(h), side)
        wt, ww = _axis_taps(rc[:, 1], np.int64(w), side)
        i = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wgt = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        idx.append(np.tile(i, (t, 1)))
        wts.append(np.tile(wgt, (t, 1)))
    return np.concatenate(idx).astype(np.int32), np.concatenate(wts).astype(np.float32)


def vision_metadata(
    grid_thw,
    cfg: VisionConfig,
    num_patches: int | None = None,
    full_shape: tuple[int, int] | None = None,
    bucketed: bool = False,
) -> dict[str, np.ndarray]:
    """Everything the device-side vision tower needs besides the pixels.

    `num_patches` pads the patch count for a static shape (padding patches sit after the real
    ones, in segments of their own, with zero position weights, and are never scattered into
    the text); `full_shape` pads the segment table to a fixed `(S, Lmax)`; `bucketed` chooses
    both from `bucket`, so that similar inputs share one compiled shape.
    """
    g = _as_grids(grid_thw)
    n, n_pad = patch_budget(g, cfg.merge_unit, num_patches, bucketed)
    cu = frame_cu_seqlens(g)
    frame_len = int(np.diff(cu).max())
    cu = pad_segments(cu, n, n_pad, frame_len)
    if bucketed:
        full_shape = full_shape or (bucket(len(cu) - 1, 4, 2), bucket(frame_len, 64, 2))
    full = pack_segments(cu, *(full_shape or (None, None)))
    rot = rot_pos_ids(g, cfg)
    pos_index, pos_weight = position_taps(g, cfg)
    pad = n_pad - n
    return {
        "rot_pos": np.pad(rot, ((0, pad), (0, 0))).astype(np.int32),
        "pos_index": np.pad(pos_index, ((0, pad), (0, 0))),
        "pos_weight": np.pad(pos_weight, ((0, pad), (0, 0))),
        "full_index": full.index,
        "full_valid": full.valid,
        "full_slot": full.slot,
    }
