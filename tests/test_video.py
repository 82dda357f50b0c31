"""Tests for tempo_jax.data.video on real files written with PyAV into tmp_path."""

from __future__ import annotations

import contextlib
import dataclasses
import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from tempo_jax.data import video

W, H = 64, 48


def _grey_frames(n: int, w: int = W, h: int = H) -> list[np.ndarray]:
    """Frame i is uniformly grey at level 20 + 12 i, so its index is readable after coding."""
    assert n <= 19
    return [np.full((h, w, 3), 20 + 12 * i, np.uint8) for i in range(n)]


def _index_of(frame: np.ndarray) -> int:
    return int(round((float(frame.mean()) - 20) / 12))


class _NoSeek(io.RawIOBase):
    """A write-only, non-seekable sink: muxers then cannot go back to write durations."""

    def __init__(self, f):
        self.f = f

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self.f.write(b)


def _write(
    path: Path,
    frames: list[np.ndarray],
    *,
    rate: int = 8,
    pts: list[int] | None = None,
    time_base: Fraction | None = None,
    fmt: str | None = None,
    rotation: int | None = None,
    options: dict[str, str] | None = None,
    non_seekable: bool = False,
    gop: int | None = None,
) -> Path:
    sink = open(path, "wb") if non_seekable else None  # noqa: SIM115
    c = av.open(_NoSeek(sink) if sink else str(path), "w", format=fmt, options=options or {})
    s = c.add_stream("libx264", rate=rate)
    s.width, s.height = frames[0].shape[1], frames[0].shape[0]
    s.pix_fmt = "yuv420p"
    s.options = {"preset": "ultrafast", "crf": "10"}
    if gop:
        s.gop_size = gop
    if time_base is not None:
        s.codec_context.time_base = time_base
    if rotation is not None:
        s.set_display_rotation(rotation)
    for i, rgb in enumerate(frames):
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        f.pts = pts[i] if pts is not None else i
        if time_base is not None:
            f.time_base = time_base
        c.mux(s.encode(f))
    c.mux(s.encode())
    c.close()
    if sink:
        sink.close()
    return path


@pytest.fixture(scope="module")
def basic(tmp_path_factory) -> Path:
    """2 s, 8 fps, 64x48: 16 grey levels."""
    return _write(tmp_path_factory.mktemp("v") / "basic.mp4", _grey_frames(16))


def test_probe_basic(basic):
    info = video.probe(basic)
    assert info.path == str(basic)
    assert info.duration == pytest.approx(2.0)
    assert info.fps == pytest.approx(8.0)
    assert (info.width, info.height, info.rotation) == (W, H, 0)
    assert info.num_frames == 16


