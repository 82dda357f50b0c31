"""The trainer: one workdir's model (split into graphdef, trainable and frozen parameters),
mesh, tokenizer, checkpoints and logs, and the stage scheduler; `run` is the whole training
command (train, resuming from the last checkpoint; evaluate after each stage; export;
report).

Every way out (a stage's end, `run` returning, SIGTERM, an error) waits until the checkpoints
already started are committed. A non-finite loss or gradient skips the update and is logged;
it never reaches a checkpoint.

What a run killed at any instant (SIGKILL, a lost host) leaves, and its restart does
(`scripts/chaos.py` measures it): the restart resumes from the newest committed checkpoint
that reads back (a damaged newer one is moved to `ckpt.damaged/`, never restored from); the
logs are cut back to what that checkpoint accounts for, so every step's row is in
`metrics.jsonl` and TensorBoard exactly once, with the values an uninterrupted run logs (the
unlogged part of a logging window travels in the checkpoint); evaluations, export and report
are redone or read back, never half-written. One trainer per workdir (`workdir/.lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import signal
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx

from tempo_jax import fileio
from tempo_jax import sharding as shd
from tempo_jax.data.pipeline import Loader, PipelineConfig, make_loader
from tempo_jax.distributed import agree_with_main, is_main
from tempo_jax.models import families
from tempo_jax.training import data as data_lib
from tempo_jax.training import evaluation, report
from tempo_jax.training.checkpoints import (
    Checkpoints,
    DamagedCheckpoint,
    LayoutMismatch,
    uncommitted_steps,
)
from tempo_jax.training.grpo import run_grpo
from tempo_jax.training.hf_export import check_out_dir, save_hf
from tempo_jax.training.metrics_logger import MetricsLogger
from tempo_jax.training.optimizer import make_optimizer
from tempo_jax.training.setup import build_model, load_tokenizer, make_mesh, trainable_filter
from tempo_jax.training.sft import run_sft

log = logging.getLogger("tempo_jax.train")

REPORT_KEYS = ("r1@0.5", "miou", "refusal_accuracy", "false_refusal_rate")
STAGES = {"sft": run_sft, "grpo": run_grpo}


class NothingToResume(RuntimeError):
    """Every committed checkpoint of the workdir is damaged: starting over is the user's
    call (the message says how)."""


class NoSpace(RuntimeError):
    """The disk filled while writing a checkpoint, an export or a log."""


@dataclasses.dataclass
class Resume:
    """The checkpoint a run resumes from, read whole once (a damaged file shows here, before
    any step): its global step, metadata, optimizer state, RNG and, in the middle of GRPO,
    the frozen reference parameters. The parameters are already in `Trainer.params`."""

    step: int
    meta: dict
    opt_state: Any
    rng: Any
    reference: Any = None

    @property
    def stage(self) -> str:
        return self.meta["stage"]

    @property
    def stage_step(self) -> int:
        return self.meta["step"]


class Trainer:
    """Holds the model split into (graphdef, trainable params, frozen params), the checkpoint
    manager and the logs of one workdir. Close it (or use it as a context manager): `close`
    waits for the checkpoints in flight."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: Path):
        self.config = config
        self.workdir = Path(workdir).absolute()  # Orbax wants absolute paths
        self.mesh, self.rules = make_mesh(config)
        self.model = build_model(config, self.mesh, self.rules)
        if self.mesh is not None and not config.model.init_checkpoint:
            shd.shard_model(self.model, self.mesh, self.rules)
        self.graphdef, self.params, self.frozen = nnx.split(
            self.model, trainable_filter(config), ...)
        self.tokenizer = load_tokenizer(families.family_of(self.model))
        self.ckpt = Checkpoints(self.workdir / "ckpt", config)
        self.logger = MetricsLogger(self.workdir)
        self.stop_requested = False
        self.resumed: Resume | None = None
        self._resume_checked = False
        self._closed = False
        self._sigterm_before = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.stop_requested = True

    def close(self) -> None:
        """Wait until every checkpoint in flight is committed, then close the checkpoint
        manager, `metrics.jsonl` and the TensorBoard writer and give SIGTERM back.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.ckpt.close()  # waits for the async commits first
        finally:
            self.logger.close()
            signal.signal(signal.SIGTERM, self._sigterm_before)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- what the stages share
    def merged(self) -> nnx.Module:
        """The current policy as a model."""
        return nnx.merge(self.graphdef, self.params, self.frozen)

    def checkpoint_step(self, stage: str, step: int, total: int, opt_state, rng,
                        loader: Loader | None, log_window: dict | None = None) -> bool:
        """After `step` of a stage: save every `ckpt_every` steps, at the stage's last step
        and on SIGTERM. True when SIGTERM asks the loop to stop (its checkpoint saved; the
        loop's `committing` waits for the commit). `log_window` (the loop's metrics since its
        last logged row) travels with the checkpoint, so a resumed run logs the same rows."""
        stop = self.stop_requested  # read once: SIGTERM may land between two reads
        if (step + 1) % self.config.ckpt_every == 0 or step + 1 == total or stop:
            extra = {} if loader is None else {"data_state": loader.get_state()}
            if log_window is not None:
                extra["log_window"] = log_window
            self.ckpt.save(stage, step + 1, self.params, opt_state, rng, extra)
        if stop:
            log.warning("stopped at %s step %d: checkpoint saved", stage, step + 1)
        return stop

    def stream(self, records: list[dict], video_root: str, pcfg: PipelineConfig,
               resume_ckpt: int | None = None, stage: str = "", require_usable: bool = True,
               collated: bool = True) -> Loader:
        """The Grain loader of a stage, each host reading its own share; restored to the
        position saved in the checkpoint being resumed, so no example is seen twice or
        skipped across a restart. A training stream none of whose examples loads raises
        `NoUsableData` (evaluation reports failures instead: `require_usable=False`)."""
        loader = make_loader(records, video_root, pcfg, self.model.config.vision,
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             require_usable=require_usable, collated=collated)
        if resume_ckpt is not None:
            state = self.ckpt.meta(resume_ckpt).get("data_state")
            if state is None:
                log.warning("checkpoint %d has no data position; the %s stream restarts",
                            resume_ckpt, stage)
            else:
                loader.set_state(state)
        return loader

    def examples(self, data: data_lib.Data, which: str, pcfg: PipelineConfig) -> list[dict]:
        """The processed `train` or `val` examples (cached mode), loaded on first use."""
        attr = f"{which}_examples"
        if getattr(data, attr) is None:
            recs = data.train if which == "train" else data.val
            setattr(data, attr, data_lib.load_all(recs, data.video_root, pcfg,
                                                  self.model.config.vision,
                                                  f"loading {which} videos"))
        return getattr(data, attr)

    # ---- resuming
    def resume(self) -> Resume | None:
        """Find the checkpoint to resume from (once): the newest committed one that reads back
        whole. Newer ones that do not read are moved to `ckpt.damaged/` (named in the log);
        when none reads, `NothingToResume` says what is damaged and how to start over. A
        workdir without checkpoints starts from step 0."""
        if self._resume_checked:
            return self.resumed
        failed: list[DamagedCheckpoint] = []
        for step in sorted(self.ckpt.manager.all_steps(), reverse=True):
            try:
                self.resumed = self._read(step)
            except LayoutMismatch:  # not damage: the run's switch differs from the saved one
                raise
            except Exception as e:  # TensorStore's read errors are plain Exceptions
                failed.append(DamagedCheckpoint(step, e))
                log.error("%s", failed[-1])
                continue
            for bad in failed:
                where = self.ckpt.quarantine(bad.step, str(bad))
                log.error("checkpoint %d is damaged: moved to %s; resuming from checkpoint %d "
                          "(the steps after it are recomputed)", bad.step, where, step)
            break
        else:
            if failed:
                raise NothingToResume(
                    f"{'; '.join(map(str, failed))}; no committed checkpoint of "
                    f"{self.workdir} reads back, so there is nothing to resume from. To start "
                    f"over, move {self.ckpt.directory} aside (e.g. `mv {self.ckpt.directory} "
                    f"{self.ckpt.directory}.old`) and rerun")
        self._resume_checked = True
        if self.resumed is not None:
            log.info("resuming from checkpoint %d (%s step %d)", self.resumed.step,
                     self.resumed.stage, self.resumed.stage_step)
        return self.resumed

    def _read(self, step: int) -> Resume:
        """Checkpoint `step` read whole (parameters into `self.params`, only if all of it
        reads), with GRPO's reference when it resumes inside GRPO."""
        c = self.config
        meta = self.ckpt.meta(step)
        if meta.get("stage") not in STAGES:
            raise ValueError(f"metadata names no stage ({meta!r})")
        # every stage's optimizer state has this structure (AdamW after clipping)
        template = make_optimizer(c.sft.learning_rate, c.sft.warmup_steps, c.sft.steps,
                                  c.optim).init(self.params)
        params, opt_state, rng = self.ckpt.read(step, self.params, template,
                                                jax.random.PRNGKey(c.seed))
        reference = None
        if (meta["stage"] == "grpo" and 0 < meta["step"] < c.rl.steps and c.rl.beta > 0
                and "sft" in self.ckpt.stages()):
            try:
                reference = self.ckpt.reference(self.params)
            except Exception as e:
                raise RuntimeError(f"its GRPO reference, checkpoint "
                                   f"{self.ckpt.global_step('grpo', 0)}, cannot be read: "
                                   f"{e}") from e
        nnx.replace_by_pure_dict(self.params, params)  # only once all of it has read
        return Resume(step, meta, opt_state, rng, reference)

    def resumed_state(self, step: int, opt_state, rng):
        """(opt_state, rng) of checkpoint `step`, the one `resume` read (handed over once)."""
        r = self.resumed
        if r is None or r.step != step or r.opt_state is None:
            return self.ckpt.restore_into(step, self.params, opt_state, rng)
        out = (r.opt_state, r.rng)
        r.opt_state = r.rng = None  # the stage owns them now
        return out

    def reference_params(self) -> nnx.State:
        """GRPO's frozen reference when resuming inside GRPO (read by `resume`)."""
        if self.resumed is not None and self.resumed.reference is not None:
            return self.resumed.reference
        return self.ckpt.reference(self.params)

    def log_window(self, stage: str, step0: int) -> dict:
        """The metrics a resumed stage had gathered since its last logged row."""
        r = self.resumed
        if r is None or (r.stage, r.stage_step) != (stage, step0):
            return {}
        return r.meta.get("log_window", {})

    def stage_done(self, stage: str) -> bool:
        """Whether the resume checkpoint has `stage` complete."""
        r = self.resume()
        if r is None:
            return False
        order = self.ckpt.stages()
        return (order.index(stage) < order.index(r.stage)
                or (stage == r.stage and r.stage_step >= self.ckpt.stage_steps(stage)))

    def keeps_row(self, row: dict) -> bool:
        """Whether a training row of `metrics.jsonl` is accounted for by the resume
        checkpoint (a row logged after it is logged again by the resumed run)."""
        r = self.resume()
        if r is None or row.get("stage") not in STAGES:
            return False
        order = self.ckpt.stages()
        return (order.index(row["stage"]) < order.index(r.stage)
                or (row["stage"] == r.stage and row["step"] <= r.stage_step))

    # ---- the stages
    def run(self, data: data_lib.Data, after_stage=None) -> dict:
        """Run the configured stages in order, resuming from the latest checkpoint that reads
        (`resume`); `after_stage(stage)` is called for every stage complete by then, those
        that completed before a restart included. Returns `{"preempted": bool}`: True when
        SIGTERM stopped the run (its checkpoint committed)."""
        stages = self.ckpt.stages()
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r} (sft, grpo)")
        resume = self.resume()
        start_stage, start_step, latest = None, 0, None
        if resume is not None:
            latest, start_stage, start_step = resume.step, resume.stage, resume.stage_step
        for stage in stages:
            if start_stage is not None and stages.index(stage) < stages.index(start_stage):
                if after_stage is not None:
                    after_stage(stage, earlier=True)  # its evaluation is on disk
                continue
            total = self.ckpt.stage_steps(stage)
            step0 = start_step if stage == start_stage else 0
            ckpt = latest if stage == start_stage and step0 < total else None
            if step0 < total and STAGES[stage](self, data, step0, ckpt).get("preempted"):
                return {"preempted": True}
            if after_stage is not None:
                after_stage(stage)
            if self.stop_requested:  # SIGTERM during the evaluation: the stage is saved
                log.warning("SIGTERM after the %s stage: stopping before the next one", stage)
                return {"preempted": True}
        return {"preempted": False}

    def evaluate(self, data: data_lib.Data, n: int | None = None) -> tuple[dict, list[dict]]:
        """(metrics, rows) of the current policy on the validation set (every process)."""
        return evaluation.evaluate(self, data, n)

    def export(self, path: Path) -> Path:
        """The Hugging Face directory of the current policy (`hf_export.save_hf`: what
        `python -m tempo_jax.export` writes); every process takes part."""
        return save_hf(self.config, self.merged(), path)


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (resuming when the workdir has checkpoints), export, evaluate and report.

    Returns the report, or `{"preempted": True, ...}` when SIGTERM stopped training (the
    checkpoint it saved is committed: rerun with the same workdir to resume). Whatever way it
    returns or raises, every checkpoint it started is committed and every file it wrote
    (metrics, TensorBoard events, evaluations, export, report) is complete on disk.

    A second `run` on a workdir whose first is alive raises `fileio.Busy` (naming it); a
    full disk raises `NoSpace` (what was being written, the checkpoint that is intact)."""
    workdir = Path(workdir).absolute()  # Orbax wants absolute paths
    main = is_main()  # only process 0 writes logs, plots, report, export
    lock = (fileio.exclusive(workdir, "tempo_jax.train") if main
            else contextlib.nullcontext())
    with lock:
        try:
            return _run(config, workdir, main)
        except Exception as e:
            if not fileio.no_space(e):
                raise
            raise _no_space(e, workdir) from e


def _no_space(e: BaseException, workdir: Path) -> NoSpace:
    """The full disk as one message: where, what was being written, which checkpoint is
    intact (a half-written save is removed: it holds space and nothing restorable)."""
    import shutil

    partial = uncommitted_steps(workdir)
    for path in partial.values():
        shutil.rmtree(path, ignore_errors=True)
    ckpt = workdir / "ckpt"
    committed = sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) \
        if ckpt.is_dir() else []
    saving = set(partial) | {int(s) for s in re.findall(r"/(\d+)\.orbax-checkpoint-tmp", str(e))}
    what = (f"while saving checkpoint {', '.join(map(str, sorted(saving)))} (its partial files "
            "removed)" if saving else f"({' '.join(str(e).split())[-160:]})")
    intact = (f"checkpoint {committed[-1]} (the last committed) is intact and the run resumes "
              "from it" if committed else "no checkpoint was committed yet")
    free = shutil.disk_usage(workdir).free / 2**20
    return NoSpace(f"no space left on device under {workdir} {what}; {intact}; "
                   f"{free:.0f} MiB free: free some space and rerun with the same --workdir")


def _run(config: ml_collections.ConfigDict, workdir: Path, main: bool) -> dict:
    if main:
        fileio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    t0 = time.perf_counter()
    check_out_dir(workdir / "hf")  # before training, not after it
    data = data_lib.prepare_data(config, workdir)
    with Trainer(config, workdir) as trainer:
        trainer.resume()
        stages = trainer.ckpt.stages()
        if main:  # what the resume checkpoint does not account for is done again
            for stage in stages:
                if not trainer.stage_done(stage):
                    (workdir / f"eval_{stage}.json").unlink(missing_ok=True)
            if not all(trainer.stage_done(s) for s in stages):
                (workdir / "report.json").unlink(missing_ok=True)
            dropped = trainer.logger.restart(lambda row: trainer.keeps_row(row) or (
                row["stage"].startswith("eval_")
                and (workdir / f"{row['stage']}.json").exists()))
            if dropped:
                log.info("metrics.jsonl: %d row(s) after checkpoint %s dropped (logged again "
                         "as the steps are redone)", dropped,
                         trainer.resumed.step if trainer.resumed else "none")
        result: dict[str, Any] = {"baseline": report.baseline_constant_window(data.train,
                                                                              data.val)}
        rows_by_stage: dict[str, list] = {}

        def after_stage(stage: str, earlier: bool = False) -> None:
            path = workdir / f"eval_{stage}.json"
            # evaluated before a restart (process 0's view: the evaluation is collective)
            if agree_with_main(path.exists()):
                result[stage] = json.loads(path.read_text())
                return
            if earlier:  # the policy has moved on: that stage's model is not here to evaluate
                log.warning("%s is missing: the report has no %s section", path, stage)
                return
            metrics, rows = trainer.evaluate(data)
            result[stage] = metrics
            rows_by_stage[stage] = rows
            # beside the training curves (metrics.jsonl, TensorBoard), at the stage's last step
            trainer.logger.log(f"eval_{stage}", trainer.ckpt.stage_end(stage),
                               {k: v for k, v in metrics.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if main:
                fileio.write_text(path, json.dumps(metrics, indent=2))
            log.info("%s: %s", stage, {k: result[stage].get(k) for k in (*REPORT_KEYS,
                                                                          "refusal_auc")})

        if trainer.run(data, after_stage)["preempted"]:
            step = trainer.ckpt.latest_step()
            log.warning("preempted: checkpoint %s committed; rerun with --workdir %s to resume",
                        step, workdir)
            return {"preempted": True, "checkpoint": step}
        last = trainer.ckpt.stages()[-1]
        rows = rows_by_stage.get(last) or trainer.evaluate(data)[1]
        trainer.export(workdir / "hf")  # every process: it gathers one tensor at a time
    if main:
        report.plot_curves(workdir)
        report.plot_timeline(rows, workdir / "timeline.png")
        fileio.write_text(workdir / "predictions.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))
    result["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if main:
        fileio.write_text(workdir / "report.json", json.dumps(result, indent=2))
    return result

