"""Preview what the model will see of a video: SAA (or uniform) frames, resolution, tokens.

SAA's allocation is invisible in a training log, so this tool makes it inspectable: it runs
the same steps as the data pipeline (one ``video.read_for_saa`` pass: grey thumbnails ->
change scores -> plan, and with ``--png`` the chosen frames) and
prints the frame times, the resized frame size, the vision grid and the visual-token count
against the budget. ``--png`` draws a contact sheet (the chosen frames at the model's
resolution, each titled with its time) above the change-score curve with a tick at every
chosen time, so one sees frames crowd where things change.

CLI::

    python -m tempo_jax.data.preview VIDEO [--saa|--uniform] [--max-tokens N] [--json]
                                           [--png FILE] [--family qwen2_5_vl|qwen3_vl]

``--family`` picks the backbone whose frame geometry is planned (Qwen2.5-VL: frames in
multiples of 28 pixels, the default; Qwen3-VL: of 32).

With ``--json`` the last output line is one JSON object (``video``, ``duration``, ``mode``,
``frame_times``, ``resized_hw``, ``video_grid_thw``, ``num_visual_tokens``). Unreadable
input exits with code 1 and a single line ``error: <path>: <problem>`` on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from tempo_jax.data import saa, video
from tempo_jax.data.processor import FAMILIES, QWEN2_5_VL, PatchSpec, patch_spec, resize_frame

__all__ = [
    "JSON_KEYS", "PreviewError", "contact_sheet", "main", "preview", "render_text",
    "save_contact_sheet",
    "thumbnail_size",
]

# The keys of the --json line, in order (a stable contract for scripts).
JSON_KEYS: tuple[str, ...] = (
    "video", "duration", "mode", "frame_times", "resized_hw", "video_grid_thw",
    "num_visual_tokens",
)
# Longest side of the grey thumbnails the change scores are computed on: small enough to be
# cheap and insensitive to pixel noise (same scale as saa.grey_thumbnails' default).
THUMB_MAX_SIDE = 64


class PreviewError(Exception):
    """Input that cannot be previewed; the message is one line, ``"<path>: <problem>"``."""


def thumbnail_size(width: int, height: int, max_side: int = THUMB_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of the grey thumbnails: aspect kept, never upscaled."""
    s = min(1.0, max_side / max(width, height))
    return max(1, round(width * s)), max(1, round(height * s))


def preview(path: str | Path, saa_cfg: saa.SAAConfig | None = None,
            spec: PatchSpec | None = None) -> dict[str, Any]:
    """Plan the frames of one video as the data pipeline does, without decoding them.

    `spec`: the vision tower's patch geometry (``processor.patch_spec(vision_config)``;
    default Qwen2.5-VL's). Returns the JSON fields (see ``JSON_KEYS``) plus what a report or a
    plot needs: ``max_visual_tokens``, ``frame_hw`` (source display size), ``fps``,
    ``num_frames``, ``candidate_times`` and ``change_scores`` (lists), ``merge_size`` and
    ``temporal_patch_size``. The change scores are computed in uniform mode too, so both modes
    can be plotted against the same curve. Raises :class:`tempo_jax.data.video.VideoError`
    (or :class:`PreviewError`) for bad input.
    """
    return _run(path, saa_cfg or saa.SAAConfig(), with_frames=False, spec=spec)[0]


def contact_sheet(path: str | Path, out: str | Path, saa_cfg: saa.SAAConfig | None = None,
                  spec: PatchSpec | None = None) -> tuple[dict[str, Any], Path]:
    """Plan, decode and draw one video's SAA frames with their times (the notebook's frame
    strip); returns ``preview``'s result and the PNG's path."""
    result, frames, pts = _run(path, saa_cfg or saa.SAAConfig(), with_frames=True, spec=spec)
    return result, save_contact_sheet(result, frames, pts, out)


