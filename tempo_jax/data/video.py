"""Video decoding with PyAV: probing, cheap grey thumbnails and RGB frames at real times.

Every time in this module is in seconds from the start of the video stream (a frame's
``pts * time_base`` minus the stream's ``start_time``), taken from each frame's own
timestamp: variable-frame-rate videos are never assumed to be uniform. Frames come out
upright (the container's display matrix is applied with ``np.rot90``). Every failure
that comes from the file is a :class:`VideoError` whose message starts with the path.

Decoding is multi-threaded (see :func:`decode_threads`): slice threading for H.264 streams
whose pictures are coded as several slices, frame threading otherwise. The data pipeline
reads a video once with :func:`read_for_saa` (thumbnails, SAA plan, then RGB for the chosen
frames only); :func:`read_thumbnails` and :func:`read_frames` are the two-pass equivalents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import itertools
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import numpy as np

__all__ = [
    "SAARead",
    "VideoError",
    "VideoInfo",
    "decode_threads",
    "probe",
    "read_for_saa",
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
# Environment variable that overrides the number of decoder threads (see decode_threads).
DECODE_THREADS_ENV = "TEMPO_JAX_DECODE_THREADS"
# read_for_saa keeps at most this many bytes of decoded candidate frames (YUV) before it gives
# up on the single pass and decodes the chosen frames in a second pass instead.
MAX_KEEP_BYTES = 1 << 30


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
    threads_set: bool = False  # decoder threading chosen (before the codec opens)


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


def decode_threads() -> int:
    """Decoder threads per video: ``$TEMPO_JAX_DECODE_THREADS`` if set, else the usable CPUs
    (at most 8). FFmpeg's own "auto" (0) starts one more frame thread than there are cores,
    which measured slower on small machines; data-loader setups running one worker process per
    core may prefer 1."""
    env = os.environ.get(DECODE_THREADS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_ANNEXB_START = re.compile(b"\x00\x00\x01")


def _h264_slices(data: bytes, extradata: bytes | None) -> int:
    """Number of coded-slice NAL units (types 1 and 5) in one H.264 packet.

    Packets are length-prefixed (avcC, as in mp4/mkv; the prefix size is in the extradata)
    or Annex B (start codes, as in raw .h264 and MPEG-TS).
    """
    slices = 0
    if extradata and len(extradata) >= 5 and extradata[0] == 1:  # avcC
        size_len = (extradata[4] & 3) + 1
        i = 0
        while i + size_len < len(data):
            size = int.from_bytes(data[i : i + size_len], "big")
            i += size_len
            if size <= 0 or i + size > len(data):
                break
            slices += (data[i] & 0x1F) in (1, 5)
            i += size
        return slices
    for m in _ANNEXB_START.finditer(data):
        if m.end() < len(data):
            slices += (data[m.end()] & 0x1F) in (1, 5)
    return slices


def _set_threads(src: _Source, packet: Any) -> None:
    """Choose the decoder's threading from the first packet, before the codec opens.

    H.264 pictures cut into several slices decode fastest with slice threading (measured 0.80 s
    vs 1.07 s for frame threading on a 2-minute 640x360 clip, 2 cores); single-slice pictures
    (most real-world H.264) and other codecs use frame threading.
    """
    src.threads_set = True
    cc = src.stream.codec_context
    if cc.is_open:
        return
    threads = decode_threads()
    kind = "AUTO"  # FFmpeg picks frame threading where the codec supports it
    if cc.name == "h264" and packet.size:
        with contextlib.suppress(Exception):  # a sniffing problem must never stop decoding
            if _h264_slices(bytes(packet), cc.extradata) > 1:
                kind = "SLICE"
    with contextlib.suppress(Exception):
        cc.thread_type = kind
        cc.thread_count = threads


@dataclasses.dataclass
class _Decoded:
    frame: Any  # av.VideoFrame
    time: float  # seconds from the stream start
    index: int  # running index in decode output (identity for caching)
    end: float  # time + this frame's display duration


def _decode(src: _Source) -> Iterator[Any]:
    """``container.decode(stream)``, choosing the decoder threads at the first packet."""
    for packet in src.container.demux(src.stream):
        if not src.threads_set:
            _set_threads(src, packet)
        yield from packet.decode()


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
        for frame in _decode(src):
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


def _header_info(src: _Source, first: _Decoded) -> tuple[int, int, int, float | None]:
    """(rotation quarter turns, display width, display height, duration from metadata)."""
    k = _rotation_k(first.frame)
    w, h = int(first.frame.width), int(first.frame.height)  # what read_frames returns
    duration = src.header_duration
    if duration is None and src.container.duration and src.container.duration > 0:
        duration = float(src.container.duration) / 1e6
    if k % 2:
        w, h = h, w
    return k, w, h, duration


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
        k, w, h, duration = _header_info(src, first)
        num_frames = int(src.stream.frames) if src.stream.frames else None
        fps = src.fps
    if duration is None:  # no metadata: measure, and take the average rate from the scan
        duration, counted = _scan_duration(path)
        num_frames = num_frames or counted
        if num_frames and duration > 0:
            fps = num_frames / duration
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


def _bin_rows(y: np.ndarray, n: int) -> np.ndarray:
    """Sums of ``n`` bands of rows of a uint8 plane; band i is rows [i*H//n, (i+1)*H//n)."""
    fh = y.shape[0]
    tall = -(-fh // n)
    dtype = np.uint16 if tall <= 257 else np.uint32  # 257 * 255 < 2**16
    if fh % n == 0:  # equal bands: one reduction over a reshaped view
        return y.reshape(n, tall, y.shape[1]).sum(axis=1, dtype=dtype)
    # Bands are q or q + 1 rows tall: add the first q rows of every band, then the extras
    # (vector adds of whole rows, several times faster than np.add.reduceat along axis 0).
    edges = (np.arange(n + 1) * fh) // n
    starts, q = edges[:-1], int(np.diff(edges).min())
    acc = y[starts].astype(dtype)
    for k in range(1, q):
        acc += y[starts + k]
    extra = np.nonzero(np.diff(edges) > q)[0]
    acc[extra] += y[starts[extra] + q]
    return acc


def _luma_thumbnail(frame: Any, w: int, h: int) -> np.ndarray | None:
    """Area-average the 8-bit luma plane straight from the decoder (no swscale setup).

    Much cheaper than ``reformat`` per thumbnail, which matters at 4 fps over long videos.
    Pixel (i, j) is the mean of rows [i*H//h, (i+1)*H//h) x columns [j*W//w, (j+1)*W//w).
    Returns None (caller falls back to ``reformat``) for other pixel formats or upscaling.
    Limited-range luma is expanded to full range, as ``format='gray'`` does.
    """
    fmt = frame.format.name
    fw, fh = frame.width, frame.height
    if fmt not in _LUMA_FIRST_PLANE or w > fw or h > fh:
        return None
    plane = frame.planes[0]
    y = np.frombuffer(plane, np.uint8).reshape(-1, plane.line_size)[:fh, :fw]
    col_edges = (np.arange(w) * fw) // w
    sums = np.add.reduceat(_bin_rows(y, h), col_edges, axis=1, dtype=np.uint32)
    row_edges = (np.arange(h) * fh) // h
    counts = np.outer(np.diff(np.append(row_edges, fh)), np.diff(np.append(col_edges, fw)))
    mean = sums / counts
    full_range = fmt.startswith("yuvj") or fmt == "gray" or frame.color_range == 2
    if not full_range:
        mean = (mean - 16.0) * (255.0 / 219.0)
    return np.clip(np.rint(mean), 0, 255).astype(np.uint8)


def _grey(d: _Decoded, width: int, height: int, interpolation: str) -> np.ndarray:
    """The upright grey thumbnail (width x height) of a decoded frame."""
    kq = _rotation_k(d.frame)
    w, h = (height, width) if kq % 2 else (width, height)
    arr = _luma_thumbnail(d.frame, w, h) if interpolation == "AREA" else None
    if arr is None:
        arr = d.frame.reformat(w, h, format="gray", interpolation=interpolation).to_ndarray()
    return np.ascontiguousarray(np.rot90(arr, kq)) if kq else arr


def _grid(fps: float) -> Iterator[float]:
    """k / fps for k = 0, 1, 2, ... (endless)."""
    for k in itertools.count():
        yield k / fps


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

    def take(target: float, d: _Decoded) -> bool:
        if d.index not in seen:
            seen.add(d.index)
            times.append(d.time)
            greys.append(_grey(d, width, height, interpolation))
        return True

    with _open(path) as src, contextlib.closing(_iter_frames(src)) as frames:
        last = _select_nearest(frames, _grid(fps), take, lambda t, d: t < d.end and take(t, d))
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


def _map_threads(fn: Callable[[Any], Any], items: Sequence[Any], threads: int) -> list[Any]:
    """``[fn(x) for x in items]``, on ``threads`` threads when that can help (``fn`` must
    release the GIL for most of its work, as swscale and PIL's resampling do)."""
    threads = min(threads, len(items))
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


class _Target(float):
    """A grid time (seconds) that says which grids it is on: candidate and/or keep."""

    def __new__(cls, t: float, cand: bool, keep: bool) -> _Target:
        self = super().__new__(cls, t)
        self.cand, self.keep = cand, keep
        return self


@dataclasses.dataclass(frozen=True)
class SAARead:
    """What :func:`read_for_saa` returns (iterable as ``info, cand_times, grey, frames, pts``).

    ``cand_times`` [T] / ``grey`` [T, h, w] are exactly what :func:`read_thumbnails` returns;
    ``frames`` [N, H, W, 3] uint8 (upright RGB) and ``pts`` [N] (their real times, seconds)
    follow the order of the chosen times (both None with ``rgb=False``); ``plan`` is what
    ``plan_fn`` returned; ``single_pass`` is False when the memory bound made it decode the
    chosen frames in a second pass (then ``frames``/``pts`` are exactly :func:`read_frames`').
    """

    info: VideoInfo
    cand_times: np.ndarray
    grey: np.ndarray
    frames: np.ndarray | None
    pts: np.ndarray | None
    plan: Any
    single_pass: bool

    def __iter__(self) -> Iterator[Any]:
        return iter((self.info, self.cand_times, self.grey, self.frames, self.pts))


def _match_kept(kept: np.ndarray, want: np.ndarray, tol: float) -> np.ndarray:
    """Index into ``kept`` (sorted times) for every wanted time: the nearest (earlier on ties),
    except that a time whose nearest kept frame already went to an earlier (smaller) wanted
    time takes the next kept frame when that is within ``tol`` seconds, so that distinct
    nearby times (the two frames of a temporal patch) get distinct frames wherever the grid
    allows. Equal times get the same frame; the frames follow the order of the times."""
    order = np.argsort(want, kind="stable")
    out = np.empty(len(want), np.int64)
    prev, prev_t = -1, -math.inf
    for i in order:
        t = float(want[i])
        j = int(np.searchsorted(kept, t, side="left"))  # kept[j-1] < t <= kept[j]
        if j == len(kept) or (j > 0 and t - kept[j - 1] <= kept[j] - t):
            j -= 1
        if t == prev_t:  # the same time again: the same frame
            j = prev
        elif j <= prev and prev + 1 < len(kept) and abs(kept[prev + 1] - t) <= tol:
            j = prev + 1
        j = max(j, prev)  # never behind an earlier time's frame (order is kept)
        out[i] = j
        prev, prev_t = j, t
    return out


def read_for_saa(
    path: Any,
    plan_fn: Callable[[VideoInfo, np.ndarray, np.ndarray], Any],
    *,
    candidate_fps: float = 4.0,
    thumb_size: tuple[int, int] | Callable[[int, int], tuple[int, int]] = (32, 32),
    keep_fps: float | None = None,
    size: tuple[int, int] | None = None,
    interpolation: str = "BICUBIC",
    rgb: bool = True,
    transform: Callable[[Any, np.ndarray], np.ndarray] | None = None,
    max_keep_bytes: int = MAX_KEEP_BYTES,
    threads: int | None = None,
) -> SAARead:
    """Probe, SAA thumbnails, plan and the chosen RGB frames with ONE decode of the video.

    1. Decodes the video once. For every time on the candidate grid ``k / candidate_fps`` the
       nearest frame gives a grey thumbnail, exactly as :func:`read_thumbnails` (``thumb_size``
       is ``(width, height)``, or a function of the display ``(width, height)``); the frames
       nearest to the grid ``k / keep_fps`` (default: the candidate grid) are kept as decoded
       (YUV, about 1.5 bytes per pixel; no RGB conversion).
    2. ``plan_fn(info, cand_times, grey)`` chooses the frames: it returns their times
       (seconds), or an object with a ``.times`` array (e.g. an SAA ``Plan``), kept as
       ``plan``. ``info`` is what :func:`probe` reports, except that a duration missing from
       the metadata comes from the decoded frames instead of a packet scan.
    3. Only the chosen frames are converted to RGB (on ``threads`` threads, default
       :func:`decode_threads`), optionally scaled to ``size = (width, height)`` by swscale,
       then passed through ``transform(plan, frame)`` when given (on the same threads; e.g.
       the processor's resize to the plan's resolution, so that the full-size RGB frames are
       never all in memory at once; ``frames`` then holds what it returns).

    Each chosen time gets the kept frame nearest to it, not the nearest frame of the video:
    SAA never asks for a higher local rate than ``max_fps`` (4 fps, the candidate rate by
    default), so the chosen times are the candidates up to the offset of a pair's second frame
    (at most half a grid step, 0.125 s at 4 fps). Two times that would share a kept frame take
    neighbouring kept frames when those are within a grid step (see ``_match_kept``). The
    returned ``pts`` are the real times of the frames actually returned, and are what ETA must
    use as timestamps. When the kept frames would exceed ``max_keep_bytes`` (long or large
    videos), they are dropped as soon as that is known and the chosen frames are decoded in a
    second pass with :func:`read_frames` (``single_pass`` is then False).
    """
    if not candidate_fps > 0:
        raise ValueError(f"candidate_fps must be positive, got {candidate_fps}")
    keep_fps = float(candidate_fps if keep_fps is None else keep_fps)
    if not keep_fps > 0:
        raise ValueError(f"keep_fps must be positive, got {keep_fps}")
    size = _check_size(size)
    spath = _path_str(path)
    threads = decode_threads() if threads is None else max(1, int(threads))
    times: list[float] = []
    greys: list[np.ndarray] = []
    seen: set[int] = set()
    kept: dict[int, _Decoded] = {}
    state = {"keep": bool(rgb), "bytes": 0, "frame_bytes": 0, "count": 0}
    tw = th = 0

    def take(target: _Target, d: _Decoded) -> bool:
        if target.cand and d.index not in seen:
            seen.add(d.index)
            times.append(d.time)
            greys.append(_grey(d, tw, th, "AREA"))
        if target.keep and state["keep"] and d.index not in kept:
            kept[d.index] = d
            state["bytes"] += state["frame_bytes"]
            if state["bytes"] > max_keep_bytes:  # too long or too large: two passes
                state["keep"] = False
                kept.clear()
        return True

    def targets() -> Iterator[_Target]:
        grids = heapq.merge(((t, 0) for t in _grid(candidate_fps)),
                            ((t, 1) for t in _grid(keep_fps)))
        for t, group in itertools.groupby(grids, key=lambda x: x[0]):
            kinds = {k for _, k in group}
            yield _Target(t, 0 in kinds, 1 in kinds)

    def counted(frames: Iterable[_Decoded]) -> Iterator[_Decoded]:
        for d in frames:
            state["count"] += 1
            yield d

    with _open(path) as src, contextlib.closing(_iter_frames(src)) as frames:
        first = next(frames, None)
        if first is None:
            raise _no_frames(spath)
        k, width, height, duration = _header_info(src, first)
        tw, th = (int(v) for v in (thumb_size(width, height) if callable(thumb_size)
                                   else thumb_size))
        if tw <= 0 or th <= 0:
            raise ValueError(f"thumb_size must be positive (width, height), got {(tw, th)}")
        state["frame_bytes"] = sum(int(p.buffer_size) for p in first.frame.planes)
        if duration is not None and rgb:  # known up front: do not even start keeping
            n_keep = math.ceil(duration * keep_fps) + 1
            if src.stream.frames:
                n_keep = min(n_keep, int(src.stream.frames))
            state["keep"] = n_keep * state["frame_bytes"] <= max_keep_bytes
        last = _select_nearest(
            counted(itertools.chain([first], frames)), targets(), take,
            lambda t, d: t < d.end and take(t, d),
        )
        assert last is not None
        _check_truncation(src, last, math.inf)
        num_frames = int(src.stream.frames) if src.stream.frames else None
        fps = src.fps
        if duration is None:  # no metadata: the decoded frames tell
            duration = last.end
            num_frames = num_frames or state["count"]
            if num_frames and duration > 0:
                fps = num_frames / duration
        info = VideoInfo(spath, float(duration), float(fps), width, height, 90 * k, num_frames)
        cand_times = np.asarray(times, np.float64)
        grey = np.stack(greys).astype(np.uint8, copy=False)
        plan = plan_fn(info, cand_times, grey)
        want = np.asarray(getattr(plan, "times", plan), dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(want)):
            raise ValueError("plan_fn returned non-finite times")
        if not rgb:
            return SAARead(info, cand_times, grey, None, None, plan, True)
        single = bool(state["keep"]) and bool(kept)
        if single:
            pool = sorted(kept.values(), key=lambda d: d.time)
            kept_times = np.asarray([d.time for d in pool], np.float64)
            picks = _match_kept(kept_times, want, 1.0 / keep_fps)
            unique = sorted(set(picks.tolist()))

            def convert(d: _Decoded) -> np.ndarray:
                arr = _to_rgb(d, size, interpolation)
                return arr if transform is None else transform(plan, arr)

            rgbs = _map_threads(lambda j: convert(pool[j]), unique, threads)
            slot = {j: i for i, j in enumerate(unique)}
            if len(want):
                out = np.stack([rgbs[slot[int(j)]] for j in picks])
            else:
                out = convert(first)[:0]
            pts = kept_times[picks] if len(want) else np.zeros((0,), np.float64)
            kept.clear()
            return SAARead(info, cand_times, grey, out, pts, plan, True)
    # The candidates did not fit in memory: decode the chosen frames in a second pass.
    out, pts = read_frames(path, want, size=size, interpolation=interpolation)
    if transform is not None:
        if len(out):
            out = np.stack(_map_threads(lambda f: transform(plan, f), list(out), threads))
        else:
            out = transform(plan, np.zeros(out.shape[1:], np.uint8))[None][:0]
    return SAARead(info, cand_times, grey, out, pts, plan, False)


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
