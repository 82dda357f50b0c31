"""Temporal grounding metrics.

Training-time / Charades-STA style metrics (R1@m, mIoU, refusal accounting) share the IoU
code of the accuracy reward (`tempo_jax.rl.rewards.best_iou`), so a number logged during RL
means the same thing as the reward that produced it. The official QVHighlights metrics
(see /work/shared/TEMPO_R0.md, "Reference behaviour") live further down this file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tempo_jax.rl.rewards import REFUSE, Answer, best_iou, parse_answer

__all__ = ["grounding_metrics", "normalize_prediction"]

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


# --- QVHighlights official metrics -----------------------------------------------------------
# (R1@0.5/0.7 on the first window, mAP@[0.5:0.95], short/middle/long, HD mAP, HIT@1):
# implemented separately below.
