"""The SFT stage: teacher-forced cross-entropy on the answer tokens (only their positions go
through the LM head), with gradient accumulation over micro-batches."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import numpy as np

from tempo_jax import cli
from tempo_jax import sharding as shd
from tempo_jax.data.batching import global_batch
from tempo_jax.data.pipeline import collate_alike
from tempo_jax.training import data as data_lib
from tempo_jax.training.loop import StepResult, run_stage
from tempo_jax.training.optimizer import make_optimizer
from tempo_jax.training.setup import pipeline_config
from tempo_jax.training.steps import make_steps

log = logging.getLogger("tempo_jax.train")


def _contrast_share(c, data: data_lib.Data) -> float:
    contrast = c.sft.get("contrast_share", 0.0)
    if not 0.0 <= contrast <= 1.0:
        raise cli.UsageError(f"--config.sft.contrast_share={contrast}: expected 0 to 1")
    if contrast > 0 and not (c.data.cache_examples and data.pir_ratio > 0):
        log.warning("sft.contrast_share=%s is ignored: contrast pairs are drawn with PIR "
                    "pairs afresh (data.cache_examples, data.pir_resample, "
                    "data.irrelevant_ratio > 0); this run trains on fixed PIR pairs", contrast)
    return contrast


def run_sft(trainer: Any, data: data_lib.Data, step0: int, resume_ckpt: int | None) -> dict:
    """SFT steps `step0 .. sft.steps - 1`, resumed from checkpoint `resume_ckpt` when given."""
    c = trainer.config
    pcfg = pipeline_config(c, batch_size=c.sft.batch_size)
    vision = trainer.model.config.vision
    accum = max(1, c.optim.accum_steps)
    contrast = _contrast_share(c, data)
    loader = examples = None
    if c.data.cache_examples:
        examples = trainer.examples(data, "train", pcfg)
    else:
        if c.sft.batch_size % accum:
            raise ValueError(f"sft.batch_size {c.sft.batch_size} is not a multiple of "
                             f"optim.accum_steps {accum}")
        loader = trainer.stream(data.train, data.video_root, dataclasses.replace(
            pcfg, batch_size=c.sft.batch_size // accum), resume_ckpt, "sft", collated=False)
    steps = make_steps(make_optimizer(c.sft.learning_rate, c.sft.warmup_steps, c.sft.steps,
                                      c.optim))
    opt_state = steps.tx.init(trainer.params)
    rng = jax.random.PRNGKey(c.seed)
    if resume_ckpt is not None:
        opt_state, rng = trainer.resumed_state(resume_ckpt, opt_state, rng)
    sampler = data_lib.PirSampler(data, trainer.tokenizer, vision)

    def micro_batches(step: int) -> list[dict]:
        """The step's micro-batches (one without accumulation), of equal shapes."""
        if loader is not None:
            chunks = [next(loader) for _ in range(accum)]
        else:
            picked = sampler.pick(examples, np.random.default_rng([c.seed, 1, step]),
                                  c.sft.batch_size, pcfg, contrast_share=contrast)
            chunks = data_lib.chunks(picked, accum)
        return collate_alike(chunks, pcfg, vision)

    def step_fn(step: int, opt_state) -> StepResult:
        micro = micro_batches(step)
        args = []
        for batch, targets in zip(micro, data_lib.micro_targets(micro), strict=True):
            args.append((global_batch(batch, trainer.mesh, trainer.rules,
                                      model_config=trainer.model.config),
                         *(shd.shard_rows(a, trainer.mesh, trainer.rules, pad_axis=1)
                           for a in targets)))
        # accumulation runs inside the one jitted step (a scan over the micro-batches)
        with shd.use_mesh(trainer.mesh, trainer.rules):
            (_, metrics), grads = steps.sft_grad(trainer.params, trainer.frozen,
                                                 trainer.graphdef, *data_lib.as_step_args(args))
        trainer.params, opt_state, ok = steps.apply(trainer.params, opt_state, grads,
                                                    metrics["loss"])
        tokens = sum(int(b["attention_mask"].sum()) for b in micro)
        return StepResult(opt_state, metrics, skipped=int(not bool(ok)), tokens=tokens)

    return run_stage(trainer, "sft", "SFT", step0, c.sft.steps, step_fn, opt_state=opt_state,
                     rng=rng, loader=loader, log_every=c.log_every,
                     postfix=lambda m: {"loss": f"{m['loss']:.3f}",
                                        "acc": f"{m['token_accuracy']:.2f}"})
