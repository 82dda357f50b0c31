"""Synthetic grounding videos: real H.264 mp4 files of coloured shapes with exact windows.

Tests, the demo and benchmarks need videos with known ground truth and no download. Each
video shows a static grey noise texture (``background_drift`` pixels of slow drift, 0 by
default) and 1 to ``max_events`` *named* objects ("red circle", "blue square", ...) with a
thin black outline. Event object k is drawn in exactly the frames whose presentation time
lies in its window ``[t1, t2]`` (seconds, multiples of 0.1) and moves in one direction
meanwhile: it sweeps across its quarter of the frame every ``sweep_seconds`` and re-enters
from the start side; an optional distractor object appears too but is never queried. Every
object in a video has its own colour, so a colour test on decoded pixels tells which object
is on screen. Refusal queries name colours never shown in that video.

The background is static and the objects are outlined and keep moving so that what changes
in a video is its events: SAA's change score (luma differences of small thumbnails) then
rises inside the event windows and crowds frames there, as on real videos with a steady
camera. (A drifting texture moves every pixel and drowns the objects; some colours, e.g.
magenta and green, have nearly the background's luma and show up only through the outline.)

``generate`` writes ``videos/*.mp4`` and ``annotations.jsonl`` (one line per video-query
pair: ``video``, ``query``, ``windows``, ``duration``, ``qid``, ``relevant``).
CLI: ``python -m tempo_jax.data.synthetic --out DIR --num N --seed S``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

__all__ = [
    "COLORS",
    "MOTIONS",
    "SHAPES",
    "SyntheticSpec",
    "colour_pixels",
    "different_colours",
    "generate",
    "main",
    "make_video",
    "plan_video",
]

# Saturated colours, pairwise far apart (RGB distance >= 150) and far from the grey
# background (channel spread <= 30, values 50..175), so a distance threshold of ~60
# separates them after yuv420p chroma subsampling and compression.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 195, 40),
    "blue": (30, 60, 235),
    "yellow": (240, 220, 30),
    "magenta": (220, 40, 220),
    "cyan": (30, 215, 225),
    "white": (250, 250, 250),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
MOTIONS: dict[str, tuple[str, tuple[int, int]]] = {
    # name: (phrase, unit direction (dx, dy) in image coordinates)
    "right": ("to the right", (1, 0)),
    "left": ("to the left", (-1, 0)),
    "up": ("upward", (0, -1)),
    "down": ("downward", (0, 1)),
}
_TEMPLATES: tuple[str, ...] = (
    "the {obj} appears and moves {motion}",
    "a {obj} shows up and slides {motion}",
    "the {obj} moving {motion} across the screen",
    "when does the {obj} move {motion}?",
)
_ANNOTATION_FILE = "annotations.jsonl"
_SPEC_FILE = "spec.json"


@dataclasses.dataclass
class SyntheticSpec:
    """How many videos and what they look like; everything is a function of ``seed``."""

    num: int
    seed: int = 0
    width: int = 128
    height: int = 96
    fps: float = 8.0
    min_duration: float = 8.0
    max_duration: float = 16.0
    max_events: int = 3
    refusal_queries_per_video: int = 1
    distractor_prob: float = 0.5
    crf: int = 18
    preset: str = "veryfast"
    gop_seconds: float = 2.0  # keyframe interval, so that seeking is exercised
    background_drift: float = 0.0  # amplitude (pixels) of the background's slow drift
    min_event_fraction: float = 0.15  # event length as a fraction of the video, lower bound
    max_event_fraction: float = 0.6  # ... upper bound (shorter events: harder to guess)
    sweep_seconds: float = 2.0  # an object crosses its lane this often; 0: once per window
    outline: bool = True  # black outline around objects (luma contrast for every colour)
    object_scale: float = 0.11  # object radius as a fraction of min(width, height)
    tint: float = 10.0  # the background's per-video colour cast: each channel +- up to this
    texture_contrast: float = 1.0  # scales the background texture's deviations from mid-grey
    colours: tuple[str, ...] | None = None  # the colours drawn from (None: all of COLORS)
    # a video with a single object moves it across the whole frame (not one quarter of it)
    whole_frame_single: bool = False

    def __post_init__(self) -> None:
        if self.num < 0:
            raise ValueError(f"num must be >= 0, got {self.num}")
        if self.width < 16 or self.height < 16 or self.width % 2 or self.height % 2:
            raise ValueError(f"width/height must be even and >= 16, got {self.width}x{self.height}")
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if not 1.0 <= self.min_duration <= self.max_duration:
            raise ValueError(
                f"need 1 <= min_duration <= max_duration, got {self.min_duration}, "
                f"{self.max_duration}"
            )
        if not 1 <= self.max_events <= 3:  # each object owns a quarter of the frame
            raise ValueError(f"max_events must be in [1, 3], got {self.max_events}")
        palette = self.palette()
        unknown = [c for c in palette if c not in COLORS]
        if unknown or len(set(palette)) < 2:
            raise ValueError(f"colours must be 2 or more distinct names from {sorted(COLORS)}, "
                             f"got {list(palette)}")
        if not (self.tint >= 0 and self.texture_contrast >= 0):
            raise ValueError(f"tint and texture_contrast must be >= 0, got {self.tint}, "
                             f"{self.texture_contrast}")
        r = self.radius()
        whole = self.whole_frame_single and self.max_events == 1 and self.distractor_prob == 0
        lane = min(self.width, self.height) // (1 if whole else 2)
        if 2 * r + 4 > lane:  # an object must fit, and move, in its lane
            raise ValueError(f"object_scale {self.object_scale} gives objects of radius {r} px, "
                             f"too big for {'the' if whole else 'the quarters of the'} "
                             f"{self.width}x{self.height} frame")
        if not (self.background_drift >= 0 and self.sweep_seconds >= 0):
            raise ValueError(
                f"background_drift and sweep_seconds must be >= 0, got {self.background_drift}, "
                f"{self.sweep_seconds}"
            )

    def palette(self) -> tuple[str, ...]:
        """The colour names objects and refusal queries are drawn from."""
        return tuple(self.colours) if self.colours is not None else tuple(COLORS)

    def radius(self) -> int:
        """Object radius in pixels."""
        return max(3, int(round(self.object_scale * min(self.width, self.height))))

    def looks(self) -> dict[str, Any]:
        """The fields that decide a video's content (all but ``num``)."""
        d = dataclasses.asdict(self)
        d.pop("num")
        if d["colours"] is not None:
            d["colours"] = list(d["colours"])
        return d


