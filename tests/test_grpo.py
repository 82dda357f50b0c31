"""The PIR-GRPO objective against a plain-loop numpy transcription of its definition, hand
worked cases (ddof=1 advantages, clip fraction, first-iteration ratio 1), and its gradients
through a toy flax.nnx policy against central finite differences in float64."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from tempo_jax.rl import grpo


@pytest.fixture
def x64():
    """float64 for this test only; the previous setting is restored afterwards."""
    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)


# ---------------------------------------------------------------------------- references


def np_advantages(rewards, g, scale, eps=1e-4):
    out = [0.0] * len(rewards)
    for start in range(0, len(rewards), g):
        grp = [float(x) for x in rewards[start:start + g]]
        mean = sum(grp) / g
        var = sum((x - mean) ** 2 for x in grp) / (g - 1)
        for i, x in enumerate(grp):
            out[start + i] = (x - mean) / (math.sqrt(var) + eps) if scale else x - mean
    return np.asarray(out)


def np_loss(logps, old, ref, adv, mask, cfg):
    """Token by token, straight from the definition; only masked-in tokens are visited."""
    n, t = logps.shape
    lo, hi = 1 - cfg.eps_low, 1 + cfg.eps_high
    seqs = []  # per sequence: list of (pg, kl, clipped, ratio)
    for i in range(n):
        rows = []
        for j in range(t):
            if not mask[i][j]:
                continue
            ratio = math.exp(logps[i][j] - old[i][j])
            a = adv[i]
            obj = min(ratio * a, min(max(ratio, lo), hi) * a)
            kl = 0.0
            if cfg.beta > 0:
                d = ref[i][j] - logps[i][j]
                kl = math.exp(d) - d - 1
            clipped = (a > 0 and ratio > hi) or (a < 0 and ratio < lo)
            rows.append((-obj, kl, float(clipped), ratio))
        seqs.append(rows)
    toks = [r for rows in seqs for r in rows]
    ntok = len(toks)

    def agg(k):
        if cfg.loss_agg == "token-mean":
            return sum(r[k] for r in toks) / ntok
        per = [sum(r[k] for r in rows) / len(rows) for rows in seqs if rows]
        return sum(per) / len(per)

    pg, kl_agg = agg(0), agg(1)
    return pg + cfg.beta * kl_agg, {
        "pg_loss": pg,
        "kl_loss": cfg.beta * kl_agg,
        "kl": sum(r[1] for r in toks) / ntok,
        "clip_fraction": sum(r[2] for r in toks) / ntok,
        "ratio_mean": sum(r[3] for r in toks) / ntok,
        "ratio_max": max(r[3] for r in toks),
        "response_length_mean": ntok / n,
    }


def random_batch(seed, g=4, b=3, t=7, garbage=np.nan):
    rng = np.random.default_rng(seed)
    n = g * b
    rewards = rng.integers(0, 3, size=n).astype(float)
    rewards[:g] = 1.0  # all-equal group: advantage 0, no NaN
    rewards[g:g + 2] = 2.0  # partial tie
    logps = rng.normal(-2.0, 1.0, (n, t))
    old = logps + rng.normal(0.0, 0.3, (n, t))
    ref = logps + rng.normal(0.0, 0.3, (n, t))
    lengths = rng.integers(1, t + 1, size=n)
    lengths[1] = 0  # an empty completion
    lengths[2] = t
    mask = np.arange(t)[None] < lengths[:, None]
    for a in (logps, old, ref):  # padding must never reach the loss
        a[~mask] = garbage
    return rewards, logps, old, ref, mask


CONFIGS = [
    grpo.GRPOConfig(num_generations=4, beta=beta, loss_agg=agg, scale_rewards=scale,
                    eps_high=eh)
    for beta, agg, scale, eh in itertools.product(
        [0.0, 0.04], list(grpo.LOSS_AGGREGATIONS), [True, False], [0.28, 0.2])
]


# ---------------------------------------------------------------------------- loss vs numpy


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"b{c.beta}-{c.loss_agg}-"
                         f"s{int(c.scale_rewards)}-eh{c.eps_high}")
def test_loss_and_metrics_match_numpy_float64(cfg, x64):
    rewards, logps, old, ref, mask = random_batch(0)
    adv = grpo.group_advantages(rewards, cfg.num_generations, cfg.scale_rewards, cfg.std_eps)
    assert adv.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(adv), np_advantages(rewards, 4, cfg.scale_rewards),
                               rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(adv)[:4] == 0.0)
    loss, m = grpo.grpo_loss(jnp.asarray(logps), jnp.asarray(old),
                             jnp.asarray(ref) if cfg.beta else None, adv, jnp.asarray(mask),
                             cfg)
    want_loss, want = np_loss(logps, old, ref, np.asarray(adv), mask, cfg)
    assert loss.dtype == jnp.float64 and loss.shape == ()
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-9, atol=1e-9)
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k].shape == (), k
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-9, atol=1e-9, err_msg=k)
    if cfg.beta == 0:
        assert float(m["kl"]) == 0.0 and float(m["kl_loss"]) == 0.0


def test_float32_and_jit_match_numpy():
    cfg = grpo.GRPOConfig(num_generations=4, beta=0.04, loss_agg="seq-mean-token-mean")
    rewards, logps, old, ref, mask = random_batch(3, garbage=np.inf)
    adv = grpo.group_advantages(np.asarray(rewards, np.float32), 4)
    assert adv.dtype == jnp.float32
    args = [jnp.asarray(a, jnp.float32) for a in (logps, old, ref)]
    fn = jax.jit(grpo.grpo_loss, static_argnames="cfg")
    loss, m = fn(*args, adv, jnp.asarray(mask), cfg=cfg)
    want_loss, want = np_loss(logps, old, ref, np.asarray(adv, np.float64), mask, cfg)
    np.testing.assert_allclose(float(loss), want_loss, rtol=1e-5, atol=1e-5)
    for k, v in want.items():
        np.testing.assert_allclose(float(m[k]), v, rtol=1e-5, atol=1e-5, err_msg=k)
    # garbage (inf) at padded positions leaves the gradient finite and zero there
    g = jax.grad(lambda lp: fn(lp, *args[1:], adv, jnp.asarray(mask), cfg=cfg)[0])(args[0])
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~mask] == 0.0)


# ---------------------------------------------------------------------------- advantages


def test_advantages_ddof1_by_hand_and_dr_grpo():
    # group [1, 0, 0, 1]: mean 0.5, unbiased var = 4 * 0.25 / 3 = 1/3
    s = math.sqrt(1 / 3) + 1e-4
    adv = np.asarray(grpo.group_advantages([1, 0, 0, 1, 3, 3, 3, 3], 4))
    np.testing.assert_allclose(adv[:4], [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], rtol=1e-6)
    assert np.all(adv[4:] == 0.0) and np.all(np.isfinite(adv))
    # ddof=1, not 0: group [0, 2] has unbiased std sqrt(2), population std 1
    np.testing.assert_allclose(np.asarray(grpo.group_advantages([0.0, 2.0], 2)),
                               [-1 / (math.sqrt(2) + 1e-4), 1 / (math.sqrt(2) + 1e-4)],
                               rtol=1e-6)
    # Dr.GRPO: centred only
    dr = np.asarray(grpo.group_advantages([1.0, 0.0, 0.0, 3.0], 2, scale_rewards=False))
    np.testing.assert_allclose(dr, [0.5, -0.5, -1.5, 1.5], rtol=1e-6)
    # registries by name
    r = jnp.asarray([0.2, 1.0, 0.0, 0.5, 0.5, 2.0])
    np.testing.assert_allclose(grpo.get_advantage_estimator("grpo")(r, 3),
                               grpo.group_advantages(r, 3), rtol=1e-6)
    np.testing.assert_allclose(grpo.get_advantage_estimator("dr_grpo")(r, 3),
                               grpo.group_advantages(r, 3, False), rtol=1e-6)
    with pytest.raises(KeyError):
        grpo.get_advantage_estimator("ppo")
    # G = 1: nothing to compare against, advantage 0 rather than NaN
    assert np.all(np.asarray(grpo.group_advantages([1.0, 2.0], 1)) == 0.0)
    with pytest.raises(ValueError):
        grpo.group_advantages([1.0, 2.0, 3.0], 2)


# ---------------------------------------------------------------------------- hand cases


def test_first_iteration_ratio_one_and_reference_rules():
    logps = jnp.asarray([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]])
    mask = jnp.asarray([[1, 1, 1], [1, 0, 0]], bool)
    a = jnp.asarray([2.0, -1.0])
    cfg = grpo.GRPOConfig(beta=0.0)
    loss, m = grpo.grpo_loss(logps, logps, None, a, mask, cfg)  # beta=0: no reference needed
    # token-mean weighting: -(sum_i A_i * len_i) / sum(len)
    np.testing.assert_allclose(float(loss), -(2 * 3 - 1 * 1) / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m["pg_loss"]), float(loss), rtol=1e-6)
    assert float(m["ratio_mean"]) == 1.0 and float(m["ratio_max"]) == 1.0
    assert float(m["clip_fraction"]) == 0.0 and float(m["kl"]) == 0.0
    np.testing.assert_allclose(float(m["response_length_mean"]), 2.0)
    # equal lengths + group-centred advantages: -mean(A) = 0
    adv = grpo.group_advantages(jnp.asarray([1.0, 0.0, 0.5, 0.5]), 2)
    full = jnp.ones((4, 3), bool)
    lp = jnp.full((4, 3), -1.3)
    loss0, _ = grpo.grpo_loss(lp, lp, None, adv, full, cfg)
    np.testing.assert_allclose(float(loss0), -float(jnp.mean(adv)), atol=1e-7)
    # the gradient at ratio 1 is the plain policy gradient -A / sum(mask) per token
    g = jax.grad(lambda x: grpo.grpo_loss(x, logps, None, a, mask, cfg)[0])(logps)
    np.testing.assert_allclose(np.asarray(g), [[-0.5, -0.5, -0.5], [0.25, 0, 0]], rtol=1e-6)
    # a reference given with beta=0 is ignored; beta>0 without one is an error
    loss_ref, m_ref = grpo.grpo_loss(logps, logps, logps - 1.0, a, mask, cfg)
    assert float(loss_ref) == float(loss) and float(m_ref["kl"]) == 0.0
    with pytest.raises(ValueError, match="reference"):
        grpo.grpo_loss(logps, logps, None, a, mask, grpo.GRPOConfig(beta=0.04))
    with pytest.raises(ValueError, match="loss_agg"):
        grpo.grpo_loss(logps, logps, None, a, mask, grpo.GRPOConfig(beta=0.0, loss_agg="sum"))


def test_clip_fraction_by_hand():
    # eps_low 0.2, eps_high 0.28: the clip binds for A>0 above 1.28, for A<0 below 0.8
    ratios = np.asarray([[1.5, 1.25, 0.5, 1.0],    # A>0: 1.5 binds; 1.25 inside; 0.5 unclipped
                         [0.5, 0.79, 1.5, 9.0],    # A<0: 0.5, 0.79 bind; 1.5 unclipped; masked
                         [3.0, 0.1, 1.0, 1.0]])    # A=0: never binds
    mask = jnp.asarray([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]], bool)
    a = jnp.asarray([1.0, -2.0, 0.0])
    old = jnp.full((3, 4), -1.0)
    logps = old + jnp.log(jnp.asarray(ratios, jnp.float32))
    cfg = grpo.GRPOConfig(beta=0.0)
    loss, m = grpo.grpo_loss(logps, old, None, a, mask, cfg)
    np.testing.assert_allclose(float(m["clip_fraction"]), 3 / 9, rtol=1e-6)
    # objective by hand: row 0 min(r, clip(r)) = 1.28, 1.25, 0.5, 1.0;
    # row 1 -2 * max(r, clip(r)) = -2 * (0.8, 0.8, 1.5); row 2: 0
    obj = (1.28 + 1.25 + 0.5 + 1.0) - 2 * (0.8 + 0.8 + 1.5)
    np.testing.assert_allclose(float(loss), -obj / 9, rtol=1e-5)
    np.testing.assert_allclose(float(m["ratio_max"]), 3.0, rtol=1e-5)  # 9.0 is masked out
    # symmetric eps=0.2 clips the A>0 ratio 1.25 too
    _, m2 = grpo.grpo_loss(logps, old, None, a, mask, grpo.GRPOConfig(beta=0.0, eps_high=0.2))
    np.testing.assert_allclose(float(m2["clip_fraction"]), 4 / 9, rtol=1e-6)


def test_seq_mean_excludes_empty_sequences():
    logps = jnp.zeros((3, 2))
    old = jnp.zeros((3, 2))
    mask = jnp.asarray([[1, 1], [1, 0], [0, 0]], bool)
    a = jnp.asarray([1.0, 4.0, 100.0])
    cfg = grpo.GRPOConfig(beta=0.0, loss_agg="seq-mean-token-mean")
    loss, _ = grpo.grpo_loss(logps, old, None, a, mask, cfg)
    np.testing.assert_allclose(float(loss), -(1.0 + 4.0) / 2, rtol=1e-6)
    tm, _ = grpo.grpo_loss(logps, old, None, a, mask, grpo.GRPOConfig(beta=0.0))
    np.testing.assert_allclose(float(tm), -(1.0 * 2 + 4.0) / 3, rtol=1e-6)
    # an all-empty batch gives 0, not NaN
    z, mz = grpo.grpo_loss(logps, old, None, a, jnp.zeros((3, 2), bool), cfg)
    assert float(z) == 0.0 and all(np.isfinite(float(v)) for v in mz.values())


# ---------------------------------------------------------------------------- log-probs


def test_sequence_logps_and_entropy():
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 3, (2, 3, 11)) + 500.0  # large offset: must be computed stably
    tokens = rng.integers(0, 11, (2, 3))
    lp = np.asarray(grpo.sequence_logps(jnp.asarray(logits, jnp.float32), jnp.asarray(tokens)))
    ent = np.asarray(grpo.token_entropy(jnp.asarray(logits, jnp.float32)))
    for i in range(2):
        for j in range(3):
            z = logits[i, j] - logits[i, j].max()
            logp = z - math.log(sum(math.exp(v) for v in z))
            np.testing.assert_allclose(lp[i, j], logp[tokens[i, j]], atol=1e-4)
            np.testing.assert_allclose(ent[i, j], -sum(math.exp(v) * v for v in logp),
                                       atol=1e-4)
    bf = grpo.sequence_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(tokens))
    assert bf.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(grpo.token_entropy(jnp.zeros((1, 1, 11)))),
                               [[math.log(11)]], rtol=1e-6)
    masked = jnp.asarray([[[0.0, 0.0, -jnp.inf, -jnp.inf]]])
    np.testing.assert_allclose(np.asarray(grpo.token_entropy(masked)), [[math.log(2)]],
                               rtol=1e-6)


# ---------------------------------------------------------------------------- gradients


class ToyPolicy(nnx.Module):
    """Embedding + linear head: logits [N, T, V] from the previous token ids."""

    def __init__(self, vocab: int, dim: int, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, param_dtype=jnp.float64, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, param_dtype=jnp.float64, dtype=jnp.float64,
                               rngs=rngs)

    def __call__(self, ids):
        return self.head(jnp.tanh(self.embed(ids)))


@pytest.mark.parametrize("beta,agg", [(0.04, "token-mean"), (0.04, "seq-mean-token-mean"),
                                      (0.0, "token-mean")])
def test_gradients_match_finite_differences(beta, agg, x64):
    v, t, n, g = 11, 5, 4, 2
    model = ToyPolicy(v, 3, nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    theta0, unravel = ravel_pytree(params)
    assert theta0.dtype == jnp.float64
    rng = np.random.default_rng(7)
    prev = jnp.asarray(rng.integers(0, v, (n, t)))
    tokens = jnp.asarray(rng.integers(0, v, (n, t)))
    mask = jnp.asarray(np.arange(t)[None] < np.asarray([5, 3, 4, 1])[:, None])
    base = grpo.sequence_logps(model(prev), tokens)
    old = base + jnp.asarray(rng.normal(0, 0.4, (n, t)))  # some tokens land outside the clip
    ref = base + jnp.asarray(rng.normal(0, 0.3, (n, t)))
    adv = grpo.group_advantages(jnp.asarray([1.0, 0.0, 0.3, 2.0]), g)
    cfg = grpo.GRPOConfig(num_generations=g, beta=beta, loss_agg=agg)

    # no token sits on a kink of min/clip, where finite differences are meaningless
    ratio = np.asarray(jnp.exp(base - old))[np.asarray(mask)]
    assert np.min(np.abs(ratio[:, None] - [1 - cfg.eps_low, 1 + cfg.eps_high])) > 1e-3

    @jax.jit
    def loss_of(theta):
        logits = nnx.merge(graphdef, unravel(theta))(prev)
        return grpo.grpo_loss(grpo.sequence_logps(logits, tokens), old, ref if beta else None,
                              adv, mask, cfg)

    _, m = loss_of(theta0)
    assert 0.0 < float(m["clip_fraction"]) < 1.0  # both branches are exercised
    grad = np.asarray(jax.grad(lambda th: loss_of(th)[0])(theta0))
    h = 1e-5
    steps = h * jnp.eye(theta0.size, dtype=theta0.dtype)
    batched = jax.jit(jax.vmap(lambda th: loss_of(th)[0]))  # one compile for all 2P probes
    fd = np.asarray(batched(theta0 + steps) - batched(theta0 - steps)) / (2 * h)
    rel = np.linalg.norm(fd - grad) / np.linalg.norm(grad)
    assert rel < 1e-5, rel
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------------------- dynamic sampling


def test_informative_groups_and_fill_prefers_them_in_rollout_order():
    g = 4
    r0 = np.array([1, 1, 1, 1, 0, 1, 0, 0, 2, 2, 2, 2], float)  # groups: equal, mixed, equal
    r1 = np.array([0, 0, 0, 0, 1, 0, 1, 1, 0.5, 0.5, 0.5, 0.500001], float)
    f0, f1 = grpo.informative_groups(r0, g), grpo.informative_groups(r1, g)
    assert f0.tolist() == [False, True, False] and f1.tolist() == [False, True, True]
    picks, valid = grpo.fill_groups([f0, f1], 3)
    assert picks == [(0, 1), (1, 1), (1, 2)] and valid.all()  # the batch is full of signal
    picks, valid = grpo.fill_groups([f0], 3)  # one round only: padded with masked groups
    assert picks == [(0, 1), (0, 0), (0, 2)] and valid.tolist() == [True, False, False]
    with pytest.raises(ValueError, match="fewer"):
        grpo.fill_groups([f0], 4)


@pytest.mark.parametrize("agg", list(grpo.LOSS_AGGREGATIONS))
def test_equal_reward_groups_never_reach_the_loss(agg):
    """The trainer's update after dynamic sampling: the batch has its static size, and a
    group of equal rewards (padding) is masked out, so the loss and every gradient equal
    those of the informative groups alone, whatever the padding's log-probs."""
    g, t = 4, 6
    cfg = grpo.GRPOConfig(num_generations=g, beta=0.04, loss_agg=agg)
    rng = np.random.default_rng(0)
    rewards = np.concatenate([rng.integers(0, 3, 2 * g).astype(float), np.ones(g)])
    rewards[:g] = [0, 1, 2, 0]
    f = grpo.informative_groups(rewards, g)
    picks, valid = grpo.fill_groups([f], 3)
    assert f.tolist()[2] is False and [j for _, j in picks][2] == 2 and not valid[2]
    rows = np.concatenate([np.arange(j * g, (j + 1) * g) for _, j in picks])
    logps = rng.normal(-2.0, 1.0, (3 * g, t))
    old, ref = logps + rng.normal(0, 0.3, logps.shape), logps + rng.normal(0, 0.3, logps.shape)
    lengths = rng.integers(1, t + 1, 3 * g)
    mask = (np.arange(t)[None] < lengths[:, None]) & np.repeat(valid, g)[:, None]
    adv = grpo.group_advantages(rewards[rows], g)

    def loss(lp, m, o, r, a):
        return grpo.grpo_loss(lp, o, r, a, m, cfg)[0]

    full, grad = jax.value_and_grad(loss)(logps, mask, old, ref, adv)
    keep = np.repeat(valid, g)
    alone, grad_alone = jax.value_and_grad(loss)(logps[keep], mask[keep], old[keep], ref[keep],
                                                 adv[keep])
    np.testing.assert_allclose(full, alone, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad)[keep], grad_alone, rtol=1e-6, atol=1e-9)
    assert not np.asarray(grad)[~keep].any()
