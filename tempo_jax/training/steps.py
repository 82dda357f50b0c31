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

from tempo_jax import sharding as shd
from tempo_jax.rl import grpo as grpo_lib


def _merge(graphdef, params, frozen):
    return nnx.merge(graphdef, params, frozen)


def sft_loss(params, frozen, graphdef, inputs, pred_pos, targets, valid, n=None):
    """Mean cross-entropy of the answer tokens; `n` (a micro-batch of an accumulated step):
    the whole step's token count, so that the micro-batches' losses add up to its mean."""
    model = _merge(graphdef, params, frozen)
    logits = model.forward(inputs, logits_positions=pred_pos)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(valid.sum(), 1) if n is None else n
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
                   old_logps, ref_logps, advantages, cfg, num_samples, norms=None):
    """The PIR-GRPO loss of a batch; `norms` (a micro-batch of an accumulated step): the
    whole step's denominators (`grpo.loss_norms`), so that the micro-batches' losses and
    metrics add up to the step's."""
    model = _merge(graphdef, params, frozen)
    logits = completion_logits(model, prompt_inputs, completions, comp_mask, start, num_samples)
    logps = grpo_lib.sequence_logps(logits, completions)
    norms = grpo_lib.loss_norms(comp_mask) if norms is None else norms
    loss, metrics = grpo_lib.grpo_loss(logps, old_logps, ref_logps, advantages, comp_mask, cfg,
                                       norms=norms)
    ent = grpo_lib.token_entropy(logits)
    metrics = dict(metrics)
    metrics["entropy"] = jnp.sum(ent * comp_mask) / norms["tokens"]
    return loss, metrics


def _stack(batches):
    """Micro-batches of equal shapes -> one tree with a leading micro-batch axis."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def _scan_micro(value_and_grad, params, micro, maxed=frozenset()):
    """Gradient accumulation inside one program: `value_and_grad(params, batch)` over the
    leading axis of `micro` with `lax.scan`, the losses, metrics and gradients summed (the
    metrics in `maxed` maximised); the per-micro-batch functions are normalised by the whole
    step's counts, so the sums are the step's values. One micro-batch's activations are
    alive at a time, and the running gradient sum beside them."""
    one = jax.tree.map(lambda x: x[0], micro)
    (loss0, m0), g0 = jax.eval_shape(value_and_grad, params, one)
    zeros = lambda t: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), t)  # noqa: E731
    metrics0 = {k: jnp.full(v.shape, -jnp.inf, v.dtype) if k in maxed
                else jnp.zeros(v.shape, v.dtype) for k, v in m0.items()}

    def body(carry, batch):
        loss, metrics, grads = carry
        (part, m), g = value_and_grad(params, batch)
        metrics = {k: jnp.maximum(metrics[k], m[k]) if k in maxed else metrics[k] + m[k]
                   for k in metrics}
        return (loss + part, metrics, jax.tree.map(jnp.add, grads, g)), None

    (loss, metrics, grads), _ = jax.lax.scan(body, (zeros(loss0), metrics0, zeros(g0)), micro)
    return (loss, metrics), grads


def sft_grad(params, frozen, graphdef, inputs, pred_pos, targets, valid):
    """`((loss, metrics), grads)` of the SFT loss. With tuples of micro-batches of equal
    shapes (`inputs` a tuple of input dicts, the others tuples of arrays; gradient
    accumulation, `optim.accum_steps`), one program scans over them and returns the values
    of one batch as large as all of them together. The gradients leave laid out as the
    parameters are."""
    if not isinstance(inputs, tuple):
        out = jax.value_and_grad(sft_loss, has_aux=True)(params, frozen, graphdef, inputs,
                                                          pred_pos, targets, valid)
    else:
        n = jnp.maximum(sum(v.sum() for v in valid), 1)

        def one(p, b):
            return jax.value_and_grad(sft_loss, has_aux=True)(p, frozen, graphdef, *b, n=n)

        out = _scan_micro(one, params, _stack(list(zip(inputs, pred_pos, targets, valid,
                                                       strict=True))))
    return out[0], shd.constrain_like(out[1], params)


def grpo_grad(params, frozen, graphdef, prompt_inputs, completions, comp_mask, start,
              old_logps, ref_logps, advantages, cfg, num_samples):
    """`((loss, metrics), grads)` of the PIR-GRPO objective; tuples of micro-batches (each
    whole groups of `num_samples` rows) are accumulated in one program as in `sft_grad`."""
    args = (prompt_inputs, completions, comp_mask, start, old_logps, ref_logps, advantages)
    if not isinstance(prompt_inputs, tuple):
        out = jax.value_and_grad(grpo_objective, has_aux=True)(params, frozen, graphdef,
                                                               *args, cfg, num_samples)
    else:
        norms = grpo_lib.loss_norms(jnp.concatenate(comp_mask))
        if ref_logps is None:
            args = (*args[:5], (None,) * len(prompt_inputs), args[6])

        def one(p, b):
            return jax.value_and_grad(grpo_objective, has_aux=True)(
                p, frozen, graphdef, *b, cfg, num_samples, norms=norms)

        out = _scan_micro(one, params, _stack(list(zip(*args, strict=True))),
                          maxed=grpo_lib.MAX_METRICS)
    return out[0], shd.constrain_like(out[1], params)


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

    The gradient steps also take tuples of micro-batches in place of their batch arguments
    (gradient accumulation inside the one program: `sft_grad`, `grpo_grad`).
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
    # fresh wrappers: JAX caches traces per function object, and a stage must trace this
    # module's loss functions as they are now (a test replaces one), not reuse another
    # stage's trace
    return Steps(
        sft_grad=jax.jit(functools.wraps(sft_grad)(lambda *a: sft_grad(*a)),
                         static_argnums=(2,)),
        grpo_grad=jax.jit(functools.wraps(grpo_grad)(lambda *a: grpo_grad(*a)),
                          static_argnums=(2, 10, 11)),
        ref_logps=jax.jit(reference_logps, static_argnums=(2, 7)),
        apply=apply_fn(tx), tx=tx)