def _run(path: str | Path, cfg: saa.SAAConfig, with_frames: bool,
         spec: PatchSpec | None = None
         ) -> tuple[dict[str, Any], np.ndarray | None, np.ndarray | None]:
    """``preview``'s result and, with ``with_frames``, the chosen frames at the model's
    resolution (what the model sees) with their real times, from one decode pass."""
    spath = str(path)
    spec = spec or PatchSpec()

    def plan_fn(info: video.VideoInfo, times: np.ndarray, grey: np.ndarray) -> SimpleNamespace:
        if not (info.duration > 0 and math.isfinite(info.duration)):
            raise PreviewError(f"{spath}: zero-length video (duration {info.duration:g} s)")
        scores = saa.change_scores(grey, smooth=cfg.smooth, noise=cfg.score_noise)
        try:
            p = saa.plan(info.duration, (info.height, info.width), times, scores, cfg, spec)
        except ValueError as exc:
            raise PreviewError(f"{spath}: {exc}") from exc
        return SimpleNamespace(info=info, plan=p, times=p.times, scores=scores)

    read = video.read_for_saa(
        path, plan_fn, candidate_fps=cfg.candidate_fps, thumb_size=thumbnail_size,
        keep_fps=max(cfg.candidate_fps, cfg.max_fps), rgb=with_frames,
        transform=lambda r, f: resize_frame(f, *r.plan.resized_hw),
    )
    info, p, scores = read.plan.info, read.plan.plan, read.plan.scores
    result = {
        "video": spath,
        "duration": float(info.duration),
        "mode": "saa" if cfg.enabled else "uniform",
        "frame_times": [round(float(t), 6) for t in p.times],
        "resized_hw": [int(v) for v in p.resized_hw],
        "video_grid_thw": [int(v) for v in p.grid_thw],
        "num_visual_tokens": int(p.num_visual_tokens),
        "max_visual_tokens": int(cfg.max_visual_tokens),
        "frame_hw": [int(info.height), int(info.width)],
        "fps": float(info.fps),
        "num_frames": info.num_frames,
        "candidate_times": [float(t) for t in read.cand_times],
        "change_scores": [float(s) for s in scores],
        "merge_size": spec.merge_size,
        "temporal_patch_size": spec.temporal_patch_size,
    }
    return result, read.frames, read.pts


def render_text(result: dict[str, Any], width: int = 88) -> str:
    """A readable multi-line summary of a ``preview`` result."""
    t, gh, gw = result["video_grid_thw"]
    h, w = result["resized_hw"]
    sh, sw = result["frame_hw"]
    times = result["frame_times"]
    budget = result["max_visual_tokens"]
    tokens = result["num_visual_tokens"]
    nf = result["num_frames"]
    merge, tp = result["merge_size"], result["temporal_patch_size"]
    mode = (
        "SAA (frames follow content change)" if result["mode"] == "saa" else "uniform (fixed fps)"
    )
    rate = len(times) / result["duration"]
    pairs = " ".join(
        f"[{times[i]:.2f} {times[i + 1]:.2f}]" if i + 1 < len(times) else f"[{times[i]:.2f}]"
        for i in range(0, len(times), 2)
    )
    lines = [
        f"video:          {result['video']}",
        f"duration:       {result['duration']:.2f} s  (source {sw}x{sh}, {result['fps']:.2f} fps"
        + (f", {nf} frames)" if nf else ")"),
        f"mode:           {mode}",
        f"frames:         {len(times)} ({t} temporal patches of {tp}), mean {rate:.2f} frames/s",
        f"resized h x w:  {h} x {w}",
        f"grid (t, h, w): ({t}, {gh}, {gw})  = {t} x {gh // merge} x {gw // merge} merged tokens",
        f"visual tokens:  {tokens} of budget {budget} ({100.0 * tokens / budget:.1f}%)",
        "frame times (s), one [pair] per temporal patch:",
        textwrap.fill(pairs, width=width, initial_indent="  ", subsequent_indent="  "),
    ]
    return "\n".join(lines)


