"""Attention backends agree with a plain numpy reference; the TPU splash kernel is checked in
Pallas interpret mode on CPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tempo_jax.models.attention import attention, check_backend


def _reference(q, k, v, allowed, scale):
    """numpy fp64 grouped-query attention; `allowed` [B, Lq, Lk]."""
    b, lq, h, d = q.shape
    g = h // k.shape[2]
    k = np.repeat(k, g, axis=2)
    v = np.repeat(v, g, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    logits = np.where(allowed[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):  # fully masked (padding) rows become NaN, never compared
        logits -= logits.max(-1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def _inputs(seed, b=2, length=128, h=4, hkv=2, d=32):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((b, length, h, d)).astype(np.float32)
    k = rng.standard_normal((b, length, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, length, hkv, d)).astype(np.float32)
    return q, k, v


def _causal_padded(b, length, lens, left):
    valid = np.zeros((b, length), bool)
    for i, n in enumerate(lens):
        valid[i, length - n:] = True if left else False
        if not left:
            valid[i, :n] = True
    causal = np.tril(np.ones((length, length), bool))
    return valid, causal[None] & valid[:, None, :]


@pytest.mark.parametrize("left", [False, True])
def test_xla_key_padding_and_causal_flag_match_numpy(left):
    """The fast path: key padding as a bias and the causal mask generated per block."""
    q, k, v = _inputs(2, length=300)
    valid, allowed = _causal_padded(2, 300, [300, 177], left)
    out = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.2,
                               kv_valid=jnp.asarray(valid), causal=True))
    ref = _reference(q, k, v, allowed, 0.2)
    np.testing.assert_allclose(out[valid], ref[valid], atol=2e-5)


@pytest.mark.parametrize("left", [False, True])
def test_xla_matches_numpy_causal_padded(left):
    q, k, v = _inputs(0)
    valid, allowed = _causal_padded(2, 128, [128, 77], left)
    out = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), scale=0.2,
                               mask=jnp.asarray(allowed)))
    ref = _reference(q, k, v, allowed, 0.2)
    np.testing.assert_allclose(out[valid], ref[valid], atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_splash_interpret_matches_xla(causal):
    q, k, v = _inputs(1)
    length = q.shape[1]
    # segment ids express padding (text) or packing (vision windows)
    seg = np.ones((2, length), np.int32)
    seg[1, 90:] = 0 if causal else 2
    same = seg[:, :, None] == seg[:, None, :]
    allowed = same & (np.tril(np.ones((length, length), bool))[None] if causal else True)
    ref = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="xla",
                               scale=32**-0.5, mask=jnp.asarray(allowed), causal=causal))
    out = np.asarray(attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="splash",
                               splash_interpret=True, scale=32**-0.5, causal=causal,
                               q_segment_ids=jnp.asarray(seg), kv_segment_ids=jnp.asarray(seg)))
    np.testing.assert_allclose(out, ref, atol=1e-4)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        check_backend("flash")


def test_auto_backend_resolves_per_platform():
    from tempo_jax.models.attention import resolve_backend

    assert resolve_backend("auto", "tpu") == "splash"
    assert resolve_backend("auto", "gpu") == "cudnn"
    assert resolve_backend("auto", "cpu") == "xla"
    assert resolve_backend("auto") == "xla"  # this test machine is a CPU
    assert resolve_backend("cudnn", "tpu") == "cudnn"  # an explicit choice is kept
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash")
