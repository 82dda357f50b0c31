"""Evaluation command line: `python -m tempo_jax.evaluate <command> ...`.

`run` evaluates a model (a training workdir or an exported HF directory) on a dataset with
greedy decoding, using the SAA / ETA / prompt settings saved with it: official-format
predictions, the raw answers, metrics and a timeline plot; resumable after a crash.

`metrics` scores a QVHighlights prediction file (official submission format) against ground
truth with the official definitions (`tempo_jax.grounding.metrics.qvhighlights_metrics`), prints a
readable table and optionally writes the official JSON structure, so a number we report can
be checked against the official evaluator. Each command is a subparser registered by an
`add_<name>_parser(subparsers)` function and run by its `cmd_<name>(args)`; adding one is a
single line in `build_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tempo_jax import cli, fileio
from tempo_jax.grounding.metrics import (
    QVH_IOU_THRESHOLDS,
    QVH_SALIENCY_LEVELS,
    grounding_metrics,
    load_jsonl_records,
    qvhighlights_metrics,
)
from tempo_jax.inference import answer_rows
from tempo_jax.models import families

__all__ = [
    "Loaded", "add_metrics_parser", "add_run_parser", "answer_rows", "apply_overrides",
    "build_parser",
    "cmd_metrics", "cmd_run", "evaluate_model", "format_metrics_table", "load_checkpoint",
    "load_records", "main", "submission_row",
]

log = logging.getLogger("tempo_jax.evaluate")

_MR_SPLITS = ("full", "short", "middle", "long")


def _num(value: Any, width: int = 6) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "-".rjust(width)
    return f"{value:{width}.2f}"


def format_metrics_table(metrics: dict[str, Any]) -> str:
    """Human-readable view of a `qvhighlights_metrics` result: the brief numbers, then the
    per-threshold moment-retrieval table and the highlight table (empty splits show '-')."""
    lines = ["QVHighlights metrics (official definitions, %)", ""]
    brief = metrics.get("brief", {})
    key_width = max((len(k) for k in brief), default=0)
    lines += [f"  {k:<{key_width}}  {_num(v)}" for k, v in brief.items()]

    if any(s in metrics for s in _MR_SPLITS):
        keys = [str(t) for t in QVH_IOU_THRESHOLDS]
        lines += ["", "Moment retrieval (IoU threshold)"]
        lines.append(f"  {'':<14}" + "".join(f"{k:>7}" for k in keys) + f"{'avg':>7}")
        for split in _MR_SPLITS:
            table = metrics.get(split)
            if table is None:
                continue
            for kind in ("MR-mAP", "MR-R1"):
                row = table[kind]
                cells = "".join(" " + _num(row[k]) for k in keys)
                avg = " " + _num(row["average"]) if "average" in row else ""
                lines.append(f"  {split + ' ' + kind:<14}{cells}{avg}")

    levels = [n for n in QVH_SALIENCY_LEVELS if f"HL-min-{n}" in metrics]
    if levels:
        lines += ["", "Highlight detection (clip positive if score >= min)"]
        lines.append(f"  {'':<22}{'HL-mAP':>8}{'HL-Hit1':>8}")
        for name in levels:
            row = metrics[f"HL-min-{name}"]
            label = f"HL-min-{name} (>={QVH_SALIENCY_LEVELS[name]})"
            lines.append(f"  {label:<22}  {_num(row['HL-mAP'])}  {_num(row['HL-Hit1'])}")
    return "\n".join(lines)


def add_metrics_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `metrics`: score a prediction file with the official QVHighlights metrics."""
    parser = subparsers.add_parser(
        "metrics",
        help="official QVHighlights metrics of a prediction file",
        description="Score predictions (official submission JSONL: qid, pred_relevant_windows "
        "[[start, end, score], ...], pred_saliency_scores) against QVHighlights ground truth "
        "with the official evaluator's definitions.",
    )
    parser.add_argument("--predictions", required=True, type=Path, help="prediction JSONL")
    parser.add_argument("--ground-truth", required=True, type=Path, help="ground-truth JSONL")
    parser.add_argument("--out", type=Path, help="write the metrics JSON (official layout) here")
    parser.add_argument(
        "--shared-qids-only", action="store_true",
        help="evaluate the qids both files share instead of requiring the same qids "
        "(the official match_number=False)",
    )
    parser.set_defaults(func=cmd_metrics)
    return parser


