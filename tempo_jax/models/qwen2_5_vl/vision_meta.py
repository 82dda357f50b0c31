"""Host-side (numpy) metadata for the vision tower.

The window permutation, the attention segments and the 2D rotary coordinates depend only on
the grids, so they are computed on the CPU and shipped as small int arrays: device code sees
static shapes and does gathers, never data-dependent control flow.

Attention is run on *packed segments*: every segment (a window, or a whole temporal patch for
the full-attention blocks) becomes one row of a `[S, Lmax]` gather table, so attention costs
`sum(L_s * Lmax)` instead of `N**2`, and one padded layout serves every backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tempo_jax.models.inputs import bucket, pad_segments, patch_budget
from tempo_jax.models.qwen2_5_vl.config import VisionConfig


def _as_grids(grid_thw) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"grid_thw entries must be positive, got {g.tolist()}")
    return g


def window_index(grid_thw, cfg: VisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Merged-unit permutation grouping each window's units together, and the window
    boundaries in patches (the reference `get_window_index`, deduplicated boundaries)."""
    merge = cfg.spatial_merge_size
    wsize = cfg.window_size // merge // cfg.patch_size
    index_parts, cu = [], [0]
    offset = 0
    for t, h, w in _as_grids(grid_thw):
        if h % merge or w % merge:
            raise ValueError(f"grid {(t, h, w)} not divisible by spatial_merge_size {merge}")
        lh, lw = h // merge, w // merge
        idx = np.arange(t * lh * lw).reshape(t, lh, lw)
        ph, pw = wsize - lh % wsize, wsize - lw % wsize
        nh, nw = (lh + ph) // wsize, (lw + pw) // wsize
        padded = np.full((t, lh + ph, lw + pw), -1, dtype=np.int64)
        padded[:, :lh, :lw] = idx
        padded = padded.reshape(t, nh, wsize, nw, wsize).transpose(0, 1, 3, 2, 4)
        padded = padded.reshape(t, nh * nw, wsize * wsize)
        lens = (padded >= 0).sum(-1).reshape(-1)
        flat = padded.reshape(-1)
        index_parts.append(flat[flat >= 0] + offset)
        cu.extend((np.cumsum(lens) * merge * merge + cu[-1]).tolist())
        offset += t * lh * lw
    cu_arr = np.asarray(cu, dtype=np.int64)
    keep = np.concatenate([[True], cu_arr[1:] != cu_arr[:-1]])
    return np.concatenate(index_parts), cu_arr[keep]


def frame_cu_seqlens(grid_thw) -> np.ndarray:
    """Full attention in Qwen2.5-VL is per temporal patch (h*w patches), not per video."""
    g = _as_grids(grid_thw)
    lens = np.repeat(g[:, 1] * g[:, 2], g[:, 0])
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)


def rot_pos_ids(grid_thw, cfg: VisionConfig) -> np.ndarray:
    """(row, col) of every patch, in the processor's merge-block-major patch order."""
    merge = cfg.spatial_merge_size
    out = []
    for t, h, w in _as_grids(grid_thw):
        hpos = np.broadcast_to(np.arange(h)[:, None], (h, w))
        wpos = np.broadcast_to(np.arange(w)[None, :], (h, w))
        shape = (h // merge, merge, w // merge, merge)
        hw = np.stack([a.reshape(shape).transpose(0, 2, 1, 3).reshape(-1) for a in (hpos, wpos)],
                      -1)
        out.append(np.tile(hw, (t, 1)))
    return np.concatenate(out).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class PackedSegments:
    index: np.ndarray  # [S, Lmax] int32: token gathered into each slot (0 for empty slots)
    valid: np.ndarray  # [S, Lmax] bool
    slot: np.ndarray  # [N] int32: flat slot s * Lmax + l holding each token


def pack_segments(
    cu_seqlens: np.ndarray, num_segments: int | None = None, segment_len: int | None = None
) -> PackedSegments:
    """Gather tables for attention within segments given by cumulative boundaries."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    lens = np.diff(cu)
    n = int(cu[-1])
    s = num_segments or len(lens)
    lmax = segment_len or int(lens.max())
    if s < len(lens) or lmax < lens.max():
        raise ValueError(
            f"packing needs at least {len(lens)} segments of {int(lens.max())}, "
            f"got {s} x {lmax}"
        )
    pos = np.arange(lmax)[None, :]
    valid = np.zeros((s, lmax), dtype=bool)
    valid[: len(lens)] = pos < lens[:, None]
    index = np.zeros((s, lmax), dtype=np.int64)
    index[: len(lens)] = np.where(valid[: len(lens)], cu[:-1, None] + pos, 0)
    seg_of = np.repeat(np.arange(len(lens)), lens)
    slot = seg_of * lmax + (np.arange(n) - cu[:-1][seg_of])
    return PackedSegments(index.astype(np.int32), valid, slot.astype(np.int32))


def vision_metadata(
    grid_thw,
    cfg: VisionConfig,
    num_patches: int | None = None,
    full_shape: tuple[int, int] | None = None,
    window_shape: tuple[int, int] | None = None,
    bucketed: bool = False,
) -> dict[str, np.ndarray]:
    """Everything the device-side vision tower needs besides the pixels.

    `num_patches` pads the patch count for a static shape (padding patches sit after the real
    ones in segments of their own and are never scattered into the text);
    `full_shape` / `window_shape` pad the segment tables to fixed `(S, Lmax)`; `bucketed`
    chooses all three from `bucket`, so that similar inputs share one compiled shape.
    """
    g = _as_grids(grid_thw)
    unit = cfg.merge_unit
    n, n_pad = patch_budget(g, unit, num_patches, bucketed)
    widx, cu_win = window_index(g, cfg)
    cu_full = frame_cu_seqlens(g)
    win_len = unit * (cfg.window_size // cfg.spatial_merge_size // cfg.patch_size) ** 2
    frame_len = int(np.diff(cu_full).max())
    widx = np.concatenate([widx, np.arange(n // unit, n_pad // unit)])
    cu_win = pad_segments(cu_win, n, n_pad, win_len)
    cu_full = pad_segments(cu_full, n, n_pad, frame_len)
    rot = rot_pos_ids(g, cfg)
    if n_pad > n:
        rot = np.concatenate([rot, np.zeros((n_pad - n, 2), np.int32)])
    if bucketed:
        # segment tables vary with aspect ratio and frame count: coarser buckets (2 per
        # octave) keep the number of compiled shapes small at a small padding cost
        full_shape = full_shape or (bucket(len(cu_full) - 1, 4, 2), bucket(frame_len, 64, 2))
        window_shape = window_shape or (bucket(len(cu_win) - 1, 4, 2), win_len)
    # window permutation applies to merge units; expand it to patches
    patch_perm = (widx[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
    full = pack_segments(cu_full, *(full_shape or (None, None)))
    win = pack_segments(cu_win, *(window_shape or (None, None)))
    return {
        "patch_perm": patch_perm.astype(np.int32),
        "reverse_index": np.argsort(widx).astype(np.int32),
        "rot_pos": rot[patch_perm],
        "full_index": full.index,
        "full_valid": full.valid,
        "full_slot": full.slot,
        "win_index": win.index,
        "win_valid": win.valid,
        "win_slot": win.slot,
    }
