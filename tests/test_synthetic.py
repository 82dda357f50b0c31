"""Tests for tempo_jax.data.synthetic: real mp4 files whose pixels match their annotations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tempo_jax.data import synthetic, video

SPEC = synthetic.SyntheticSpec(num=3, seed=0)


def _colour_of(query: str) -> str:
    found = [c for c in synthetic.COLORS if f" {c} " in f" {query} "]
    assert len(found) == 1, query
    return found[0]


def _load(ann: Path) -> list[dict]:
    return [json.loads(line) for line in ann.read_text().splitlines()]


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("syn")
    ann = synthetic.generate(out, SPEC)
    return out, _load(ann)


def test_annotations_parse(generated):
    out, lines = generated
    assert lines, "no annotation lines"
    videos = sorted({line["video"] for line in lines})
    assert videos == [f"videos/syn{i:05d}.mp4" for i in range(3)]
    assert len({line["qid"] for line in lines}) == len(lines)
    for line in lines:
        assert set(line) == {"video", "query", "windows", "duration", "qid", "relevant",
                             "colours", "caption"}
        # the caption names every object shown, so every colour shown (a caption think)
        assert sorted(w for w in line["caption"].split() if w in line["colours"]) == sorted(
            line["colours"])
        # the colours shown: every relevant query names one, no refusal query does
        from tempo_jax.data.synthetic import query_colour

        assert (query_colour(line["query"]) in line["colours"]) == line["relevant"]
        assert (out / line["video"]).is_file()
        assert SPEC.min_duration <= line["duration"] <= SPEC.max_duration
        info = video.probe(out / line["video"])
        assert info.duration == pytest.approx(line["duration"])
        assert (info.width, info.height, info.fps) == (128, 96, 8.0)
        if line["relevant"]:
            [(t1, t2)] = line["windows"]
            assert 0.0 <= t1 < t2 <= line["duration"]
            assert round(t1, 1) == t1 and round(t2, 1) == t2
        else:
            assert line["windows"] == []
    for v in videos:
        relevant = [ln for ln in lines if ln["video"] == v and ln["relevant"]]
        refusals = [ln for ln in lines if ln["video"] == v and not ln["relevant"]]
        assert 1 <= len(relevant) <= SPEC.max_events
        assert len(refusals) == SPEC.refusal_queries_per_video


def test_object_visible_exactly_inside_its_window(generated):
    out, lines = generated
    for line in (ln for ln in lines if ln["relevant"]):
        path = out / line["video"]
        colour = _colour_of(line["query"])
        [(t1, t2)] = line["windows"]
        # Times well inside vs well outside the window, through read_frames.
        inside = np.linspace(t1 + 0.07, t2 - 0.07, 5)
        outside = [t for t in (t1 - 0.5, t1 - 0.2, t2 + 0.2, t2 + 0.5, 0.0) if 0 <= t < t1 - 0.1]
        outside += [t for t in (t2 + 0.2, t2 + 0.5) if t < line["duration"]]
        frames, _ = video.read_frames(path, [*inside, *outside])
        counts = synthetic.colour_pixels(frames, colour)
        assert np.all(counts[: len(inside)] >= 50), (line["query"], counts)
        assert np.all(counts[len(inside) :] <= 2), (line["query"], counts)
        # And exactly: every decoded frame shows the object iff its pts is in [t1, t2].
        frames, pts = video.read_range(path, 0.0, line["duration"])
        counts = synthetic.colour_pixels(frames, colour)
        shown = (pts >= t1 - 1e-6) & (pts <= t2 + 1e-6)
        assert shown.any() and not shown.all()
        assert np.all(counts[shown] >= 50), (line["query"], counts, pts)
        assert np.all(counts[~shown] <= 2), (line["query"], counts, pts)


def test_refusal_queries_name_objects_not_shown(generated):
    out, lines = generated
    for line in (ln for ln in lines if not ln["relevant"]):
        colour = _colour_of(line["query"])
        same_video = [ln for ln in lines if ln["video"] == line["video"] and ln["relevant"]]
        assert colour not in {_colour_of(ln["query"]) for ln in same_video}
        frames, _ = video.read_range(out / line["video"], 0.0, line["duration"])
        assert synthetic.colour_pixels(frames, colour).max() <= 2, line["query"]


def test_deterministic_and_idempotent(generated, tmp_path):
    out, lines = generated
    ann2 = synthetic.generate(tmp_path / "again", SPEC)
    assert ann2.read_bytes() == (out / "annotations.jsonl").read_bytes()
    for v in sorted({line["video"] for line in lines}):
        a, pa = video.read_range(out / v, 0.0, 100.0)
        b, pb = video.read_range(tmp_path / "again" / v, 0.0, 100.0)
        np.testing.assert_array_equal(pa, pb)
        np.testing.assert_array_equal(a, b)
    # Rerunning keeps the existing (complete) videos and rewrites identical annotations.
    first = tmp_path / "again" / lines[0]["video"]
    stamp = first.stat().st_mtime_ns
    ann3 = synthetic.generate(tmp_path / "again", SPEC)
    assert first.stat().st_mtime_ns == stamp
    assert ann3.read_bytes() == ann2.read_bytes()
    assert not list((tmp_path / "again").rglob("*.partial"))
    # Another seed gives other content; another look in the same folder is refused.
    other = synthetic.generate(tmp_path / "other", synthetic.SyntheticSpec(num=3, seed=1))
    assert other.read_bytes() != ann2.read_bytes()
    with pytest.raises(ValueError, match="different spec"):
        synthetic.generate(tmp_path / "again", synthetic.SyntheticSpec(num=3, seed=0, fps=10))


def test_cli_and_sizes(tmp_path):
    ann = synthetic.main(
        [
            "--out", str(tmp_path), "--num", "1", "--seed", "3", "--width", "64",
            "--height", "48", "--fps", "10", "--min-duration", "3", "--max-duration", "4",
        ]
    )  # fmt: skip
    [*lines] = _load(ann)
    info = video.probe(tmp_path / lines[0]["video"])
    assert (info.width, info.height, info.fps) == (64, 48, 10.0)
    assert 3.0 <= info.duration <= 4.0
    with pytest.raises(ValueError):
        synthetic.SyntheticSpec(num=1, width=127)


def test_saa_crowds_frames_inside_the_event(tmp_path):
    """The background is static and objects keep moving, so SAA (as the data pipeline runs
    it, on the decoded video) gives an event window more frames per second than the rest."""
    from tempo_jax.data import saa
    from tempo_jax.data.pipeline import PipelineConfig, plan_video

    spec = synthetic.SyntheticSpec(num=4, seed=0, max_events=1, distractor_prob=0.0)
    lines = [ln for ln in _load(synthetic.generate(tmp_path, spec)) if ln["relevant"]]
    cfg = PipelineConfig()
    assert len(lines) == 4
    for line in lines:
        [(t1, t2)] = line["windows"]
        read = video.read_for_saa(
            tmp_path / line["video"], lambda info, c, g: plan_video(info, c, g, cfg.saa),
            thumb_size=cfg.thumbnail_size, rgb=False)
        times, duration = read.plan.times, line["duration"]
        inside = (times >= t1) & (times <= t2)
        ratio = (inside.sum() / (t2 - t1)) / ((~inside).sum() / (duration - (t2 - t1)))
        assert ratio > 1.5, (line["query"], ratio)
        # and the change score itself is what rises inside the window
        scores = saa.change_scores(read.grey)
        c = read.cand_times
        assert scores[(c > t1 + 0.5) & (c < t2 - 0.5)].mean() > 3 * scores[(c < t1 - 0.5) | (
            c > t2 + 0.5)].mean() + 0.05, line["query"]


def test_background_is_static_and_drift_is_optional(tmp_path):
    spec = synthetic.SyntheticSpec(num=1, seed=2, max_events=1, distractor_prob=0.0)
    [line, *_] = _load(synthetic.generate(tmp_path / "static", spec))
    [(t1, _t2)] = line["windows"]
    frames, _ = video.read_range(tmp_path / "static" / line["video"], 0.0, t1 - 0.05)
    assert len(frames) >= 3
    assert np.abs(frames[1:].astype(int) - frames[:-1]).mean() < 0.5  # coding noise only
    drifting = synthetic.SyntheticSpec(num=1, seed=2, max_events=1, distractor_prob=0.0,
                                       background_drift=4.0)
    [line, *_] = _load(synthetic.generate(tmp_path / "drift", drifting))
    frames, _ = video.read_range(tmp_path / "drift" / line["video"], 0.0, t1 - 0.05)
    assert np.abs(frames[1:].astype(int) - frames[:-1]).mean() > 2
    with pytest.raises(ValueError):
        synthetic.SyntheticSpec(num=1, sweep_seconds=-1.0)


HUES = ("red", "yellow", "green", "cyan", "blue", "magenta")  # 60 degrees apart on the wheel


def _patch_colour(pixel_values: np.ndarray, temporal_patch_size: int) -> str:
    """A plain reader of the model's input: the mean RGB of every 14x14 patch (un-normalised),
    the patch of strongest chroma, and the named hue nearest to its hue."""
    import colorsys

    from tempo_jax.data.processor import CLIP_MEAN, CLIP_STD

    n = pixel_values.shape[0]
    x = pixel_values.reshape(n, 3, temporal_patch_size, 14, 14)
    x = x * np.asarray(CLIP_STD)[:, None, None, None] + np.asarray(CLIP_MEAN)[:, None, None,
                                                                               None]
    means = np.clip(x.mean(axis=(2, 3, 4)), 0.0, 1.0)
    best = means[int(np.argmax(means.max(1) - means.min(1)))]
    hue = colorsys.rgb_to_hsv(*best)[0]

    def dist(name: str) -> float:
        h = colorsys.rgb_to_hsv(*(np.asarray(synthetic.COLORS[name]) / 255.0))[0]
        return min(abs(hue - h), 1.0 - abs(hue - h))

    return min(HUES, key=dist)


def test_demo_colour_reaches_the_model_input(tmp_path):
    """The demo's refusal cue is the object's colour: on the demo's own held-out videos, as the
    pipeline feeds them to the vision tower (SAA, resize to the tiny token budget, patches), a
    reader of patch means names the object's colour for >= 95% of videos."""
    from tempo_jax.configs.tempo_r0 import get_config
    from tempo_jax.data.pipeline import load_example
    from tempo_jax.data.prompts import load_tokenizer
    from tempo_jax.data.sources import VideoIndex
    from tempo_jax.training import data as train_data
    from tempo_jax.training import setup

    config = get_config("tiny")
    spec = train_data.synthetic_spec(config, "val")
    assert set(spec.palette()) == set(HUES) and spec.tint == 0
    lines = [ln for ln in _load(synthetic.generate(tmp_path, spec)) if ln["relevant"]]
    assert len(lines) == config.data.synthetic_val
    pcfg = setup.pipeline_config(config)
    vision = setup.model_config(config).vision
    tok, videos = load_tokenizer(None), VideoIndex(tmp_path)
    right = 0
    for line in lines:
        ex = load_example(line, videos, tok, pcfg, vision)
        # 112x56 frames halved exactly: 2x4 patches, 2 merged tokens per temporal patch
        assert ex["video_grid_thw"][0, 1:].tolist() == [2, 4]
        right += _patch_colour(ex["pixel_values"], vision.temporal_patch_size) == _colour_of(
            line["query"])
    assert right / len(lines) >= 0.95, right


