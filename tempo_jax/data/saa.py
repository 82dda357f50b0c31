"""SAA, Self-adaptive Attention Allocation (ours, in the spirit of Tempo-R0).

The vision tokens of a video are a fixed budget. SAA spends it where the content changes:

1. cheap grey thumbnails at a dense candidate rate (`candidate_fps`, 4 fps by default);
2. `change_scores`: mean absolute difference to the previous thumbnail, normalised, smoothed;
3. `frame_times`: a sampling density over time proportional to `floor + score**alpha`,
   clipped to a local frame rate in `[min_fps, max_fps]`, sampled by its inverse CDF. Qwen2.5-VL
   fuses 2 consecutive frames into one temporal patch, so the CDF places *pairs*, and the two
   frames of a pair sit at most `pair_gap` seconds apart (one moment per patch);
4. `plan`: frame count and `smart_resize` resolution chosen together so the merged visual
   tokens never exceed `max_visual_tokens`. The backbone's `PatchSpec` (`processor.patch_spec`
   of its vision config) sets the resize factor: frames are multiples of 28 pixels for
   Qwen2.5-VL (14-pixel patches, merge 2), of 32 for Qwen3-VL (16-pixel patches).

`enabled=False` gives the stock uniform sampling (Qwen's 2 fps; spread over the whole video when
the budget affords fewer frames) under the same budget logic, for ablations. The plan carries
the real time of every frame; nothing downstream may assume uniform spacing (ETA uses
`Plan.segment_times`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from PIL import Image

from tempo_jax.data.processor import PatchSpec, smart_resize

__all__ = [
    "PIXEL_UNIT_FACTOR", "Plan", "SAAConfig", "candidate_times", "change_scores", "frame_times",
    "grey_thumbnails", "plan",
]

# SAAConfig's pixel bounds count pixels of 28x28-pixel merged tokens (Qwen2.5-VL's 14-pixel
# patches x merge 2, qwen-vl-utils' units); `SAAConfig.pixel_bounds` converts them
PIXEL_UNIT_FACTOR = 28
TEMPORAL_PATCH = 2  # frames per temporal patch: the CDF places pairs (both families' value)


@dataclasses.dataclass(frozen=True)
class SAAConfig:
    """SAA settings; saved beside every checkpoint (they are part of the model's input).

    Units, so that one setting means the same for every backbone family:
    `max_visual_tokens` counts merged visual tokens, i.e. LLM tokens, which cost the same
    whatever the vision tower (and each is `merge_size**2` patches for the tower in both
    families), so the budget fixes the sequence length. `min_pixels` / `max_pixels` bound one
    frame in Qwen2.5-VL pixels (`PIXEL_UNIT_FACTOR` = 28: 28x28 pixels per merged token, the
    qwen-vl-utils convention their defaults come from), i.e. they stand for 16 and 768 merged
    tokens per frame; for a backbone whose merged token covers f x f pixels they scale by
    (f / 28)**2 (`pixel_bounds(f)`). So under the same settings a Qwen3-VL video (f = 32) gets
    the same token budget and per-frame token range as a Qwen2.5-VL one; where the budget binds,
    the same frames and token grid at (32/28)**2 = 1.31x the pixels (elsewhere rounding the
    frame to 32 rather than 28 pixels may give a slightly different grid).
    """

    enabled: bool = True
    candidate_fps: float = 4.0  # rate of the grey thumbnails the change scores come from
    smooth: int = 3  # moving-average window over candidates
    score_noise: float = 4.0  # grey levels of change treated as noise when normalising
    floor: float = 0.2  # density floor, so static stretches still get frames
    alpha: float = 1.0  # density exponent on the change score
    mean_fps: float = 2.0  # mean rate SAA aims for before the token budget
    min_fps: float = 0.5  # local frame-rate band (scaled down with the mean when the
    max_fps: float = 4.0  # budget forces fewer frames than mean_fps implies)
    uniform_fps: float = 2.0  # enabled=False: Qwen's default uniform rate
    max_visual_tokens: int = 3584  # merged tokens per video
    # Per-frame pixel floor. qwen-vl-utils uses 128*28*28; under a 3584-token budget that
    # caps a video at 56 frames, too few to localise events in minutes-long videos, so we
    # allow down to 16 merged tokens per frame (e.g. 84x140 for 16:9) before dropping frames.
    min_pixels: int = 16 * 28 * 28
    max_pixels: int = 768 * 28 * 28  # qwen-vl-utils VIDEO_MAX_PIXELS
    max_frames: int = 768  # qwen-vl-utils FPS_MAX_FRAMES
    min_frames: int = 4  # qwen-vl-utils FPS_MIN_FRAMES
    pair_gap: float = 0.25  # max seconds between the 2 frames of a temporal patch
    jitter: float = 0.0  # in [0, 1): random shift of pair quantiles (training augmentation)
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "candidate_fps > 0": self.candidate_fps > 0,
            "smooth >= 1": self.smooth >= 1,
            "score_noise > 0": self.score_noise > 0,
            "floor >= 0": self.floor >= 0,
            "alpha > 0": self.alpha > 0,
            "0 < min_fps <= max_fps": 0 < self.min_fps <= self.max_fps,
            "mean_fps > 0": self.mean_fps > 0,
            "uniform_fps > 0": self.uniform_fps > 0,
            "max_visual_tokens >= 1": self.max_visual_tokens >= 1,
            "0 < min_pixels <= max_pixels": 0 < self.min_pixels <= self.max_pixels,
            "2 <= min_frames <= max_frames": 2 <= self.min_frames <= self.max_frames,
            "pair_gap > 0": self.pair_gap > 0,
            "0 <= jitter < 1": 0 <= self.jitter < 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid SAAConfig: {', '.join(bad)}")

    def pixel_bounds(self, factor: int = PIXEL_UNIT_FACTOR) -> tuple[int, int]:
        """(min, max) pixels per frame for frames cut in `factor` x `factor`-pixel merged tokens:
        `min_pixels` and `max_pixels` scaled by (factor / 28)**2 and rounded (unchanged at 28)."""
        unit, area = PIXEL_UNIT_FACTOR**2, factor * factor
        return ((self.min_pixels * area + unit // 2) // unit,
                (self.max_pixels * area + unit // 2) // unit)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAAConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown SAAConfig keys: {sorted(unknown)}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Which frames to decode, at what size, and the resulting vision grid."""

    times: np.ndarray  # [n] seconds, sorted, n even; frames 2k and 2k+1 form temporal patch k
    resized_hw: tuple[int, int]  # multiples of the backbone's factor (patch x merge)
    grid_thw: tuple[int, int, int]  # (n/2, h/patch, w/patch)
    num_visual_tokens: int  # merged tokens = n/2 * (h/factor) * (w/factor)

    @property
    def n_frames(self) -> int:
        return int(self.times.shape[0])

    @property
    def segment_times(self) -> np.ndarray:
        """Real start time t_k of each temporal patch (ETA's timestamps)."""
        return self.times[0::TEMPORAL_PATCH]


def candidate_times(duration: float, candidate_fps: float = 4.0) -> np.ndarray:
    """Times of the dense thumbnails the change scores are computed on (at least one)."""
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    n = max(1, math.ceil(duration * candidate_fps - 1e-9))
    return np.arange(n, dtype=np.float64) / candidate_fps


def grey_thumbnails(frames: np.ndarray, max_side: int = 64) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 grey [T, h, w] with max(h, w) <= max_side.

    Tiny thumbnails make the change score cheap and insensitive to pixel noise.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    t, h, w, _ = frames.shape
    s = min(1.0, max_side / max(h, w))
    th, tw = max(1, round(h * s)), max(1, round(w * s))
    out = np.empty((t, th, tw), dtype=np.uint8)
    for i, f in enumerate(frames):
        img = Image.fromarray(np.ascontiguousarray(f)).convert("L")
        out[i] = np.asarray(img.resize((tw, th), Image.Resampling.BOX))
    return out


def change_scores(grey: np.ndarray, smooth: int = 3, noise: float = 4.0) -> np.ndarray:
    """[T, h, w] grey thumbnails -> [T] change scores in [0, 1].

    Score t is the mean absolute difference between thumbnails t and t-1 (the first frame
    copies the second), min-max normalised so the allocation is relative to this video's own
    activity, with a `noise` floor (grey levels) on the range so that a static video's
    compression flicker is not blown up into fake activity; then a moving average over
    `smooth` candidates, so one noisy thumbnail cannot grab frames.
    """
    g = np.asarray(grey)
    if g.ndim != 3:
        raise ValueError(f"expected grey thumbnails [T, h, w], got shape {g.shape}")
    t = g.shape[0]
    if t == 0:
        raise ValueError("need at least one thumbnail")
    if t == 1:
        return np.zeros(1)
    g = g.astype(np.float32)
    d = np.abs(np.diff(g, axis=0)).mean(axis=(1, 2), dtype=np.float64)
    d = np.concatenate([d[:1], d])
    s = (d - d.min()) / max(float(d.max() - d.min()), noise)
    k = int(smooth)
    if k > 1:
        padded = np.pad(s, (k // 2, k - 1 - k // 2), mode="edge")
        s = np.convolve(padded, np.full(k, 1.0 / k), mode="valid")
    return np.clip(s, 0.0, 1.0)


def _water_fill(w: np.ndarray, lens: np.ndarray, total: float, lo: float, hi: float,
                max_iter: int = 200) -> np.ndarray:
    """Rates r_i ∝ w_i with sum(r_i * len_i) = total and lo <= r_i <= hi.

    Clip-and-renormalise that fixes only the side with the larger violated mass per round:
    clipping that side moves the free rates away from it, so a fixed bin never needs to be
    released again, and it converges in a few rounds.
    """
    r = np.zeros_like(w)
    fixed = np.zeros(w.shape, dtype=bool)
    for _ in range(max_iter):
        free = ~fixed
        if not free.any():
            break
        remaining = total - float((r[fixed] * lens[fixed]).sum())
        denom = float((w[free] * lens[free]).sum())
        if denom > 0:
            r[free] = w[free] * (remaining / denom)
        else:
            r[free] = remaining / max(float(lens[free].sum()), 1e-12)
        over = free & (r > hi)
        under = free & (r < lo)
        excess = float(((r - hi) * lens)[over].sum())
        deficit = float(((lo - r) * lens)[under].sum())
        if excess <= 1e-12 * total and deficit <= 1e-12 * total:
            break
        if excess >= deficit:
            r[over], fixed = hi, fixed | over
        else:
            r[under], fixed = lo, fixed | under
    return np.clip(r, lo, hi)


def _uniform_times(duration: float, n: int, fps: float) -> np.ndarray:
    """Uniform sampling over the whole video.

    When the budget affords the fps-implied frame count (round(duration * fps), made even) and
    those frames fit, frames are k/fps from t=0 (the stock 2 fps layout). Otherwise (the token
    budget or max_frames cut the count, or a short video needs min_frames) the n frames are
    spread evenly from the first frame to the end, as qwen-vl-utils does
    (`linspace(0, total_frames - 1, nframes)`), so a long video is covered to its end rather
    than only over its first n/fps seconds.
    """
    full = int(round(duration * fps))
    if n >= full - full % TEMPORAL_PATCH and (n - 1) / fps <= duration:
        return np.arange(n, dtype=np.float64) / fps
    return np.linspace(0.0, duration, n, dtype=np.float64)


def frame_times(
    cand_times: np.ndarray | None,
    scores: np.ndarray | None,
    duration: float,
    n_frames: int,
    cfg: SAAConfig | None = None,
) -> np.ndarray:
    """Times of `n_frames` frames (even), crowded where the change score is high.

    Each candidate owns the interval between the midpoints to its neighbours. The pair rate
    there is ∝ `floor + score**alpha`, clipped to half the [min_fps, max_fps] band (the band
    scales down with the mean rate when the budget allows fewer frames than `mean_fps`), and
    pair k starts at the inverse CDF of k + 1/2 pairs; its partner follows after
    min(pair_gap, half the gap to the next pair). No scores: uniform density.
    """
    cfg = cfg or SAAConfig()
    duration = float(duration)
    n = int(n_frames)
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if n < 2 or n % TEMPORAL_PATCH:
        raise ValueError(f"n_frames must be even and >= 2, got {n}")
    if not cfg.enabled:
        return _uniform_times(duration, n, cfg.uniform_fps)
    m = n // TEMPORAL_PATCH

    if cand_times is None or scores is None or len(cand_times) == 0:
        c, s = np.zeros(1), np.zeros(1)
    else:
        c = np.asarray(cand_times, dtype=np.float64)
        s = np.asarray(scores, dtype=np.float64)
        if c.shape != s.shape or c.ndim != 1:
            raise ValueError(f"cand_times {c.shape} and scores {s.shape} must be equal 1-D")
        order = np.argsort(c, kind="stable")
        c, s = np.clip(c[order], 0.0, duration), s[order]
    edges = np.concatenate([[0.0], 0.5 * (c[1:] + c[:-1]), [duration]])
    lens = np.diff(edges)
    w = cfg.floor + np.clip(np.nan_to_num(s), 0.0, None) ** cfg.alpha
    keep = lens > 0
    edges = np.concatenate([[0.0], edges[1:][keep]])
    lens, w = lens[keep], w[keep]
    if not (w > 0).any():
        w = np.ones_like(w)

    rate = n / duration  # mean frames per second actually affordable
    scale = min(1.0, rate / cfg.mean_fps)
    lo = min(cfg.min_fps * scale, rate) / TEMPORAL_PATCH  # pairs per second
    hi = max(cfg.max_fps * scale, rate) / TEMPORAL_PATCH
    r = _water_fill(w, lens, float(m), lo, hi)
    cum = np.concatenate([[0.0], np.cumsum(r * lens)])
    cum *= m / cum[-1]

    targets = np.arange(m, dtype=np.float64) + 0.5
    if cfg.jitter > 0:
        rng = np.random.default_rng(cfg.seed)
        targets = targets + cfg.jitter * rng.uniform(-0.5, 0.5, size=m)
    starts = np.interp(targets, cum, edges)
    gaps = np.diff(np.concatenate([starts, [duration]]))
    partners = starts + np.minimum(cfg.pair_gap, 0.5 * gaps)
    times = np.stack([starts, partners], axis=1).reshape(-1)
    return np.clip(times, 0.0, duration)


def _fit_budget(height: int, width: int, n0: int, cfg: SAAConfig,
                factor: int) -> tuple[int, tuple[int, int]]:
    """Largest frame count <= n0, then the largest resolution, within the token budget.

    Per temporal patch we may spend budget // (n/2) merged tokens, i.e. that many
    `factor` x `factor` pixel cells per frame (capped at the max pixel bound). If even the min
    pixel bound does not fit, frames are dropped (two at a time); only at a single temporal
    patch may the frame go below it.
    """
    budget = cfg.max_visual_tokens
    token_px = factor * factor
    min_px, max_px = cfg.pixel_bounds(factor)
    tok_min = math.ceil(min_px / token_px)
    n = min(n0, TEMPORAL_PATCH * max(1, budget // tok_min))
    while n >= TEMPORAL_PATCH:
        per_patch = budget // (n // TEMPORAL_PATCH)
        px = min(max_px, per_patch * token_px)
        floor_px = min_px if n > TEMPORAL_PATCH else token_px
        while px >= floor_px and px >= token_px:
            h, w = smart_resize(height, width, factor, min(min_px, px), px)
            if (h // factor) * (w // factor) <= per_patch:
                return n, (h, w)
            px -= token_px  # smart_resize's rounding overshot: shrink and retry
        n -= TEMPORAL_PATCH
    raise ValueError(
        f"a {height}x{width} frame cannot fit max_visual_tokens={budget} even as one temporal "
        "patch"
    )


def plan(
    duration: float,
    frame_hw: tuple[int, int],
    cand_times: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    cfg: SAAConfig | None = None,
    spec: PatchSpec | None = None,
) -> Plan:
    """Frame times, resolution and grid for one video, within the visual-token budget.

    Start from the fps-implied frame count (clipped to [min_frames, max_frames], even), give
    each frame the largest resolution the budget allows, and drop frames only when even
    `min_pixels` per frame would overflow it. With `cfg.enabled` the frames follow the change
    scores (`frame_times`); otherwise they are uniform at `uniform_fps`. `spec`: the vision
    tower's patch geometry (`processor.patch_spec(vision_config)`; default Qwen2.5-VL's).
    """
    cfg = cfg or SAAConfig()
    spec = spec or PatchSpec()
    if spec.temporal_patch_size != TEMPORAL_PATCH:
        raise ValueError(f"SAA places frames in pairs; the tower fuses "
                         f"{spec.temporal_patch_size} frames per temporal patch")
    factor = spec.factor
    duration = float(duration)
    if not duration > 0:
        raise ValueError(f"duration must be positive, got {duration}")
    height, width = (int(v) for v in frame_hw)
    fps = cfg.mean_fps if cfg.enabled else cfg.uniform_fps
    n0 = int(np.clip(round(duration * fps), cfg.min_frames, cfg.max_frames))
    n0 = max(TEMPORAL_PATCH, n0 - n0 % TEMPORAL_PATCH)
    n, (h, w) = _fit_budget(height, width, n0, cfg, factor)
    times = frame_times(cand_times, scores, duration, n, cfg)
    m = n // TEMPORAL_PATCH
    tokens = m * (h // factor) * (w // factor)
    if tokens > cfg.max_visual_tokens:  # _fit_budget guarantees this; keep it loud
        raise AssertionError(f"plan overflows the budget: {tokens} > {cfg.max_visual_tokens}")
    return Plan(times=times, resized_hw=(h, w),
                grid_thw=(m, h // spec.patch_size, w // spec.patch_size),
                num_visual_tokens=int(tokens))
