"""Metrics of a run: `metrics.jsonl` (one JSON row per logged step) and TensorBoard event
files, written by process 0 only (other processes log nothing)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tempo_jax.distributed import is_main

log = logging.getLogger("tempo_jax.train")


class MetricsLogger:
    """Appends to `workdir/metrics.jsonl` and `workdir/tb`; `close` flushes both (the
    TensorBoard writer has a background thread)."""

    def __init__(self, workdir: Path):
        self.is_main = is_main()
        self.file = open(Path(workdir) / "metrics.jsonl", "a") if self.is_main else None  # noqa: SIM115
        self.tb = None
        if self.is_main:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(Path(workdir) / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX missing: no TensorBoard event files")

    def log(self, stage: str, step: int, metrics: dict) -> None:
        """One row `{"stage", "step", **metrics}` (values as floats)."""
        if self.file is None:
            return
        row = {"stage": stage, "step": step}
        row.update({k: float(v) for k, v in metrics.items()})
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{stage}/{k}", float(v), step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
