"""Temporal grounding metrics.

Training-time / Charades-STA style metrics (R1@m, mIoU, refusal accounting) share the IoU
code of the accuracy reward (`tempo_jax.rl.rewards.best_iou`), so a number logged during RL
means the same thing as the reward that produced it. The official QVHighlights metrics
(see /work/shared/TEMPO_R0.md, "Reference behaviour") live further down this file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from tempo_jax.grounding.answers import REFUSE, Answer, best_iou, parse_answer, think_text

__all__ = ["grounding_metrics", "normalize_prediction", "refusal_auc", "refusal_diagnostics"]

NAN = float("nan")


def normalize_prediction(pred: Any) -> Answer:
    """A raw string (parsed), a parsed answer, or a `[s, e]` pair -> `(s, e)` / "refuse" /
    None, so callers may pass model text or already-parsed answers alike."""
    if pred is None:
        return None
    if isinstance(pred, str):
        return REFUSE if pred == REFUSE else parse_answer(pred)
    try:
        s, e = (float(v) for v in pred)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(s) and math.isfinite(e)) or s < 0 or e < 0:
        return None
    return (s, e) if s <= e else (e, s)


def _fraction(num: float, den: int) -> float:
    return float(num) / den if den else NAN


def grounding_metrics(
    predictions: Sequence[Any],
    windows: Sequence[Sequence[Sequence[float]]],
    relevant: Sequence[bool],
    duration: Sequence[float | None] | None = None,
    thresholds: Sequence[float] = (0.3, 0.5, 0.7),
) -> dict[str, float | int]:
    """Charades-STA style R1@m / mIoU over the relevant pairs, plus PIR refusal accounting.

    Each prediction is a `parse_answer` output (tuple | "refuse" | None) or raw model text.
    For a relevant pair the IoU is the max over its ground-truth windows after clipping the
    prediction to [0, duration]; a refusal or an unreadable answer is IoU 0 and still counts
    in the denominator (never flatter a model for failing to answer). `r1@m` counts IoU >= m.

    Returns `r1@{m}` per threshold, `miou`, `refusal_accuracy` (irrelevant pairs refused),
    `false_refusal_rate` (relevant pairs refused), `unparsable_rate` (over all pairs), and
    `num_relevant` / `num_irrelevant`. A fraction with an empty denominator is NaN (not 0,
    which would read as a real score): e.g. `refusal_accuracy` without irrelevant pairs.
    """
    n = len(predictions)
    if len(windows) != n or len(relevant) != n:
        raise ValueError(
            f"{n} predictions but {len(windows)} window lists and {len(relevant)} flags"
        )
    durations = [None] * n if duration is None else list(duration)
    if len(durations) != n:
        raise ValueError(f"{n} predictions but {len(durations)} durations")

    ious: list[float] = []
    false_refusals = refused_irrelevant = unparsable = n_irrelevant = 0
    for pred, gts, rel, dur in zip(predictions, windows, relevant, durations, strict=True):
        ans = normalize_prediction(pred)
        unparsable += ans is None
        if rel:
            false_refusals += ans == REFUSE
            gt_list = [] if gts is None else list(gts)
            ious.append(best_iou(ans, gt_list, dur) if isinstance(ans, tuple) else 0.0)
        else:
            n_irrelevant += 1
            refused_irrelevant += ans == REFUSE

    iou = np.asarray(ious, np.float64)
    n_relevant = len(ious)
    out: dict[str, float | int] = {}
    for m in thresholds:
        out[f"r1@{m:g}"] = _fraction(float(np.sum(iou >= m)), n_relevant)
    out["miou"] = float(iou.mean()) if n_relevant else NAN
    out["refusal_accuracy"] = _fraction(refused_irrelevant, n_irrelevant)
    out["false_refusal_rate"] = _fraction(false_refusals, n_relevant)
    out["unparsable_rate"] = _fraction(unparsable, n)
    out["num_relevant"] = n_relevant
    out["num_irrelevant"] = n_irrelevant
    return out


def refusal_auc(scores: Sequence[float], irrelevant: Sequence[bool]) -> float:
    """ROC AUC of `scores` (e.g. P(none)) for telling irrelevant pairs from relevant ones:
    the chance that a random irrelevant pair scores above a random relevant one, ties
    counting half (Mann-Whitney). 0.5: the pairs are indistinguishable; NaN without both."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(irrelevant, bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return NAN
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def refusal_diagnostics(rows: Sequence[dict[str, Any]], *,
                        caption_think: bool = False) -> dict[str, float]:
    """From evaluation rows (`relevant`, `parsed`, `qid`, optional `p_none`): the AUC of
    P(none), mean P(none) per kind, and refusal accuracy split between cross pairs (a held-out
    video with another held-out video's query, qid `...|pir:...`) and the other irrelevant
    queries (the generator's own refusal queries). With `caption_think`, also the share of
    generated thinks that name what the video shows (`caption`)."""
    rel = [bool(r["relevant"]) for r in rows]
    out: dict[str, float] = {}
    scored = [(r["p_none"], not f) for r, f in zip(rows, rel, strict=True)
              if r.get("p_none") is not None]
    if scored:
        p, irr = zip(*scored, strict=True)
        p_arr, irr_arr = np.asarray(p), np.asarray(irr)
        out["refusal_auc"] = refusal_auc(p_arr, irr_arr)
        out["p_none_relevant"] = float(p_arr[~irr_arr].mean()) if (~irr_arr).any() else NAN
        out["p_none_irrelevant"] = float(p_arr[irr_arr].mean()) if irr_arr.any() else NAN
    cross = [normalize_prediction(r["parsed"]) == REFUSE for r, f in zip(rows, rel, strict=True)
             if not f and "|pir:" in str(r.get("qid", ""))]
    own = [normalize_prediction(r["parsed"]) == REFUSE for r, f in zip(rows, rel, strict=True)
           if not f and "|pir:" not in str(r.get("qid", ""))]
    out["refusal_accuracy_cross"] = _fraction(sum(cross), len(cross))
    out["refusal_accuracy_generated"] = _fraction(sum(own), len(own))
    # with a caption think: does the model say what the video shows (the step before the
    # decision)? `caption` is the annotation's, `answer` the generated text
    said = [r["caption"].lower() in think_text(r.get("answer") or "").lower()
            for r in rows if caption_think and r.get("caption") and "answer" in r]
    if said:
        out["caption_accuracy"] = _fraction(sum(said), len(said))
    return out


