"""The trainer: one workdir's model (split into graphdef, trainable and frozen parameters),
mesh, tokenizer, checkpoints and logs, and the stage scheduler; `run` is the whole training
command (train, resuming from the last checkpoint; evaluate after each stage; export;
report).

Every way out (a stage's end, `run` returning, SIGTERM, an error) waits until the checkpoints
already started are committed. A non-finite loss or gradient skips the update and is logged;
it never reaches a checkpoint.
"""

from __future__ import annotations

import json
import logging
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
from tempo_jax.training.checkpoints import Checkpoints
from tempo_jax.training.grpo import run_grpo
from tempo_jax.training.hf_export import check_out_dir, save_hf
from tempo_jax.training.metrics_logger import MetricsLogger
from tempo_jax.training.setup import build_model, load_tokenizer, make_mesh, trainable_filter
from tempo_jax.training.sft import run_sft

log = logging.getLogger("tempo_jax.train")

REPORT_KEYS = ("r1@0.5", "miou", "refusal_accuracy", "false_refusal_rate")
STAGES = {"sft": run_sft, "grpo": run_grpo}


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
                        loader: Loader | None) -> bool:
        """After `step` of a stage: save every `ckpt_every` steps, at the stage's last step
        and on SIGTERM. True when SIGTERM asks the loop to stop (its checkpoint saved; the
        loop's `committing` waits for the commit)."""
        stop = self.stop_requested  # read once: SIGTERM may land between two reads
        if (step + 1) % self.config.ckpt_every == 0 or step + 1 == total or stop:
            extra = None if loader is None else {"data_state": loader.get_state()}
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

    # ---- the stages
    def run(self, data: data_lib.Data, after_stage=None) -> dict:
        """Run the configured stages in order, resuming from the latest checkpoint;
        `after_stage(stage)` is called when a stage completes in this process. Returns
        `{"preempted": bool}`: True when SIGTERM stopped the run (its checkpoint committed)."""
        stages = self.ckpt.stages()
        for s in stages:
            if s not in STAGES:
                raise ValueError(f"unknown stage {s!r} (sft, grpo)")
        resume = self.ckpt.latest()
        start_stage, start_step, latest = None, 0, None
        if resume is not None:
            latest, meta = resume
            start_stage, start_step = meta["stage"], meta["step"]
            log.info("resuming from checkpoint %d (%s step %d)", latest, start_stage, start_step)
            # params carry over between stages: load them even when the stage is complete
            nnx.replace_by_pure_dict(self.params, self.ckpt.restore_params(latest, self.params))
        for stage in stages:
            if start_stage is not None and stages.index(stage) < stages.index(start_stage):
                continue  # finished before the restart
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
    (metrics, TensorBoard events, evaluations, export, report) is complete on disk."""
    workdir = Path(workdir).absolute()  # Orbax wants absolute paths
    main = is_main()  # only process 0 writes logs, plots, report, export
    workdir.mkdir(parents=True, exist_ok=True)
    if main:
        fileio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    t0 = time.perf_counter()
    check_out_dir(workdir / "hf")  # before training, not after it
    data = data_lib.prepare_data(config, workdir)
    with Trainer(config, workdir) as trainer:
        result: dict[str, Any] = {"baseline": report.baseline_constant_window(data.train,
                                                                              data.val)}
        rows_by_stage: dict[str, list] = {}

        def after_stage(stage: str) -> None:
            path = workdir / f"eval_{stage}.json"
            # evaluated before a restart (process 0's view: the evaluation is collective)
            if agree_with_main(path.exists()):
                result[stage] = json.loads(path.read_text())
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

