"""Video decoding with PyAV: probing, cheap grey thumbnails and RGB frames at real times.

Every time in this module is in seconds from the start of the video stream (a frame's
``pts * time_base`` minus the stream's ``start_time``), taken from each frame's own
timestamp: variable-frame-rate videos are never assumed to be uniform. Frames come out
upright (the container's display matrix is applied with ``np.rot90``). Every failure
that comes from the file is a :class:`VideoError` whose message starts with the path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import av
import numpy as np

__all__ = [
    "VideoError",
    "VideoInfo",
    "probe",
    "read_frames",
    "read_range",
    "read_thumbnails",
]

# Seek (to the keyframe before the first wanted time) only when it is at least this far in.
_SEEK_MIN_SECONDS = 1.0
# read_frames seeks again (instead of decoding through) across gaps longer than this.
_SEEK_GAP_SECONDS = 10.0
# Errors raised by PyAV/FFmpeg or by I/O on the file: all become VideoError.
_FILE_ERRORS: tuple[type[BaseException], ...] = (av.FFmpegError, OSError, EOFError, ValueError)


class VideoError(Exception):
    """A video could not be read; the message is one line, ``"<path>: <problem>"``."""

    def __init__(self, path: Any, problem: str):
        self.path = str(path)
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.path}: {self.problem}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    """What downstream sampling needs to know about a video, before decoding it all.

    ``width``/``height`` are the display size (after rotation); ``rotation`` is the
    counter-clockwise rotation in degrees (0, 90, 180 or 270) applied to decoded frames
    to show them upright; ``fps`` is the average rate; ``num_frames`` is None when the
    container does not say and no scan was needed.
    """

    path: str
    duration: float
    fps: float
    width: int
    height: int
    rotation: int
    num_frames: int | None


# --------------------------------------------------------------------------- helpers


def _path_str(path: Any) -> str:
    return os.fspath(path) if isinstance(path, str | os.PathLike) else str(path)


def _is_local(spath: str) -> bool:
    return "://" not in spath or spath.startswith("file://")


def _describe(exc: BaseException) -> str:
    """A short one-line description of a PyAV/OS error, without repeating the path."""
    if isinstance(exc, av.FFmpegError | OSError) and getattr(exc, "strerror", None):
        return str(exc.strerror)
    text = str(exc) or type(exc).__name__
    return text


@contextlib.contextmanager
def _errors_as_video_error(path: str, what: str) -> Iterator[None]:
    try:
        yield
    except VideoError:
        raise
    except _FILE_ERRORS as exc:
        raise VideoError(path, f"{what}: {_describe(exc)}") from exc


@dataclasses.dataclass
class _Source:
    """An open container with its video stream and the numbers needed to time frames."""

    path: str
    container: Any
    stream: Any
    time_base: float
    origin: int | None  # pts of time 0 (stream.start_time); None when unknown
    fps: float  # average rate, for frames without pts and as a frame-duration fallback
    header_duration: float | None  # the video stream's own duration metadata, if any


@contextlib.contextmanager
def _open(path: Any) -> Iterator[_Source]:
    spath = _path_str(path)
    fileobj = None
    container = None
    try:
        with _errors_as_video_error(spath, "cannot open"):
            if _is_local(spath):
                local = spath[len("file://") :] if spath.startswith("file://") else spath
                if not os.path.isfile(local):
                    raise VideoError(spath, "file not found")
                container = av.open(local, mode="r")
            else:
                from etils import epath

                epath_obj = epath.Path(spath)
                if not epath_obj.exists():
                    raise VideoError(spath, "file not found")
                fileobj = epath_obj.open("rb")
                container = av.open(fileobj, mode="r")
        if not container.streams:
            raise VideoError(spath, "no streams found (truncated file or not a video)")
        if not container.streams.video:
            raise VideoError(spath, "no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = float(stream.time_base) if stream.time_base else 1.0
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not (fps > 0 and math.isfinite(fps)):
            fps = 25.0  # FFmpeg's own default for streams without timing
        header = None
        if stream.duration and stream.duration > 0 and stream.time_base:
            header = float(stream.duration * stream.time_base)
        yield _Source(spath, container, stream, time_base, stream.start_time, fps, header)
    finally:
        if container is not None:
            with contextlib.suppress(Exception):
                container.close()
        if fileobj is not None:
            with contextlib.suppress(Exception):
                fileobj.close()


@dataclasses.dataclass
class _Decoded:
    frame: Any  # av.VideoFrame
    time: float  # seconds from the stream start
    index: int  # running index in decode output (identity for caching)
    end: float  # time + this frame's display duration


def _iter_frames(src: _Source, start: float | None = None) -> Iterator[_Decoded]:
    """Decode frames in presentation order with their real times.

    With ``start`` (seconds) far enough in and a known time origin, seeks to the keyframe
    at or before it first; if the seek lands after ``start`` (imprecise demuxers), decoding
    restarts from the beginning so that no frame before ``start`` is missed.
    """
    c, stream = src.container, src.stream
    seeked = False
    if start is not None and start >= _SEEK_MIN_SECONDS and src.origin is not None:
        target = src.origin + int(math.floor(start / src.time_base))
        try:
            c.seek(target, stream=stream, backward=True, any_frame=False)
            seeked = True
        except _FILE_ERRORS:
            seeked = False
            with contextlib.suppress(*_FILE_ERRORS):
                c.seek(0)
    origin = src.origin
    index = 0
    running = 0.0  # for frames without pts: the sum of earlier frames' durations
    first = True
    with _errors_as_video_error(src.path, "cannot decode"):
        for frame in c.decode(stream):
            dur = frame.duration * src.time_base if frame.duration else 1.0 / src.fps
            if frame.pts is not None:
                if origin is None:
                    origin = frame.pts
                t = (frame.pts - origin) * src.time_base
            else:  # raw elementary streams carry no timestamps: add up durations
                t = running
            running = t + dur
            if first and seeked and start is not None and t > start + 1e-6:
                break  # the seek overshot: fall through to a full decode below
            first = False
            yield _Decoded(frame, float(t), index, float(t + dur))
            index += 1
        else:
            return
    # Only reached after an overshooting seek.
    with _errors_as_video_error(src.path, "cannot decode"):
        c.seek(0)
    yield from _iter_frames(dataclasses.replace(src), None)


def _rotation_k(frame: Any) -> int:
    """Number of counter-clockwise quarter turns that make ``frame`` upright."""
    try:
        rot = frame.rotation
    except (AttributeError, av.FFmpegError):
        return 0
    if rot is None or not math.isfinite(float(rot)):
        return 0
    return int(round(float(rot) / 90.0)) % 4


def _select_nearest(
    frames: Iterable[_Decoded],
    targets: Iterator[float],
    emit: Callable[[float, _Decoded], bool],
    tail: Callable[[float, _Decoded], bool],
) -> _Decoded | None:
    """Stream frames once and hand each target time its nearest frame (earlier on ties).

    ``targets`` must be non-decreasing. ``emit(target, frame)`` returns False to stop early.
    Targets after the last frame go to ``tail(target, last)``, which returns False to stop.
    Returns the last frame seen (None when there was none).
    """
    prev: _Decoded | None = None
    target = next(targets, None)
    for cur in frames:
        while target is not None and target <= cur.time:
            pick = prev if prev is not None and target - prev.time <= cur.time - target else cur
            if not emit(target, pick):
                return cur
            target = next(targets, None)
        if target is None:
            return cur
        prev = cur
    if prev is None:
        return None
    while target is not None and tail(target, prev):
        target = next(targets, None)
    return prev


def _no_frames(path: str) -> VideoError:
    return VideoError(path, "no decodable video frames (empty or corrupt video stream)")


def _check_truncation(src: _Source, last: _Decoded, wanted_until: float) -> None:
    """Raise when frames stop well before both the header's duration and a wanted time."""
    if src.header_duration is None:
        return
    tol = max(0.5, 3.0 / src.fps)
    if last.end + tol < min(src.header_duration, wanted_until):
        raise VideoError(
            src.path,
            f"truncated: frames end at {last.end:.2f}s but the stream header says "
            f"{src.header_duration:.2f}s",
        )


