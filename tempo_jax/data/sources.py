"""Grounding annotations (QVHighlights, Charades-STA, generic JSONL), video lookup, grain
sources and PIR (irrelevant-pair) construction.

Why: every dataset is turned into one record shape early, validated line by line with errors
that name `file:line`, so a bad annotation fails loudly at load time (or is skipped and
counted), never as a NaN reward mid-training. A record is a dict::

    {"qid": str, "video": str, "query": str, "windows": [[s, e], ...] (seconds),
     "duration": float, "relevant": bool, "source_vid": str}

`source_vid` is the identity of the *source* video (a YouTube id for QVHighlights), which PIR
uses so that an "irrelevant" pair never takes its query from another clip of the same video.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "AnnotationError", "SkippedLine", "Records", "parse_qvh_vid", "load_qvhighlights",
    "load_charades_sta", "load_charades_durations", "load_jsonl", "VideoIndex",
    "GroundingSource", "make_pir",
]

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.5  # seconds a window may stick out of [0, duration] (rounding in files)


class AnnotationError(ValueError):
    """A bad annotation line; the message starts with `file:line:`."""

    def __init__(self, path: str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = path, line, reason


class SkippedLine(NamedTuple):
    path: str
    line: int
    reason: str


def skipped_summary(reasons: Sequence[str], first: int = 3, total: int | None = None) -> str:
    """`N skipped (first: a; b; c)`: how much input was dropped and why, in one line
    (`total`: the count, when `reasons` keeps only some)."""
    n = len(reasons) if total is None else total
    if not reasons:
        return f"{n} skipped"
    more = "; ..." if n > first else ""
    return f"{n} skipped (first: {'; '.join(reasons[:first])}{more})"


class Records(list):
    """The records of one file (a plain list of dicts) plus what lenient loading skipped."""

    def __init__(self, items: Iterable[dict] = (), path: str = "",
                 skipped: Sequence[SkippedLine] = ()):
        super().__init__(items)
        self.path = path
        self.skipped: list[SkippedLine] = list(skipped)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def skipped_summary(self) -> str:
        """This file's skipped lines in one line: count and the first `file:line: reason`s."""
        return skipped_summary([f"{s.path}:{s.line}: {s.reason}" for s in self.skipped])


class _Bad(Exception):
    """Internal: one line's problem, turned into an AnnotationError or a skip."""


def _lines(path) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines of a local or gs:// file."""
    from etils import epath

    text = epath.Path(path).read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield i, line.strip()


def _collect(path, parse, strict: bool) -> Records:
    """Runs `parse(lineno, text)` per line; strict → raise on the first bad line, lenient →
    skip it, log `file:line: reason` and keep going."""
    records, skipped = [], []
    p = os.fspath(path)
    for lineno, text in _lines(path):
        try:
            records.append(parse(lineno, text))
        except _Bad as e:
            if strict:
                raise AnnotationError(p, lineno, str(e)) from None
            skipped.append(SkippedLine(p, lineno, str(e)))
            logger.warning("%s:%d: %s (line skipped)", p, lineno, e)
    if skipped:
        logger.warning("%s: skipped %d bad line(s), kept %d", p, len(skipped), len(records))
    return Records(records, p, skipped)