def save_contact_sheet(
    result: dict[str, Any],
    frames: np.ndarray,
    pts: np.ndarray,
    out: str | Path,
    dpi: int = 100,
) -> Path:
    """Write a PNG: the frames in a grid, titled with their times, over the change curve.

    ``frames`` [N, H, W, 3] uint8 are the decoded (and resized) frames of ``result``, and
    ``pts`` their real times. Uses matplotlib's Agg canvas directly (no pyplot state, no
    display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = int(frames.shape[0])
    fh, fw = frames.shape[1:3]
    ncols = max(1, min(n, max(4, math.ceil(math.sqrt(2.0 * n)))))
    nrows = math.ceil(n / ncols)
    cell_w = 1.6 if n <= 48 else 1.1
    cell_h = cell_w * fh / fw + 0.25  # room for the title
    curve_h = 2.4
    fig_w = max(8.0, ncols * cell_w)
    fig = Figure(figsize=(fig_w, nrows * cell_h + curve_h + 0.6), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows + 1, ncols, height_ratios=[cell_h] * nrows + [curve_h])
    fontsize = 7 if n <= 48 else 5.5
    for i in range(n):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        ax.imshow(frames[i], interpolation="nearest")
        ax.set_title(f"#{i} {float(pts[i]):.2f}s", fontsize=fontsize, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[nrows, :])
    c = np.asarray(result["candidate_times"], dtype=np.float64)
    s = np.asarray(result["change_scores"], dtype=np.float64)
    times = np.asarray(result["frame_times"], dtype=np.float64)
    ax.plot(c, s, color="tab:blue", lw=1.2, label="change score")
    ax.fill_between(c, 0.0, s, color="tab:blue", alpha=0.15)
    ax.vlines(times, -0.16, -0.03, color="tab:red", lw=0.9, label="chosen frames")
    for t in times:
        ax.axvline(t, color="tab:red", lw=0.5, alpha=0.15)
    ax.set_xlim(0.0, result["duration"])
    ax.set_ylim(-0.18, 1.05)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("change score")
    ax.legend(loc="upper right", fontsize=7)
    t, gh, gw = result["video_grid_thw"]
    fig.suptitle(
        f"{Path(result['video']).name}: {result['mode']}, {len(times)} frames at "
        f"{result['resized_hw'][0]}x{result['resized_hw'][1]}, grid ({t}, {gh}, {gw}), "
        f"{result['num_visual_tokens']}/{result['max_visual_tokens']} visual tokens",
        fontsize=9,
    )
    out = Path(out)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m tempo_jax.data.preview", description=__doc__.splitlines()[0]
    )
    ap.add_argument("video", help="video file")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--saa", dest="saa", action="store_true", default=True,
                      help="content-adaptive SAA sampling (default)")
    mode.add_argument("--uniform", dest="saa", action="store_false",
                      help="uniform sampling at 2 fps (Qwen's default), for comparison")
    ap.add_argument("--max-tokens", type=int, default=saa.SAAConfig.max_visual_tokens,
                    help="visual-token budget (merged tokens per video, default %(default)s)")
    ap.add_argument("--json", action="store_true",
                    help="end the output with one JSON line (machine readable)")
    ap.add_argument("--png", metavar="FILE", help="write a contact sheet PNG here")
    ap.add_argument("--family", choices=FAMILIES, default=QWEN2_5_VL,
                    help="backbone whose frame geometry is planned (default %(default)s)")
    args = ap.parse_args(argv)
    if args.max_tokens < 1:
        ap.error(f"--max-tokens must be >= 1, got {args.max_tokens}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (1 for unreadable input, with one stderr line)."""
    args = _parse(argv)
    cfg = dataclasses.replace(
        saa.SAAConfig(), enabled=bool(args.saa), max_visual_tokens=int(args.max_tokens)
    )
    try:
        spec = patch_spec(SimpleNamespace(family=args.family))
        result, frames, pts = _run(args.video, cfg, with_frames=bool(args.png), spec=spec)
        sheet = None
        if args.png:
            try:
                sheet = save_contact_sheet(result, frames, pts, args.png)
            except OSError as exc:
                raise PreviewError(f"{args.png}: cannot write PNG: {exc.strerror or exc}") from exc
    except (video.VideoError, PreviewError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    print(render_text(result))
    if sheet is not None:
        print(f"contact sheet:  {sheet}")
    if args.json:
        print(json.dumps({k: result[k] for k in JSON_KEYS}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