def test_thumbnails_grid_and_luma(tmp_path):
    # Left quarter green, right quarter blue (equal RGB means, very different luma),
    # middle brightening over time.
    frames = []
    for rgb in _grey_frames(16):
        rgb = rgb.copy()
        rgb[:, : W // 4] = (0, 255, 0)
        rgb[:, -W // 4 :] = (0, 0, 255)
        frames.append(rgb)
    path = _write(tmp_path / "luma.mp4", frames)
    times, grey = video.read_thumbnails(path, fps=4.0, size=(16, 8))
    assert grey.dtype == np.uint8 and grey.shape == (8, 8, 16)
    np.testing.assert_allclose(times, np.arange(8) * 0.25)
    assert np.all(np.diff(times) > 0)
    left, right, mid = grey[:, :, :3].mean(), grey[:, :, -3:].mean(), grey[:, :, 6:10]
    assert left > right + 80  # luma: green ~150, blue ~30; an RGB mean would tie them
    assert np.all(np.diff(mid.mean(axis=(1, 2))) > 5)  # follows the brightening
    # The fast luma path (AREA) agrees with swscale's grey conversion.
    _, swscale = video.read_thumbnails(path, fps=4.0, size=(16, 8), interpolation="BILINEAR")
    assert np.abs(swscale.astype(int) - grey).mean() < 3

    # A denser grid than the frame rate takes each frame once.
    times, grey = video.read_thumbnails(path, fps=20.0)
    np.testing.assert_allclose(times, np.arange(16) / 8)
    assert grey.shape == (16, 32, 32)


def test_read_frames_nearest_rgb(tmp_path):
    frames = _grey_frames(16)
    frames[5] = frames[5].copy()
    frames[5][:8, :8] = (255, 0, 0)  # a red corner: RGB order, not BGR
    path = _write(tmp_path / "n.mp4", frames)
    want = [0.51, 1.0, 0.06, 0.07, 1.95, 5.0, 0.625]
    out, pts = video.read_frames(path, want)
    assert out.dtype == np.uint8 and out.shape == (len(want), H, W, 3)
    np.testing.assert_allclose(pts, [0.5, 1.0, 0.0, 0.125, 1.875, 1.875, 0.625])
    assert [_index_of(f[16:, 16:]) for f in out] == [4, 8, 0, 1, 15, 15, 5]
    r, g, b = out[-1, 2, 2].astype(int)
    assert r > 200 and g < 60 and b < 60
    # Sized output, and an empty request.
    small, _ = video.read_frames(path, [0.5], size=(32, 24))
    assert small.shape == (1, 24, 32, 3)
    none, none_pts = video.read_frames(path, [])
    assert none.shape == (0, H, W, 3) and none_pts.shape == (0,)


def test_seek_matches_sequential_decode(tmp_path, monkeypatch):
    # 24 s at 8 fps with a keyframe every second: far and widely spaced times seek.
    frames = [np.full((32, 32, 3), (i * 37) % 200 + 20, np.uint8) for i in range(192)]
    path = _write(tmp_path / "long.mp4", frames, gop=8)
    full, full_pts = video.read_range(path, 0.0, 100.0)
    assert len(full) == 192
    want = [19.3, 2.5, 23.9, 14.06, 2.55, 30.0]
    out, pts = video.read_frames(path, want)
    idx = [int(np.argmin(np.abs(full_pts - t))) for t in want]
    np.testing.assert_allclose(pts, full_pts[idx])
    np.testing.assert_array_equal(out, full[idx])
    part, part_pts = video.read_range(path, 10.0, 11.0)
    np.testing.assert_allclose(part_pts, np.arange(80, 89) / 8)
    np.testing.assert_array_equal(part, full[80:89])
    empty, _ = video.read_range(path, 10.01, 10.1)
    assert empty.shape == (0, 32, 32, 3)

    # Seeking really skips: late times decode about a keyframe interval, not the video.
    decoded = []
    real_iter = video._iter_frames

    def counting(src, start=None):
        for d in real_iter(src, start):
            decoded.append(d.time)
            yield d

    monkeypatch.setattr(video, "_iter_frames", counting)
    video.read_frames(path, [19.3, 23.9])
    assert 0 < len(decoded) < 60 and min(decoded) >= 18.9
    decoded.clear()
    out, pts = video.read_frames(path, [23.0, 2.0])  # a long gap is sought over, too
    assert 0 < len(decoded) < 40
    np.testing.assert_array_equal(out, full[[184, 16]])


def test_seek_overshoot_falls_back_to_full_decode(tmp_path, monkeypatch):
    # Some demuxers land after the wanted time; that must not lose the frames before it.
    frames = [np.full((32, 32, 3), (i * 37) % 200 + 20, np.uint8) for i in range(48)]
    path = _write(tmp_path / "over.mp4", frames, gop=8)
    full, full_pts = video.read_range(path, 0.0, 100.0)

    class Overshoot:
        def __init__(self, c):
            self._c = c

        def __getattr__(self, name):
            return getattr(self._c, name)

        def seek(self, offset, **kw):
            stream = kw.get("stream")
            jump = int(2.0 / float(stream.time_base)) if stream is not None else 0
            return self._c.seek(offset + jump, **kw)

    real_open = video._open

    @contextlib.contextmanager
    def fake_open(p):
        with real_open(p) as src:
            yield dataclasses.replace(src, container=Overshoot(src.container))

    monkeypatch.setattr(video, "_open", fake_open)
    want = [2.0, 2.1, 4.5]
    out, pts = video.read_frames(path, want)
    idx = [int(np.argmin(np.abs(full_pts - t))) for t in want]
    np.testing.assert_allclose(pts, full_pts[idx])
    np.testing.assert_array_equal(out, full[idx])
    part, part_pts = video.read_range(path, 1.5, 2.0)
    np.testing.assert_allclose(part_pts, np.arange(12, 17) / 8)


def test_variable_frame_rate(tmp_path):
    ms = [0, 50, 100, 400, 450, 1000, 1100, 1150, 1200, 1900, 2000, 2010, 2020, 2500, 2600, 3000]
    path = _write(tmp_path / "vfr.mp4", _grey_frames(len(ms)), pts=ms, time_base=Fraction(1, 1000))
    real = np.asarray(ms) / 1000
    frames, pts = video.read_range(path, 0.0, 10.0)
    np.testing.assert_allclose(pts, real, atol=1e-6)
    assert [_index_of(f) for f in frames] == list(range(len(ms)))
    out, pts = video.read_frames(path, [1.04, 0.7, 2.3, 1.6])
    np.testing.assert_allclose(pts, [1.0, 0.45, 2.5, 1.9], atol=1e-6)
    assert [_index_of(f) for f in out] == [5, 4, 13, 9]
    times, _ = video.read_thumbnails(path, fps=4.0)
    assert set(np.round(times, 6)) <= set(np.round(real, 6))
    assert np.all(np.diff(times) > 0)
    info = video.probe(path)
    assert 3.0 <= info.duration < 3.5


def test_missing_duration_metadata(tmp_path):
    # Matroska written to a non-seekable sink carries no duration at all.
    path = _write(tmp_path / "nodur.mkv", _grey_frames(16), fmt="matroska", non_seekable=True)
    with av.open(str(path)) as c:
        assert c.duration is None and c.streams.video[0].duration is None
    info = video.probe(path)
    assert info.duration == pytest.approx(2.0)
    assert info.fps == pytest.approx(8.0)
    assert info.num_frames == 16
    # A raw H.264 elementary stream has neither duration nor timestamps.
    raw = _write(tmp_path / "raw.h264", _grey_frames(16), fmt="h264")
    with av.open(str(raw)) as c:
        assert c.duration is None
    info = video.probe(raw)
    assert info.duration == pytest.approx(2.0)
    _, pts = video.read_range(raw, 0.0, 10.0)
    np.testing.assert_allclose(pts, np.arange(16) / 8)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotated_video_comes_out_upright(tmp_path, rotation):
    frames = _grey_frames(8)
    for f in frames:
        f[: H // 2, : W // 4] = 255  # a white block in the stored top-left corner
    plain = _write(tmp_path / "plain.mp4", frames)
    rotated = _write(tmp_path / "rot.mp4", frames, rotation=rotation)
    info = video.probe(rotated)
    assert info.rotation == rotation
    quarter = rotation // 90
    assert (info.width, info.height) == ((H, W) if quarter % 2 else (W, H))
    ref, _ = video.read_frames(plain, [0.5])
    out, _ = video.read_frames(rotated, [0.5])
    # Counter-clockwise display rotation: the stored top-left block moves to the
    # bottom-left (90), bottom-right (180) or top-right (270).
    np.testing.assert_array_equal(out[0], np.rot90(ref[0], quarter))
    corner = {90: out[0, -2, 1], 180: out[0, -2, -2], 270: out[0, 1, -2]}[rotation]
    assert corner.min() > 230
    assert out[0, 1, 1].max() < 200
    _, grey = video.read_thumbnails(rotated, size=(8, 12))
    assert grey.shape[1:] == (12, 8)
    sized, _ = video.read_frames(rotated, [0.5], size=(20, 30))
    assert sized.shape == (1, 30, 20, 3)


def test_epath_and_remote_style_paths(basic, monkeypatch):
    from etils import epath

    assert video.probe(epath.Path(basic)).duration == pytest.approx(2.0)
    assert video.probe(Path(basic)).num_frames == 16

    opened = []

    class FakeRemote:
        def __init__(self, p):
            self.p = p

        def exists(self) -> bool:
            return True

        def open(self, mode: str):
            opened.append(self.p)
            return open(basic, mode)  # noqa: SIM115

    monkeypatch.setattr(epath, "Path", FakeRemote)
    _, pts = video.read_frames("gs://bucket/clip.mp4", [1.0])
    assert opened == ["gs://bucket/clip.mp4"] and pts.tolist() == [1.0]


def _bad_files(tmp: Path) -> dict[str, Path]:
    good = _write(tmp / "good.mp4", _grey_frames(16) + _grey_frames(16))
    data = good.read_bytes()
    truncated = tmp / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])
    text = tmp / "text.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp / "empty.mp4"
    empty.write_bytes(b"")
    # A container with a video stream that holds no frames (and audio that has some).
    zero = tmp / "zero_frames.mkv"
    with av.open(str(zero), "w") as c:
        v = c.add_stream("libx264", rate=8)
        v.width, v.height, v.pix_fmt = W, H, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        c.start_encoding()
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate, fr.pts = 8000, 0
        c.mux(a.encode(fr))
        c.mux(a.encode())
        c.mux(v.encode())
    audio_only = tmp / "audio_only.mkv"
    with av.open(str(audio_only), "w") as c:
        a = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate, fr.pts = 8000, 0
        c.mux(a.encode(fr))
        c.mux(a.encode())
    return {
        "missing": tmp / "does_not_exist.mp4",
        "truncated": truncated,
        "text": text,
        "empty": empty,
        "zero_frames": zero,
        "audio_only": audio_only,
    }


_READERS = {
    "probe": video.probe,
    "thumbnails": video.read_thumbnails,
    "for_saa": lambda p: video.read_for_saa(p, lambda info, c, g: [0.5]),
    "frames": lambda p: video.read_frames(p, [0.5]),
    "range": lambda p: video.read_range(p, 0.0, 1.0),
}


def test_errors_name_the_file(tmp_path):
    bad = _bad_files(tmp_path)
    expected = {
        "missing": "file not found",
        "zero_frames": "no decodable video frames",
        "audio_only": "no video stream",
    }
    for kind, path in bad.items():
        for name, reader in _READERS.items():
            with pytest.raises(video.VideoError) as info:
                reader(path)
            msg = str(info.value)
            assert msg.startswith(f"{path}: "), (kind, name, msg)
            assert "\n" not in msg
            if kind in expected:
                assert expected[kind] in msg, (kind, name, msg)


def test_truncated_after_header_is_detected(tmp_path):
    # With the index at the front (faststart) a cut file still opens; the missing tail
    # must not silently turn into "the last frame".
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (H, W, 3), dtype=np.uint8) for _ in range(32)]
    path = _write(tmp_path / "fs.mp4", frames, options={"movflags": "faststart"})
    data = path.read_bytes()
    cut = tmp_path / "fs_cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(video.VideoError, match="truncated"):
        video.read_frames(cut, [3.5])
    with pytest.raises(video.VideoError, match="truncated"):
        video.read_thumbnails(cut)
    with pytest.raises(video.VideoError, match="truncated"):
        video.read_for_saa(cut, lambda info, c, g: [0.25])
    out, _ = video.read_frames(cut, [0.25])  # the part that is there still reads
    assert out.shape == (1, H, W, 3)