# ----------------------------------------------------------------------------- API


def probe(path: Any) -> VideoInfo:
    """Duration, fps, display size and rotation, mostly from metadata (cheap).

    Decodes one frame (for the rotation and to prove the stream decodes). When neither
    the stream nor the container states a duration, scans packet timestamps (or, for raw
    streams without timestamps, counts decoded frames) to find where the last frame ends.
    A file cut after an intact header probes fine; the readers detect the missing tail.
    """
    spath = _path_str(path)
    with _open(path) as src, contextlib.closing(_iter_frames(src)) as frames:
        first = next(frames, None)
        if first is None:
            raise _no_frames(spath)
        k = _rotation_k(first.frame)
        w, h = int(first.frame.width), int(first.frame.height)  # what read_frames returns
        num_frames = int(src.stream.frames) if src.stream.frames else None
        duration = src.header_duration
        if duration is None and src.container.duration and src.container.duration > 0:
            duration = float(src.container.duration) / 1e6
        fps = src.fps
    if duration is None:  # no metadata: measure, and take the average rate from the scan
        duration, counted = _scan_duration(path)
        num_frames = num_frames or counted
        if num_frames and duration > 0:
            fps = num_frames / duration
    if k % 2:
        w, h = h, w
    return VideoInfo(spath, float(duration), float(fps), w, h, 90 * k, num_frames)


