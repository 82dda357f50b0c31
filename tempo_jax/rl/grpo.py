"""PIR-GRPO objective: group advantages, PPO-clip with clip-higher, k3 KL to a frozen
reference, token-level or sequence-level aggregation.

Pure functions of per-token log-probabilities, so the trainer decides how those are computed
(logits at completion positions only) and everything here jits and differentiates. Old
log-probs are the policy's own log-softmax over raw logits at the sampled tokens (as the
sampler reports them), not the tempered or truncated sampling distribution.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
    """Hashable, so it can be a static argument of a jitted step."""

    num_generations: int = 8  # G samples per prompt
    eps_low: float = 0.2
    eps_high: float = 0.28  # DAPO clip-higher
    beta: float = 0.04  # k3 KL weight; 0 drops the reference model entirely
    scale_rewards: bool = True  # False: Dr.GRPO (no std scaling)
    loss_agg: str = "token-mean"  # or "seq-mean-token-mean"
    num_iterations: int = 1  # optimizer passes per rollout batch
    std_eps: float = 1e-4


# ---------------------------------------------------------------------------- advantages


def _float(x) -> Array:
    """Keep a float input's precision (float64 under x64), promote ints/bools to float32."""
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.float32)


def group_advantages(rewards, num_generations: int, scale_rewards: bool = True,
                     eps: float = 1e-4) -> Array:
    """Group-relative advantages for prompt-major rewards [N] (row b*G + g).

    (r - mean_G) / (std_G + eps) with the unbiased (ddof=1) group std, as the TRL-based
    recipes; ``scale_rewards=False`` gives Dr.GRPO's r - mean_G (no length/difficulty bias
    from the std). A group with equal rewards gets advantage 0 (it carries no signal), and
    G=1 gives 0 rather than NaN.
    """
    r = _float(rewards)
    if r.ndim != 1 or r.shape[0] % num_generations:
        raise ValueError(f"rewards {r.shape} is not [B * G] with G={num_generations}")
    r = r.reshape(-1, num_generations)
    centred = r - r.mean(axis=1, keepdims=True)
    if scale_rewards and num_generations > 1:
        std = jnp.std(r, axis=1, keepdims=True, ddof=1)
        centred = centred / (std + eps)
    return centred.reshape(-1)


def _grpo_advantages(rewards, num_generations: int, eps: float = 1e-4) -> Array:
    return group_advantages(rewards, num_generations, True, eps)


def _dr_grpo_advantages(rewards, num_generations: int, eps: float = 1e-4) -> Array:
    return group_advantages(rewards, num_generations, False, eps)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., Array]] = {
    "grpo": _grpo_advantages,
    "dr_grpo": _dr_grpo_advantages,
}


def get_advantage_estimator(name: str) -> Callable[..., Array]:
    """Look an estimator up by name: ``fn(rewards, num_generations, eps=1e-4) -> [N]``."""
    if name not in ADVANTAGE_ESTIMATORS:
        known = sorted(ADVANTAGE_ESTIMATORS)
        raise KeyError(f"unknown advantage estimator {name!r}; known: {known}")
    return ADVANTAGE_ESTIMATORS[name]


# ---------------------------------------------------------------------------- aggregation


def loss_norms(mask: Array) -> dict[str, Array]:
    """The denominators of the aggregations and metrics, from a batch's completion mask
    [N, T]: its tokens, its sequences with at least one token, its rows. A micro-batch of an
    accumulated step takes the whole step's, so the micro-batches' terms add up to it."""
    maskf = jnp.asarray(mask).astype(jnp.float32)
    return {"tokens": jnp.maximum(jnp.sum(maskf), 1.0),
            "sequences": jnp.maximum(jnp.sum(jnp.any(mask, axis=1)), 1.0),
            "rows": jnp.asarray(maskf.shape[0], jnp.float32)}


def _token_mean(loss_tok: Array, mask: Array, norms: dict[str, Array]) -> Array:
    """Every completion token weighs the same (DAPO): long answers are not down-weighted."""
    return jnp.sum(loss_tok * mask) / norms["tokens"]


def _seq_mean_token_mean(loss_tok: Array, mask: Array, norms: dict[str, Array]) -> Array:
    """Original GRPO: mean per sequence, then over sequences with at least one token."""
    n = jnp.sum(mask, axis=1)
    per_seq = jnp.sum(loss_tok * mask, axis=1) / jnp.maximum(n, 1.0)
    has = (n > 0).astype(loss_tok.dtype)
    return jnp.sum(per_seq * has) / norms["sequences"]


LOSS_AGGREGATIONS: dict[str, Callable[[Array, Array, dict], Array]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
}


# ---------------------------------------------------------------------------- loss


# metrics an accumulated step combines by max (the others are sums of normalised terms)
MAX_METRICS = frozenset({"ratio_max"})