def cmd_metrics(args: argparse.Namespace) -> int:
    """Run `metrics`: load, score, print the table, write `--out` (indent 4, as officially)."""
    predictions = load_jsonl_records(args.predictions)
    ground_truth = load_jsonl_records(args.ground_truth)
    metrics = qvhighlights_metrics(
        predictions, ground_truth, match_qids=not args.shared_qids_only
    )
    print(format_metrics_table(metrics))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(metrics, indent=4) + "\n", encoding="utf-8")
        print(f"\nwrote {args.out}")
    return 0


# ============================================================================ run: model evaluation
DATASETS = ("qvhighlights", "charades", "jsonl")
CLIP_SECONDS = 2.0  # QVHighlights saliency clips


@dataclasses.dataclass
class Loaded:
    """A model with the SAA / ETA / prompt settings it was trained with."""

    model: Any
    settings: dict
    source: str  # "workdir" | "hf"
    config: Any = None  # the training config, for a workdir


def load_checkpoint(path: str | os.PathLike, *, step: int | None = None,
                    dtype: str = "float32") -> Loaded:
    """A training workdir (its latest or `step` checkpoint, settings from its config) or an
    exported HF directory (weights + tempo_settings.json)."""
    p = Path(path)
    if (p / "ckpt").is_dir() and (p / "config.json").exists():
        from tempo_jax.training.checkpoints import load_workdir
        from tempo_jax.training.setup import settings_dict

        config, model = load_workdir(p, step=step)
        return Loaded(model, settings_dict(config), "workdir", config)
    if (p / "config.json").exists() and list(p.glob("*.safetensors")):
        import jax.numpy as jnp

        from tempo_jax.hf import load_settings
        from tempo_jax.models.families import load_pretrained

        return Loaded(load_pretrained(p, dtype=jnp.dtype(dtype)), load_settings(p), "hf")
    raise FileNotFoundError(f"{p}: neither a training workdir (config.json + ckpt/) nor a "
                            "Hugging Face directory (config.json + *.safetensors)")


def apply_overrides(settings: dict, overrides: Sequence[str]) -> dict:
    """`saa.max_visual_tokens=1024`-style overrides of the saved settings, typed like the
    saved value (JSON literals accepted)."""
    out = json.loads(json.dumps(settings))
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, _, field = key.partition(".")
        if not sep or section not in out or not field:
            raise ValueError(f"override {item!r}: expected saa.FIELD=VALUE or prompt.FIELD=VALUE")
        if field not in out[section]:
            raise ValueError(f"override {item!r}: {section} has no field {field!r} "
                             f"(fields: {', '.join(sorted(out[section]))})")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[section][field] = value
    return out


def default_annotations(dataset: str, split: str, video_root: str | None) -> Path:
    names = {"qvhighlights": [f"highlight_{split}_release.jsonl", f"highlight_{split}.jsonl"],
             "charades": [f"charades_sta_{split}.txt"],
             "jsonl": [f"{split}.jsonl", "annotations.jsonl"]}[dataset]
    roots = [Path(video_root), Path(video_root).parent] if video_root else [Path(".")]
    tried = [r / n for r in roots for n in names]
    for t in tried:
        if t.exists():
            return t
    raise FileNotFoundError(f"no {dataset} {split} annotations: tried "
                            f"{', '.join(map(str, tried))}; pass --annotations")


def load_records(dataset: str, path, charades_durations: str | None = None) -> list[dict]:
    """The records of an annotation file (a `sources.Records` list: bad lines skipped, kept
    in its `skipped`)."""
    from tempo_jax.data import sources

    if dataset == "qvhighlights":
        return sources.load_qvhighlights(path, strict=False)
    if dataset == "charades":
        if not charades_durations:
            raise ValueError("charades needs --charades-durations (Charades_v1_{split}.csv)")
        return sources.load_charades_sta(path, charades_durations, strict=False)
    return sources.load_jsonl(path, strict=False)


def submission_row(record: dict, parsed) -> dict:
    """The official QVHighlights submission line: the answered window with score 1 (a
    refusal or an unreadable answer becomes [[0, 0, 0]], never an empty list) and saliency
    1 for the 2-second clips whose centre lies inside the window, 0 elsewhere."""
    dur = float(record["duration"])
    n_clips = max(1, int(dur / CLIP_SECONDS))  # the official clip count
    if isinstance(parsed, (tuple, list)) and len(parsed) == 2:
        s, e = (min(max(float(v), 0.0), dur) for v in parsed)
        windows = [[round(s, 4), round(e, 4), 1.0]]
        centres = (np.arange(n_clips) + 0.5) * CLIP_SECONDS
        saliency = ((centres >= s) & (centres <= e)).astype(float).tolist()
    else:
        windows = [[0.0, 0.0, 0.0]]
        saliency = [0.0] * n_clips
    qid = record["qid"]
    return {"qid": int(qid) if str(qid).isdigit() else qid, "query": record["query"],
            "vid": record["video"], "pred_relevant_windows": windows,
            "pred_saliency_scores": saliency}