def _scan_duration(path: Any) -> tuple[float, int]:
    """(duration, frame count) from packet timestamps or durations, else by decoding."""
    spath = _path_str(path)
    with _open(path) as src:
        end = None
        start = src.origin
        count = 0
        total = 0  # sum of packet durations, for streams without timestamps
        all_durations = True
        with _errors_as_video_error(spath, "cannot read packets"):
            for packet in src.container.demux(src.stream):
                if packet.size == 0:
                    continue
                count += 1
                dur = packet.duration or 0
                total += dur
                all_durations = all_durations and dur > 0
                if packet.pts is None:
                    continue
                if start is None or packet.pts < start:
                    start = packet.pts
                stop = packet.pts + (dur if dur else 1.0 / src.fps / src.time_base)
                end = stop if end is None else max(end, stop)
        if end is not None and start is not None:
            return float((end - start) * src.time_base), count
        if count and all_durations:
            return float(total * src.time_base), count
    with _open(path) as src, contextlib.closing(_iter_frames(src)) as frames:
        last = None
        n = 0
        for decoded in frames:
            last = decoded
            n += 1
        if last is None:
            raise _no_frames(spath)
        return float(last.end), n


_LUMA_FIRST_PLANE = {
    "yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p", "nv12", "nv21", "gray",
}  # fmt: skip


