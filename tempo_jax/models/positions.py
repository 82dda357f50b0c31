"""Host-side (numpy) positions the families share: text-only rows and where decoding
continues after a prompt. The family modules compute their vision layouts (`rope_index`);
these rules are the same in both (Qwen3-VL's `get_rope_index` keeps Qwen2.5-VL's text
continuation and its `rope_deltas`)."""

from __future__ import annotations

import numpy as np

__all__ = ["PAD_POSITION", "as_2d", "decode_start", "text_positions"]

PAD_POSITION = 1  # the original initialises with torch.ones: padded slots read 1


def as_2d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2:
        raise ValueError(f"{name} must be [B, L] or [L], got shape {a.shape}")
    return a


def text_positions(attention_mask) -> np.ndarray:
    """Positions of text-only rows, `[3, B, L]` int32: `cumsum(mask) - 1` on valid tokens and
    1 on padded slots, as the original `get_rope_index` text branch (so left and right
    padding both give every row positions 0, 1, 2, ... on its real tokens)."""
    mask = as_2d(attention_mask, "attention_mask").astype(np.int64)
    pos = np.cumsum(mask, axis=-1) - 1
    pos = np.where(mask == 0, PAD_POSITION, pos)
    return np.broadcast_to(pos[None], (3, *mask.shape)).astype(np.int32)


def decode_start(position_ids, attention_mask=None) -> np.ndarray:
    """Where generation continues for each row, `[B]` int32: the largest position over the
    row's valid tokens + 1 (0 for an empty row). Independent of how much padding there is,
    unlike `L + rope_delta`, which the original only gets right for full-length rows."""
    pos = np.asarray(position_ids)
    if pos.ndim == 2:  # [3, L]
        pos = pos[:, None]
    if pos.ndim != 3 or pos.shape[0] != 3:
        raise ValueError(f"position_ids must be [3, B, L], got shape {pos.shape}")
    if attention_mask is None:
        mask = np.ones(pos.shape[1:], dtype=bool)
    else:
        mask = as_2d(attention_mask, "attention_mask").astype(bool)
    if mask.shape != pos.shape[1:]:
        raise ValueError(f"attention_mask {mask.shape} does not match positions {pos.shape}")
    masked = np.where(mask[None], pos.astype(np.int64), -1)
    return (masked.max(axis=(0, 2)) + 1).astype(np.int32)
