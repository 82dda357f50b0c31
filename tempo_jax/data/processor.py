"""Qwen2.5-VL and Qwen3-VL video preprocessing in numpy + PIL (no torch).

Matches what the reference pipelines (qwen-vl-utils + transformers' Qwen2-VL processors for
Qwen2.5-VL, transformers' `Qwen3VLVideoProcessor` for Qwen3-VL) feed the vision tower, so a
checkpoint trained with the torch stack sees the same pixels here. The two families differ only
in constants, carried by a `PatchSpec` (`patch_spec(vision_config)` picks the family's):
Qwen2.5-VL cuts 14-pixel patches normalised with the CLIP mean/std, Qwen3-VL 16-pixel patches
with mean = std = 0.5; both fuse 2 frames per temporal patch and merge 2x2 patches per token.

* `smart_resize`: transformers' rule (multiples of 28, aspect kept, pixel count clamped);
  `smart_resize_video`: Qwen3-VL's variant (multiples of 32, the pixel bounds apply to the
  whole clip, tiny frames are scaled up first).
* `resize_frames`: qwen-vl-utils resizes videos with torchvision `resize(BICUBIC,
  antialias=True)` on uint8 tensors, which converts them to float32, runs the separable
  antialiased cubic (a = -0.5, support widened by the downscale factor; width pass, then
  height pass, no rounding in between), then clamps to [0, 255] and rounds half to even.
  PIL's resampler is the same kernel (torch's AA code was ported from it), but its 8-bit path
  rounds and clips between the two passes and uses fixed-point weights: up to 26/255 off on
  noisy frames. So each channel is resized as a PIL "F" (float32) image, in C, then clamped
  and rounded like torchvision: within 1/255 of torchvision at every down- and up-scale
  measured (`scripts/bench_data.py` reports it; `tests/test_processor.py` checks the float
  path against a numpy reference of the kernel).
* `normalize`: rescale 1/255 (in float64, then float32, as transformers' numpy processors) and
  the mean/std; or, with `fused_rescale` (Qwen3-VL, whose only processor is torch's),
  `(x - 255 mean) / (255 std)` in float32 as transformers' torch processors compute it. The two
  orders differ by about 1 ulp; each family uses its reference's, bit for bit.
* `patchify`: transformers' flattened patch layout, rows ordered (t, h/2, w/2, 2, 2) and
  columns (C, temporal, 14, 14), so row blocks of one temporal patch are contiguous.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from tempo_jax.models import families

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "FAMILIES", "HALF_MEAN", "HALF_STD", "IMAGE_FACTOR", "PatchSpec",
    "QWEN2_5_VL", "QWEN3_VL", "QWEN3_VL_VIDEO_MAX_PIXELS", "QWEN3_VL_VIDEO_MIN_PIXELS",
    "normalize", "patch_spec", "patchify", "process_segments", "process_video", "resize_frame",
    "resize_frames", "smart_resize", "smart_resize_video", "temporal_patch_times",
    "vision_family",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF_MEAN = HALF_STD = (0.5, 0.5, 0.5)  # Qwen3-VL (transformers' IMAGENET_STANDARD_MEAN/STD)
IMAGE_FACTOR = 28  # patch_size * merge_size
RESCALE = 1.0 / 255.0
# Qwen3-VL's per-clip pixel bounds, from the released checkpoints' video_preprocessor_config.json
# (`size`: shortest_edge, longest_edge); transformers' class defaults are 128*32*32, 768*32*32.
QWEN3_VL_VIDEO_MIN_PIXELS = 4096
QWEN3_VL_VIDEO_MAX_PIXELS = 25165824

QWEN2_5_VL, QWEN3_VL = families.FAMILIES
FAMILIES = families.FAMILIES


@dataclasses.dataclass(frozen=True)
class PatchSpec:
    """How a vision tower wants its frames cut and normalised (defaults: Qwen2.5-VL).

    `fused_rescale`: normalise as transformers' torch processors do (see `normalize`)."""

    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    fused_rescale: bool = False

    @property
    def factor(self) -> int:
        """Pixels per merged token side: frame sizes must be multiples of it."""
        return self.patch_size * self.merge_size

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `process_video` / `process_segments`."""
        return dataclasses.asdict(self)


_FAMILY_SPECS = {
    QWEN2_5_VL: PatchSpec(),
    QWEN3_VL: PatchSpec(patch_size=16, mean=HALF_MEAN, std=HALF_STD, fused_rescale=True),
}


def vision_family(config: Any) -> str:
    """The model family (`"qwen2_5_vl"` or `"qwen3_vl"`) of a vision or model config
    (`models.families.family_of`); Qwen2.5-VL, the project's original backbone, for a
    config of neither family's classes without a `family` attribute."""
    try:
        return families.family_of(config)
    except TypeError:
        return QWEN2_5_VL