def test_demo_look_keeps_exact_windows_and_saa_signal(tmp_path):
    """The demo's bigger objects on a neutral background still appear exactly inside their
    windows and in no other frame, and move across the whole frame."""
    from tempo_jax.configs.tempo_r0 import get_config
    from tempo_jax.data.pipeline import plan_video
    from tempo_jax.training import data as train_data
    from tempo_jax.training import setup

    config = get_config("tiny")
    pcfg = setup.pipeline_config(config)
    spec = dataclasses.replace(train_data.synthetic_spec(config, "val"), num=3)
    lines = [ln for ln in _load(synthetic.generate(tmp_path, spec)) if ln["relevant"]]
    for line in lines:
        frames, times = video.read_range(tmp_path / line["video"], 0.0, line["duration"])
        [(t1, t2)] = line["windows"]
        counts = synthetic.colour_pixels(frames, _colour_of(line["query"]))
        inside = (times >= t1 + 1e-3) & (times <= t2 - 1e-3)
        outside = (times < t1 - 0.2) | (times > t2 + 0.2)
        assert counts[inside].min() > 50, line["query"]  # radius 14 px (a star: ~80 px)
        assert counts[outside].max() == 0, line["query"]
        # no colour cast: the background's channels agree (the hue is the object's alone)
        spread = frames[outside].astype(int).max(-1) - frames[outside].astype(int).min(-1)
        assert np.median(spread) <= 3
        # SAA (as the pipeline runs it) still crowds frames inside the event
        read = video.read_for_saa(
            tmp_path / line["video"], lambda info, c, g: plan_video(info, c, g, pcfg.saa),
            thumb_size=pcfg.thumbnail_size, rgb=False)
        t = read.plan.times
        k = (t >= t1) & (t <= t2)
        assert (k.sum() / (t2 - t1)) / ((~k).sum() / (line["duration"] - (t2 - t1))) > 1.5
    with pytest.raises(ValueError, match="too big"):
        synthetic.SyntheticSpec(num=1, object_scale=0.4)
    with pytest.raises(ValueError, match="colours"):
        synthetic.SyntheticSpec(num=1, colours=("red", "mauve"))