def _read_rows(path: Path) -> dict[str, dict]:
    """Answers already written (a crashed run resumes after them); the last row of a qid wins,
    and a torn last line from a kill is ignored."""
    return {str(row["qid"]): row for row in fileio.read_jsonl(path)[0]}


def evaluate_model(
    checkpoint: str | os.PathLike,
    records: Sequence[dict],
    video_root: str,
    out_dir: str | os.PathLike,
    *,
    dataset: str = "jsonl",
    step: int | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 8,
    max_new_tokens: int = 64,
    num_workers: int = 0,
    dtype: str = "float32",
    timeline: int = 16,
    loaded: Loaded | None = None,
    ground_truth: Sequence[dict] | None = None,
) -> dict:
    """Greedy answers for `records`, the submission file, metrics and a timeline in `out_dir`.

    Resumable, at any instant: qids already answered in `answers.jsonl` are skipped and a
    line torn by a kill is dropped, so every query is answered exactly once however often it
    is killed and rerun. One evaluation per `out_dir` at a time (`fileio.Busy` names the
    other). A record whose video is missing or broken is answered `[[0, 0, 0]]`, counted in
    `num_failed` and listed with its reason; it stays in every denominator.
    """
    from tqdm import tqdm

    from tempo_jax.data.pipeline import config_from_settings, make_loader
    from tempo_jax.data.prompts import load_tokenizer

    out = Path(out_dir)
    with fileio.exclusive(out, "evaluate run"):  # one writer of answers.jsonl at a time
        loaded = loaded or load_checkpoint(checkpoint, step=step, dtype=dtype)
        settings = apply_overrides(loaded.settings, overrides)
        fileio.write_text(out / "settings.json", json.dumps(settings, indent=2))
        answers_path = out / "answers.jsonl"
        done = {q: r for q, r in _read_rows(answers_path).items() if not r.get("error")}
        if answers_path.exists():  # drop a torn last line and retried failures before appending
            fileio.write_text(answers_path, "".join(json.dumps(r) + "\n" for r in done.values()))
        todo = [r for r in records if str(r["qid"]) not in done]
        tok = load_tokenizer(None, family=families.family_of(loaded.model))
        if todo:
            pcfg = config_from_settings(
                settings, batch_size=batch_size, with_answer=False, pad_side="left", shuffle=False,
                num_epochs=1, num_workers=num_workers)
            loader = make_loader(todo, video_root, pcfg, loaded.model.config.vision)
            bar = tqdm(total=len(todo), desc="evaluating", unit="query", file=sys.stdout,
                       mininterval=2)
            with open(answers_path, "a") as f:
                for batch_rows in answer_rows(loaded.model, loader, tok, max_new_tokens):
                    for row in batch_rows:
                        f.write(json.dumps(row) + "\n")
                        done[str(row["qid"])] = row
                    f.flush()
                    bar.update(len(batch_rows))
                failed = dict(loader.skip_counter.failed)
                for r in todo:  # broken or missing videos: answered as a refusal, never dropped
                    if str(r["qid"]) not in done:
                        reason = failed.get(str(r["qid"]), "not loaded")
                        row = {"qid": str(r["qid"]), "video": r["video"], "query": r["query"],
                               "windows": r.get("windows", []), "duration": r.get("duration"),
                               "relevant": bool(r.get("relevant", True)), "answer": "",
                               "parsed": None, "error": reason}
                        f.write(json.dumps(row) + "\n")
                        done[str(r["qid"])] = row
            bar.close()
        rows = [done[str(r["qid"])] for r in records]
        return _finish(rows, records, out, dataset, timeline, ground_truth)


