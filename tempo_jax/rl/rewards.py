"""PIR-GRPO rewards: strict format reward, IoU accuracy reward, registry.

See /work/shared/TEMPO_R0.md, "Prompt and answer (ours)" and "PIR-GRPO (ours)". The answer
parser and the IoU live in `tempo_jax.grounding.answers` (the metrics share them) and are
re-exported here. The parser is lenient (a model that writes `12.5s - 17.8s` still gets its
window scored), the format reward is strict (that is what teaches the template). Every reward
here is a Tunix-style function `(prompts, completions, **example_fields) -> list[float]` and
never raises on any completion text: a crash mid-rollout would cost a whole RL step for one
odd sample.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tempo_jax.grounding.answers import (
    REFUSE,
    Answer,
    _duration,
    _window,
    best_iou,
    clip_window,
    parse_answer,
    temporal_iou,
    think_text,
)

__all__ = [
    "REFUSE", "REWARDS", "Answer", "parse_answer", "format_reward", "temporal_iou",
    "clip_window", "best_iou", "time_r1_score", "accuracy_reward", "register", "get_reward",
    "total_reward", "think_text",
]

RewardFn = Callable[..., list[float]]

_WINDOW = r"[0-9]+(?:\.[0-9]+)? to [0-9]+(?:\.[0-9]+)?"
_FORMAT_PLAIN_RE = re.compile(rf"<answer>(?:{_WINDOW}|none)</answer>")
_FORMAT_THINK_RE = re.compile(rf"<think>[^<>]*</think><answer>(?:{_WINDOW}|none)</answer>")
_IM_END = "<|im_end|>"


def _strict_format(text: Any, thinking: bool) -> bool:
    if not isinstance(text, str):
        return False
    text = text.strip()
    if text.endswith(_IM_END):
        text = text[: -len(_IM_END)].strip()
    pattern = _FORMAT_THINK_RE if thinking else _FORMAT_PLAIN_RE
    return pattern.fullmatch(text) is not None


def format_reward(
    prompts: Sequence[Any], completions: Sequence[Any], *, thinking: bool = False, **fields: Any
) -> list[float]:
    """1.0 when a completion is exactly the template we train (thinking-free
    `<answer>12.5 to 17.8</answer>` / `<answer>none</answer>`, or with `<think>…</think>`
    first when `thinking`), else 0.0. Strict on purpose: leniency lives in the parser."""
    del prompts, fields
    return [1.0 if _strict_format(c, bool(thinking)) else 0.0 for c in completions]


# --- accuracy reward ---------------------------------------------------------------------

def time_r1_score(
    window: Sequence[float], gt_windows: Sequence[Sequence[float]], duration: float | None = None
) -> float:
    """Time-R1's `IoU * (1 - |Δs|/D) * (1 - |Δe|/D)`, maxed over the ground-truth windows
    (the best-matching one under this score). Without a usable duration D, D is the
    smallest span from 0 holding the prediction and every ground truth."""
    w = clip_window(window, duration)
    if w is None:
        return 0.0
    gts = [g for g in (_window(g) for g in gt_windows) if g is not None]
    if not gts:
        return 0.0
    d = _duration(duration)
    if d is None:
        d = _duration(max([w[1]] + [g[1] for g in gts]))
        if d is None:
            return 0.0
    best = 0.0
    for g in gts:
        fs = max(0.0, 1.0 - abs(w[0] - g[0]) / d)
        fe = max(0.0, 1.0 - abs(w[1] - g[1]) / d)
        best = max(best, temporal_iou(w, g) * fs * fe)
    return float(best)


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    if value is None:
        return [None] * n
    items = list(value)
    if len(items) != n:
        raise ValueError(f"{name} has {len(items)} entries for {n} completions")
    return items


def accuracy_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    *,
    windows: Sequence[Sequence[Sequence[float]]],
    relevant: Sequence[bool],
    duration: Sequence[float | None] | None = None,
    iou_type: str = "iou",
    **fields: Any,
) -> list[float]:
    """PIR-GRPO accuracy: a relevant pair earns the IoU (or Time-R1 score) of its answer,
    0 for a refusal or an unreadable answer; an irrelevant pair earns 1 for a refusal and
    0 for any window. `windows[i]` lists the ground-truth `[s, e]` of completion i."""
    del prompts, fields
    if iou_type not in ("iou", "time_r1"):
        raise ValueError(f"iou_type must be 'iou' or 'time_r1', got {iou_type!r}")
    n = len(completions)
    windows_l = _per_item(windows, n, "windows")
    relevant_l = _per_item(relevant, n, "relevant")
    duration_l = _per_item(duration, n, "duration")
    score = time_r1_score if iou_type == "time_r1" else best_iou
    out = []
    for text, gts, rel, dur in zip(completions, windows_l, relevant_l, duration_l, strict=True):
        ans = parse_answer(text)
        if not rel:
            out.append(1.0 if ans == REFUSE else 0.0)
        elif isinstance(ans, tuple):
            out.append(score(ans, [] if gts is None else list(gts), dur))
        else:
            out.append(0.0)
    return out


# --- registry --------------------------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward to `REWARDS`, so configs can name rewards as strings."""

    def deco(fn: RewardFn) -> RewardFn:
        if name in REWARDS and REWARDS[name] is not fn:
            raise ValueError(f"reward {name!r} already registered")
        REWARDS[name] = fn
        return fn

    return deco


def get_reward(name: str) -> RewardFn:
    """The reward registered as `name` (KeyError listing the known names otherwise)."""
    try:
        return REWARDS[name]
    except KeyError:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REWARDS)}") from None


register("format")(format_reward)
register("accuracy")(accuracy_reward)


def total_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    names: Sequence[str] = ("format", "accuracy"),
    **fields: Any,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Sum of the named rewards, plus each part (float64 [N]) so the trainer can log them.
    A non-finite part value (only possible from a user-registered reward) counts as 0."""
    n = len(completions)
    parts: dict[str, np.ndarray] = {}
    total = np.zeros(n, np.float64)
    for name in names:
        values = np.asarray(get_reward(name)(prompts, completions, **fields), np.float64)
        if values.shape != (n,):
            raise ValueError(f"reward {name!r} returned shape {values.shape}, expected ({n},)")
        values = np.where(np.isfinite(values), values, 0.0)
        parts[name] = values
        total = total + values
    return total, parts