def _luma_thumbnail(frame: Any, w: int, h: int) -> np.ndarray | None:
    """Area-average the 8-bit luma plane straight from the decoder (no swscale setup).

    About 4x cheaper than ``reformat`` per thumbnail, which matters at 4 fps over long
    videos. Returns None (caller falls back to ``reformat``) for other pixel formats or
    upscaling. Limited-range luma is expanded to full range, as ``format='gray'`` does.
    """
    fmt = frame.format.name
    fw, fh = frame.width, frame.height
    if fmt not in _LUMA_FIRST_PLANE or w > fw or h > fh:
        return None
    plane = frame.planes[0]
    y = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:fh, :fw]
    rows = np.add.reduceat(y.astype(np.uint32), (np.arange(h) * fh) // h, axis=0)
    sums = np.add.reduceat(rows, (np.arange(w) * fw) // w, axis=1).astype(np.float64)
    counts = np.outer(np.diff(np.append((np.arange(h) * fh) // h, fh)),
                      np.diff(np.append((np.arange(w) * fw) // w, fw)))  # fmt: skip
    mean = sums / counts
    full_range = fmt.startswith("yuvj") or fmt == "gray" or frame.color_range == 2
    if not full_range:
        mean = (mean - 16.0) * (255.0 / 219.0)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def read_thumbnails(
    path: Any,
    fps: float = 4.0,
    size: tuple[int, int] = (32, 32),
    *,
    interpolation: str = "AREA",
) -> tuple[np.ndarray, np.ndarray]:
    """Small grey frames on a dense time grid, for cheap content-change scoring (SAA).

    For each grid time ``k / fps`` inside the video, the frame with the nearest
    presentation time is taken (once: a frame nearest to several grid times appears once),
    so the returned ``times`` [T] (float64 seconds, strictly increasing) are real frame
    times. Grey is the luma plane (full range) scaled to ``size = (width, height)`` of
    the upright frame; there is no RGB conversion. Returns ``(times, grey[T, h, w] uint8)``.
    """
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    width, height = int(size[0]), int(size[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size}")
    spath = _path_str(path)
    times: list[float] = []
    greys: list[np.ndarray] = []
    seen: set[int] = set()

    def grid() -> Iterator[float]:
        k = 0
        while True:
            yield k / fps
            k += 1

    def take(target: float, d: _Decoded) -> bool:
        if d.index not in seen:
            seen.add(d.index)
            kq = _rotation_k(d.frame)
            w, h = (height, width) if kq % 2 else (width, height)
            arr = _luma_thumbnail(d.frame, w, h) if interpolation == "AREA" else None
            if arr is None:
                g = d.frame.reformat(w, h, format="gray", interpolation=interpolation)
                arr = g.to_ndarray()
            times.append(d.time)
            greys.append(np.ascontiguousarray(np.rot90(arr, kq)) if kq else arr)
        return True

    with _open(path) as src, contextlib.closing(_iter_frames(src)) as frames:
        last = _select_nearest(frames, grid(), take, lambda t, d: t < d.end and take(t, d))
        if last is None:
            raise _no_frames(spath)
        _check_truncation(src, last, math.inf)
    return np.asarray(times, np.float64), np.stack(greys).astype(np.uint8, copy=False)


def _to_rgb(d: _Decoded, size: tuple[int, int] | None, interpolation: str) -> np.ndarray:
    k = _rotation_k(d.frame)
    if size is None:
        arr = d.frame.to_ndarray(format="rgb24")
    else:
        w, h = (size[1], size[0]) if k % 2 else (size[0], size[1])
        arr = d.frame.reformat(w, h, format="rgb24", interpolation=interpolation).to_ndarray()
    return np.ascontiguousarray(np.rot90(arr, k)) if k else arr


def _check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"size must be positive (width, height), got {size}")
    return w, h


def read_frames(
    path: Any,
    times: Sequence[float],
    *,
    size: tuple[int, int] | None = None,
    interpolation: str = "BICUBIC",
) -> tuple[np.ndarray, np.ndarray]:
    """The frames whose presentation times are nearest to ``times`` (seconds), upright RGB.

    Decodes once, sequentially (seeking first to the keyframe before the earliest wanted
    time when it is far in), and converts to RGB only the frames it keeps. Returns
    ``(frames[N, H, W, 3] uint8, pts[N] float64)`` in the order of ``times``, where ``pts``
    are the chosen frames' real times (ties go to the earlier frame; times past the end get
    the last frame). ``size=(width, height)`` resizes; the default keeps full resolution,
    which is what the model's processor wants (it resizes itself).
    """
    size = _check_size(size)
    want = np.asarray(list(times), dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(want)):
        raise ValueError("times must be finite")
    spath = _path_str(path)
    order = np.argsort(want, kind="stable")
    sorted_want = want[order]
    picks: list[_Decoded | None] = [None] * len(want)
    cache: dict[float, np.ndarray] = {}  # keyed by frame time: one RGB conversion per frame
    pos = iter(range(len(order)))

    def take(target: float, d: _Decoded) -> bool:
        i = int(order[next(pos)])
        picks[i] = d
        if d.time not in cache:
            cache[d.time] = _to_rgb(d, size, interpolation)
        return True

    with _open(path) as src:
        if len(want) == 0:
            with contextlib.closing(_iter_frames(src)) as frames:
                first = next(frames, None)
            if first is None:
                raise _no_frames(spath)
            shape = _to_rgb(first, size, interpolation).shape
            return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.float64)
        # Long gaps between wanted times are skipped by seeking rather than decoding; the
        # nearest frame to a time is always within a frame of it, so groups are independent.
        breaks = np.nonzero(np.diff(sorted_want) > _SEEK_GAP_SECONDS)[0] + 1
        if src.origin is None:  # no time origin (raw streams): one sequential pass only
            breaks = breaks[:0]
        last = None
        for group in np.split(sorted_want, breaks):
            with contextlib.closing(_iter_frames(src, float(group[0]))) as frames:
                last = _select_nearest(frames, iter(group.tolist()), take, take)
            if last is None:
                raise _no_frames(spath)
        assert last is not None
        _check_truncation(src, last, float(want.max()))
    out = np.stack([cache[p.time] for p in picks if p is not None])
    pts = np.asarray([p.time for p in picks if p is not None], np.float64)
    return out, pts


def read_range(
    path: Any,
    start: float,
    end: float,
    *,
    size: tuple[int, int] | None = None,
    interpolation: str = "BICUBIC",
) -> tuple[np.ndarray, np.ndarray]:
    """Every frame with presentation time in ``[start, end]`` (seconds), upright RGB.

    Returns ``(frames[N, H, W, 3] uint8, pts[N] float64)``; N may be 0 when no frame falls
    inside the range (the frame array then still has the video's frame shape).
    """
    if not (math.isfinite(start) and math.isfinite(end)) or end < start:
        raise ValueError(f"need finite start <= end, got [{start}, {end}]")
    size = _check_size(size)
    spath = _path_str(path)
    out: list[np.ndarray] = []
    pts: list[float] = []
    eps = 1e-9
    with _open(path) as src, contextlib.closing(_iter_frames(src, start)) as frames:
        last = None
        for d in frames:
            last = d
            if d.time > end + eps:
                break
            if d.time >= start - eps:
                out.append(_to_rgb(d, size, interpolation))
                pts.append(d.time)
        if last is None:
            raise _no_frames(spath)
        if last.time <= end + eps:  # the stream ended inside or before the range
            _check_truncation(src, last, end)
        if not out:
            shape = _to_rgb(last, size, interpolation).shape
            return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.float64)
    return np.stack(out), np.asarray(pts, np.float64)
