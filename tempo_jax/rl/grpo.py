"""PIR-GRPO objective: group advantages, PPO-clip with clip-higher, k3 KL to a frozen
reference, token-level or sequence-level aggregation.

Pure functions of per-token log-probabilities, so the trainer decides how those are computed
(logits at completion positions only) and everything here jits and differentiates.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    num_generations: int = 8  # G samples per prompt
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO clip-higher
    beta: float = 0.04  # k3 KL weight; 0 drops the reference model entirely
    scale_rewards: bool = True  # False: Dr.GRPO (no std scaling)
    loss_agg: str = "token-mean"  # or "seq-mean-token-mean"
    num_iterations: int = 1  # optimizer passes per rollout batch
    std_eps: float = 1e-4


def group_advantages(rewards, num_generations: int, scale_rewards: bool = True,
                     eps: float = 1e-4) -> jax.Array:
    """(r - mean_G) / (std_G + eps) per group of G consecutive rows (prompt-major), with the
    unbiased (ddof=1) group std of the TRL-based recipes; without scaling, r - mean_G."""
    r = jnp.asarray(rewards, jnp.float32).reshape(-1, num_generations)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale_rewards:
        std = jnp.std(r, axis=1, keepdims=True, ddof=1) if num_generations > 1 else 0.0
        centred = centred / (std + eps)
    return centred.reshape(-1)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": lambda r, g, eps=1e-4: group_advantages(r, g, True, eps),
    "dr_grpo": lambda r, g, eps=1e-4: group_advantages(r, g, False, eps),
}


def get_advantage_estimator(name: str) -> Callable:
    if name not in ADVANTAGE_ESTIMATORS:
        known = sorted(ADVANTAGE_ESTIMATORS)
        raise KeyError(f"unknown advantage estimator {name!r}; known: {known}")
    return ADVANTAGE_ESTIMATORS[name]


def _token_mean(loss_tok, mask):
    return jnp.sum(loss_tok * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _seq_mean_token_mean(loss_tok, mask):
    n = jnp.sum(mask, axis=1)
    per_seq = jnp.sum(loss_tok * mask, axis=1) / jnp.maximum(n, 1.0)
    has = (n > 0).astype(loss_tok.dtype)
    return jnp.sum(per_seq * has) / jnp.maximum(jnp.sum(has), 1.0)


LOSS_AGGREGATIONS: dict[str, Callable] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
}


def grpo_loss(logps, old_logps, ref_logps, advantages, mask, cfg: GRPOConfig):
    """Scalar loss and metrics. logps/old_logps/ref_logps [N, T], advantages [N], mask [N, T]
    (completion tokens). Old log-probs are the sampler's own (raw-logit log-softmax)."""
    if cfg.loss_agg not in LOSS_AGGREGATIONS:
        known = sorted(LOSS_AGGREGATIONS)
        raise ValueError(f"unknown loss_agg {cfg.loss_agg!r}; choose from {known}")
    use_kl = cfg.beta > 0
    if use_kl and ref_logps is None:
        raise ValueError("beta > 0 needs reference log-probs (set beta=0 to drop the reference)")
    agg = LOSS_AGGREGATIONS[cfg.loss_agg]
    dt = jnp.promote_types(logps.dtype, jnp.float32)  # at least fp32 (fp64 in gradient checks)
    mask = mask.astype(dt)
    adv = advantages.astype(dt)[:, None]
    ratio = jnp.exp(logps - old_logps)
    clipped = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    objective = jnp.minimum(ratio * adv, clipped * adv)
    pg_tok = -objective
    pg_loss = agg(pg_tok, mask)
    if use_kl:
        d = ref_logps - logps
        kl_tok = jnp.exp(d) - d - 1.0
        kl = agg(kl_tok, mask)
    else:
        kl_tok = jnp.zeros_like(pg_tok)
        kl = jnp.zeros((), dt)
    loss = agg(pg_tok + cfg.beta * kl_tok, mask) if use_kl else pg_loss
    is_clipped = (((adv > 0) & (ratio > 1.0 + cfg.eps_high))
                  | ((adv < 0) & (ratio < 1.0 - cfg.eps_low)))
    n_tok = jnp.maximum(jnp.sum(mask), 1.0)
    metrics = {
        "pg_loss": pg_loss,
        "kl_loss": cfg.beta * kl,
        "kl": jnp.sum(kl_tok * mask) / n_tok,
        "clip_fraction": jnp.sum(is_clipped * mask) / n_tok,
        "ratio_mean": jnp.sum(ratio * mask) / n_tok,
        "ratio_max": jnp.max(jnp.where(mask > 0, ratio, -jnp.inf)),
        "response_length_mean": jnp.sum(mask) / mask.shape[0],
    }
    return loss, metrics


def sequence_logps(logits, tokens):
    """log p(token) under fp32 log-softmax: logits [N, T, V], tokens [N, T] -> [N, T]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


def token_entropy(logits):
    """Entropy of the policy at each position [N, T] (logged, not optimised)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), -1)
    return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