# ------------------------------------------------------------------------ planning


def _tenths(x: float) -> float:
    return round(round(x * 10) / 10, 1)


def _rate(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def plan_video(rng: np.random.Generator, spec: SyntheticSpec) -> dict[str, Any]:
    """Draw one video's content: duration, objects, windows, motions and queries.

    Cheap (no pixels), so that ``generate`` can rebuild annotations for videos that
    already exist on disk.
    """
    rate = _rate(spec.fps)
    lo = math.ceil(spec.min_duration * rate)
    hi = max(lo, math.floor(spec.max_duration * rate))
    num_frames = int(rng.integers(lo, hi + 1))
    duration = float(num_frames / rate)
    last_t = float((num_frames - 1) / rate)  # time of the last frame

    n_events = int(rng.integers(1, spec.max_events + 1))
    has_distractor = bool(rng.random() < spec.distractor_prob)
    colours = [str(c) for c in rng.permutation(list(spec.palette()))]
    used = colours[: n_events + int(has_distractor)]
    free = colours[n_events + int(has_distractor) :]

    r = spec.radius()
    cells = [int(c) for c in rng.permutation(4)]  # one quarter of the frame per object
    whole = spec.whole_frame_single and len(used) == 1
    objects = []
    for k, colour in enumerate(used):
        shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
        motion = str(list(MOTIONS)[int(rng.integers(len(MOTIONS)))])
        # Window on a 0.1 s grid, inside [0.5, last_t - 0.3], at least ~1.5 s long.
        min_len = min(max(1.5, spec.min_event_fraction * duration), max(0.5, last_t - 1.0))
        max_len = max(min_len, min(spec.max_event_fraction * duration, last_t - 0.8))
        length = _tenths(rng.uniform(min_len, max_len))
        t1_max = max(0.5, last_t - 0.3 - length)
        t1 = _tenths(rng.uniform(0.5, t1_max))
        t2 = _tenths(min(t1 + length, last_t))
        # Straight path along the motion direction inside the object's own quarter of the
        # frame, so objects never occlude each other (pixel tests stay exact).
        dx, dy = MOTIONS[motion][1]
        col, row = (0, 0) if whole else (cells[k] % 2, cells[k] // 2)
        cell_w, cell_h = (spec.width, spec.height) if whole else (spec.width / 2, spec.height / 2)
        xa, xb = col * cell_w + r + 1, (col + 1) * cell_w - r - 2
        ya, yb = row * cell_h + r + 1, (row + 1) * cell_h - r - 2
        x0 = x1 = float(rng.uniform(xa, xb))
        y0 = y1 = float(rng.uniform(ya, yb))
        if dx:
            x0, x1 = (xa, xb) if dx > 0 else (xb, xa)
        else:
            y0, y1 = (ya, yb) if dy > 0 else (yb, ya)
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        name = f"{colour} {shape}"
        objects.append(
            {
                "object": name,
                "colour": colour,
                "shape": shape,
                "motion": motion,
                "query": template.format(obj=name, motion=MOTIONS[motion][0]),
                "window": [t1, t2],
                "path": [[round(x0, 2), round(y0, 2)], [round(x1, 2), round(y1, 2)]],
                "radius": r,
                "distractor": k >= n_events,
            }
        )

    absent = []
    for k in range(min(spec.refusal_queries_per_video, len(free))):
        colour = free[k]
        shape = str(SHAPES[int(rng.integers(len(SHAPES)))])
        motion = str(list(MOTIONS)[int(rng.integers(len(MOTIONS)))])
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        name = f"{colour} {shape}"
        absent.append(
            {"object": name, "query": template.format(obj=name, motion=MOTIONS[motion][0])}
        )

    return {
        "duration": round(duration, 6),
        "num_frames": num_frames,
        "fps": float(rate),
        "width": spec.width,
        "height": spec.height,
        "texture_seed": int(rng.integers(2**31)),
        "tint": float(spec.tint),
        "texture_contrast": float(spec.texture_contrast),
        "background_drift": float(spec.background_drift),
        "sweep_seconds": float(spec.sweep_seconds),
        "outline": max(1, int(round(r / 8))) if spec.outline else 0,
        "events": [o for o in objects if not o["distractor"]],
        "distractors": [o for o in objects if o["distractor"]],
        "absent_queries": absent,
    }


# ----------------------------------------------------------------------- rendering


def _shape_mask(shape: str, r: int) -> np.ndarray:
    """Boolean mask [2r+1, 2r+1] of a shape centred in its box."""
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    if shape == "circle":
        return xx**2 + yy**2 <= r**2
    if shape == "square":
        return (np.abs(xx) <= 0.85 * r) & (np.abs(yy) <= 0.85 * r)
    if shape == "diamond":
        return np.abs(xx) + np.abs(yy) <= r
    if shape == "triangle":  # pointing up, base at the bottom
        return (yy <= 0.8 * r) & (2 * np.abs(xx) <= (yy + r) * 1.1)
    if shape == "star":  # 5 points: radius interpolates between outer and inner by angle
        ang = np.arctan2(xx, -yy)
        frac = np.abs(((ang / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at the tips
        return np.hypot(xx, yy) <= r * (0.45 + 0.55 * frac)
    raise ValueError(f"unknown shape {shape!r}")


def _texture(seed: int, height: int, width: int, tint: float = 10.0,
             contrast: float = 1.0) -> np.ndarray:
    """A deterministic low-saturation noise texture [H, W, 3] (float) in about 50..175, its
    colour cast up to `tint` per channel (0: neutral grey, so any hue is an object's) and its
    deviations from mid-grey scaled by `contrast` (low: objects dominate every patch)."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0.0, 1.0, (height // 8 + 2, width // 8 + 2))
    up = np.kron(coarse, np.ones((8, 8)))[:height, :width]
    # Soften the blocks with a small box blur (separable, edge-padded).
    k = 5
    pad = np.pad(up, k // 2, mode="edge")
    cs = np.cumsum(np.cumsum(np.pad(pad, ((1, 0), (1, 0))), 0), 1)
    smooth = (cs[k:, k:] - cs[:-k, k:] - cs[k:, :-k] + cs[:-k, :-k]) / (k * k)
    fine = rng.uniform(-1.0, 1.0, (height, width))
    grey = 60.0 + 90.0 * smooth + 12.0 * fine
    grey = 112.5 + contrast * (grey - 112.5)
    cast = rng.uniform(-1.0, 1.0, 3) * tint  # drawn whatever `tint`: same texture for a seed
    return np.clip(grey[..., None] + cast, 50.0, 175.0)


def _erode(mask: np.ndarray, k: int) -> np.ndarray:
    """Binary erosion by a (2k+1) x (2k+1) square (pixels outside the mask count as off)."""
    if k <= 0:
        return mask
    pad = np.pad(mask, k)
    out = np.ones_like(mask)
    n, m = mask.shape
    for dy in range(2 * k + 1):
        for dx in range(2 * k + 1):
            out &= pad[dy : dy + n, dx : dx + m]
    return out


def _render_frames(plan: dict[str, Any]):
    """Yield (frame index, RGB uint8 [H, W, 3]) for every frame of a planned video."""
    w, h = plan["width"], plan["height"]
    rate = Fraction(plan["fps"]).limit_denominator(1001)
    margin = max(4, min(w, h) // 12)
    tex = _texture(plan["texture_seed"], h + 2 * margin, w + 2 * margin,
                   plan.get("tint", 10.0), plan.get("texture_contrast", 1.0)).astype(np.uint8)
    drift = min(float(plan["background_drift"]), float(margin))
    sweep = float(plan["sweep_seconds"])
    objects = plan["events"] + plan["distractors"]
    masks = [_shape_mask(o["shape"], o["radius"]) for o in objects]
    fills = [_erode(m, int(plan["outline"])) for m in masks]  # colour inside the outline
    windows = [
        (Fraction(round(o["window"][0] * 10), 10), Fraction(round(o["window"][1] * 10), 10))
        for o in objects
    ]
    for i in range(plan["num_frames"]):
        t = Fraction(i) / rate  # exact frame time: visibility has no float edge cases
        tf = float(t)
        ox = margin + int(round(drift * math.sin(2 * math.pi * tf / 7.0)))
        oy = margin + int(round(drift * math.sin(2 * math.pi * tf / 11.0 + 1.0)))
        frame = tex[oy : oy + h, ox : ox + w].copy()
        for o, mask, fill, (t1, t2) in zip(objects, masks, fills, windows, strict=True):
            if not t1 <= t <= t2:
                continue
            if sweep > 0:  # lane crossings every `sweep` seconds, always in the same direction
                a = (float(t - t1) / sweep) % 1.0
            else:
                a = float((t - t1) / (t2 - t1)) if t2 > t1 else 0.0
            (x0, y0), (x1, y1) = o["path"]
            cx = int(round(x0 + a * (x1 - x0)))
            cy = int(round(y0 + a * (y1 - y0)))
            r = o["radius"]
            ya, yb = max(0, cy - r), min(h, cy + r + 1)
            xa, xb = max(0, cx - r), min(w, cx + r + 1)
            box = (slice(ya - (cy - r), yb - (cy - r)), slice(xa - (cx - r), xb - (cx - r)))
            frame[ya:yb, xa:xb][mask[box]] = (0, 0, 0)
            frame[ya:yb, xa:xb][fill[box]] = COLORS[o["colour"]]
        yield i, frame


def _encode(path: Path, plan: dict[str, Any], spec: SyntheticSpec) -> None:
    rate = _rate(plan["fps"])
    tmp = path.with_name(path.name + ".partial")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        try:
            stream = container.add_stream("libx264", rate=rate)
            stream.options = {"preset": spec.preset, "crf": str(spec.crf)}
        except (av.FFmpegError, ValueError):  # a PyAV build without libx264
            stream = container.add_stream("h264", rate=rate)
        stream.width = plan["width"]
        stream.height = plan["height"]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1) / rate
        stream.gop_size = max(1, int(round(spec.gop_seconds * plan["fps"])))
        for i, rgb in _render_frames(plan):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = stream.codec_context.time_base
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    os.replace(tmp, path)


def make_video(
    path: str | os.PathLike,
    rng: np.random.Generator,
    spec: SyntheticSpec,
    *,
    rel_path: str | None = None,
) -> dict[str, Any]:
    """Plan one video with ``rng``, write it to ``path`` (mp4, H.264, yuv420p).

    Returns its metadata: ``video`` (``rel_path``, default ``videos/<file name>``),
    ``duration``, ``events`` (``object``, ``query``, ``window`` and drawing details),
    ``distractors`` and ``absent_queries`` (objects never shown in this video).
    """
    path = Path(path)
    plan = plan_video(rng, spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    _encode(path, plan, spec)
    return {"video": rel_path or f"videos/{path.name}", **plan}


def colour_pixels(frames: np.ndarray, colour: str, tol: float = 60.0) -> np.ndarray:
    """Per frame, how many pixels are within ``tol`` (RGB distance) of a named colour.

    ``frames`` is [..., H, W, 3] uint8 RGB; returns counts of shape ``frames.shape[:-3]``.
    """
    ref = np.asarray(COLORS[colour], np.float32)
    d = np.linalg.norm(np.asarray(frames, np.float32) - ref, axis=-1)
    return (d <= tol).sum(axis=(-2, -1))


def _annotation_lines(meta: dict[str, Any], stem: str) -> list[dict[str, Any]]:
    shown = sorted(o["colour"] for o in meta["events"] + meta["distractors"])
    # what the video shows, for a caption think: every object, in the order they appear
    seen = sorted(meta["events"] + meta["distractors"], key=lambda o: o["window"][0])
    caption = " and ".join(f"a {o['object']}" for o in seen)
    lines = []
    for k, ev in enumerate(meta["events"]):
        lines.append(
            {
                "video": meta["video"],
                "query": ev["query"],
                "windows": [list(ev["window"])],
                "duration": meta["duration"],
                "qid": f"{stem}_q{k}",
                "relevant": True,
                "colours": shown,
                "caption": caption,
            }
        )
    for k, ab in enumerate(meta["absent_queries"]):
        lines.append(
            {
                "video": meta["video"],
                "query": ab["query"],
                "windows": [],
                "duration": meta["duration"],
                "qid": f"{stem}_r{k}",
                "relevant": False,
                "colours": shown,
                "caption": caption,
            }
        )
    return lines


def query_colour(query: str) -> str | None:
    """The colour a synthetic query names (its first colour word), or None."""
    for word in query.lower().replace("?", " ").split():
        if word in COLORS:
            return word
    return None


def different_colours(record: dict, donor: dict) -> bool:
    """`make_pir`'s `compatible` test for synthetic videos: the donor query names a colour the
    video never shows (annotation field `colours`; else the colour of the record's own
    query), so it truly does not happen there."""
    b = query_colour(donor["query"])
    shown = record.get("colours") or [query_colour(record["query"])]
    return b is not None and None not in shown and b not in shown


def generate(
    out_dir: str | os.PathLike, spec: SyntheticSpec, *, progress: bool | None = None
) -> Path:
    """Write ``spec.num`` videos and their ``annotations.jsonl`` under ``out_dir``.

    Deterministic for a seed (video ``i`` uses ``default_rng([seed, i])``), so it is also
    idempotent: videos already on disk (written atomically, so complete) are kept and only
    the annotations are rewritten, byte-identical. Refuses a directory made with a different
    look (spec other than ``num``). Returns the annotation file's path.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    spec_file = out / _SPEC_FILE
    looks = json.dumps(spec.looks(), sort_keys=True)
    if spec_file.exists():
        old = json.dumps(json.loads(spec_file.read_text()), sort_keys=True)
        if old != looks:
            raise ValueError(f"{out}: holds synthetic videos made with a different spec: {old}")
    else:
        spec_file.write_text(looks + "\n")
    if progress is None:
        progress = spec.num >= 8
    lines: list[dict[str, Any]] = []
    for i in tqdm(range(spec.num), desc="synthetic videos", disable=not progress, unit="video"):
        stem = f"syn{i:05d}"
        rel = f"videos/{stem}.mp4"
        rng = np.random.default_rng([spec.seed, i])
        target = out / rel
        if target.exists():
            meta = {"video": rel, **plan_video(rng, spec)}
        else:
            meta = make_video(target, rng, spec, rel_path=rel)
        lines.extend(_annotation_lines(meta, stem))
    ann = out / _ANNOTATION_FILE
    tmp = ann.with_name(ann.name + ".partial")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, ann)
    return ann


def main(argv: Sequence[str] | None = None) -> Path:
    """Command line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--num", type=int, required=True, help="number of videos")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--fps", type=float, default=8.0)
    ap.add_argument("--min-duration", type=float, default=8.0)
    ap.add_argument("--max-duration", type=float, default=16.0)
    ap.add_argument("--max-events", type=int, default=3)
    ap.add_argument("--refusals", type=int, default=1, help="refusal queries per video")
    ap.add_argument("--crf", type=int, default=18)
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--background-drift", type=float, default=0.0,
                    help="pixels of slow background drift (0: static)")
    ap.add_argument("--sweep-seconds", type=float, default=2.0,
                    help="seconds per lane crossing of an object (0: one per window)")
    args = ap.parse_args(argv)
    if args.num < 1:
        ap.error(f"--num must be >= 1, got {args.num}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        ap.error(f"--out {args.out}: exists and is not a directory")
    try:
        spec = _spec(args)
    except ValueError as e:  # the spec's own checks name the bad values
        ap.error(str(e))
    path = generate(args.out, spec, progress=True)
    print(path)
    return path


def _spec(args: argparse.Namespace) -> SyntheticSpec:
    return SyntheticSpec(
        num=args.num,
        seed=args.seed,
        width=args.width,
        height=args.height,
        fps=args.fps,
        min_duration=args.min_duration,
        max_duration=args.max_duration,
        max_events=args.max_events,
        refusal_queries_per_video=args.refusals,
        crf=args.crf,
        preset=args.preset,
        background_drift=args.background_drift,
        sweep_seconds=args.sweep_seconds,
    )


if __name__ == "__main__":
    main()
