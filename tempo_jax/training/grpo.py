"""The PIR-GRPO stage, one named function per part of a step:

    rollout -> score -> (dynamic sampling: more rounds until enough informative groups)
            -> update_batch -> advantages -> update

`rollout` is also what the scale tests run on several processes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tempo_jax import cli
from tempo_jax import sharding as shd
from tempo_jax.data.batching import global_batch
from tempo_jax.data.pipeline import batch_patch_capacity, collate, collate_alike
from tempo_jax.distributed import all_rows
from tempo_jax.generate import SamplingConfig
from tempo_jax.inference import answer_sampling, sample_rows
from tempo_jax.rl import grpo as grpo_lib
from tempo_jax.rl import rewards as rewards_lib
from tempo_jax.training import data as data_lib
from tempo_jax.training.loop import StepResult, run_stage
from tempo_jax.training.optimizer import make_optimizer
from tempo_jax.training.setup import pipeline_config
from tempo_jax.training.steps import Steps, make_steps

log = logging.getLogger("tempo_jax.train")


def rollout(model: nnx.Module, batch: dict, mesh, rules, sampling: SamplingConfig, rng):
    """PIR-GRPO's sampling step: `sampling.num_samples` completions of each prompt of this
    process's left-padded `batch` (`inference.sample_rows`): this process's rows
    (prompt-major, host arrays) and the batch's model inputs as global arrays (what the
    update step takes)."""
    return sample_rows(model, batch, mesh, rules, sampling=sampling, rng=rng)


def rollout_sampling(rc) -> SamplingConfig:
    """The rollout's sampling settings from `config.rl` (checked once, at the stage's start)."""
    return answer_sampling(rc.max_new_tokens, num_samples=rc.num_generations,
                           temperature=rc.temperature, top_p=rc.top_p)


def score(texts: list[str], meta: list[dict], rc, thinking: bool) -> tuple[np.ndarray, dict]:
    """(total reward per completion, each named reward's values) of `texts`, whose prompts'
    metadata is `meta` (one entry per completion)."""
    names = tuple(n.strip() for n in rc.rewards.split(","))
    total, parts = rewards_lib.total_reward(
        [m["query"] for m in meta], texts, names=names, iou_type=rc.iou_type,
        windows=[m["windows"] for m in meta], relevant=[m["relevant"] for m in meta],
        duration=[m["duration"] for m in meta], thinking=thinking)
    return np.asarray(total, np.float64), parts


def advantages(total: np.ndarray, num_samples: int, scale_rewards: bool) -> np.ndarray:
    """Group-relative advantages of the update batch's rewards."""
    return np.asarray(grpo_lib.group_advantages(jnp.asarray(total, jnp.float32), num_samples,
                                                scale_rewards=scale_rewards))


@dataclasses.dataclass
class UpdateBatch:
    """The arrays of one GRPO update, global on the mesh; with gradient accumulation each
    field is a tuple of its micro-batches' arrays (of equal shapes)."""

    inputs: dict | tuple
    completions: Any
    comp_mask: Any
    start: Any
    old_logps: Any
    advantages: Any

    def micro(self) -> list[tuple]:
        """The micro-batches, each as (inputs, completions, comp_mask, start, old_logps,
        advantages)."""
        fields = (self.inputs, self.completions, self.comp_mask, self.start, self.old_logps,
                  self.advantages)
        return list(zip(*fields, strict=True)) if isinstance(self.inputs, tuple) else [fields]


def update_batch(trainer: Any, done: list[dict], picks, valid: np.ndarray, pcfg, capacity,
                 rc, accum: int = 1) -> UpdateBatch:
    """The picked groups' prompts, completions, old log-probs and advantages; padding groups
    (no informative group left to fill the batch) are masked out of the loss. `accum`
    micro-batches of whole groups (`optim.accum_steps`), collated to equal shapes."""
    g = rc.num_generations
    vision = trainer.model.config.vision
    parts = data_lib.chunks(list(range(len(picks))), accum)
    batches = collate_alike([[done[picks[i][0]]["examples"][picks[i][1]] for i in part]
                             for part in parts], pcfg, vision,
                            patch_capacity=capacity // len(parts))
    rows = functools.partial(shd.shard_rows, mesh=trainer.mesh, rules=trainer.rules)
    micro = []
    for part, batch in zip(parts, batches, strict=True):
        inputs = global_batch(batch, trainer.mesh, trainer.rules,
                              model_config=trainer.model.config, pad_side="left")

        def rows_of(get, part=part):
            return np.concatenate([get(done[picks[i][0]])[picks[i][1] * g:(picks[i][1] + 1) * g]
                                   for i in part])

        tokens = rows_of(lambda d: d["out"].tokens)
        lengths = rows_of(lambda d: d["out"].lengths)
        adv = advantages(rows_of(lambda d: d["total"]), g, rc.scale_rewards)
        comp_mask = ((np.arange(tokens.shape[1])[None, :] < lengths[:, None])
                     & np.repeat(valid[part], g)[:, None])
        start = np.repeat(data_lib.decode_start(batch), g)
        micro.append((inputs, rows(tokens), rows(comp_mask), rows(start),
                      rows(rows_of(lambda d: d["out"].logprobs)), rows(adv)))
    return UpdateBatch(*data_lib.as_step_args(micro))


def update(trainer: Any, steps: Steps, ub: UpdateBatch, opt_state, ref_params, gcfg, g: int):
    """`num_iterations` policy updates on one batch. Returns (opt_state, loss, metrics,
    number of updates skipped as non-finite)."""
    ref = None
    if ref_params is not None:
        with shd.use_mesh(trainer.mesh, trainer.rules):
            ref = [steps.ref_logps(ref_params, trainer.frozen, trainer.graphdef, inputs,
                                   completions, comp_mask, start, g)
                   for inputs, completions, comp_mask, start, _, _ in ub.micro()]
        ref = ref[0] if len(ref) == 1 else tuple(ref)
    skipped = 0
    for _ in range(gcfg.num_iterations):
        with shd.use_mesh(trainer.mesh, trainer.rules):
            (loss, m), grads = steps.grpo_grad(
                trainer.params, trainer.frozen, trainer.graphdef, ub.inputs, ub.completions,
                ub.comp_mask, ub.start, ub.old_logps, ref, ub.advantages, gcfg, g)
        trainer.params, opt_state, ok = steps.apply(trainer.params, opt_state, grads, loss)
        skipped += int(not bool(ok))
    return opt_state, loss, m, skipped


def _frac(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def run_grpo(trainer: Any, data: data_lib.Data, step0: int, resume_ckpt: int | None) -> dict:
    """PIR-GRPO steps `step0 .. rl.steps - 1`, resumed from checkpoint `resume_ckpt`."""
    c, rc = trainer.config, trainer.config.rl
    pcfg = pipeline_config(c, batch_size=rc.batch_size, with_answer=False, pad_side="left")
    vision = trainer.model.config.vision
    capacity = batch_patch_capacity(pcfg, vision)  # one shape for every rollout batch
    irrelevant = rc.get("irrelevant_prompts", -1)
    loader = examples = None
    if c.data.cache_examples:
        examples = data_lib.prompt_examples(trainer.examples(data, "train", pipeline_config(
            c, batch_size=rc.batch_size)))
    else:
        if irrelevant >= 0:
            log.warning("rl.irrelevant_prompts=%d is ignored: a streamed batch holds the "
                        "fixed PIR pairs the shuffle brings (cached examples with "
                        "data.pir_resample draw an exact number)", irrelevant)
        loader = trainer.stream(data.train, data.video_root,
                                dataclasses.replace(pcfg, seed=c.seed + 1), resume_ckpt,
                                "grpo", collated=False)
    gcfg = grpo_lib.GRPOConfig(
        num_generations=rc.num_generations, eps_low=rc.eps_low, eps_high=rc.eps_high,
        beta=rc.beta, scale_rewards=rc.scale_rewards, loss_agg=rc.loss_agg,
        num_iterations=rc.num_iterations,
    )
    steps = make_steps(make_optimizer(rc.learning_rate, rc.warmup_steps, rc.steps, c.optim))
    opt_state = steps.tx.init(trainer.params)
    rng = jax.random.PRNGKey(c.seed + 1)
    ref_params = jax.tree.map(jnp.copy, trainer.params) if rc.beta > 0 else None
    if resume_ckpt is not None:
        opt_state, rng = trainer.resumed_state(resume_ckpt, opt_state, rng)
        if rc.beta > 0:
            ref_params = trainer.reference_params()
    g = rc.num_generations
    accum = max(1, c.optim.accum_steps)
    if rc.batch_size % accum:
        raise cli.UsageError(f"rl.batch_size {rc.batch_size} is not a multiple of "
                             f"optim.accum_steps {accum}")
    sampling = rollout_sampling(rc)
    rounds = 1 + (max(0, rc.get("max_refills", 0)) if rc.get("filter_groups") else 0)
    sampler = data_lib.PirSampler(data, trainer.tokenizer, vision)

    def one_round(step: int, k: int, model) -> dict:
        """Roll out one batch of prompts (round k of this step) and score it."""
        if loader is not None:
            exs = next(loader)
        else:  # round 0 draws what a run without refills draws
            seed = [c.seed, 2, step] + ([k] if k else [])
            exs = sampler.pick(examples, np.random.default_rng(seed), rc.batch_size, pcfg,
                               irrelevant=irrelevant)
        batch = collate(exs, pcfg, vision, patch_capacity=capacity)
        key = jax.random.fold_in(rng, step)
        out, _ = rollout(model, batch, trainer.mesh, trainer.rules, sampling,
                         jax.random.fold_in(key, k) if k else key)
        texts = [trainer.tokenizer.decode(t[:n], skip_special_tokens=True)
                 for t, n in zip(out.tokens, out.lengths, strict=True)]
        meta = [m for m in batch["meta"] for _ in range(g)]
        total, parts = score(texts, meta, rc, c.prompt.thinking)
        informative = (grpo_lib.informative_groups(total, g) if rounds > 1
                       else np.ones(len(exs), bool))
        return {"examples": exs, "out": out, "total": total, "parts": parts,
                "informative": informative, "relevant": [m["relevant"] for m in meta],
                "refused": [rewards_lib.parse_answer(t) == "refuse" for t in texts]}

    def step_fn(step: int, opt_state) -> StepResult:
        model = trainer.merged()
        done: list[dict] = []
        for k in range(rounds):
            done.append(one_round(step, k, model))
            n_good = sum(int(d["informative"].sum()) for d in done)
            # every host decides alike (the rollouts are collective on several hosts)
            if all_rows(np.array([n_good >= rc.batch_size])).all():
                break
        picks, valid = grpo_lib.fill_groups([d["informative"] for d in done], rc.batch_size)
        ub = update_batch(trainer, done, picks, valid, pcfg, capacity, rc, accum)
        opt_state, loss, m, skipped = update(trainer, steps, ub, opt_state, ref_params, gcfg, g)
        return StepResult(opt_state, _rollout_metrics(done, loss, m, valid), skipped=skipped,
                          tokens=int(all_rows(np.concatenate(
                              [d["out"].lengths for d in done])).sum()))

    return run_stage(trainer, "grpo", "PIR-GRPO", step0, rc.steps, step_fn,
                     opt_state=opt_state, rng=rng, loader=loader,
                     log_every=rc.get("log_every", 1),
                     postfix=lambda m: {"reward": f"{m['reward']:.2f}",
                                        "kl": f"{m.get('kl', 0.0):.3f}"})


def _rollout_metrics(done: list[dict], loss, m: dict, valid: np.ndarray) -> dict:
    """The logged figures of a step: every rollout of the step (all rounds), every host's
    rows."""
    def cat(key):
        return all_rows(np.concatenate([d[key] for d in done]))

    refused, relevant, all_total = cat("refused"), cat("relevant"), cat("total")
    informative = cat("informative")
    r_lengths = all_rows(np.concatenate([d["out"].lengths for d in done]))
    metrics = {k: float(v) for k, v in m.items()}
    metrics.update(
        loss=float(loss), reward=float(np.mean(all_total)),
        **{f"reward_{n}": float(np.mean(all_rows(np.concatenate(
            [np.asarray(d["parts"][n]) for d in done])))) for n in done[0]["parts"]},
        response_length=float(r_lengths.mean()),
        refusal_accuracy=_frac(refused[~relevant]),
        false_refusal_rate=_frac(refused[relevant]),
        dropped_groups=float(1.0 - informative.mean()),
        rollout_rounds=len(done),
        update_fill=float(all_rows(valid).mean()),
    )
    return metrics

