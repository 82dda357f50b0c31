"""Attention backends agree with a plain numpy reference; the TPU splash kernel is checked in
Pallas interpret mode on CPU."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tempo_jax.models.attention import attention, check_backend


@pytest.fixture(autouse=True)
def _fp32_matmuls():
    """fp32 comparisons at 2e-5 need true fp32 dots (GPUs default to TF32)."""
    import jax

    with jax.default_matmul_precision("highest"):
        yield


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
    platform = __import__("jax").default_backend()
    assert resolve_backend("auto") == {"gpu": "cudnn", "tpu": "splash"}.get(platform, "xla")
    assert resolve_backend("cudnn", "tpu") == "cudnn"  # an explicit choice is kept
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash")


# ---------------------------------------------------------------------------- cuDNN (GPU only)
gpu = pytest.mark.skipif(__import__("jax").default_backend() != "gpu",
                         reason="the cuDNN kernel needs an NVIDIA GPU")


def _bf16(*xs):
    return [jnp.asarray(x, jnp.bfloat16) for x in xs]


@gpu
@pytest.mark.parametrize("left", [False, True])
def test_cudnn_causal_key_padding_matches_numpy_forward_and_backward(left):
    """The text layers' call (causal, key padding on either side) through cuDNN: outputs and
    gradients against the fp32 XLA path on the same bf16 inputs."""
    import jax

    q, k, v = _inputs(3, length=256, d=64)
    valid, allowed = _causal_padded(2, 256, [256, 131], left)
    ct = np.random.default_rng(4).standard_normal(q.shape).astype(np.float32)
    ct *= valid[..., None, None]
    qb, kb, vb = _bf16(q, k, v)

    def loss(backend, q, k, v):
        out = attention(q, k, v, scale=0.125, backend=backend, kv_valid=jnp.asarray(valid),
                        causal=True)
        return jnp.sum(out.astype(jnp.float32) * ct), out

    grads = {}
    for backend in ("cudnn", "xla"):
        (_, out), g = jax.value_and_grad(loss, argnums=(1, 2, 3), has_aux=True)(
            backend, qb, kb, vb)
        grads[backend] = (np.asarray(out, np.float32), [np.asarray(x, np.float32) for x in g])
    ref = _reference(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), allowed, 0.125)
    out, g = grads["cudnn"]
    np.testing.assert_allclose(out[valid], ref[valid], atol=3e-2)
    for a, b in zip(g, grads["xla"][1], strict=True):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


@gpu
def test_cudnn_prefix_padding_runs_as_sequence_lengths():
    """The vision tower's call: heads-first packed segments padded at the end (one empty),
    non-causal; `valid_is_prefix` hands cuDNN lengths instead of a bias."""
    q, k, v = _inputs(5, b=3, length=128, h=4, hkv=4, d=80)
    lens = [128, 50, 0]
    valid = np.arange(128)[None] < np.asarray(lens)[:, None]
    allowed = np.broadcast_to(valid[:, None, :], (3, 128, 128))
    qb, kb, vb = _bf16(q, k, v)
    hf = [jnp.swapaxes(x, 1, 2) for x in (qb, kb, vb)]
    ref = _reference(*(np.asarray(x, np.float32) for x in (qb, kb, vb)), allowed, 80**-0.5)
    for prefix in (True, False):
        out = attention(*hf, scale=80**-0.5, backend="cudnn", kv_valid=jnp.asarray(valid),
                        heads_first=True, valid_is_prefix=prefix)
        out = np.asarray(jnp.swapaxes(out, 1, 2), np.float32)
        np.testing.assert_allclose(out[valid], ref[valid], atol=3e-2)


@gpu
def test_cudnn_model_logits_match_xla_backend():
    """A whole bf16 forward (vision tower + decoder) with cuDNN attention against the same
    weights with XLA attention."""
    from flax import nnx

    from tempo_jax.models.qwen2_5_vl import Qwen25VL, RuntimeOptions, prepare_inputs, preset

    cfg = preset("tiny")
    rng = np.random.default_rng(6)
    t, h, w = 2, 8, 8
    n_vis = t * h * w // cfg.vision.merge_unit
    ids = np.concatenate([rng.integers(0, 1000, 10), [cfg.vision_start_token_id],
                          np.full(n_vis, cfg.video_token_id), [cfg.vision_end_token_id],
                          rng.integers(0, 1000, 12)])[None]
    inputs = prepare_inputs(cfg, ids, pixel_values_videos=rng.standard_normal(
        (t * h * w, cfg.vision.patch_dim)).astype(np.float32), video_grid_thw=[[t, h, w]],
        second_per_grid_ts=[1.0])
    logits = {}
    for backend in ("cudnn", "xla"):
        model = Qwen25VL(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0), options=RuntimeOptions(
            dtype=jnp.bfloat16, attention_backend=backend))
        logits[backend] = np.asarray(model.forward(inputs), np.float32)
    a, b = logits["cudnn"], logits["xla"]
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 2e-2


SHARDED_SPLASH = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tempo_jax import sharding as shd
from tempo_jax.models.attention import attention

rng = np.random.default_rng(0)
b, length, h, hkv, d = 4, 128, 4, 2, 32
q = rng.standard_normal((b, length, h, d)).astype(np.float32)
k = rng.standard_normal((b, length, hkv, d)).astype(np.float32)
v = rng.standard_normal((b, length, hkv, d)).astype(np.float32)
valid = np.ones((b, length), bool)
valid[1, 100:] = valid[3, 64:] = False
res = {}
for name, sizes in {"fsdp4_tensor2": (1, 4, 2), "data2_tensor4": (2, 1, 4)}.items():
    mesh = shd.make_mesh(*sizes)
    def f(q, k, v, valid, backend):
        return attention(q, k, v, backend=backend, scale=d ** -0.5, causal=True,
                         kv_valid=valid, splash_interpret=True)
    with shd.use_mesh(mesh):
        put = lambda a: jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp"))))
        args = [put(a) for a in (q, k, v, valid)]
        ref = jax.jit(f, static_argnums=4)(*args, "xla")
        out = jax.jit(f, static_argnums=4)(*args, "splash")
    res[name] = float(np.abs(np.asarray(out)[valid] - np.asarray(ref)[valid]).max())
print(json.dumps(res))
"""


def test_splash_under_a_mesh_runs_per_device_and_matches_xla():
    """A Mosaic kernel cannot be partitioned by XLA: under a mesh of several devices splash
    runs inside shard_map (rows and heads split), and still equals the XLA backend."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", SHARDED_SPLASH], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res) == {"fsdp4_tensor2", "data2_tensor4"}
    assert all(err <= 1e-4 for err in res.values()), res
