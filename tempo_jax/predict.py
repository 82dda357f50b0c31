"""`python -m tempo_jax.predict`: ask your own video when something happens.

    python -m tempo_jax.predict --checkpoint runs/demo VIDEO "query" ["query" ...]
    python -m tempo_jax.predict --checkpoint runs/demo/hf FOLDER "query"      # every video
    python -m tempo_jax.predict --checkpoint runs/demo PAIRS.jsonl            # {"video", "query"}

The model's SAA / ETA / prompt settings come from the checkpoint (a training workdir or an
HF export), as in `evaluate run`, and the answers come from the same greedy sampler, so a
query answered here is answered as the evaluator would. Each video is decoded once, however
many questions it is asked. One line per query (`12.5 to 17.8 s` or `not in this video`);
`--json` prints one JSON object per query instead (the raw answer, the parsed window, the
frame times); `--png FILE` draws the frames the model saw with their times above the video's
timeline, one row per query with its answered window.

A video that cannot be read is reported (`error: <file>: <problem>`) and the others are still
answered; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tempo_jax import cli
from tempo_jax.cli import UsageError
from tempo_jax.data.video import VideoError

__all__ = ["describe", "draw", "main", "predict", "read_requests"]

log = logging.getLogger("tempo_jax.predict")

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v")


# ============================================================================ requests
def read_requests(inputs: Sequence[str]) -> list[dict]:
    """(video, query) requests from the command line's positional arguments: a video file and
    its queries, a folder of videos and the queries asked of each, or one JSONL file of
    `{"video": ..., "query": ...}` lines (relative videos are relative to the file)."""
    if not inputs:
        raise UsageError("give a video (or a folder of videos, or a JSONL of pairs) and at "
                         "least one query")
    first, queries = Path(inputs[0]), list(inputs[1:])
    if first.suffix.lower() == ".jsonl":
        if queries:
            raise UsageError(f"{first}: the queries come from the JSONL file; give no query "
                             "arguments with it")
        return _read_jsonl(first)
    if not first.exists():
        raise UsageError(f"{first}: no such video, folder or JSONL file")
    if first.is_dir():
        videos = sorted(p for p in first.iterdir() if p.suffix.lower() in VIDEO_EXTS)
        if not videos:
            raise UsageError(f"{first}: no videos in this folder (looked for "
                             f"{', '.join(VIDEO_EXTS)})")
    else:
        videos = [first]
    if not queries:
        raise UsageError(f"{first}: give at least one query after the video, e.g. "
                         f"python -m tempo_jax.predict --checkpoint DIR {first} \"a dog runs\"")
    for q in queries:
        if not q.strip():
            raise UsageError("a query is empty")
    return [{"video": str(v), "query": q} for v in videos for q in queries]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UsageError(f"{path}: no such JSONL file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("video"), str) or not (
                isinstance(row.get("query"), str) and row["query"].strip()):
            raise UsageError(f"{path}:{n}: expected {{\"video\": PATH, \"query\": TEXT}}, "
                             f"got {line.strip()[:80]}")
        video = Path(row["video"])
        if not video.is_absolute():
            video = path.parent / video
        out.append({"video": str(video), "query": row["query"]})
    if not out:
        raise UsageError(f"{path}: no (video, query) lines")
    return out


# ============================================================================ answering
def predict(loaded: Any, requests: Sequence[dict], *, batch_size: int = 8,
            max_new_tokens: int = 64, keep_frames: bool = False, progress: bool = True
            ) -> list[dict]:
    """Greedy answers for `requests` (dicts with `video` and `query`), in their order.

    `loaded` is `evaluate.load_checkpoint(...)`'s result. Each video is decoded and
    processed once (SAA, resize, patches), then asked each of its queries. Returns one row
    per request: `video`, `query`, `answer` (raw text), `window` ([start, end] s, or None),
    `refused`, `frame_times`, `duration`, and `error` (a video that could not be read: no
    answer). With `keep_frames`, `frames` holds the frames the model saw (uint8)."""
    from tqdm import tqdm

    from tempo_jax.data.pipeline import (
        batch_patch_capacity,
        collate,
        config_from_settings,
        load_example,
        with_query,
    )
    from tempo_jax.data.processor import vision_family
    from tempo_jax.data.prompts import load_tokenizer
    from tempo_jax.data.sources import VideoIndex
    from tempo_jax.inference import answer_rows

    pcfg = config_from_settings(loaded.settings, batch_size=batch_size, with_answer=False,
                                pad_side="left", shuffle=False, num_epochs=1)
    vision = loaded.model.config.vision
    tok = load_tokenizer(pcfg.tokenizer_path, family=vision_family(vision))
    processed: dict[str, dict | str] = {}  # video -> its example, or why it failed
    rows: list[dict | None] = [None] * len(requests)
    todo: list[tuple[int, dict]] = []
    for i, req in enumerate(tqdm(requests, desc="reading videos", unit="query",
                                 file=sys.stderr, disable=not progress, mininterval=2)):
        video = req["video"]
        if video not in processed:
            path = Path(video).absolute()
            index = VideoIndex(path.parent, exts=(path.suffix.lower() or ".mp4",),
                               recursive=False)
            record = {"video": path.name, "query": req["query"], "qid": str(i)}
            try:
                processed[video] = load_example(record, index, tok, pcfg, vision,
                                                keep_frames=keep_frames)
            except (VideoError, FileNotFoundError, ValueError) as e:
                msg = " ".join(str(e).split())
                processed[video] = msg if path.name in msg else f"{video}: {msg}"
        ex = processed[video]
        if isinstance(ex, str):
            rows[i] = {"video": video, "query": req["query"], "answer": None, "window": None,
                       "refused": False, "frame_times": [], "duration": None, "error": ex}
            continue
        todo.append((i, {**with_query(ex, req["query"], tok, pcfg, vision), "qid": str(i)}))

    capacity = batch_patch_capacity(pcfg, vision)  # evaluate run's batches, shape for shape
    batches = (collate([ex for _, ex in todo[k:k + batch_size]], pcfg, vision, capacity)
               for k in range(0, len(todo), batch_size))
    bar = tqdm(total=len(todo), desc="answering", unit="query", file=sys.stderr,
               disable=not progress, mininterval=2)
    for batch_rows in answer_rows(loaded.model, batches, tok, max_new_tokens):
        for r in batch_rows:
            i = int(r["qid"])
            parsed = r["parsed"]
            ex = processed[requests[i]["video"]]
            rows[i] = {"video": requests[i]["video"], "query": r["query"],
                       "answer": r["answer"],
                       "window": parsed if isinstance(parsed, list) else None,
                       "refused": parsed == "refuse",
                       "frame_times": [round(float(t), 4) for t in ex["frame_times"]],
                       "duration": float(ex["duration"]), "error": None}
            if keep_frames:
                rows[i]["frames"] = ex["frames"]
        bar.update(len(batch_rows))
    bar.close()
    return rows  # type: ignore[return-value]


def describe(row: dict) -> str:
    """The one-line answer: `12.5 to 17.8 s`, `not in this video`, or why there is none."""
    if row["error"]:
        return f"error: {row['error']}"
    if row["refused"]:
        return "not in this video"
    if row["window"] is not None:
        s, e = row["window"]
        return f"{s:g} to {e:g} s"
    return f"unreadable answer: {row['answer'][:60]!r}"


# ============================================================================ picture
def draw(rows: Sequence[dict], out: str | Path) -> Path:
    """One video's picture: the frames the model saw, titled with their times, above the
    video's timeline with one row per query (its answered window, or the refusal)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first = rows[0]
    frames, times, dur = first["frames"], first["frame_times"], first["duration"]
    n = len(frames)
    ncols = min(n, 12)
    nrows = -(-n // ncols)
    fh, fw = frames.shape[1:3]
    cell_w = 1.3
    cell_h = cell_w * fh / fw + 0.3
    line_h = 0.42
    fig = Figure(figsize=(max(8.0, ncols * cell_w), nrows * cell_h + len(rows) * line_h + 1.3),
                 dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows + 1, ncols,
                            height_ratios=[cell_h] * nrows + [len(rows) * line_h + 0.7])
    for k in range(n):
        ax = fig.add_subplot(grid[k // ncols, k % ncols])
        ax.imshow(frames[k], interpolation="nearest")
        ax.set_title(f"{float(times[k]):.1f}s", fontsize=7, pad=2)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[nrows, :])
    for j, r in enumerate(rows):
        y = len(rows) - 1 - j
        ax.plot([0, dur], [y, y], color="0.88", lw=9, solid_capstyle="butt")
        if r["window"] is not None:
            s, e = (min(max(float(v), 0.0), dur) for v in r["window"])
            ax.plot([s, e], [y, y], color="tab:blue", lw=9, solid_capstyle="butt")
        ax.text(0, y + 0.32, f"{r['query'][:70]}  ->  {describe(r)}", fontsize=8, va="bottom")
    ax.vlines(times, -0.7, -0.5, color="tab:red", lw=0.8)
    ax.set_xlim(0, dur)
    ax.set_ylim(-0.8, len(rows) - 0.1)
    ax.set_yticks([])
    ax.set_xlabel("seconds (red ticks: the frames' times)")
    fig.suptitle(f"{Path(first['video']).name}: {n} frames, {dur:.1f} s", fontsize=9)
    out = Path(out)
    fig.savefig(out, format="png")
    return out


def picture_paths(png: str | Path, videos: Sequence[str]) -> dict[str, Path]:
    """`--png FILE` for one video; `FILE` stem + `-<video stem>` for each of several."""
    png = Path(png)
    if len(videos) == 1:
        return {videos[0]: png}
    return {v: png.with_name(f"{png.stem}-{Path(v).stem}{png.suffix or '.png'}")
            for v in videos}


# ============================================================================ command line
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tempo_jax.predict",
        description="Ask videos when something happens (or whether it happens at all).")
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir (its latest checkpoint) or HF export directory")
    ap.add_argument("--step", type=int, help="checkpoint step of a workdir (default: latest)")
    ap.add_argument("inputs", nargs="+", metavar="VIDEO_OR_FOLDER_OR_JSONL [QUERY ...]",
                    help="a video and its queries; a folder of videos and the queries asked "
                    "of each; or a JSONL file of {\"video\", \"query\"} lines")
    ap.add_argument("--json", action="store_true", help="one JSON object per query")
    ap.add_argument("--png", metavar="FILE", help="draw frames, times and answered windows")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="parameter dtype of an HF export")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; a user's mistake is one `error:` line on stderr and exit status 2,
    an unreadable video one line and exit status 1 (the other videos are answered)."""
    args = build_parser().parse_args(argv)
    cli.setup_logging(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)
    try:
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise UsageError("--batch-size and --max-new-tokens must be >= 1")
        requests = read_requests(args.inputs)
        from tempo_jax.evaluate import load_checkpoint

        loaded = load_checkpoint(args.checkpoint, step=args.step, dtype=args.dtype)
    except (UsageError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = predict(loaded, requests, batch_size=args.batch_size,
                   max_new_tokens=args.max_new_tokens, keep_frames=bool(args.png))
    for r in rows:
        if args.json:
            print(json.dumps({k: v for k, v in r.items() if k != "frames"}))
        else:
            print(f"{r['video']}  {r['query']!r}  ->  {describe(r)}")
    if args.png:
        ok = [r for r in rows if not r["error"]]
        videos = list(dict.fromkeys(r["video"] for r in ok))
        for video, path in picture_paths(args.png, videos).items():
            draw([r for r in ok if r["video"] == video], path)
            print(f"picture: {path}", file=sys.stderr)
    failed = sorted({r["error"] for r in rows if r["error"]})
    for f in failed:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
