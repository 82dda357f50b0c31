"""Timing shared by the benchmark scripts: the sides of a comparison run interleaved
(A B A B ...), several times, and are reported as median, min and max, so a machine that
was busy during the run shows as spread instead of as a skewed ratio."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_time(fn: Callable[[], object], reps: int) -> float:
    """Median seconds of `reps` calls of one side (where the sides cannot interleave: each in
    its own process, as `bench_mfu.py` runs them on a GPU)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_interleaved(sides: dict[str, Callable[[], object]], reps: int
                     ) -> dict[str, list[float]]:
    """Seconds of each call of each side, `reps` rounds of one call per side in turn (every
    side must already be warm: compiled, first call made)."""
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        for name, fn in sides.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def spread(values: list[float], digits: int = 4) -> dict[str, float]:
    """{median, min, max} of a list."""
    return {"median": round(statistics.median(values), digits),
            "min": round(min(values), digits), "max": round(max(values), digits)}


def ratio_spread(ref: list[float], ours: list[float]) -> dict[str, float]:
    """Per-round speed-up ref / ours (rounds are interleaved, so each pair shared the same
    machine state): median, min, max."""
    return spread([r / o for r, o in zip(ref, ours, strict=True)], digits=3)