def patch_spec(config: Any) -> PatchSpec:
    """The family's `PatchSpec` with the config's own patch, temporal patch and merge sizes
    (mean/std are preprocessing constants of the family, not fields of a model config)."""
    base = _FAMILY_SPECS[vision_family(config)]
    return dataclasses.replace(
        base,
        patch_size=int(getattr(config, "patch_size", base.patch_size)),
        temporal_patch_size=int(getattr(config, "temporal_patch_size", base.temporal_patch_size)),
        merge_size=int(getattr(config, "spatial_merge_size", base.merge_size)),
    )


def _bounded_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int,
                    num_frames: int = 1, temporal_factor: int = 1) -> tuple[int, int]:
    """The common core of both rules: round to `factor`, then rescale (aspect kept) when the
    clip's `t_bar * h * w` leaves `[min_pixels, max_pixels]`. With one frame and
    `temporal_factor=1` the arithmetic is exactly the per-image rule."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(
            f"absolute aspect ratio must be smaller than 200, got "
            f"{max(height, width) / min(height, width)}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize(
    height: int,
    width: int,
    factor: int = IMAGE_FACTOR,
    min_pixels: int = 56 * 56,
    max_pixels: int = 14 * 14 * 4 * 1280,
) -> tuple[int, int]:
    """Target (h, w): multiples of `factor`, aspect ratio kept, h*w clamped to the pixel range.

    Same arithmetic as transformers' `qwen2_vl.image_processing_qwen2_vl.smart_resize`, so
    grids (and therefore token counts) agree with the torch reference exactly.
    """
    return _bounded_resize(height, width, factor, min_pixels, max_pixels)


def smart_resize_video(
    num_frames: int,
    height: int,
    width: int,
    temporal_factor: int = 2,
    factor: int = 32,
    min_pixels: int = QWEN3_VL_VIDEO_MIN_PIXELS,
    max_pixels: int = QWEN3_VL_VIDEO_MAX_PIXELS,
) -> tuple[int, int]:
    """Qwen3-VL's target (h, w) for a clip of `num_frames` frames: transformers'
    `qwen3_vl.video_processing_qwen3_vl.smart_resize`, argument order included.

    Unlike `smart_resize` the bounds cap the whole clip (`t_bar * h * w`, `t_bar` the frame count
    rounded to `temporal_factor`), and a side under `factor` is first scaled up to it."""
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be larger than temporal_factor:{temporal_factor}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height = int(height * scale)
        width = int(width * scale)
    return _bounded_resize(height, width, factor, min_pixels, max_pixels, num_frames,
                           temporal_factor)


def temporal_patch_times(frame_times: Sequence[float] | np.ndarray,
                         temporal_patch_size: int = 2) -> np.ndarray:
    """Qwen3-VL's timestamp of each temporal patch: the mean of its first and last frame times,
    the last frame repeated to fill the final patch (transformers'
    `Qwen3VLProcessor._calculate_timestamps`, on real, possibly non-uniform, frame times)."""
    t = np.asarray(frame_times, dtype=np.float64).reshape(-1)
    if t.shape[0] == 0:
        raise ValueError("need at least one frame time")
    t = np.concatenate([t, np.repeat(t[-1:], -t.shape[0] % temporal_patch_size)])
    t = t.reshape(-1, temporal_patch_size)
    return (t[:, 0] + t[:, -1]) / 2


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [T, H, W, 3], got shape {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("need at least one frame")
    return frames


def _resize_into(frame: np.ndarray, out: np.ndarray) -> None:
    """uint8 [H, W, 3] -> float32 [3, h, w] (unrounded) into ``out``, one PIL "F" image per
    channel (PIL's float path keeps full precision between its two passes)."""
    height, width = out.shape[1:]
    for c, band in enumerate(Image.fromarray(frame).split()):
        out[c] = np.asarray(band.convert("F").resize((width, height), Image.Resampling.BICUBIC))


def resize_frames(frames: np.ndarray, height: int, width: int, *, threads: int = 1) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, height, width, 3], torchvision's antialiased bicubic.

    Float resampling per channel (PIL "F", a = -0.5 cubic with the antialias support), then
    clamp to [0, 255] and round half to even, as torchvision does for uint8 input. PIL
    releases the GIL while resampling, so ``threads > 1`` splits the frames over threads.
    """
    frames = _check_frames(frames)
    if frames.dtype != np.uint8:
        raise TypeError(f"resize_frames expects uint8 frames, got {frames.dtype}")
    if frames.shape[1:3] == (height, width):
        return frames
    work = np.empty((frames.shape[0], 3, height, width), dtype=np.float32)

    def one(i: int) -> None:
        _resize_into(np.ascontiguousarray(frames[i]), work[i])

    threads = max(1, min(int(threads), frames.shape[0]))
    if threads == 1:
        for i in range(frames.shape[0]):
            one(i)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(frames.shape[0])))
    np.clip(work, 0.0, 255.0, out=work)
    np.rint(work, out=work)  # half to even, as torch.round
    return np.ascontiguousarray(work.astype(np.uint8).transpose(0, 2, 3, 1))


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """One uint8 [H, W, 3] frame -> uint8 [height, width, 3] (see `resize_frames`)."""
    return resize_frames(np.asarray(frame)[None], height, width)[0]


def normalize(
    frames: np.ndarray,
    channel_axis: int = -1,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    fused_rescale: bool = False,
) -> np.ndarray:
    """Rescale by 1/255 and apply the mean/std (default CLIP's), returning float32.

    transformers' numpy processors rescale in float64 (x * (1/255)) before casting to float32;
    for the 256 uint8 levels float32 x / 255 gives the same bits (checked exhaustively in the
    tests) at a quarter of the memory traffic, so uint8 input takes that path. Other dtypes are
    taken as 0..255 values and follow transformers' float64 rescale.

    `fused_rescale`: transformers' torch processors fold the rescale into the statistics,
    `(x - float32(mean) * 255) / (float32(std) * 255)` in float32; Qwen3-VL's video processor
    is one of them, so its family normalises this way.
    """
    x = np.asarray(frames)
    axis = channel_axis % x.ndim
    if x.shape[axis] != 3:
        raise ValueError(f"expected 3 channels on axis {channel_axis}, got shape {x.shape}")
    shape = [1] * x.ndim
    shape[axis] = 3
    mean = np.asarray(mean, dtype=np.float32).reshape(shape)
    std = np.asarray(std, dtype=np.float32).reshape(shape)
    if fused_rescale:
        scale = np.float32(1.0 / RESCALE)  # torch multiplies a float32 tensor by it in float32
        y = x.astype(np.float32)
        y -= mean * scale
        y /= std * scale
        return y
    if x.dtype == np.uint8:
        y = x.astype(np.float32)
        y /= np.float32(255.0)
    else:
        y = (x.astype(np.float64) * RESCALE).astype(np.float32)
    y -= mean
    y /= std
    return y


def _pad_time(frames: np.ndarray, temporal_patch_size: int) -> np.ndarray:
    """Repeat the last frame until T is a multiple of temporal_patch_size (transformers)."""
    pad = -frames.shape[0] % temporal_patch_size
    if pad:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
    return frames


def _patch_layout(
    frames: np.ndarray, temporal_patch_size: int, patch_size: int, merge_size: int
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Channels-last [T, H, W, C] (T already padded) -> [N, C*tp*ps*ps], any dtype.

    Equivalent to transformers' channels-first reshape(gt, tp, C, gh/m, m, ps, gw/m, m, ps)
    + transpose(0, 3, 6, 4, 7, 2, 1, 5, 8), but with a single copy.
    """
    t, h, w, c = frames.shape
    factor = patch_size * merge_size
    if h % factor or w % factor:
        raise ValueError(f"frame size {(h, w)} must be a multiple of {factor}")
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(
        gt, temporal_patch_size, gh // merge_size, merge_size, patch_size,
        gw // merge_size, merge_size, patch_size, c,
    )
    # -> (gt, gh/m, gw/m, m_h, m_w, C, tp, ps_h, ps_w)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    rows = np.ascontiguousarray(x).reshape(gt * gh * gw, c * temporal_patch_size * patch_size**2)
    return rows, (gt, gh, gw)


def patchify(
    frames: np.ndarray,
    temporal_patch_size: int = 2,
    patch_size: int = 14,
    merge_size: int = 2,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Normalised float32 [T, H, W, 3] -> (pixel_values [N, 3*tp*ps*ps], grid (t, h, w)).

    T is padded to a multiple of temporal_patch_size by repeating the last frame, as
    transformers does, so an odd frame count never drops the tail.
    """
    frames = _pad_time(_check_frames(frames), temporal_patch_size)
    return _patch_layout(frames, temporal_patch_size, patch_size, merge_size)


def process_video(
    frames: np.ndarray,
    resized_hw: tuple[int, int] | None = None,
    temporal_patch_size: int = 2,
    patch_size: int = 14,
    merge_size: int = 2,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    fused_rescale: bool = False,
) -> dict[str, np.ndarray]:
    """uint8 [T, H, W, 3] -> {pixel_values_videos [N, 3*tp*ps*ps] float32, video_grid_thw [1, 3]}.

    Defaults: Qwen2.5-VL (1176 columns); `**patch_spec(vision).as_kwargs()` gives a family's.
    Resizes to `resized_hw` (None keeps the frame size, which must be a multiple of
    patch_size * merge_size), then patchifies the uint8 pixels and normalises in the patch
    layout: normalisation is elementwise, so the result equals
    `patchify(normalize(resize_frames(...)))` bit for bit, while the transpose moves 1 byte per
    value instead of 4.
    """
    frames = _check_frames(frames)
    if resized_hw is not None:
        frames = resize_frames(frames, int(resized_hw[0]), int(resized_hw[1]))
    frames = _pad_time(frames, temporal_patch_size)
    stats = {"mean": mean, "std": std, "fused_rescale": fused_rescale}
    if frames.dtype == np.uint8:
        rows, grid = _patch_layout(frames, temporal_patch_size, patch_size, merge_size)
        pixel_values = normalize(rows.reshape(rows.shape[0], 3, -1), channel_axis=1, **stats)
        pixel_values = pixel_values.reshape(rows.shape)
    else:
        pixel_values, grid = _patch_layout(
            normalize(frames, **stats), temporal_patch_size, patch_size, merge_size
        )
    return {
        "pixel_values_videos": pixel_values,
        "video_grid_thw": np.asarray([grid], dtype=np.int64),
    }


def process_segments(
    frames: np.ndarray,
    resized_hw: tuple[int, int] | None = None,
    temporal_patch_size: int = 2,
    patch_size: int = 14,
    merge_size: int = 2,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    fused_rescale: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Like `process_video`, but one grid (1, h, w) per temporal patch, for ETA.

    ETA places every temporal patch in its own vision segment (with its own timestamp), so the
    model needs K grids instead of one (K, h, w) grid; the pixel rows are unchanged because
    the layout already stores temporal patch k as the k-th contiguous block of h*w rows.
    Qwen3-VL does the same split itself (one timestamped segment per temporal patch).
    """
    out = process_video(frames, resized_hw, temporal_patch_size, patch_size, merge_size,
                        mean=mean, std=std, fused_rescale=fused_rescale)
    gt, gh, gw = (int(v) for v in out["video_grid_thw"][0])
    grids = np.tile(np.asarray([[1, gh, gw]], dtype=np.int64), (gt, 1))
    return out["pixel_values_videos"], grids
