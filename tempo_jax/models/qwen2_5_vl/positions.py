"""M-RoPE position ids for Qwen2.5-VL, computed on the host in numpy.

Why host-side numpy: positions depend on data-dependent token layouts (where the vision
segments are, how big each grid is), which is control flow that does not belong inside a
jitted graph. The device code only ever sees the finished `[3, B, L]` int32 array.

Two layouts:

* Stock: Qwen2.5-VL *as originally released* (transformers ~4.49-4.51
  `get_rope_index`). Text after a vision item continues at `max(previous positions) + 1`,
  and a video's temporal coordinate is `floor(k * second_per_grid_t * tokens_per_second)`
  evaluated in float32 like torch does. transformers 5.x replaced the continuation with
  `+ max(h, w) // merge` (huggingface/transformers issue 45381); we deliberately do not.
* ETA (`video_segment_times` given): every video grid is one segment
  `<timestamp text><|vision_start|><|video_pad|>*n<|vision_end|>`, whose temporal
  coordinate comes from its real time `t_k`: `tau_k = P0 + floor(t_k * tps)`, where `P0`
  is where the video block starts. See `TEMPO_R0.md`, "ETA (ours)".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tempo_jax.models.positions import PAD_POSITION as _PAD_POSITION
from tempo_jax.models.positions import as_2d as _as_2d
from tempo_jax.models.positions import decode_start, text_positions

__all__ = ["rope_index", "text_positions", "decode_start"]



@dataclass
class _Item:
    kind: str  # "image" or "video"
    start: int  # index of <|vision_start|> in the valid (unpadded) row
    grid: tuple[int, int, int]  # (t, h, w) in patches, before the spatial merge
    index: int  # global index into image_grid_thw or video_grid_thw


def _as_grid(g, name: str) -> np.ndarray | None:
    if g is None:
        return None
    a = np.asarray(g, dtype=np.int64)
    if a.size == 0:
        return a.reshape(0, 3)
    if a.ndim == 1 and a.shape[0] == 3:
        a = a[None]
    if a.ndim != 2 or a.shape[1] != 3:
        raise ValueError(f"{name} must be [n, 3] (t, h, w), got shape {a.shape}")
    return a


def _per_video(values, n: int, name: str, default, dtype) -> np.ndarray:
    if values is None:
        return np.full((n,), default, dtype=dtype)
    a = np.asarray(values, dtype=dtype).reshape(-1)
    if a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} entries but video_grid_thw has {n} videos")
    return a


def _temporal_offsets(n_t: int, second_per_grid_t: float, tokens_per_second) -> np.ndarray:
    """`floor(k * second_per_grid_t * tps)` for k < n_t, in float32 with the original's
    association `(k * spg) * tps` and truncation toward zero (torch `.long()`)."""
    k = np.arange(n_t, dtype=np.float32)
    t = (k * np.float32(second_per_grid_t)) * np.float32(tokens_per_second)
    return np.trunc(t).astype(np.int64)


def _find_items(row: np.ndarray, b: int, counters: dict, grids: dict, merge: int,
                image_token_id: int, video_token_id: int,
                vision_start_token_id: int) -> list[_Item]:
    """The vision items of one (unpadded) row, in order, each checked against its grid."""
    items: list[_Item] = []
    starts = np.flatnonzero(row == vision_start_token_id)
    for s in starts.tolist():
        if s + 1 >= row.shape[0]:
            continue
        tok = int(row[s + 1])
        if tok == image_token_id:
            kind, pad = "image", image_token_id
        elif tok == video_token_id:
            kind, pad = "video", video_token_id
        else:
            continue  # the original ignores a vision_start not followed by a pad token
        grid = grids[kind]
        idx = counters[kind]
        if grid is None or idx >= grid.shape[0]:
            n_have = 0 if grid is None else grid.shape[0]
            raise ValueError(
                f"row {b}: {kind} item {len(items)} (at token {s}) needs {kind} grid #{idx} "
                f"but only {n_have} {kind} grid(s) were given"
            )
        t, h, w = (int(v) for v in grid[idx])
        if h % merge or w % merge:
            raise ValueError(
                f"row {b}: {kind} grid #{idx} = {(t, h, w)} is not divisible by "
                f"spatial_merge_size={merge}"
            )
        expected = t * (h // merge) * (w // merge)
        run = 0
        while s + 1 + run < row.shape[0] and row[s + 1 + run] == pad:
            run += 1
        if run != expected:
            raise ValueError(
                f"row {b}: {kind} item {len(items)} (vision_start at token {s}, {kind} grid "
                f"#{idx} = {(t, h, w)}) has {run} {kind} pad tokens but the grid needs "
                f"t*h*w/merge^2 = {expected}"
            )
        counters[kind] = idx + 1
        items.append(_Item(kind, s, (t, h, w), idx))
    for kind, pad in (("image", image_token_id), ("video", video_token_id)):
        total = int((row == pad).sum())
        covered = sum(
            it.grid[0] * (it.grid[1] // merge) * (it.grid[2] // merge)
            for it in items if it.kind == kind
        )
        if total != covered:
            raise ValueError(
                f"row {b}: {total - covered} {kind} pad token(s) are not preceded by "
                f"<|vision_start|> (stray pads)"
            )
    return items


class _RowBuilder:
    """Positions of one valid row, assigned left to right, tracking the running maximum."""

    def __init__(self, length: int):
        self.pos = np.full((3, length), -1, dtype=np.int64)
        self.cursor = 0
        self.max = -1

    def put(self, stop: int, values: np.ndarray) -> None:
        """Positions for tokens [cursor, stop); `values` is [3, n] or [n] (all axes)."""
        values = np.asarray(values, dtype=np.int64)
        if values.ndim == 1:
            values = np.broadcast_to(values[None], (3, values.shape[0]))
        n = stop - self.cursor
        assert values.shape == (3, n), (values.shape, n)
        if n:
            self.pos[:, self.cursor:stop] = values
            self.max = max(self.max, int(values.max()))
        self.cursor = stop

    def text_until(self, stop: int) -> None:
        """Plain text: continue at max(previous positions) + 1."""
        n = stop - self.cursor
        self.put(stop, self.max + 1 + np.arange(n))

    def stock_item(self, item: _Item, merge: int, second_per_grid_t: float, tps) -> None:
        """Original layout: text up to the pads, then the (t, h, w) grid offset by
        `text_len + st_idx` (= the first position after that text)."""
        self.text_until(item.start + 1)
        base = self.max + 1
        t, h, w = item.grid[0], item.grid[1] // merge, item.grid[2] // merge
        tt = _temporal_offsets(t, second_per_grid_t, tps)
        self._grid(base + tt, base, h, w)

    def _grid(self, temporal: np.ndarray, spatial0: int, h: int, w: int) -> None:
        t = temporal.shape[0]
        ti = np.repeat(temporal, h * w)
        hi = np.tile(np.repeat(np.arange(h), w), t) + spatial0
        wi = np.tile(np.arange(w), t * h) + spatial0
        self.put(self.cursor + t * h * w, np.stack([ti, hi, wi]))


def rope_index(
    input_ids,
    attention_mask=None,
    image_grid_thw=None,
    video_grid_thw=None,
    second_per_grid_ts=None,
    *,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    vision_start_token_id: int = 151652,
    video_segment_times: Sequence[float] | np.ndarray | None = None,
    timestamp_lengths: Sequence[int] | np.ndarray | None = None,
    block_starts: Sequence[bool] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """3D (temporal, height, width) positions of a batch, as Qwen2.5-VL as released computes
    them, or with ETA time-aligned video segments when `video_segment_times` is given.

    Returns `(position_ids [3, B, L] int32, rope_deltas [B] int32)` where
    `rope_deltas[b] = max(valid positions of row b) + 1 - L` (L = padded length), as the
    original. Padded slots read 1. Grids are consumed in order across the batch.

    ETA arguments (one entry per video grid, i.e. per segment, across the batch):
    `video_segment_times` real time in seconds of each segment's first frame;
    `timestamp_lengths` number of timestamp text tokens right before each segment's
    `<|vision_start|>` (default 0); `block_starts` whether a segment starts a new video
    block (default: the first video segment of each row only). The token right after a
    segment's pads is taken to be its `<|vision_end|>`.
    """
    ids = _as_2d(input_ids, "input_ids")
    B, L = ids.shape
    if attention_mask is None:
        mask = np.ones((B, L), dtype=bool)
        mask_given = False
    else:
        mask = _as_2d(attention_mask, "attention_mask").astype(bool)
        mask_given = True
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
    img = _as_grid(image_grid_thw, "image_grid_thw")
    vid = _as_grid(video_grid_thw, "video_grid_thw")
    eta = video_segment_times is not None

    if img is None and vid is None and not eta:
        # The original's text-only branch: its rope delta takes the max over *all* slots,
        # padded ones (= 1) included, and is 0 without a mask.
        pos = text_positions(mask.astype(np.int64))
        if not mask_given:
            return pos, np.zeros((B,), dtype=np.int32)
        deltas = pos.max(axis=(0, 2)).astype(np.int64) + 1 - L
        return pos, deltas.astype(np.int32)

    n_vid = 0 if vid is None else vid.shape[0]
    spg = _per_video(second_per_grid_ts, n_vid, "second_per_grid_ts", 1.0, np.float32)
    if eta:
        seg_t = _per_video(video_segment_times, n_vid, "video_segment_times", 0.0, np.float64)
        seg_n = _per_video(timestamp_lengths, n_vid, "timestamp_lengths", 0, np.int64)
        if (seg_n < 0).any():
            raise ValueError(f"timestamp_lengths must be >= 0, got {seg_n.tolist()}")
        seg_block = None if block_starts is None else _per_video(
            block_starts, n_vid, "block_starts", False, bool)

    merge = int(spatial_merge_size)
    grids = {"image": img, "video": vid}
    counters = {"image": 0, "video": 0}
    out = np.full((3, B, L), _PAD_POSITION, dtype=np.int64)
    deltas = np.zeros((B,), dtype=np.int64)
    for b in range(B):
        row = ids[b][mask[b]]
        items = _find_items(row, b, counters, grids, merge, image_token_id, video_token_id,
                            vision_start_token_id)
        rb = _RowBuilder(row.shape[0])
        p0 = None  # ETA: where the current video block starts
        for j, it in enumerate(items):
            if it.start < rb.cursor:
                raise ValueError(f"row {b}: item {j} at token {it.start} overlaps the previous one")
            if it.kind == "image" or not eta:
                s = 0.0 if it.kind == "image" else float(spg[it.index])
                rb.stock_item(it, merge, s, tokens_per_second)
                continue
            k = it.index
            n = int(seg_n[k])
            ts0 = it.start - n
            if ts0 < rb.cursor:
                raise ValueError(
                    f"row {b}: video segment {k} claims {n} timestamp tokens before its "
                    f"vision_start (token {it.start}) but only {it.start - rb.cursor} text "
                    f"tokens follow the previous item"
                )
            rb.text_until(ts0)
            first_in_row = p0 is None
            starts_block = first_in_row if seg_block is None else bool(seg_block[k])
            if first_in_row and not starts_block:
                raise ValueError(
                    f"row {b}: video segment {k} is the row's first segment but "
                    f"block_starts[{k}] is False"
                )
            if starts_block:
                p0 = rb.max + 1
            tau = p0 + int(np.floor(seg_t[k] * float(tokens_per_second)))
            # timestamp tokens and <|vision_start|>: tau, tau+1, ..., tau+n
            rb.put(it.start + 1, tau + np.arange(n + 1))
            t, h, w = it.grid[0], it.grid[1] // merge, it.grid[2] // merge
            rb._grid(tau + _temporal_offsets(t, float(spg[k]), tokens_per_second), p0, h, w)
            if rb.cursor < row.shape[0]:  # <|vision_end|>
                rb.put(rb.cursor + 1, np.array([tau + n + 1]))
        rb.text_until(row.shape[0])
        out[:, b, mask[b]] = rb.pos
        deltas[b] = rb.max + 1 - L
    for kind, grid in grids.items():
        if grid is not None and counters[kind] != grid.shape[0]:
            raise ValueError(
                f"{kind}_grid_thw has {grid.shape[0]} entries but the batch holds only "
                f"{counters[kind]} {kind} item(s)"
            )
    return out.astype(np.int32), deltas.astype(np.int32)
