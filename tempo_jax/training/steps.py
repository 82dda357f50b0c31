"""The step functions, the only place where they are jitted: the SFT gradient, the PIR-GRPO
gradient, the reference model's log-probs and the optimizer update.

The trainer's loops, the planner (its analytic count and its ahead-of-time compilation), the
benchmarks and the scale tests all take their steps from `make_steps`, so what they measure
or check is what training runs: donation of the parameters and optimizer state, fp32 moments,
the non-finite skip.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from tempo_jax.rl import grpo as grpo_lib


def _merge(graphdef, params, frozen):
    return nnx.merge(graphdef, params, frozen)


def sft_loss(params, frozen, graphdef, inputs, pred_pos, targets, valid):
    model = _merge(graphdef, params, frozen)
    logits = model.forward(inputs, logits_positions=pred_pos)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    loss = jnp.sum(nll * valid) / n
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * valid) / n
    return loss, {"loss": loss, "token_accuracy": acc}


def completion_logits(model: nnx.Module, prompt_inputs, completions, comp_mask, start,
                      num_samples):
    """Logits at the completion positions only, for [B * G] rows that share B prompts: the
    prompts (and their videos) are embedded once, then broadcast to their G samples.

    Each row is reordered so that its valid prompt tokens come first, then its completion,
    then the prompt's padding. Positions are explicit (M-RoPE), so this is the same
    computation; but padding now only trails the row, where causal attention never lets a
    valid token see it, so the decoder runs with no padding mask at all: the fused kernels'
    (cuDNN, splash) fastest case. Completion tokens after EOS also only trail."""
    opts = model.options
    # [B, L, D], vision features scattered; side: what else the decoder reads per position
    # (Qwen3-VL's DeepStack features), None for Qwen2.5-VL
    x, side = model.embed_for_decoder(prompt_inputs)
    pmask = prompt_inputs["attention_mask"]
    ppos = prompt_inputs["position_ids"]
    t = completions.shape[1]
    rep = lambda a, axis=0: jnp.repeat(a, num_samples, axis=axis)  # noqa: E731
    xc = model.model.embed_tokens(completions).astype(opts.dtype)
    x = jnp.concatenate([rep(x), xc], axis=1)
    cpos = (start[:, None] + jnp.arange(t)[None, :])  # [B * G, T]
    pos = jnp.concatenate([rep(ppos, 1), jnp.broadcast_to(cpos[None], (3, *cpos.shape))], axis=2)
    valid = jnp.concatenate([rep(pmask).astype(bool), jnp.ones(completions.shape, bool)], 1)
    order = jnp.argsort(~valid, axis=1, stable=True)  # valid slots first, in their order
    x = jnp.take_along_axis(x, order[..., None], axis=1)
    pos = jnp.take_along_axis(pos, order[None], axis=2)
    if side is not None:  # its per-position index follows the rows' tokens (the feature
        side = model.extend_side(side, t)  # table is indexed across the batch as it is)
        side = {**side, "visual_index": jnp.take_along_axis(
            rep(side["visual_index"]), order, axis=1)}
    h = model.model(x, pos, None, opts, side=side)
    # completion token j now sits at slot n + j (n: the row's prompt length) and is
    # predicted from slot n + j - 1
    n = rep(pmask.astype(jnp.int32).sum(axis=1))
    h = jnp.take_along_axis(h, (n[:, None] - 1 + jnp.arange(t)[None])[..., None], axis=1)
    return model.logits_from_hidden(h)


def grpo_objective(params, frozen, graphdef, prompt_inputs, completions, comp_mask, start,
                   old_logps, ref_logps, advantages, cfg, num_samples):
    model = _merge(graphdef, params, frozen)
    logits = completion_logits(model, prompt_inputs, completions, comp_mask, start, num_samples)
    logps = grpo_lib.sequence_logps(logits, completions)
    loss, metrics = grpo_lib.grpo_loss(logps, old_logps, ref_logps, advantages, comp_mask, cfg)
    ent = grpo_lib.token_entropy(logits)
    metrics = dict(metrics)
    metrics["entropy"] = jnp.sum(ent * comp_mask) / jnp.maximum(comp_mask.sum(), 1)
    return loss, metrics


def finite(loss, grads) -> jax.Array:
    """True when the loss and every gradient are finite."""
    ok = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        ok &= jnp.all(jnp.isfinite(g))
    return ok


def apply_fn(tx: optax.GradientTransformation):
    """The jitted optimizer update `(params, opt_state, grads, loss) -> (params, opt_state,
    ok)`. It leaves both unchanged when the loss or a gradient is non-finite (`ok` False), and
    it takes over (donates) the parameters and optimizer state, so the update is made in place:
    one copy of the fp32 Adam moments in device memory, not two."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply(params, opt_state, grads, loss):
        ok = finite(loss, grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        return pick(new_params, params), pick(new_opt, opt_state), ok

    return apply



def reference_logps(ref, frozen, graphdef, prompt_inputs, completions, comp_mask, start,
                    num_samples):
    """Per-token log-probs of the completions under the frozen reference parameters."""
    model = _merge(graphdef, ref, frozen)
    logits = completion_logits(model, prompt_inputs, completions, comp_mask, start, num_samples)
    return grpo_lib.sequence_logps(logits, completions)


@dataclasses.dataclass(frozen=True)
class Steps:
    """The jitted steps of one optimizer. Signatures (graphdef, GRPO config and G static):

    - `sft_grad(params, frozen, graphdef, inputs, pred_pos, targets, valid)`
      -> `((loss, metrics), grads)`
    - `grpo_grad(params, frozen, graphdef, prompt_inputs, completions, comp_mask, start,
      old_logps, ref_logps, advantages, grpo_config, G)` -> `((loss, metrics), grads)`
    - `ref_logps(ref_params, frozen, graphdef, prompt_inputs, completions, comp_mask, start,
      G)` -> `[B * G, T]`
    - `apply(params, opt_state, grads, loss)` -> `(params, opt_state, ok)`; donates its
      first two arguments and leaves both unchanged when `ok` is False.
    """

    sft_grad: Callable
    grpo_grad: Callable
    ref_logps: Callable
    apply: Callable
    tx: optax.GradientTransformation


def make_steps(tx: optax.GradientTransformation) -> Steps:
    """The steps of a stage whose optimizer is `tx` (`optimizer.make_optimizer`). Each call
    jits afresh (a stage compiles its steps once), reading this module's loss functions at
    call time."""
    return Steps(
        sft_grad=jax.jit(jax.value_and_grad(sft_loss, has_aux=True), static_argnums=(2,)),
        grpo_grad=jax.jit(jax.value_and_grad(grpo_objective, has_aux=True),
                          static_argnums=(2, 10, 11)),
        ref_logps=jax.jit(reference_logps, static_argnums=(2, 7)),
        apply=apply_fn(tx), tx=tx)