# ------------------------------------------------------------------ single-pass reader


def _plan_every_other(info, cand, grey):
    """A plan_fn: every other candidate (on the grid, so nearest frames are unambiguous)."""
    return cand[::2]


def test_read_for_saa_equals_the_two_pass_readers(tmp_path):
    frames = _grey_frames(19)
    frames[6] = frames[6].copy()
    frames[6][:8, :8] = (255, 0, 0)
    path = _write(tmp_path / "s.mp4", frames, gop=4)
    seen = {}

    def plan_fn(info, cand, grey):
        seen.update(info=info, cand=cand.copy(), grey=grey.copy())
        return np.asarray([0.75, 0.0, 2.25, 0.5, 0.5])  # any order, repeats allowed

    read = video.read_for_saa(path, plan_fn, candidate_fps=4.0, thumb_size=(16, 8))
    info, cand, grey, out, pts = read  # unpacks like a tuple
    assert info == video.probe(path) == seen["info"]
    ref_t, ref_g = video.read_thumbnails(path, fps=4.0, size=(16, 8))
    np.testing.assert_array_equal(cand, ref_t)
    np.testing.assert_array_equal(grey, ref_g)
    ref, ref_pts = video.read_frames(path, [0.75, 0.0, 2.25, 0.5, 0.5])
    np.testing.assert_array_equal(pts, ref_pts)
    np.testing.assert_array_equal(out, ref)
    assert read.single_pass and read.plan.shape == (5,)
    r, g, b = out[0, 2, 2].astype(int)  # frame 6 (0.75 s): the red corner, in RGB order
    assert r > 200 and g < 60 and b < 60
    # the thumbnail size may depend on the display size; plan_fn may return a Plan-like object
    plan = type("P", (), {"times": np.asarray([1.0])})()
    read = video.read_for_saa(path, lambda *a: plan, thumb_size=lambda w, h: (w // 4, h // 4))
    assert read.grey.shape[1:] == (H // 4, W // 4) and read.plan is plan
    np.testing.assert_allclose(read.pts, [1.0])


def test_read_for_saa_memory_bound_falls_back_to_two_passes(tmp_path, monkeypatch):
    path = _write(tmp_path / "m.mp4", _grey_frames(16))
    want = [0.1, 0.3, 1.37, 1.9]  # off the candidate grid: the two paths may differ
    one = video.read_for_saa(path, lambda *a: want)
    two = video.read_for_saa(path, lambda *a: want, max_keep_bytes=0)
    assert one.single_pass and not two.single_pass
    ref, ref_pts = video.read_frames(path, want)
    np.testing.assert_array_equal(two.pts, ref_pts)
    np.testing.assert_array_equal(two.frames, ref)
    # single pass: the nearest frames on the candidate grid (4 fps of an 8 fps video; the
    # grid's last time inside the video is 1.75 s)
    np.testing.assert_allclose(one.pts, [0.0, 0.25, 1.25, 1.75])
    assert [_index_of(f) for f in one.frames] == [0, 2, 10, 14]
    # without a duration in the metadata the bound is enforced while decoding
    nodur = _write(tmp_path / "nodur.mkv", _grey_frames(16), fmt="matroska", non_seekable=True)
    frame_bytes = W * H * 3 // 2
    late = video.read_for_saa(nodur, lambda *a: want, max_keep_bytes=3 * frame_bytes)
    assert not late.single_pass
    np.testing.assert_array_equal(late.frames, ref)
    assert late.info.duration == pytest.approx(2.0) and late.info.num_frames == 16
    # a transform runs on every returned frame, in both modes
    halve = lambda plan, f: f[::2, ::2]  # noqa: E731
    for kw in ({}, {"max_keep_bytes": 0}):
        small = video.read_for_saa(path, lambda *a: want, transform=halve, **kw)
        assert small.frames.shape == (4, H // 2, W // 2, 3)
    # rgb=False: thumbnails and plan only
    bare = video.read_for_saa(path, lambda *a: want, rgb=False)
    assert bare.frames is None and bare.pts is None and bare.plan == want


def test_read_for_saa_gives_a_pair_distinct_frames():
    kept = np.arange(8) * 0.25
    # 0.3 and 0.4 are both nearest to 0.25: the second takes 0.5 (within a grid step)
    np.testing.assert_array_equal(video._match_kept(kept, np.asarray([0.3, 0.4]), 0.25), [1, 2])
    # far apart times keep their nearest frames; ties go to the earlier frame
    np.testing.assert_array_equal(
        video._match_kept(kept, np.asarray([1.125, 0.0, 9.0]), 0.25), [4, 0, 7])
    # more times than frames: repeats rather than jumps; equal times share their frame
    np.testing.assert_array_equal(
        video._match_kept(kept[:2], np.asarray([0.0, 0.05, 0.1]), 0.25), [0, 1, 1])
    np.testing.assert_array_equal(
        video._match_kept(kept, np.asarray([0.5, 0.5, 0.75]), 0.25), [2, 2, 3])


def test_read_for_saa_raw_stream_and_rotation(tmp_path):
    raw = _write(tmp_path / "raw.h264", _grey_frames(16), fmt="h264")
    read = video.read_for_saa(raw, _plan_every_other)
    assert read.info.duration == pytest.approx(2.0) and read.info.num_frames == 16
    assert read.info.fps == pytest.approx(8.0)
    np.testing.assert_allclose(read.pts, np.arange(0, 2, 0.5))
    frames = _grey_frames(8)
    for f in frames:
        f[: H // 2, : W // 4] = 255
    rotated = _write(tmp_path / "rot.mp4", frames, rotation=90)
    read = video.read_for_saa(rotated, _plan_every_other)
    ref, _ = video.read_frames(rotated, read.plan)
    np.testing.assert_array_equal(read.frames, ref)
    assert read.frames.shape[1:3] == (W, H) and read.grey.shape[1:] == (32, 32)


@pytest.mark.parametrize("fw,fh,w,h", [(640, 360, 64, 36), (640, 360, 32, 32), (67, 45, 9, 7),
                                       (1280, 720, 50, 31), (64, 48, 64, 48)])
def test_luma_thumbnail_is_the_area_mean(fw, fh, w, h):
    rng = np.random.default_rng(fw + h)
    y = rng.integers(0, 256, (fh, fw), dtype=np.uint8)
    rgb = np.repeat(y[..., None], 3, axis=-1)
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuvj444p")
    plane = frame.planes[0]
    luma = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:fh, :fw]
    rows, cols = (np.arange(h) * fh) // h, (np.arange(w) * fw) // w
    sums = np.add.reduceat(np.add.reduceat(luma.astype(np.int64), rows, 0), cols, 1)
    counts = np.outer(np.diff(np.append(rows, fh)), np.diff(np.append(cols, fw)))
    expected = np.clip(np.rint(sums / counts), 0, 255)
    np.testing.assert_array_equal(video._luma_thumbnail(frame, w, h), expected)


def test_decoder_threading_follows_the_slices(tmp_path, monkeypatch):
    frames = [np.full((64, 96, 3), 10 * i, np.uint8) for i in range(8)]
    _write(tmp_path / "one.mp4", frames)
    c = av.open(str(tmp_path / "many.mp4"), "w")
    s = c.add_stream("libx264", rate=8)
    s.width, s.height, s.pix_fmt = 96, 64, "yuv420p"
    s.options = {"preset": "ultrafast", "slices": "4"}
    for i, rgb in enumerate(frames):
        f = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        f.pts = i
        c.mux(s.encode(f))
    c.mux(s.encode())
    c.close()
    monkeypatch.setenv(video.DECODE_THREADS_ENV, "3")
    assert video.decode_threads() == 3
    kinds = {}
    for name in ("one", "many"):
        with video._open(tmp_path / f"{name}.mp4") as src:
            frames_read = list(video._iter_frames(src))
            cc = src.stream.codec_context
            kinds[name] = (cc.thread_type.name, cc.thread_count)
        assert len(frames_read) == 8
    assert kinds["many"] == ("SLICE", 3)
    assert kinds["one"][0] in ("AUTO", "FRAME") and kinds["one"][1] == 3
    monkeypatch.setenv(video.DECODE_THREADS_ENV, "x")
    assert 1 <= video.decode_threads() <= 8
