"""The optimizer: AdamW after global-norm clipping on a warm-up + cosine schedule, its
moments in fp32 whatever the parameter dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_optimizer(lr: float, warmup: int, steps: int, oc) -> optax.GradientTransformation:
    """The optimizer of a stage of `steps` steps; `oc` is `config.optim`."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1),
                                                  end_value=lr * 0.1)
    tx = optax.chain(
        optax.clip_by_global_norm(oc.grad_clip),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay),
    )
    return fp32_state(tx) if oc.fp32_state else tx


def fp32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` in fp32 whatever the parameter dtype: both Adam moments (optax's `mu_dtype`
    covers only the first) and the update math; `optax.apply_updates` casts the update back
    to each parameter's dtype (bf16 parameters, fp32 optimizer state)."""

    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return inner.init(f32(params))

    def update(updates, state, params=None):
        return inner.update(f32(updates), state, None if params is None else f32(params))

    return optax.GradientTransformation(init, update)