def _json(text: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Bad(f"malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _field(obj: dict, name: str):
    if name not in obj:
        raise _Bad(f"missing field {name!r}")
    return obj[name]


def _number(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float | str):
        raise _Bad(f"{what} must be a number, got {x!r}")
    try:
        v = float(x)
    except ValueError:
        raise _Bad(f"{what} must be a number, got {x!r}") from None
    if not math.isfinite(v):
        raise _Bad(f"{what} must be finite, got {x!r}")
    return v


def _text(x, what: str) -> str:
    if not isinstance(x, str) or not x.strip():
        raise _Bad(f"{what} must be a non-empty string, got {x!r}")
    return x.strip()


def _duration(x) -> float:
    d = _number(x, "duration")
    if d <= 0:
        raise _Bad(f"duration must be > 0, got {x!r}")
    return d


def _windows(raw, duration: float, tolerance: float, clip: bool) -> list[list[float]]:
    """Validated `[[s, e], ...]`; a window may exceed [0, duration] by `tolerance` (then it is
    clipped); with `clip` any overshoot is clipped as long as something of it remains."""
    if not isinstance(raw, list | tuple):
        raise _Bad(f"windows must be a list of [start, end], got {raw!r}")
    out = []
    for w in raw:
        if not isinstance(w, list | tuple) or len(w) != 2:
            raise _Bad(f"window {w!r} is not [start, end]")
        s, e = _number(w[0], "window start"), _number(w[1], "window end")
        if e < s:
            raise _Bad(f"window [{s:g}, {e:g}] has end < start")
        if not clip and (s < -tolerance or e > duration + tolerance):
            raise _Bad(f"window [{s:g}, {e:g}] lies outside [0, duration={duration:g}]")
        if clip and (e <= 0 or s >= duration):
            raise _Bad(f"window [{s:g}, {e:g}] lies entirely outside [0, duration={duration:g}]")
        out.append([min(max(s, 0.0), duration), min(max(e, 0.0), duration)])
    return out


# ----------------------------------------------------------------------------- QVHighlights


def parse_qvh_vid(vid: str) -> tuple[str, float, float]:
    """`{youtube_id}_{start}_{end}` → (youtube_id, start, end). Split from the right:
    YouTube ids themselves contain underscores (e.g. `_6hnl_BrFvs_360.0_510.0`)."""
    parts = vid.rsplit("_", 2)
    if len(parts) != 3 or not parts[0]:
        raise ValueError(f"vid {vid!r} is not '{{youtube_id}}_{{start}}_{{end}}'")
    try:
        start, end = float(parts[1]), float(parts[2])
    except ValueError:
        raise ValueError(f"vid {vid!r} is not '{{youtube_id}}_{{start}}_{{end}}'") from None
    return parts[0], start, end


def load_qvhighlights(path, *, strict: bool = True,
                      tolerance: float = DEFAULT_TOLERANCE) -> Records:
    """QVHighlights JSONL (train/val/test-with-gt). Keeps `relevant_clip_ids` and
    `saliency_scores` when present (the highlight-detection metrics need them)."""

    def parse(lineno: int, text: str) -> dict:
        obj = _json(text)
        vid = _text(_field(obj, "vid"), "vid")
        try:
            yt, start, end = parse_qvh_vid(vid)
        except ValueError as e:
            raise _Bad(str(e)) from None
        duration = _duration(_field(obj, "duration"))
        windows = _windows(_field(obj, "relevant_windows"), duration, tolerance, False)
        if not windows:
            raise _Bad("relevant_windows is empty")
        qid = _field(obj, "qid")
        rec = {
            "qid": str(qid), "video": vid, "query": _text(_field(obj, "query"), "query"),
            "windows": windows, "duration": duration, "relevant": True, "source_vid": yt,
            "clip_start": start, "clip_end": end,
        }
        for key in ("relevant_clip_ids", "saliency_scores"):
            if key in obj:
                rec[key] = obj[key]
        return rec

    return _collect(path, parse, strict)


# ----------------------------------------------------------------------------- Charades-STA


def load_charades_durations(csv_path) -> dict[str, float]:
    """Video id → length (s) from `Charades_v1_{split}.csv` (header `id,subject,scene,quality,
    relevance,verified,script,objects,descriptions,actions,length`)."""
    from etils import epath

    p = os.fspath(csv_path)
    rows = csv.DictReader(epath.Path(csv_path).read_text(encoding="utf-8").splitlines())
    if rows.fieldnames is None or "id" not in rows.fieldnames or "length" not in rows.fieldnames:
        raise AnnotationError(p, 1, f"header needs 'id' and 'length' columns, got "
                                    f"{rows.fieldnames}")
    out: dict[str, float] = {}
    for row in rows:
        line = rows.line_num
        try:
            out[row["id"].strip()] = _duration(row["length"])
        except _Bad as e:
            raise AnnotationError(p, line, f"video {row['id']!r}: {e}") from None
    return out


def load_charades_sta(path, durations_csv, *, strict: bool = True,
                      tolerance: float = DEFAULT_TOLERANCE,
                      clip_windows: bool = False) -> Records:
    """Charades-STA lines `3MSZA 24.3 30.4##person turn a light on.`. `qid` is
    `{vid}_{i}`, i the 0-based line index in the file, so qids stay stable whatever lenient
    loading skips. `clip_windows=True` clips ends past the video length instead of failing
    (the released annotations have a few)."""
    durations = (durations_csv if isinstance(durations_csv, dict)
                 else load_charades_durations(durations_csv))

    def parse(lineno: int, text: str) -> dict:
        if "##" not in text:
            raise _Bad(f"unparsable Charades-STA line (no '##'): {text!r}")
        head, query = text.split("##", 1)
        fields = head.split()
        if len(fields) != 3:
            raise _Bad(f"unparsable Charades-STA line (want 'VID START END##query'): {text!r}")
        vid = fields[0]
        s, e = _number(fields[1], "start"), _number(fields[2], "end")
        if vid not in durations:
            raise _Bad(f"video {vid!r} is not in the durations CSV")
        duration = durations[vid]
        windows = _windows([[s, e]], duration, tolerance, clip_windows)
        return {
            "qid": f"{vid}_{lineno - 1}", "video": vid, "query": _text(query, "query"),
            "windows": windows, "duration": duration, "relevant": True, "source_vid": vid,
        }

    return _collect(path, parse, strict)


# ----------------------------------------------------------------------------- generic JSONL


def load_jsonl(path, *, strict: bool = True, tolerance: float = DEFAULT_TOLERANCE) -> Records:
    """Generic JSONL: `video`, `query`, `windows`, `duration`, optional `qid` (default
    `{video}_{i}`, i the 0-based line index), `relevant` (default: windows non-empty) and
    `source_vid` (default `video`). A refusal record has `windows: []`, `relevant: false`."""

    def parse(lineno: int, text: str) -> dict:
        obj = _json(text)
        video = _text(_field(obj, "video"), "video")
        duration = _duration(_field(obj, "duration"))
        windows = _windows(_field(obj, "windows"), duration, tolerance, False)
        relevant = obj.get("relevant", bool(windows))
        if not isinstance(relevant, bool):
            raise _Bad(f"relevant must be true or false, got {relevant!r}")
        if relevant and not windows:
            raise _Bad("a relevant record needs at least one window")
        if not relevant and windows:
            raise _Bad("an irrelevant (refusal) record must have windows []")
        qid = obj.get("qid", f"{video}_{lineno - 1}")
        source = obj.get("source_vid", video)
        rec = {
            "qid": str(qid), "video": video, "query": _text(_field(obj, "query"), "query"),
            "windows": windows, "duration": duration, "relevant": relevant,
            "source_vid": _text(str(source), "source_vid"),
        }
        for key, value in obj.items():  # extra fields (e.g. synthetic `colours`) ride along
            rec.setdefault(key, value)
        return rec

    return _collect(path, parse, strict)


# ----------------------------------------------------------------------------- videos


class VideoIndex:
    """Finds a record's video file under `root` (local or gs:// via etils.epath): `video` as
    a relative path, or an id tried with each of `exts`; with `recursive`, a unique file of
    that stem anywhere below `root` (the tree is listed once, on the first miss)."""

    def __init__(self, root, exts: Sequence[str] = (".mp4", ".mkv", ".webm", ".avi"),
                 recursive: bool = True):
        from etils import epath

        self.root = epath.Path(root)
        self.exts = tuple(e if e.startswith(".") else "." + e for e in exts)
        self.recursive = recursive
        self._by_stem: dict[str, list] | None = None

    def __repr__(self) -> str:
        return f"VideoIndex({os.fspath(self.root)!r}, exts={self.exts})"

    def _tree(self) -> dict[str, list]:
        if self._by_stem is None:
            index: dict[str, list] = {}
            # iterdir, not rglob: epath refuses `**` (it would fan out into GCS requests).
            todo = [self.root] if self.root.is_dir() else []
            while todo:
                for p in sorted(todo.pop().iterdir()):
                    if p.is_dir():
                        todo.append(p)
                    elif p.suffix.lower() in self.exts:
                        index.setdefault(p.stem, []).append(p)
            self._by_stem = index
        return self._by_stem

    def find(self, video: str):
        """The path of `video` (an id such as a QVHighlights vid, or a relative path)."""
        if not video or os.path.isabs(video) or ".." in video.replace("\\", "/").split("/"):
            raise ValueError(f"video must be an id or a path relative to {self.root}, "
                             f"got {video!r}")
        tried = []
        direct = self.root / video
        if direct.suffix.lower() in self.exts:
            tried.append(direct)
        tried += [self.root / f"{video}{ext}" for ext in self.exts]
        for p in tried:
            if p.is_file():
                return p
        if self.recursive and "/" not in video:
            hits = self._tree().get(video, [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise FileNotFoundError(
                    f"video {video!r} is ambiguous under {self.root}: "
                    f"{', '.join(os.fspath(h) for h in hits)}")
        raise FileNotFoundError(
            f"video {video!r} not found under {self.root} (tried "
            f"{', '.join(os.fspath(p) for p in tried)}"
            f"{' and a recursive search by name' if self.recursive else ''})")

    def __contains__(self, video: str) -> bool:
        try:
            self.find(video)
        except (FileNotFoundError, ValueError):
            return False
        return True

    def missing(self, records: Iterable[dict]) -> list[str]:
        """Videos of `records` that cannot be found (check once before a long run)."""
        return sorted({r["video"] for r in records if r["video"] not in self})


# ----------------------------------------------------------------------------- grain source


class GroundingSource:
    """A grain `RandomAccessDataSource` over records (`__len__`, `__getitem__`, a stable
    `__repr__` for checkpointing). Items are copies, so transforms may mutate them."""

    def __init__(self, records: Sequence[dict]):
        self._records = tuple(records)
        h = hashlib.sha1()
        for r in self._records:
            h.update(json.dumps([r["qid"], r["video"], r["query"], r["relevant"]]).encode())
        self._fingerprint = h.hexdigest()[:12]

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return copy.deepcopy(self._records[index])

    def __repr__(self) -> str:
        return f"GroundingSource(size={len(self)}, fingerprint={self._fingerprint})"


# ----------------------------------------------------------------------------- PIR


def make_pir(records: Sequence[dict], irrelevant_ratio: float = 0.2, seed: int = 0,
             compatible: Callable[[dict, dict], bool] | None = None) -> list[dict[str, Any]]:
    """PIR pairs: `round(irrelevant_ratio * N)` samples, chosen at random, keep their video
    but take the query of a record from a *different source video* (`source_vid`, so never
    another clip of the same YouTube video), with `relevant=False` and `windows=[]` (the
    refusal target). Deterministic per `seed`; the rest are unchanged copies, order kept.
    Irrelevant samples record where the query came from in `pir_query_qid`.

    `compatible(record, donor)`, when given, must hold for a pairing: a different source video
    does not guarantee a different event (two synthetic videos may show the same red circle),
    and a pair whose query does happen in the video would teach a wrong refusal. Donors are
    redrawn (up to 1000 times) until it holds."""
    if not 0.0 <= irrelevant_ratio <= 1.0:
        raise ValueError(f"irrelevant_ratio must be in [0, 1], got {irrelevant_ratio}")
    n = len(records)
    n_irr = int(round(irrelevant_ratio * n))
    out = [copy.deepcopy(dict(r)) for r in records]
    if n_irr == 0:
        return out
    sources = [str(r["source_vid"]) for r in records]
    # Group indices by source so "any record of another source" is one uniform draw over
    # the sorted order with the sample's own (contiguous) group cut out.
    order = sorted(range(n), key=lambda i: sources[i])
    first: dict[str, int] = {}
    size: dict[str, int] = {}
    for pos, i in enumerate(order):
        first.setdefault(sources[i], pos)
        size[sources[i]] = size.get(sources[i], 0) + 1
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(n)[:n_irr])
    for i in chosen.tolist():
        src = sources[i]
        others = n - size[src]
        if others == 0:
            raise ValueError("make_pir needs records from at least two source videos")
        for _ in range(1000):
            r = int(rng.integers(others))
            donor = order[r if r < first[src] else r + size[src]]
            if compatible is None or compatible(records[i], records[donor]):
                break
        else:
            raise ValueError(f"make_pir: no compatible donor query for {records[i]['qid']!r}")
        rec = out[i]
        rec.update(query=records[donor]["query"], windows=[], relevant=False,
                   pir_query_qid=str(records[donor]["qid"]),
                   pir_query_source_vid=sources[donor])
        rec["qid"] = f"{records[i]['qid']}|pir:{records[donor]['qid']}"
    return out
