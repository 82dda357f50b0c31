"""Reading a grounding answer and scoring a window: the answer parser, temporal IoU and the
clipping to the video, shared by the rewards (`tempo_jax.rl.rewards`), the metrics and the
evaluation, so that what training rewards and what evaluation scores agree.

The parser is lenient: a model that writes `12.5s - 17.8s` still gets its window scored; it
never raises on any text (a crash mid-rollout would cost a whole RL step for one odd sample).
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

__all__ = ["REFUSE", "Answer", "best_iou", "clip_window", "parse_answer", "temporal_iou",
           "think_text"]

REFUSE = "refuse"
Answer = tuple[float, float] | str | None

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

# --- IoU -------------------------------------------------------------------------------------

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