def grpo_loss(logps: Array, old_logps: Array, ref_logps: Array | None, advantages: Array,
              mask: Array, cfg: GRPOConfig,
              norms: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """PPO-clip (asymmetric eps) + beta * k3 KL, aggregated by ``cfg.loss_agg``.

    logps/old_logps/ref_logps [N, T] at the completion tokens, advantages [N], mask [N, T]
    (True on completion tokens). Positions outside the mask are neutralised before any exp,
    so padding with garbage (even inf) log-probs cannot leak NaN into the loss or gradients.
    Returns (loss, metrics); all metrics are scalars and the function jits with ``cfg``
    static. ``norms`` (``loss_norms``): the denominators, the whole step's for a micro-batch.
    """
    if cfg.loss_agg not in LOSS_AGGREGATIONS:
        known = sorted(LOSS_AGGREGATIONS)
        raise ValueError(f"unknown loss_agg {cfg.loss_agg!r}; choose from {known}")
    use_kl = cfg.beta > 0 and ref_logps is not None
    if cfg.beta > 0 and ref_logps is None:
        raise ValueError("beta > 0 needs reference log-probs (set beta=0 to drop the reference)")
    norms = loss_norms(mask) if norms is None else norms
    agg = functools.partial(LOSS_AGGREGATIONS[cfg.loss_agg], norms=norms)
    logps = _float(logps)
    dtype = logps.dtype
    on = jnp.asarray(mask).astype(bool)
    maskf = on.astype(dtype)
    zero = jnp.zeros((), dtype)
    # Neutralise masked positions (ratio 1, k3 0) with a "double where" so grads stay finite.
    logps = jnp.where(on, logps, zero)
    old = jnp.where(on, jax.lax.stop_gradient(_float(old_logps)).astype(dtype), zero)
    adv = jax.lax.stop_gradient(_float(advantages)).astype(dtype)[:, None]

    ratio = jnp.exp(logps - old)
    lo, hi = 1.0 - cfg.eps_low, 1.0 + cfg.eps_high
    clipped = jnp.clip(ratio, lo, hi)
    pg_tok = -jnp.minimum(ratio * adv, clipped * adv)
    pg_loss = agg(pg_tok, maskf)
    n_tok = norms["tokens"].astype(dtype)

    if use_kl:
        ref = jnp.where(on, jax.lax.stop_gradient(_float(ref_logps)).astype(dtype), zero)
        d = ref - logps
        kl_tok = jnp.exp(d) - d - 1.0
        kl_agg = agg(kl_tok, maskf)
        kl_mean = jnp.sum(kl_tok * maskf) / n_tok
        loss = agg(pg_tok + cfg.beta * kl_tok, maskf)
    else:
        kl_agg = kl_mean = zero
        loss = pg_loss

    # The clip binds only where it lowers the objective: A > 0 above 1+eps_high, A < 0 below
    # 1-eps_low (elsewhere min() picks the unclipped term and the gradient flows).
    is_clipped = ((adv > 0) & (ratio > hi)) | ((adv < 0) & (ratio < lo))
    has_tok = jnp.sum(maskf) > 0
    metrics = {
        "pg_loss": pg_loss,
        "kl_loss": cfg.beta * kl_agg,
        "kl": kl_mean,
        "clip_fraction": jnp.sum(is_clipped * maskf) / n_tok,
        "ratio_mean": jnp.sum(ratio * maskf) / n_tok,
        "ratio_max": jnp.where(has_tok, jnp.max(jnp.where(on, ratio, -jnp.inf)), zero),
        "response_length_mean": jnp.sum(maskf) / norms["rows"].astype(dtype),
    }
    return loss, metrics


# ---------------------------------------------------------------------------- log-probs


def sequence_logps(logits: Array, tokens: Array) -> Array:
    """log p(token) in fp32: logits [N, T, V], tokens [N, T] -> [N, T].

    logit[token] - logsumexp(logits): stable, and avoids materialising a second [N, T, V]
    log-softmax array (V is 151k for Qwen).
    """
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    picked = jnp.take_along_axis(x, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(x, axis=-1)


def token_entropy(logits: Array) -> Array:
    """Entropy of the policy at each position [N, T], logged to watch for collapse.

    Tokens with -inf logits (masked vocabulary) contribute 0 instead of 0 * inf = NaN.
    """
    x = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    logp = jax.nn.log_softmax(x, axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


# ---------------------------------------------------------------------------- dynamic sampling


def informative_groups(rewards, num_generations: int) -> np.ndarray:
    """[N * G] prompt-major rewards -> [N] bool: groups whose rewards are not all equal.
    A group of equal rewards has advantage 0 everywhere: it only dilutes the batch."""
    r = np.asarray(rewards, np.float64).reshape(-1, num_generations)
    return np.ptp(r, axis=1) > 0


def fill_groups(informative: Sequence[np.ndarray], batch_groups: int
                ) -> tuple[list[tuple[int, int]], np.ndarray]:
    """DAPO's dynamic sampling (verl's `filter_groups`), the choice of one update batch from
    several rollout rounds: `informative[k][j]` says whether group j of round k carries signal.

    Returns `batch_groups` (round, group) picks, informative groups first in the order they
    were rolled out, and a [batch_groups] bool mask, False where the rounds ran out of
    informative groups and an uninformative one only pads the batch to its static shape
    (the trainer masks those rows out of the loss entirely)."""
    good = [(k, j) for k, f in enumerate(informative) for j in np.flatnonzero(f)]
    rest = [(k, j) for k, f in enumerate(informative) for j in np.flatnonzero(~np.asarray(f))]
    picks = (good + rest)[:batch_groups]
    if len(picks) < batch_groups:
        raise ValueError(f"{len(picks)} groups rolled out, fewer than the batch's "
                         f"{batch_groups}")
    valid = np.arange(batch_groups) < len(good)
    return [(int(k), int(j)) for k, j in picks], valid