# --- QVHighlights official metrics -----------------------------------------------------------
# (R1@0.5/0.7 on the first window, mAP@[0.5:0.95], short/middle/long, HD mAP, HIT@1)
#
# Reproduces moment_detr's `standalone_eval/eval.py` to the digit (checked against the
# official output for `sample_val_preds.jsonl`), numpy only and vectorised over queries.
# The official definitions, including their quirks:
# - Thresholds are 0.5:0.05:0.95 *rounded to two decimals* (linspace's 0.8999999999999999
#   becomes 0.9); an IoU equal to the threshold passes.
# - R1@t: the FIRST window of `pred_relevant_windows` (list order, not the best score) against
#   the ground-truth window it overlaps most; IoU >= t is a hit.
# - mAP@t: the first 10 windows, sorted by descending score with a stable sort (ties keep
#   list order), matched greedily: each takes the unmatched ground-truth window of highest
#   IoU >= t (IoU ties: the later window, as the reversed argsort does), else it is a false
#   positive. AP is the VOC-2011 interpolated AP of `interpolated_precision_recall`;
#   mAP averages AP over queries, "average" averages the 10 unrounded mAPs.
# - short / middle / long keep, per query, only the ground-truth windows whose length l is
#   in (0, 10], (10, 30], (30, 150] s, and only the queries left with one; "full" keeps all.
# - HL-min-{Fair,Good,VeryGood}: a clip is positive for an annotator when its score is >= 2,
#   3, 4 ("min" is that minimum score, not a min over annotators). The clip count is
#   int(duration / 2); predicted saliency is truncated / zero-padded to it for AP. HL-mAP
#   averages the per-annotator AP (video2gif `get_ap`, sklearn's PR curve with a running
#   max) over queries x 3 annotators; HL-Hit1 looks up the argmax clip of the *untruncated*
#   prediction and counts a hit when ANY annotator rates it positive.
# - Every number is `float(f"{100 * x:.2f}")`. Per-query values are reduced with the same
#   numpy calls over arrays of the same shape and order as the official code, so the
#   floating-point sums (and hence the rounding) agree.
# Where the official code crashes or silently skips, we decide (never flattering a model):
# an empty window list is a query with no windows (AP 0, R1 miss) instead of an IndexError /
# being left out of the mAP; an empty split gives NaN instead of a crash; missing or extra
# qids, duplicate qids and malformed records raise ValueError naming them.

