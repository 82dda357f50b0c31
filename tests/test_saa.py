"""SAA: change scores, content-adaptive frame times and the visual-token budget."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tempo_jax.data import saa as S
from tempo_jax.data.processor import PatchSpec, patch_spec, smart_resize

QWEN3_VL_SPEC = patch_spec(SimpleNamespace(family="qwen3_vl"))  # 16-pixel patches: factor 32


def _busy_scores(duration: float = 20.0, lo: float = 4.0, hi: float = 6.0):
    c = S.candidate_times(duration, 4.0)
    return c, np.where((c >= lo) & (c < hi), 1.0, 0.0)


def _density_ratio(times: np.ndarray, duration: float, lo: float, hi: float) -> float:
    inside = (times >= lo) & (times < hi)
    return (inside.sum() / (hi - lo)) / ((~inside).sum() / (duration - (hi - lo)))


def test_static_video_gives_near_uniform_pairs():
    for duration in (7.3, 20.0, 95.0):
        c = S.candidate_times(duration)
        p = S.plan(duration, (360, 640), c, np.zeros_like(c))
        gaps = np.diff(p.segment_times)
        assert gaps.max() / gaps.min() < 1.3
        # the same from real (static) thumbnails through change_scores
        grey = np.full((len(c), 18, 32), 90, np.uint8)
        p2 = S.plan(duration, (360, 640), c, S.change_scores(grey))
        np.testing.assert_allclose(p2.times, p.times)


def test_busy_stretch_gets_more_frames_per_second():
    cfg = S.SAAConfig()
    c, s = _busy_scores()
    p = S.plan(20.0, (360, 640), c, s, cfg)
    assert _density_ratio(p.times, 20.0, 4.0, 6.0) > 2.0
    # the local rate stays within the band: at most max_fps inside, at least min_fps outside
    assert ((p.times >= 4) & (p.times < 6)).sum() / 2.0 <= cfg.max_fps + 1e-9
    outside = np.diff(p.segment_times[(p.segment_times < 3) | (p.segment_times > 7)])
    assert (2.0 / outside[outside < 2.5]).min() >= cfg.min_fps - 1e-9

    # a long video whose budget forces < mean_fps still allocates adaptively (scaled band)
    c, s = _busy_scores(1800.0, 600.0, 780.0)
    p = S.plan(1800.0, (720, 1280), c, s, cfg)
    assert p.n_frames < 1800 * cfg.mean_fps
    assert _density_ratio(p.times, 1800.0, 600.0, 780.0) > 2.0


def test_end_to_end_from_synthetic_video():
    fps, duration = 8, 20.0
    t = np.arange(int(fps * duration)) / fps
    frames = np.full((len(t), 72, 128, 3), 60, np.uint8)
    frames[:, 20:50, 30:90] = (200, 40, 40)  # static object
    for i, ti in enumerate(t):
        if 4.0 <= ti < 6.0:  # a square races across the frame during [4 s, 6 s)
            x = int((ti - 4.0) / 2.0 * 100)
            frames[i, 10:40, x:x + 28] = 255
    cand = S.candidate_times(duration, 4.0)
    idx = np.minimum(np.round(cand * fps).astype(int), len(t) - 1)
    scores = S.change_scores(S.grey_thumbnails(frames[idx], 32))
    assert scores.shape == cand.shape and 0 <= scores.min() and scores.max() <= 1
    busy = (cand >= 4) & (cand < 6)
    assert scores[busy].mean() > 0.5 and scores[~busy & ((cand < 3) | (cand > 7))].max() == 0
    p = S.plan(duration, frames.shape[1:3], cand, scores)
    assert _density_ratio(p.times, duration, 4.0, 6.0) > 2.0


def test_change_scores_definition():
    grey = np.zeros((6, 4, 4), np.uint8)
    grey[3:] = 100  # one cut between thumbnails 2 and 3
    raw = S.change_scores(grey, smooth=1)
    np.testing.assert_allclose(raw, [0, 0, 0, 1, 0, 0])
    sm = S.change_scores(grey, smooth=3)
    np.testing.assert_allclose(sm, [0, 0, 1 / 3, 1 / 3, 1 / 3, 0])
    grey2 = grey.copy()
    grey2[0] = 100  # first score copies the second
    assert S.change_scores(grey2, smooth=1)[0] == S.change_scores(grey2, smooth=1)[1] == 1
    # flicker below the noise floor stays small: a static video is not "busy"
    rng = np.random.default_rng(0)
    flicker = np.clip(100 + rng.normal(0, 1, (40, 16, 16)), 0, 255).astype(np.uint8)
    assert S.change_scores(flicker).max() < 0.25
    assert S.change_scores(grey[:1]).tolist() == [0.0]


@pytest.mark.parametrize("spec", [None, QWEN3_VL_SPEC], ids=["qwen2_5_vl", "qwen3_vl"])
def test_budget_and_invariants_on_random_videos(spec):
    rng = np.random.default_rng(0)
    f, ps = (spec or PatchSpec()).factor, (spec or PatchSpec()).patch_size
    for i in range(300):
        duration = float(np.exp(rng.uniform(np.log(0.5), np.log(7200.0))))
        hw = (int(rng.integers(64, 2161)), int(rng.integers(64, 3841)))
        budget = int(rng.integers(256, 16385))
        enabled = i % 4 != 0
        cfg = S.SAAConfig(enabled=enabled, max_visual_tokens=budget,
                          jitter=0.5 if i % 3 == 0 else 0.0, seed=i)
        c = S.candidate_times(duration, cfg.candidate_fps)
        s = rng.random(len(c)) ** 3
        p = S.plan(duration, hw, c, s, cfg, spec)
        n, (h, w) = p.n_frames, p.resized_hw
        assert p.num_visual_tokens <= budget
        assert n >= 2 and n % 2 == 0 and n <= cfg.max_frames
        assert p.num_visual_tokens == n // 2 * (h // f) * (w // f)
        assert p.grid_thw == (n // 2, h // ps, w // ps)
        assert h % f == 0 and w % f == 0 and p.grid_thw[1] % 2 == 0 == p.grid_thw[2] % 2
        assert np.all(np.diff(p.times) >= 0)
        assert p.times[0] >= 0 and p.times[-1] <= duration
        pairs = p.times.reshape(-1, 2)
        if enabled:
            assert np.all(pairs[:, 1] - pairs[:, 0] <= cfg.pair_gap + 1e-9)
            assert np.all(np.diff(pairs[:, 0]) > 0)
        else:
            np.testing.assert_allclose(np.diff(p.times), p.times[1] - p.times[0], atol=1e-9)
        # frames are only dropped when even min_pixels per frame would overflow the budget
        fps = cfg.mean_fps if enabled else cfg.uniform_fps
        n0 = int(np.clip(round(duration * fps), cfg.min_frames, cfg.max_frames)) // 2 * 2
        assert n <= n0
        if n < n0:
            per = budget // ((n + 2) // 2)
            lo = cfg.pixel_bounds(f)[0]
            hm, wm = smart_resize(*hw, f, lo, lo)
            assert per * f * f < lo or (hm // f) * (wm // f) > per


def test_factor_and_units_per_family():
    """The budget counts merged tokens in every family and the pixel bounds scale with the
    factor squared, so a budget-bound video gets the same frames and token grid from a
    Qwen3-VL tower (factor 32) as from Qwen2.5-VL's (28), at (32/28)**2 the pixels."""
    cfg = S.SAAConfig()
    assert cfg.pixel_bounds() == cfg.pixel_bounds(28) == (cfg.min_pixels, cfg.max_pixels)
    assert cfg.pixel_bounds(32) == (16 * 32 * 32, 768 * 32 * 32)
    c, s = _busy_scores()
    a = S.plan(20.0, (1080, 1920), c, s)
    b = S.plan(20.0, (1080, 1920), c, s, spec=QWEN3_VL_SPEC)
    np.testing.assert_array_equal(a.times, b.times)
    assert a.num_visual_tokens == b.num_visual_tokens and a.grid_thw == b.grid_thw
    assert b.resized_hw == tuple(v // 28 * 32 for v in a.resized_hw) == (320, 544)
    # the default spec is Qwen2.5-VL's
    d = S.plan(20.0, (1080, 1920), c, s, spec=PatchSpec())
    assert (d.resized_hw, d.grid_thw) == (a.resized_hw, a.grid_thw)
    with pytest.raises(ValueError, match="pairs"):
        S.plan(20.0, (360, 640), spec=PatchSpec(temporal_patch_size=3))


def test_budget_caps_resolution_not_only_frames():
    # 10 s at 2 fps = 20 frames = 10 temporal patches: 358 tokens each allowed
    p = S.plan(10.0, (1080, 1920), cfg=S.SAAConfig(enabled=False))
    assert p.n_frames == 20
    per = 3584 // 10
    assert p.resized_hw == smart_resize(1080, 1920, 28, 16 * 784, per * 784)
    assert p.num_visual_tokens <= 3584
    # a tiny budget drops frames, but never below one temporal patch
    p = S.plan(60.0, (1080, 1920), cfg=S.SAAConfig(max_visual_tokens=20))
    assert p.n_frames == 2 and p.num_visual_tokens <= 20


def test_uniform_mode_is_exactly_qwen_2fps():
    for duration in (20.0, 33.7, 3.0):
        p = S.plan(duration, (360, 640), cfg=S.SAAConfig(enabled=False))
        np.testing.assert_allclose(p.times, np.arange(p.n_frames) * 0.5, atol=0)
        assert p.n_frames == max(4, int(round(duration * 2)) // 2 * 2)
    # scores are ignored when disabled
    c, s = _busy_scores()
    p = S.plan(20.0, (360, 640), c, s, S.SAAConfig(enabled=False))
    np.testing.assert_array_equal(p.times, np.arange(40) * 0.5)


def test_uniform_mode_covers_the_whole_video_when_the_budget_cuts_frames():
    # 300 s at 2 fps would be 600 frames; 1024 tokens at >= 16 tokens per frame allow 128
    cfg = S.SAAConfig(enabled=False, max_visual_tokens=1024)
    p = S.plan(300.0, (360, 640), cfg=cfg)
    assert p.n_frames < 600 and p.num_visual_tokens <= 1024
    assert p.times[0] == pytest.approx(0.0, abs=1e-9)
    assert p.times[-1] == pytest.approx(300.0, abs=300.0 / p.n_frames)
    gaps = np.diff(p.times)
    np.testing.assert_allclose(gaps, 300.0 / (p.n_frames - 1), rtol=1e-9)
    # every minute of the video gets its share of frames
    per_minute = np.histogram(p.times, bins=5, range=(0.0, 300.0))[0]
    assert per_minute.min() >= p.n_frames // 5 - 1
    # max_frames cuts the same way (2 hours at 2 fps > 768 frames)
    p = S.plan(7200.0, (36, 64), cfg=S.SAAConfig(enabled=False, max_visual_tokens=10**6))
    assert p.n_frames == 768 and p.times[-1] == pytest.approx(7200.0)


def test_deterministic_for_a_seed():
    c, s = _busy_scores()
    cfg = S.SAAConfig(jitter=0.8, seed=3)
    a = S.plan(20.0, (360, 640), c, s, cfg).times
    b = S.plan(20.0, (360, 640), c, s, cfg).times
    np.testing.assert_array_equal(a, b)
    other = S.plan(20.0, (360, 640), c, s, S.SAAConfig(jitter=0.8, seed=4)).times
    assert not np.array_equal(a, other)
    assert np.all(np.diff(other) >= 0)


def test_config_roundtrip_and_validation():
    cfg = S.SAAConfig(alpha=2.0, enabled=False)
    assert S.SAAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError):
        S.SAAConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError):
        S.SAAConfig(min_fps=5.0, max_fps=4.0)
    with pytest.raises(ValueError):
        S.frame_times(None, None, 10.0, 3)
    with pytest.raises(ValueError):
        S.plan(0.0, (360, 640))
