"""Host-side vision inputs, one way for both families: the image and video patches of a
batch checked against their grids and pad tokens, concatenated into one vision batch (images
first) and given the family's tower metadata (static, bucketed shapes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def prepare_inputs(
    config: Any,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    pixel_values_videos=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    position_ids=None,
    *,
    num_patches: int | None = None,
    bucketed: bool = False,
    vision_positions: Callable,
    vision_metadata: Callable,
    host: Callable,
) -> dict[str, Any]:
    """Host side of a forward pass, both families: M-RoPE positions (when not given: 0, 1,
    2, ... for text-only rows, else the family's `vision_positions(config, ids, mask,
    image_grids, video_grids, second_per_grid_ts)`), vision metadata (the family's
    `vision_metadata`), the image and video patches concatenated into one vision batch
    (attention in the tower never crosses a temporal patch, so one call equals two).
    `host` turns an argument into a numpy array (naming the caller when it is traced).

    `num_patches` / `bucketed` pad the vision batch to a static shape (see `bucket`) so that
    a dataset compiles a handful of times, not once per video.
    """
    from tempo_jax.models.positions import text_positions

    ids = host(input_ids).astype(np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    mask = np.ones_like(ids) if attention_mask is None else host(attention_mask).astype(np.int32)
    mask = mask.reshape(ids.shape)
    img_grid, vid_grid = host(image_grid_thw), host(video_grid_thw)
    if position_ids is not None:
        pos = host(position_ids)
        if pos.ndim == 2:
            pos = np.broadcast_to(pos[None], (3, *pos.shape))
    elif img_grid is None and vid_grid is None:
        pos = text_positions(mask)
    else:
        pos = np.asarray(vision_positions(config, ids, mask, img_grid, vid_grid,
                                          host(second_per_grid_ts)))
    if pos.shape != (3, *ids.shape):
        raise ValueError(f"position_ids must be [3, B, L] = {(3, *ids.shape)}, got {pos.shape}")
    inputs: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos.astype(np.int32),
    }
    return add_vision_inputs(
        inputs, config, ((pixel_values, img_grid), (pixel_values_videos, vid_grid)),
        vision_metadata, host, num_patches=num_patches, bucketed=bucketed)


def add_vision_inputs(
    inputs: dict[str, Any],
    config: Any,
    items: tuple[tuple[Any, np.ndarray | None], tuple[Any, np.ndarray | None]],
    vision_metadata: Callable[..., dict],
    host: Callable[[Any], np.ndarray | None],
    *,
    num_patches: int | None = None,
    bucketed: bool = False,
) -> dict[str, Any]:
    """Add `pixel_values`, `vision_meta` and `num_image_features` to `inputs` (which holds
    `input_ids`) from `items` = ((image pixels, image grids), (video pixels, video grids));
    a missing kind is `(None, None)`. Errors name what disagrees: pixels without grids, pixel
    rows that the grids do not add up to, features that the pad tokens do not match."""
    ids = inputs["input_ids"]
    unit = config.vision.merge_unit
    pixels, grids = [], []
    n_img_feats = 0
    for (pv, grid), kind, tok in zip(items, ("image", "video"),
                                     (config.image_token_id, config.video_token_id),
                                     strict=True):
        if pv is None:
            continue
        if grid is None:
            raise ValueError(f"{kind} pixels given without {kind}_grid_thw")
        pv = host(pv).astype(np.float32)
        grid = grid.reshape(-1, 3)
        n = int(np.prod(grid, axis=-1).sum())
        if pv.shape != (n, config.vision.patch_dim):
            raise ValueError(
                f"{kind} pixels have shape {pv.shape}, grids {grid.tolist()} need "
                f"{(n, config.vision.patch_dim)}"
            )
        n_tokens = int((ids == tok).sum())
        if n_tokens != n // unit:
            raise ValueError(
                f"{kind} features and {kind} tokens do not match: {n // unit} features, "
                f"{n_tokens} tokens"
            )
        if kind == "image":
            n_img_feats = n // unit
        pixels.append(pv)
        grids.append(grid)
    if pixels:
        pv = np.concatenate(pixels)
        meta = vision_metadata(np.concatenate(grids), config.vision, num_patches=num_patches,
                               bucketed=bucketed)
        pad = meta["rot_pos"].shape[0] - pv.shape[0]  # the padded patch count
        inputs["pixel_values"] = np.pad(pv, ((0, pad), (0, 0))) if pad else pv
        inputs["vision_meta"] = meta
        inputs["num_image_features"] = np.int32(n_img_feats)
    return inputs


def bucket(n: int, minimum: int = 1, steps: int = 4) -> int:
    """Round up to the next of `steps` evenly spaced sizes per octave ({1, 1.25, 1.5, 1.75} x
    2^k by default: at most 25% padding), so a whole dataset has only a handful of distinct
    shapes (compilations)."""
    n = max(int(n), minimum)
    p = 1 << max(0, (n - 1).bit_length() - 1 - (steps.bit_length() - 1))
    return -(-n // p) * p


def patch_budget(grids: np.ndarray, unit: int, num_patches: int | None,
                 bucketed: bool) -> tuple[int, int]:
    """(the grids' patch count, the padded count the vision batch takes): `num_patches`, or
    the count's bucket when `bucketed`, or the count itself; a multiple of the merge unit."""
    n = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
    if bucketed and num_patches is None:
        num_patches = bucket(n, 64)
    n_pad = num_patches or n
    if n_pad < n or n_pad % unit:
        raise ValueError(f"num_patches {n_pad} must be >= {n} and a multiple of {unit}")
    return n, n_pad


def pad_segments(cu: np.ndarray, n: int, n_pad: int, seg_len: int) -> np.ndarray:
    """Segment boundaries `cu` over `n` patches extended with padding segments of at most
    `seg_len` patches up to `n_pad` (padding never shares a segment with real patches)."""
    if n_pad <= n:
        return cu
    return np.concatenate([cu, np.arange(n, n_pad, seg_len)[1:], [n_pad]])
