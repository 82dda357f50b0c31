"""PIR-GRPO rewards: answer parsing, strict format reward, IoU accuracy reward, registry.

See /work/shared/TEMPO_R0.md, "Prompt and answer (ours)" and "PIR-GRPO (ours)". The parser
is lenient (a model that writes `12.5s - 17.8s` still gets its window scored), the format
reward is strict (that is what teaches the template). Every reward here is a Tunix-style
function `(prompts, completions, **example_fields) -> list[float]` and never raises on any
completion text: a crash mid-rollout would cost a whole RL step for one odd sample.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = [
    "REFUSE", "REWARDS", "Answer", "parse_answer", "format_reward", "temporal_iou",
    "clip_window", "best_iou", "time_r1_score", "accuracy_reward", "register", "get_reward",
    "total_reward", "think_text",
]

REFUSE = "refuse"
Answer = tuple[float, float] | str | None
RewardFn = Callable[..., list[float]]

# --- parsing ---------------------------------------------------------------------------------

# One time value: seconds (`12.5`), `mm:ss`, `hh:mm:ss`, each optionally with a fraction
# (`1:02.5`) and a unit (`12.5s`, `12.5 sec`, `12.5 seconds`). ASCII digits only so that
# float() always accepts what matched. Possessive `*+` keeps the scan linear on long
# whitespace runs (no backtracking between adjacent optional spaces).
_NUM = r"[0-9]+(?::[0-9]{1,2}){0,2}(?:\.[0-9]+)?"
_UNIT = r"(?:\s?(?:seconds?|secs?|s)(?![A-Za-z]))?"
_SEP = r"(?:to|and|-|–|—|~|,)"
_PAIR_RE = re.compile(
    rf"(?<![\w.:])(?P<neg1>-\s*+)?(?P<t1>{_NUM}){_UNIT}\s*+{_SEP}\s*+"
    rf"(?P<neg2>-\s*+)?(?P<t2>{_NUM}){_UNIT}(?![A-Za-z0-9]|\.[0-9])",
    re.IGNORECASE,
)
_OPEN_RE = re.compile(r"<answer\s*>", re.IGNORECASE)
_CLOSE_RE = re.compile(r"</answer\s*>", re.IGNORECASE)
# "none" alone, any case, with optional whitespace / punctuation around it.
_REFUSAL_RE = re.compile(r"^[\W_]*none[\W_]*$", re.IGNORECASE)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.IGNORECASE | re.DOTALL)
_TAG_RE = re.compile(r"<[^<>]*>")


def think_text(text: str) -> str:
    """The text inside a completion's first `<think>…</think>` ("" if none)."""
    m = _THINK_RE.search(text)
    return m.group(1) if m else ""


def _to_seconds(token: str) -> float | None:
    """`12.5` / `mm:ss(.f)` / `hh:mm:ss(.f)` -> seconds; None for a clock field >= 60 or
    a value that overflows to inf."""
    parts = token.split(":")
    value = 0.0
    for i, part in enumerate(parts):
        x = float(part)
        if i > 0 and x >= 60:
            return None
        value = value * 60 + x
    return value if math.isfinite(value) else None


def _pair(m: re.Match[str]) -> tuple[float, float] | None:
    """A regex match -> (start, end) with start <= end; None if negative or not finite."""
    if m.group("neg1") or m.group("neg2"):
        return None
    s, e = _to_seconds(m.group("t1")), _to_seconds(m.group("t2"))
    if s is None or e is None:
        return None
    return (s, e) if s <= e else (e, s)


def _last_match(matches: Iterator[re.Match[str]]) -> re.Match[str] | None:
    last = deque(matches, maxlen=1)
    return last[0] if last else None


def _last_block(text: str) -> str | None:
    """Body of the last complete `<answer>…</answer>` block (linear scan, no regex
    backtracking over the body), or None when there is none."""
    close = _last_match(_CLOSE_RE.finditer(text))
    if close is None:
        return None
    opening = _last_match(_OPEN_RE.finditer(text, 0, close.start()))
    if opening is None:
        return None
    return text[opening.end():close.start()]


def _parse(text: str) -> Answer:
    block = _last_block(text)
    if block is not None:
        # Inside the block, the first pair is the answer (later ones are usually asides).
        if _REFUSAL_RE.match(block):
            return REFUSE
        m = _PAIR_RE.search(block)
        return _pair(m) if m else None
    # Fallback (no complete block): the last "X to Y"-like pair anywhere, else a bare "none".
    last = _last_match(_PAIR_RE.finditer(text))
    if last is not None:
        return _pair(last)
    bare = _TAG_RE.sub(" ", _THINK_RE.sub(" ", text))
    return REFUSE if _REFUSAL_RE.match(bare) else None


def parse_answer(text: Any) -> Answer:
    """Lenient answer parser: `(start, end)` seconds with start <= end, `"refuse"` for a
    refusal (`none`), or None when unreadable (or negative / non-finite).

    The last `<answer>…</answer>` block decides; surrounding text is only consulted when no
    complete block exists (e.g. a truncated generation). Never raises.
    """
    if not isinstance(text, str):
        return None
    try:
        return _parse(text)
    except Exception:  # noqa: BLE001 - a parser bug must not kill a rollout
        return None


# --- format reward ---------------------------------------------------------------------------

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


# --- IoU / accuracy reward -------------------------------------------------------------------

def _window(w: Any) -> tuple[float, float] | None:
    """Any 2-sequence of numbers -> finite sorted (s, e), else None (bad data is skipped,
    not raised on)."""
    try:
        s, e = (float(v) for v in w)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(s) and math.isfinite(e)):
        return None
    return (s, e) if s <= e else (e, s)


def _duration(d: Any) -> float | None:
    try:
        d = float(d)
    except (TypeError, ValueError):
        return None
    return d if math.isfinite(d) and d > 0 else None


def temporal_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Temporal IoU of two windows: intersection / union; 0 for an empty union or bad input."""
    wa, wb = _window(a), _window(b)
    if wa is None or wb is None:
        return 0.0
    inter = max(0.0, min(wa[1], wb[1]) - max(wa[0], wb[0]))
    union = (wa[1] - wa[0]) + (wb[1] - wb[0]) - inter
    if not (union > 0 and math.isfinite(union)):
        return 0.0
    return float(min(1.0, max(0.0, inter / union)))


def clip_window(window: Sequence[float], duration: float | None) -> tuple[float, float] | None:
    """Clip a prediction to [0, duration] (only the lower bound 0 without a duration), so an
    answer past the video's end is not scored on time that does not exist."""
    w = _window(window)
    if w is None:
        return None
    d = _duration(duration)
    hi = d if d is not None else math.inf
    return (min(max(w[0], 0.0), hi), min(max(w[1], 0.0), hi))


def best_iou(
    window: Sequence[float], gt_windows: Sequence[Sequence[float]], duration: float | None = None
) -> float:
    """Max IoU of the (clipped) prediction over all ground-truth windows; shared with the
    metrics so that training reward and evaluation agree."""
    w = clip_window(window, duration)
    if w is None:
        return 0.0
    return max((temporal_iou(w, g) for g in gt_windows), default=0.0)


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