QVH_IOU_THRESHOLDS: tuple[float, ...] = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
QVH_MAX_PRED_WINDOWS = 10
QVH_CLIP_SECONDS = 2
# name -> (lo, hi): a ground-truth window of length l belongs to the split when lo < l <= hi
QVH_LENGTH_SPLITS: dict[str, tuple[float, float]] = {
    "short": (0.0, 10.0), "middle": (10.0, 30.0), "long": (30.0, 150.0),
}
# name -> minimum annotator score (0..4) for a clip to count as a highlight
QVH_SALIENCY_LEVELS: dict[str, int] = {"Fair": 2, "Good": 3, "VeryGood": 4}

__all__ += [
    "QVH_IOU_THRESHOLDS", "QVH_LENGTH_SPLITS", "QVH_SALIENCY_LEVELS", "load_jsonl_records",
    "qvhighlights_metrics",
]


def load_jsonl_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """One JSON object per line (blank lines skipped). A bad line raises ValueError naming the
    file and line: a truncated prediction file must not turn into a silently smaller eval."""
    records: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}:{lineno}: malformed JSON ({err.msg}, column {err.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            records.append(obj)
    return records


def _pct(x: float) -> float:
    """The official formatting: percent, rounded to 2 decimals via the decimal string."""
    return float(f"{100 * x:.2f}")


def _preview(items: Sequence[Any], limit: int = 20) -> str:
    shown = ", ".join(repr(q) for q in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def _by_qid(records: Sequence[dict[str, Any]], what: str) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or "qid" not in rec:
            raise ValueError(f"{what} record #{i} has no 'qid'")
        qid = rec["qid"]
        if qid in out:
            raise ValueError(f"duplicate qid {qid!r} in the {what}")
        out[qid] = rec
    return out


def _window_array(raw: Any, width: int, qid: Any, key: str) -> np.ndarray:
    """`[[start, end, (score)], ...]` -> float64 (n, width); an empty list -> (0, width)."""
    what = "[start, end, score]" if width == 3 else "[start, end]"
    if raw is None:
        raise ValueError(f"qid {qid!r}: missing {key!r}")
    try:
        arr = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"qid {qid!r}: {key} must be a list of {what} windows") from None
    if arr.size == 0:
        return np.zeros((0, width))
    if arr.ndim != 2 or arr.shape[1] < width:
        raise ValueError(f"qid {qid!r}: {key} must be a list of {what} windows, got {raw!r}")
    return arr[:, :width]


def _cross_iou(ps: np.ndarray, pe: np.ndarray, gs: np.ndarray, ge: np.ndarray) -> np.ndarray:
    """(Q, P) x (Q, G) -> (Q, P, G) IoU, with the official operation order (a zero union
    gives NaN there too, which the matching below treats as the official argsort does)."""
    area_p = pe - ps
    area_g = ge - gs
    left = np.maximum(ps[:, :, None], gs[:, None, :])
    right = np.minimum(pe[:, :, None], ge[:, None, :])
    inter = np.clip(right - left, 0, None)
    union = area_p[:, :, None] + area_g[:, None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / union


def _paired_iou(ps: np.ndarray, pe: np.ndarray, gs: np.ndarray, ge: np.ndarray) -> np.ndarray:
    """Element-wise IoU as the official R1 computes it (union = hull; 0 where it is empty)."""
    inter = np.maximum(0, np.minimum(pe, ge) - np.maximum(ps, gs))
    union = np.maximum(pe, ge) - np.minimum(ps, gs)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union != 0)


def _reduce_selected(values: np.ndarray, selected: np.ndarray, op: str) -> np.ndarray:
    """Row-wise `values[selected].sum()` / `.mean()` that equals, bit for bit, the official
    call on the compacted 1-D array: rows are grouped by their count so numpy reduces rows
    of exactly that length (its pairwise summation depends on the length)."""
    order = np.argsort(~selected, axis=-1, kind="stable")
    packed = np.take_along_axis(values, order, axis=-1)
    counts = selected.sum(axis=-1)
    out = np.zeros(values.shape[0])
    for n in np.unique(counts):
        if n == 0:
            continue
        rows = counts == n
        out[rows] = getattr(packed[rows, :n], op)(axis=1)
    return out


def _mr_split(
    iou: np.ndarray, pvalid: np.ndarray, r1_iou: np.ndarray, gmask: np.ndarray
) -> dict[str, dict[str, float]]:
    """MR-mAP / MR-R1 tables of one split. `iou` (Q, P, G) has the predictions already in
    descending-score order, `gmask` (Q, G) marks the split's ground-truth windows; queries
    without one are not in the split. `r1_iou` (Q,) is the first window's IoU per query."""
    thr = np.asarray(QVH_IOU_THRESHOLDS)
    keys = [str(t) for t in QVH_IOU_THRESHOLDS]
    keep = gmask.any(axis=1)
    iou, pvalid, gmask, r1_iou = iou[keep], pvalid[keep], gmask[keep], r1_iou[keep]
    nq, npred, ngt = iou.shape
    nt = len(thr)
    if nq == 0:
        nan_map = dict.fromkeys(keys, NAN)
        return {"MR-mAP": {**nan_map, "average": NAN}, "MR-R1": dict(nan_map)}

    # greedy matching, vectorised over queries and thresholds, one prediction at a time
    nan = np.isnan(iou)
    rank_key = np.where(nan, np.inf, iou)  # the reversed argsort visits NaN first
    passes = (iou[:, :, None, :] >= thr[None, None, :, None]) | nan[:, :, None, :]
    passes &= gmask[:, None, None, :] & pvalid[:, :, None, None]  # (Q, P, T, G)
    locked = np.zeros((nq, nt, ngt), dtype=bool)
    tp = np.zeros((nq, nt, npred), dtype=bool)
    for p in range(npred):
        eligible = passes[:, p] & ~locked
        key = np.where(eligible, rank_key[:, p, None, :], -np.inf)
        cand = eligible & (key == key.max(axis=-1, keepdims=True))
        chosen = ngt - 1 - np.argmax(cand[..., ::-1], axis=-1)  # IoU ties: the later window
        hit = cand.any(axis=-1)
        tp[:, :, p] = hit
        qi, ti = np.nonzero(hit)
        locked[qi, ti, chosen[qi, ti]] = True
    fp = pvalid[:, None, :] & ~tp

    # interpolated AP per (query, threshold); padding after a query's last window repeats its
    # last (precision, recall) point, which adds nothing
    tp_cum = np.cumsum(tp, axis=-1, dtype=np.float64)
    fp_cum = np.cumsum(fp, axis=-1, dtype=np.float64)
    n_gt = gmask.sum(axis=1).astype(np.float64)[:, None, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp_cum / (tp_cum + fp_cum)
    recall = tp_cum / n_gt
    zeros = np.zeros((nq, nt, 1))
    mprec = np.concatenate([zeros, precision, zeros], axis=-1)
    mprec = np.maximum.accumulate(mprec[..., ::-1], axis=-1)[..., ::-1]
    mrec = np.concatenate([zeros, recall, zeros + 1.0], axis=-1)
    changed = mrec[..., 1:] != mrec[..., :-1]
    terms = (mrec[..., 1:] - mrec[..., :-1]) * mprec[..., 1:]
    ap = _reduce_selected(terms.reshape(nq * nt, -1), changed.reshape(nq * nt, -1), "sum")
    ap = ap.reshape(nq, nt)
    ap[~pvalid.any(axis=1)] = 0.0  # no windows at all: AP 0 (officially: left out / crash)

    ap_per_thr = ap.mean(axis=0)
    mr_map = {k: _pct(v) for k, v in zip(keys, ap_per_thr, strict=True)}
    mr_map["average"] = _pct(np.mean(ap_per_thr))
    mr_r1 = {k: _pct(np.mean(r1_iou >= t)) for k, t in zip(keys, QVH_IOU_THRESHOLDS, strict=True)}
    return {"MR-mAP": mr_map, "MR-R1": mr_r1}


def _moment_retrieval(
    preds: Sequence[dict[str, Any]], gts: Sequence[dict[str, Any]]
) -> dict[str, dict[str, dict[str, float]]]:
    """`{"short"|"middle"|"long"|"full": {"MR-mAP": ..., "MR-R1": ...}}` for aligned lists."""
    pred_w = [
        _window_array(p.get("pred_relevant_windows"), 3, p["qid"], "pred_relevant_windows")
        for p in preds
    ]
    gt_w = []
    for g in gts:
        w = _window_array(g.get("relevant_windows"), 2, g["qid"], "relevant_windows")
        if len(w) == 0:
            raise ValueError(f"qid {g['qid']!r}: no ground-truth window in relevant_windows")
        gt_w.append(w)
    nq, npred, ngt = len(preds), QVH_MAX_PRED_WINDOWS, max(len(w) for w in gt_w)

    pw = np.zeros((nq, npred, 3))
    pvalid = np.zeros((nq, npred), dtype=bool)
    first = np.zeros((nq, 2))
    gw = np.zeros((nq, ngt, 2))
    gvalid = np.zeros((nq, ngt), dtype=bool)
    for i, (p, g) in enumerate(zip(pred_w, gt_w, strict=True)):
        top = p[:npred]  # official: the first 10 in list order, sorted afterwards
        pw[i, : len(top)] = top
        pvalid[i, : len(top)] = True
        if len(p):
            first[i] = p[0, :2]
        gw[i, : len(g)] = g
        gvalid[i, : len(g)] = True
    has_pred = pvalid[:, 0]

    iou = _cross_iou(pw[..., 0], pw[..., 1], gw[..., 0], gw[..., 1])  # list order (Q, P, G)
    order = np.argsort(np.where(pvalid, -pw[..., 2], np.inf), axis=1, kind="stable")
    iou_sorted = np.take_along_axis(iou, order[:, :, None], axis=1)
    pvalid_sorted = np.take_along_axis(pvalid, order, axis=1)
    gt_len = gw[..., 1] - gw[..., 0]

    # R1: the first listed window against its best ground truth (np.argmax: the first
    # maximum, NaN winning); the IoU itself is then the official paired formula
    first_cross = iou[:, 0, :]  # the first listed window is index 0 before sorting

    def r1_iou(gmask: np.ndarray) -> np.ndarray:
        key = np.where(np.isnan(first_cross), np.inf, first_cross)
        best = np.argmax(np.where(gmask, key, -np.inf), axis=1)
        rows = np.arange(nq)
        out = _paired_iou(first[:, 0], first[:, 1], gw[rows, best, 0], gw[rows, best, 1])
        return np.where(has_pred, out, 0.0)

    splits = {
        name: gvalid & (gt_len > lo) & (gt_len <= hi)
        for name, (lo, hi) in QVH_LENGTH_SPLITS.items()
    }
    splits["full"] = gvalid
    return {
        name: _mr_split(iou_sorted, pvalid_sorted, r1_iou(gmask), gmask)
        for name, gmask in splits.items()
    }


def _highlight_detection(
    preds: Sequence[dict[str, Any]], gts: Sequence[dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """`{"HL-min-<level>": {"HL-mAP": ..., "HL-Hit1": ...}}` for aligned lists."""
    nq = len(preds)
    n_clips = np.zeros(nq, dtype=np.int64)
    pred_scores: list[np.ndarray] = []
    gt_scores: list[np.ndarray] = []
    for p, g in zip(preds, gts, strict=True):
        qid = p["qid"]
        try:
            s = np.asarray(p.get("pred_saliency_scores"), dtype=np.float64)
        except (TypeError, ValueError):
            s = None
        if s is None or s.ndim != 1:
            raise ValueError(f"qid {qid!r}: pred_saliency_scores must be a list of numbers")
        try:
            n = int(float(g["duration"]) / QVH_CLIP_SECONDS)
            ids = np.asarray(g["relevant_clip_ids"], dtype=np.int64).reshape(-1)
            sal = np.asarray(g["saliency_scores"], dtype=np.float64).reshape(len(ids), 3)
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"qid {qid!r}: highlight ground truth needs duration, relevant_clip_ids and "
                "saliency_scores (one [a, b, c] per clip id)"
            ) from None
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"qid {qid!r}: relevant_clip_ids outside the {n} clips of the video")
        full = np.zeros((n, 3))
        full[ids] = sal
        n_clips[len(pred_scores)] = n
        pred_scores.append(s)
        gt_scores.append(full)

    width = max(1, int(n_clips.max()))
    pos = np.arange(width)
    valid = pos[None, :] < n_clips[:, None]  # (Q, N)
    scores = np.zeros((nq, width))  # truncated / zero-padded to the clip count
    saliency = np.zeros((nq, width, 3))
    argmax_clip = np.full(nq, -1)
    for i, (s, full) in enumerate(zip(pred_scores, gt_scores, strict=True)):
        m = min(len(s), n_clips[i])
        scores[i, :m] = s[:m]
        saliency[i, : n_clips[i]] = full
        if len(s):  # officially np.argmax over the untruncated list; empty -> no hit
            argmax_clip[i] = int(np.argmax(s))

    # sklearn's PR curve on each (query, level, annotator): one descending-score order per
    # query, one point per distinct score, stopping at full recall
    order = np.argsort(np.where(valid, -scores, np.inf), axis=1, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=1)
    is_end = valid & np.concatenate(
        [(sorted_scores[:, 1:] != sorted_scores[:, :-1]) | ~valid[:, 1:],
         np.ones((nq, 1), dtype=bool)], axis=1,
    )
    levels = list(QVH_SALIENCY_LEVELS.items())
    mins = np.asarray([v for _, v in levels], dtype=np.float64)
    positive = (saliency[:, :, None, :] >= mins[None, None, :, None]) & valid[:, :, None, None]
    labels = positive.reshape(nq, width, -1).transpose(0, 2, 1)  # (Q, L*3, N), list order
    labels_sorted = np.take_along_axis(labels, order[:, None, :], axis=2)
    tps = np.cumsum(labels_sorted, axis=-1, dtype=np.float64)
    n_pos = tps[..., -1]
    precision = tps / (pos + 1.0)
    ends = np.broadcast_to(is_end[:, None, :], tps.shape)
    k_full = np.argmax(ends & (tps == n_pos[..., None]), axis=-1)  # first point at recall 1
    in_curve = ends & (pos <= k_full[..., None])
    at_end = np.where(ends, tps, 0.0)
    prev_end_tps = np.concatenate(
        [np.zeros(tps.shape[:-1] + (1,)), np.maximum.accumulate(at_end, axis=-1)[..., :-1]],
        axis=-1,
    )
    selected = in_curve & (tps > prev_end_tps)  # the recall changes at these points
    interp = np.maximum.accumulate(np.where(in_curve, precision, 0.0)[..., ::-1], axis=-1)
    # the official array runs from full recall down, so reduce in that order
    ap = _reduce_selected(
        interp.reshape(-1, width), selected[..., ::-1].reshape(-1, width), "mean"
    ).reshape(n_pos.shape)
    n_all = n_clips[:, None].astype(np.float64)
    ap = np.where(n_pos == 0, 0.0, np.where(n_pos == n_all, 1.0, ap))  # one label only
    ap = ap.reshape(nq, len(levels), 3)

    rows = np.arange(nq)
    in_range = (argmax_clip >= 0) & (argmax_clip < n_clips)
    hit_rows = positive[rows, np.where(in_range, argmax_clip, 0)]  # (Q, L, 3)
    hit_rows = np.where(in_range[:, None, None], hit_rows, False).astype(np.float64)
    out: dict[str, dict[str, float]] = {}
    for j, (name, _) in enumerate(levels):
        out[f"HL-min-{name}"] = {
            "HL-mAP": _pct(np.mean(ap[:, j, :])),
            "HL-Hit1": _pct(np.mean(np.max(hit_rows[:, j, :], axis=1))),
        }
    return out


def qvhighlights_metrics(
    predictions: Sequence[dict[str, Any]],
    ground_truth: Sequence[dict[str, Any]],
    *,
    match_qids: bool = True,
) -> dict[str, Any]:
    """The official QVHighlights metrics, in the official evaluator's output structure and
    key order, so numbers are comparable with published results.

    `predictions` use the submission format (`qid`, `pred_relevant_windows` =
    `[[start, end, score], ...]`, `pred_saliency_scores` = one score per 2 s clip);
    `ground_truth` the annotation format. As officially, the moment-retrieval tables are
    computed when the first prediction has `pred_relevant_windows` and the highlight tables
    when it has `pred_saliency_scores`. With `match_qids` (the official default) both sides
    must cover the same qids, else ValueError naming the difference; `match_qids=False`
    evaluates the qids they share (the official `match_number=False`).
    """
    pred_by_qid = _by_qid(predictions, "predictions")
    gt_by_qid = _by_qid(ground_truth, "ground truth")
    missing = [q for q in gt_by_qid if q not in pred_by_qid]
    extra = [q for q in pred_by_qid if q not in gt_by_qid]
    if match_qids and (missing or extra):
        parts = []
        if missing:
            parts.append(f"{len(missing)} qid(s) without a prediction: {_preview(missing)}")
        if extra:
            parts.append(f"{len(extra)} predicted qid(s) not in the ground truth: "
                         f"{_preview(extra)}")
        raise ValueError(
            "predictions and ground truth must cover the same qids, as the official evaluator "
            "asserts (match_qids=False / --shared-qids-only scores the shared ones): "
            + "; ".join(parts)
        )
    preds = [p for q, p in pred_by_qid.items() if q in gt_by_qid]  # submission order
    if not preds:
        raise ValueError("no qid is shared by the predictions and the ground truth")
    gts = [gt_by_qid[p["qid"]] for p in preds]

    brief: dict[str, float] = {}
    tables: dict[str, Any] = {}
    if "pred_relevant_windows" in preds[0]:
        mr = _moment_retrieval(preds, gts)
        tables.update(mr)
        mr_brief = {
            "MR-full-mAP": mr["full"]["MR-mAP"]["average"],
            "MR-full-mAP@0.5": mr["full"]["MR-mAP"]["0.5"],
            "MR-full-mAP@0.75": mr["full"]["MR-mAP"]["0.75"],
            "MR-short-mAP": mr["short"]["MR-mAP"]["average"],
            "MR-middle-mAP": mr["middle"]["MR-mAP"]["average"],
            "MR-long-mAP": mr["long"]["MR-mAP"]["average"],
            "MR-full-R1@0.5": mr["full"]["MR-R1"]["0.5"],
            "MR-full-R1@0.7": mr["full"]["MR-R1"]["0.7"],
        }
        brief.update(sorted(mr_brief.items()))
    if "pred_saliency_scores" in preds[0]:
        hl = _highlight_detection(preds, gts)
        tables.update(hl)
        for name, table in hl.items():
            brief[f"{name}-mAP"] = table["HL-mAP"]
            brief[f"{name}-Hit1"] = table["HL-Hit1"]
    return {"brief": brief, **dict(sorted(tables.items()))}
