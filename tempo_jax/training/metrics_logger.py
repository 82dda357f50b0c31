"""Metrics of a run: `metrics.jsonl` (one JSON row per logged step) and TensorBoard event
files, written by process 0 only (other processes log nothing).

`metrics.jsonl` is the record; the TensorBoard files are rebuilt from it when a run resumes
(`restart`), so both hold each row exactly once however often the run was killed."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from tempo_jax import fileio
from tempo_jax.distributed import is_main

log = logging.getLogger("tempo_jax.train")


class MetricsLogger:
    """Appends to `workdir/metrics.jsonl` and `workdir/tb`; `close` flushes both (the
    TensorBoard writer has a background thread)."""

    def __init__(self, workdir: Path):
        self.is_main = is_main()
        self.path = Path(workdir) / "metrics.jsonl"
        self.tb_dir = Path(workdir) / "tb"
        self.file = self.tb = None
        if self.is_main:
            _drop_torn_tail(self.path)  # an append must start on a line of its own
            self._open()

    def _open(self) -> None:
        self.file = open(self.path, "a")  # noqa: SIM115
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.tb_dir))
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
        self._tb_row(row)

    def _tb_row(self, row: dict) -> None:
        if self.tb is not None:
            for k, v in row.items():
                if k not in ("stage", "step"):
                    self.tb.add_scalar(f"{row['stage']}/{k}", float(v), row["step"])

    def restart(self, keep: Callable[[dict], bool]) -> int:
        """A resumed run's logs: the rows `keep` accepts (those its checkpoint accounts for)
        stay, in order, the rest (and any torn line) go, and the TensorBoard files are
        written anew from them. Returns how many rows were dropped."""
        if not self.is_main:
            return 0
        rows, torn = fileio.read_jsonl(self.path)
        kept = [r for r in rows if keep(r)]
        self.close()
        fileio.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        shutil.rmtree(self.tb_dir, ignore_errors=True)
        self._open()
        for r in kept:
            self._tb_row(r)
        if self.tb is not None:
            self.tb.flush()
        return len(rows) - len(kept) + torn

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that a kill left without its newline (it is an unfinished row)."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        fileio.write_text(path, data[:data.rfind(b"\n") + 1].decode())


def tensorboard_scalars(tb_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in a run's TensorBoard event files, read from the TFRecord
    framing (length, its CRC, the Event proto, its CRC) without TensorBoard: what checks that
    each row reached TensorBoard exactly once."""
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for f in sorted(Path(tb_dir).glob("events.out.tfevents.*")):
        data, i = f.read_bytes(), 0
        while i + 12 <= len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            if i + 12 + n + 4 > len(data):
                break  # a record torn by a kill
            ev = event_pb2.Event()
            ev.ParseFromString(data[i + 12:i + 12 + n])
            out += [(v.tag, ev.step) for v in ev.summary.value]
            i += 12 + n + 4
    return out