def _finish(rows: list[dict], records: Sequence[dict], out: Path, dataset: str,
            timeline: int, ground_truth: Sequence[dict] | None = None) -> dict:
    """Submission file, metrics (ours for every dataset, the official set for QVHighlights)
    and the timeline plot, from the answers of every record."""
    from tempo_jax.grounding.answers import parse_answer
    from tempo_jax.training.report import plot_timeline

    subs = [submission_row(r, parse_answer(row.get("answer") or ""))
            for r, row in zip(records, rows, strict=True)]
    fileio.write_text(out / "predictions.jsonl", "".join(json.dumps(x) + "\n" for x in subs))
    failed = [row for row in rows if row.get("error")]
    metrics: dict[str, Any] = grounding_metrics(
        [row.get("answer") or "" for row in rows], [r.get("windows", []) for r in records],
        [bool(r.get("relevant", True)) for r in records], [r.get("duration") for r in records])
    metrics["num_queries"] = len(records)
    metrics["num_failed"] = len(failed)
    metrics["failed"] = {str(row["qid"]): row["error"] for row in failed[:100]}
    if dataset == "qvhighlights" and ground_truth is not None:
        wanted = {str(r["qid"]) for r in records}
        gt = [g for g in ground_truth if str(g["qid"]) in wanted]
        metrics["official"] = qvhighlights_metrics(subs, gt)
    fileio.write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    drawable = [{**row, "windows": r.get("windows", []), "duration": r["duration"]}
                for r, row in zip(records, rows, strict=True) if r.get("duration")]
    if timeline and drawable:
        plot_timeline(drawable, out / "timeline.png", n=timeline)
    return metrics


def _summary(metrics: dict) -> str:
    keys = ("r1@0.3", "r1@0.5", "r1@0.7", "miou", "refusal_accuracy", "false_refusal_rate",
            "unparsable_rate")
    lines = [f"{metrics['num_queries']} queries, {metrics['num_failed']} failed "
             "(missing or broken videos, answered [[0, 0, 0]])"]
    lines += [f"  {k:<20} {metrics[k]:.4f}" for k in keys if k in metrics]
    for qid, reason in list(metrics.get("failed", {}).items())[:10]:
        lines.append(f"  failed {qid}: {reason}")
    if "official" in metrics:
        lines += ["", format_metrics_table(metrics["official"])]
    return "\n".join(lines)


def add_run_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `run`: evaluate a model on a dataset."""
    parser = subparsers.add_parser(
        "run", help="evaluate a model (training workdir or HF export) on a dataset",
        description="Greedy answers for every query of a split, with the SAA / ETA / prompt "
        "settings saved with the model; writes answers.jsonl (raw, resumable), "
        "predictions.jsonl (official submission format), metrics.json and timeline.png.")
    parser.add_argument("--checkpoint", required=True, help="HF export dir or training workdir")
    parser.add_argument("--step", type=int, help="checkpoint step of a workdir (default latest)")
    parser.add_argument("--dataset", choices=DATASETS, default="jsonl")
    parser.add_argument("--split", default="val")
    parser.add_argument("--annotations", help="annotation file (default: found by dataset and "
                        "split beside --video-root)")
    parser.add_argument("--video-root", required=True, help="directory the videos live under")
    parser.add_argument("--charades-durations", help="Charades_v1_{split}.csv (charades only)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override a saved setting, e.g. saa.max_visual_tokens=2048")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="Grain worker processes")
    parser.add_argument("--dtype", default="float32", help="parameter dtype of an HF export")
    parser.add_argument("--limit", type=int, help="only the first N queries")
    parser.add_argument("--timeline", type=int, default=16, help="queries in the timeline plot")
    parser.set_defaults(func=cmd_run)
    return parser


def cmd_run(args: argparse.Namespace) -> int:
    """Run `run`: load the model and records, answer, score, print the summary."""
    cli.setup_logging(logging.INFO)
    if not Path(args.checkpoint).exists():
        raise FileNotFoundError(f"--checkpoint {args.checkpoint}: no such directory")
    if not Path(args.video_root).is_dir():
        raise FileNotFoundError(f"--video-root {args.video_root}: no such directory")
    ann = Path(args.annotations) if args.annotations else default_annotations(
        args.dataset, args.split, args.video_root)
    if not ann.is_file():
        raise FileNotFoundError(f"--annotations {ann}: no such file")
    records = load_records(args.dataset, ann, args.charades_durations)
    if not records:
        raise ValueError(f"{ann}: no usable example, every line was skipped: "
                         f"{records.skipped_summary()}")
    if args.limit:
        records = records[:args.limit]
    metrics = evaluate_model(
        args.checkpoint, records, args.video_root, args.out, dataset=args.dataset,
        step=args.step, overrides=args.overrides, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, num_workers=args.num_workers, dtype=args.dtype,
        timeline=args.timeline,
        ground_truth=load_jsonl_records(ann) if args.dataset == "qvhighlights" else None)
    print(_summary(metrics))
    print(f"\nwrote {args.out}/{{answers,predictions}}.jsonl, metrics.json, timeline.png")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="python -m tempo_jax.evaluate", description="Tempo-R0 evaluation tools."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="command")
    add_run_parser(subparsers)
    add_metrics_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]) and run the command; a bad input file or record
    is reported on stderr with exit status 1 instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (OSError, ValueError, fileio.Busy) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
