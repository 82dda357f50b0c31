"""The PIR-GRPO objective against a plain numpy transcription of its definition, and its
gradients against finite differences on a toy model."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tempo_jax.rl import grpo


def numpy_advantages(rewards, g, scale, eps=1e-4):
    out = np.zeros(len(rewards))
    for start in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[start:start + g]]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - 1)
        for i, x in enumerate(grp):
            out[start + i] = (x - mean) / (var ** 0.5 + eps) if scale else x - mean
    return out


def numpy_loss(logps, old, ref, adv, mask, cfg):
    n, t = logps.shape
    tok = np.zeros((n, t))
    kl = np.zeros((n, t))
    clipped = np.zeros((n, t))
    for i in range(n):
        for j in range(t):
            ratio = np.exp(logps[i, j] - old[i, j])
            lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
            obj = min(ratio * adv[i], min(max(ratio, lo), hi) * adv[i])
            tok[i, j] = -obj
            if cfg.beta > 0:
                d = ref[i, j] - logps[i, j]
                kl[i, j] = np.exp(d) - d - 1
            clipped[i, j] = (adv[i] > 0 and ratio > hi) or (adv[i] < 0 and ratio < lo)
    total = tok + cfg.beta * kl
    if cfg.loss_agg == "token-mean":
        loss = (total * mask).sum() / mask.sum()
    else:
        per = [(total[i] * mask[i]).sum() / mask[i].sum() for i in range(n) if mask[i].sum()]
        loss = sum(per) / len(per)
    return loss, (kl * mask).sum() / mask.sum(), (clipped * mask).sum() / mask.sum()


@pytest.mark.parametrize(
    "beta,agg,scale,eps_high",
    list(itertools.product([0.0, 0.04], ["token-mean", "seq-mean-token-mean"], [True, False],
                           [0.28])) + [(0.04, "token-mean", True, 0.2)],
)
def test_loss_matches_numpy(beta, agg, scale, eps_high):
    rng = np.random.default_rng(0)
    g, n, t = 4, 12, 7
    rewards = rng.integers(0, 3, size=n).astype(float)
    rewards[:g] = 1.0  # a group with equal rewards: advantage 0, no NaN
    logps = rng.normal(-2, 1, (n, t))
    old = logps + rng.normal(0, 0.3, (n, t))
    ref = logps + rng.normal(0, 0.3, (n, t))
    lengths = rng.integers(0, t + 1, size=n)
    lengths[1] = 0  # an empty completion
    mask = (np.arange(t)[None] < lengths[:, None]).astype(float)
    cfg = grpo.GRPOConfig(num_generations=g, beta=beta, loss_agg=agg, scale_rewards=scale,
                          eps_high=eps_high)
    adv = np.asarray(grpo.group_advantages(rewards, g, scale))
    np.testing.assert_allclose(adv, numpy_advantages(rewards, g, scale), atol=1e-5)
    assert np.all(adv[:g] == 0)
    loss, m = grpo.grpo_loss(jnp.asarray(logps, jnp.float32), jnp.asarray(old, jnp.float32),
                             jnp.asarray(ref, jnp.float32) if beta else None,
                             jnp.asarray(adv), jnp.asarray(mask), cfg)
    ref_loss, ref_kl, ref_clip = numpy_loss(logps, old, ref, adv, mask, cfg)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["kl"]), ref_kl if beta else 0.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(m["clip_fraction"]), ref_clip, atol=1e-6)


def test_advantage_ddof1_by_hand_and_first_iteration():
    # group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(1/3)
    adv = np.asarray(grpo.group_advantages([1, 0, 0, 1], 4))
    np.testing.assert_allclose(adv, [0.5 / (np.sqrt(1 / 3) + 1e-4)] * 1 + [-0.5 / (np.sqrt(1 / 3)
                               + 1e-4)] * 2 + [0.5 / (np.sqrt(1 / 3) + 1e-4)], rtol=1e-6)
    # ratio 1 (first pass): token-mean pg loss is -(sum_i A_i * len_i) / sum(len)
    logps = jnp.full((2, 3), -1.0)
    mask = jnp.asarray([[1, 1, 1], [1, 0, 0]], jnp.float32)
    a = jnp.asarray([2.0, -1.0])
    loss, m = grpo.grpo_loss(logps, logps, None, a, mask, grpo.GRPOConfig(beta=0.0))
    np.testing.assert_allclose(float(loss), -(2 * 3 - 1 * 1) / 4, rtol=1e-6)
    assert float(m["clip_fraction"]) == 0.0
    with pytest.raises(ValueError, match="reference"):
        grpo.grpo_loss(logps, logps, None, a, mask, grpo.GRPOConfig(beta=0.04))


def test_clip_fraction_by_hand():
    logps = jnp.log(jnp.asarray([[1.5, 1.0], [0.5, 1.1]]))
    old = jnp.zeros((2, 2))
    a = jnp.asarray([1.0, -1.0])
    _, m = grpo.grpo_loss(logps, old, None, a, jnp.ones((2, 2)), grpo.GRPOConfig(beta=0.0))
    # row 0 (A>0): ratio 1.5 > 1.28 clips, 1.0 does not; row 1 (A<0): 0.5 < 0.8 clips, 1.1 not
    assert float(m["clip_fraction"]) == pytest.approx(0.5)


class Toy(nnx.Module):
    def __init__(self, vocab=11, dim=6):
        self.emb = nnx.Param(jax.random.normal(jax.random.key(0), (vocab, dim)) * 0.5)
        self.out = nnx.Param(jax.random.normal(jax.random.key(1), (dim, vocab)) * 0.5)

    def __call__(self, tokens):
        return jnp.tanh(self.emb[...][tokens]) @ self.out[...]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_gradients_match_finite_differences(agg):
    jax.config.update("jax_enable_x64", True)
    try:
        model = Toy()
        model.emb.value = model.emb[...].astype(jnp.float64)
        model.out.value = model.out[...].astype(jnp.float64)
        rng = np.random.default_rng(1)
        prev = jnp.asarray(rng.integers(0, 11, (4, 5)))
        tokens = jnp.asarray(rng.integers(0, 11, (4, 5)))
        old = jnp.asarray(rng.normal(-2.4, 0.2, (4, 5)))
        ref = jnp.asarray(rng.normal(-2.4, 0.2, (4, 5)))
        mask = jnp.asarray([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]],
                           jnp.float64)
        adv = grpo.group_advantages(jnp.asarray([1.0, 0.0, 2.0, 0.5]), 2).astype(jnp.float64)
        cfg = grpo.GRPOConfig(num_generations=2, beta=0.04, loss_agg=agg, eps_low=0.5,
                              eps_high=0.5)
        graphdef, params = nnx.split(model)

        def loss_of(p):
            logits = nnx.merge(graphdef, p)(prev)
            return grpo.grpo_loss(grpo.sequence_logps(logits, tokens), old, ref, adv, mask,
                                  cfg)[0]

        grads = jax.grad(loss_of)(params)
        flat_p = params.to_pure_dict()
        flat_g = grads.to_pure_dict()
        h = 1e-6
        for name in ("emb", "out"):
            value = np.asarray(flat_p[name])
            for idx in [(0, 0), (3, 2), (5, 4)]:
                def at(delta, name=name, idx=idx, value=value):
                    v = value.copy()
                    v[idx] += delta
                    p = jax.tree.map(lambda x: x, flat_p)
                    p[name] = jnp.asarray(v)
                    state = nnx.State(params)
                    nnx.replace_by_pure_dict(state, p)
                    return float(loss_of(state))

                fd = (at(h) - at(-h)) / (2 * h)
                an = float(np.asarray(flat_g[name])[idx])
                assert abs(fd - an) <= 1e-5 * max(1.0, abs(fd)), (name, idx, fd, an)
    finally:
        jax.config.update("jax_enable_x64", False)
