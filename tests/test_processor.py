"""Video preprocessing against transformers' Qwen2-VL image processor and hand-derived layouts."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from tempo_jax.data import processor as P

hf_pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")


def test_smart_resize_matches_transformers_on_random_sizes():
    rng = np.random.default_rng(0)
    settings = [(56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28), (16 * 784, 16 * 784),
                (4 * 784, 200 * 784)]
    n = 0
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 4000, size=2))
        if max(h, w) / min(h, w) > 200:
            with pytest.raises(ValueError):
                P.smart_resize(h, w)
            continue
        lo, hi = settings[n % len(settings)]
        expected = hf_pil.smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
        assert P.smart_resize(h, w, 28, lo, hi) == expected, (h, w, lo, hi)
        n += 1
    assert n >= 200
    assert P.smart_resize(360, 640) == hf_pil.smart_resize(360, 640)
    with pytest.raises(ValueError):
        P.smart_resize(10, 2011)


def test_normalize_constants_and_exactness():
    levels = np.arange(256, dtype=np.uint8)
    frame = np.stack([levels, levels, levels], axis=-1)[None]  # [1, 256, 3]
    out = P.normalize(frame)
    assert out.dtype == np.float32
    # transformers' exact op order: float64 rescale -> float32, then (x - mean) / std in float32
    resc = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    for c, (m, s) in enumerate(zip(P.CLIP_MEAN, P.CLIP_STD, strict=True)):
        ref = (resc - np.float32(m)) / np.float32(s)
        np.testing.assert_array_equal(out[0, :, c], ref)
        np.testing.assert_allclose(out[0, :, c], (np.arange(256) / 255 - m) / s, atol=1e-6)
    assert P.CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert P.CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    # float (0..255) input takes transformers' float64 path and lands on the same bits
    np.testing.assert_array_equal(P.normalize(frame.astype(np.float32)), out)
    # channel axis elsewhere
    np.testing.assert_array_equal(P.normalize(frame.transpose(0, 2, 1), channel_axis=1),
                                  out.transpose(0, 2, 1))


def test_repeated_frame_equals_transformers_image_processor():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(100, 170, 3), dtype=np.uint8)
    lo, hi = 56 * 56, 64 * 28 * 28
    h, w = P.smart_resize(100, 170, 28, lo, hi)
    resized = P.resize_frames(np.stack([img, img]), h, w)
    ours, grid = P.patchify(P.normalize(resized))

    # transformers on our resized pixels (do_resize=False): the same rows, grid and values
    proc = hf_pil.Qwen2VLImageProcessorPil(do_resize=False)
    ref = proc(images=[resized[0]], return_tensors="np")
    assert tuple(ref["image_grid_thw"][0]) == grid == (1, h // 14, w // 14)
    np.testing.assert_allclose(ours, ref["pixel_values"], atol=1e-6, rtol=0)
    # with transformers' own resize (PIL's 8-bit bicubic, which rounds between its passes and
    # is not what the torchvision video path does) the grid is the same and the pixels agree
    # on average (on this uniform-noise image PIL's clipped intermediate is up to ~20 levels
    # off at single pixels)
    full = hf_pil.Qwen2VLImageProcessorPil(min_pixels=lo, max_pixels=hi)(
        images=[img], return_tensors="np")
    assert tuple(full["image_grid_thw"][0]) == grid
    assert np.abs(ours - full["pixel_values"]).mean() < 1 / 255 / min(P.CLIP_STD)
    # odd frame count: the last frame is repeated, so [img] alone gives the same rows
    single, grid1 = P.patchify(P.normalize(resized[:1]))
    assert grid1 == grid
    np.testing.assert_array_equal(single, ours)


def test_patch_layout_hand_derived_for_different_frames():
    tp, ps, ms = 2, 14, 2
    rng = np.random.default_rng(2)
    T, H, W = 4, 56, 84
    frames = rng.standard_normal((T, H, W, 3)).astype(np.float32)
    pv, (gt, gh, gw) = P.patchify(frames, tp, ps, ms)
    assert (gt, gh, gw) == (2, 4, 6)
    assert pv.shape == (gt * gh * gw, 3 * tp * ps * ps)
    for n in range(pv.shape[0]):
        # row n = (((t_idx * gh/ms + bh) * gw/ms + bw) * ms + mh) * ms + mw
        mw = n % ms
        mh = (n // ms) % ms
        bw = (n // (ms * ms)) % (gw // ms)
        bh = (n // (ms * ms * (gw // ms))) % (gh // ms)
        t_idx = n // (gh * gw)
        for c in range(3):
            for t in range(tp):
                for y in range(ps):
                    row = (bh * ms + mh) * ps + y
                    cols = (bw * ms + mw) * ps + np.arange(ps)
                    col0 = c * tp * ps * ps + t * ps * ps + y * ps
                    np.testing.assert_array_equal(
                        pv[n, col0:col0 + ps], frames[t_idx * tp + t, row, cols, c])


def test_patchify_matches_transformers_channels_first_formula():
    rng = np.random.default_rng(3)
    frames = rng.standard_normal((5, 28, 56, 3)).astype(np.float32)
    pv, (gt, gh, gw) = P.patchify(frames)
    padded = np.concatenate([frames, frames[-1:]], 0).transpose(0, 3, 1, 2)  # [T, C, H, W]
    x = padded.reshape(gt, 2, 3, gh // 2, 2, 14, gw // 2, 2, 14)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gt * gh * gw, 3 * 2 * 14 * 14)
    np.testing.assert_array_equal(pv, x)


def test_process_video_and_segments_share_rows():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, size=(7, 90, 160, 3), dtype=np.uint8)
    hw = P.smart_resize(90, 160, 28, 4 * 784, 24 * 784)
    out = P.process_video(frames, hw)
    pv, grid_thw = out["pixel_values_videos"], out["video_grid_thw"]
    assert pv.dtype == np.float32 and grid_thw.shape == (1, 3)
    gt, gh, gw = (int(v) for v in grid_thw[0])
    assert (gt, gh * 14, gw * 14) == (4, *hw)
    # fused path == the plain composition, bit for bit
    ref, grid = P.patchify(P.normalize(P.resize_frames(frames, *hw)))
    assert grid == (gt, gh, gw)
    np.testing.assert_array_equal(pv, ref)

    seg_pv, grids = P.process_segments(frames, hw)
    np.testing.assert_array_equal(seg_pv, pv)
    np.testing.assert_array_equal(grids, np.tile([[1, gh, gw]], (gt, 1)))
    # segment k == the rows of temporal patch k processed on its own
    per = gh * gw
    padded = np.concatenate([frames, frames[-1:]], 0)
    for k in range(gt):
        alone = P.process_video(padded[2 * k:2 * k + 2], hw)["pixel_values_videos"]
        np.testing.assert_array_equal(seg_pv[k * per:(k + 1) * per], alone)


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _aa_weights(in_size: int, out_size: int) -> np.ndarray:
    """Antialiased cubic weights [out, in]: kernel stretched by the downscale factor."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    wts = np.zeros((out_size, in_size))
    for o in range(out_size):
        center = (o + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        idx = np.arange(lo, hi)
        k = _cubic((idx - center + 0.5) / stretch)
        wts[o, idx] = k / k.sum()
    return wts


SIZES = [((90, 160), (56, 84)), ((360, 640), (252, 448)), ((37, 53), (84, 112)),
         ((200, 120), (28, 28)), ((360, 640), (364, 672)), ((96, 128), (196, 252))]


def _test_image(src: tuple[int, int], noise: float) -> np.ndarray:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:src[0], 0:src[1]]
    smooth = 127 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy[..., None] / 5.0 + np.arange(3))
    return np.clip(smooth + rng.normal(0, noise, (*src, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_is_the_float_antialiased_cubic(src, dst):
    """resize_frames = the a=-0.5 cubic with its support widened by the downscale factor,
    applied separably in float (width, then height), clamped and rounded once at the end:
    torchvision's uint8 path. PIL's 8-bit path (rounding between passes) is not."""
    wh, ww = _aa_weights(src[0], dst[0]), _aa_weights(src[1], dst[1])

    def reference(img: np.ndarray) -> np.ndarray:
        mid = np.tensordot(img.astype(np.float64), ww, axes=([1], [1]))  # [h, c, W']
        out = np.tensordot(wh, mid, axes=([1], [0]))  # [H', c, W']
        return np.clip(np.round(out), 0, 255).astype(np.int32).transpose(0, 2, 1)

    for noise in (0.0, 40.0):  # smooth, and noisy content whose overshoots get clamped
        img = _test_image(src, noise)
        ours = P.resize_frames(img[None], *dst)[0].astype(np.int32)
        diff = np.abs(ours - reference(img))
        assert diff.max() <= 1 and diff.mean() < 0.01, (noise, diff.max(), diff.mean())
    # Threads give the same bits; PIL's 8-bit resize is measurably off on noisy content.
    img = _test_image(src, 40.0)
    both = P.resize_frames(np.stack([img, img[::-1]]), *dst, threads=2)
    np.testing.assert_array_equal(both[0], P.resize_frames(img[None], *dst)[0])
    np.testing.assert_array_equal(both[1], P.resize_frame(img[::-1], *dst))
    pil8 = np.asarray(Image.fromarray(img).resize(dst[::-1], Image.Resampling.BICUBIC))
    assert np.abs(pil8.astype(np.int32) - reference(img)).max() >= 1


@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_matches_torchvision_uint8_path(src, dst):
    """torchvision.transforms.functional.resize(uint8, BICUBIC, antialias=True) is, in its
    source: float32 -> F.interpolate(bicubic, antialias=True, align_corners=False) -> clamp
    [0, 255] -> round -> uint8. torch alone reproduces it (torchvision is not needed)."""
    torch = pytest.importorskip("torch")
    for noise in (0.0, 40.0):
        img = _test_image(src, noise)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
        ref = torch.nn.functional.interpolate(x, size=list(dst), mode="bicubic",
                                              align_corners=False, antialias=True)
        ref = ref.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        ours = P.resize_frames(img[None], *dst)[0]
        diff = np.abs(ours.astype(np.int32) - ref.astype(np.int32))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.005, (noise, diff.max())


def test_resize_keeps_size_and_rejects_bad_input():
    frames = np.zeros((2, 56, 56, 3), np.uint8)
    assert P.resize_frames(frames, 56, 56) is frames
    with pytest.raises(TypeError):
        P.resize_frames(frames.astype(np.float32), 28, 28)
    with pytest.raises(ValueError):
        P.patchify(np.zeros((2, 30, 56, 3), np.float32))
    assert math.prod(P.process_video(frames)["video_grid_thw"][0]) == 16
