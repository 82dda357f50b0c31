"""The loop both stages share: a progress bar, the logging cadence (`log_every`, and the last
step), step time and throughput, the count of skipped (non-finite) updates, the checkpoint
cadence (`ckpt_every`, the stage's last step, SIGTERM) and the commit of every checkpoint it
started however it ends.

A stage supplies `step_fn(step, opt_state) -> StepResult`; everything else is here, so SFT
and PIR-GRPO cannot drift apart in how they log, save or stop.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tempo_jax.train")


@dataclasses.dataclass
class StepResult:
    """What one step of a stage hands back to the loop."""

    opt_state: Any
    metrics: dict  # scalars (device or host); converted to floats only when logged
    skipped: int = 0  # updates skipped because the loss or a gradient was non-finite
    tokens: int = 0  # tokens processed (SFT) or generated (GRPO), for tokens_per_s


def run_stage(trainer: Any, stage: str, title: str, step0: int, total: int,
              step_fn: Callable[[int, Any], StepResult], *, opt_state: Any, rng: Any,
              log_every: int, loader: Any = None,
              postfix: Callable[[dict], dict] | None = None) -> dict:
    """Run steps `step0 .. total - 1` of `stage` ("sft" or "grpo"), logging every
    `log_every` steps the mean of each metric over the steps since the last row (NaN, e.g.
    a refusal rate with no irrelevant prompt, left out of the mean). Returns
    `{"skipped_updates": n, "preempted": bool}`; preempted when SIGTERM stopped it (its
    checkpoint saved and committed).

    The metrics gathered since the last row, and the count of skipped updates, are saved with
    every checkpoint and taken back on resume (`trainer.log_window`): a run restarted from a
    checkpoint in the middle of a logging window logs the row an uninterrupted run logs (the
    timings, step_time and tokens_per_s, count this process's steps only)."""
    from tqdm import tqdm

    every = max(1, log_every)
    window = trainer.log_window(stage, step0)
    skipped, since = window.get("skipped", 0), window.get("since", 0)
    sums: dict[str, list[float]] = {k: list(v) for k, v in window.get("sums", {}).items()}
    tokens, timed = 0, 0  # this process's, for the timings
    t_last = time.perf_counter()
    bar = tqdm(range(step0, total), desc=title, initial=step0, total=total, file=sys.stdout,
               mininterval=2)
    with trainer.ckpt.committing(title, loader), bar:
        for step in bar:
            res = step_fn(step, opt_state)
            opt_state = res.opt_state
            if res.skipped:
                skipped += res.skipped
                log.warning("%s step %d: non-finite loss or gradient, %d update(s) skipped",
                            title, step, res.skipped)
            tokens += res.tokens
            since += 1
            timed += 1
            for k, v in res.metrics.items():
                sums.setdefault(k, []).append(float(v))
            if (step + 1) % every == 0 or step + 1 == total:
                now = time.perf_counter()
                metrics = {k: _mean(v) for k, v in sums.items()}
                sums = {}
                metrics["skipped_updates"] = skipped
                if loader is not None:
                    metrics["skipped_examples"] = loader.skipped
                metrics["step_time"] = (now - t_last) / timed
                metrics["tokens_per_s"] = tokens / max(now - t_last, 1e-9)
                t_last, tokens, since, timed = now, 0, 0, 0
                trainer.logger.log(stage, step + 1, metrics)
                if postfix is not None:
                    bar.set_postfix(**postfix(metrics))
            if trainer.checkpoint_step(stage, step, total, opt_state, rng, loader,
                                       {"sums": sums, "since": since, "skipped": skipped}):
                return {"skipped_updates": skipped, "preempted": True}
    return {"skipped_updates": skipped, "preempted": False}


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v == v]
    return sum(finite) / len(finite) if finite else float("nan")
