"""Building blocks shared by the model families (Qwen2.5-VL, Qwen3-VL).

Linear kernels are stored `[in, out]` and every parameter carries logical axis names for
`tempo_jax.sharding`. Numerics that decide parity with the PyTorch reference live here once:
RMSNorm / LayerNorm statistics and rotary embeddings run in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tempo_jax.models.attention import attention
from tempo_jax.sharding import constrain

# a vision tower's patch activations [N, D]: the patches of the whole batch, split over the
# batch axes as the rows they come from are
PATCHES = ("batch", None)

REMAT_POLICIES = ("none", "full", "dots")
RESIDUAL = ("batch", "seq", "embed")  # logical names of the activations (sharding.constrain)
LOGITS = ("batch", "seq", "vocab")

default_init = jax.nn.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How the model runs (not what it is): dtypes, attention backend, rematerialisation."""

    dtype: Any = jnp.float32  # compute dtype; norms' statistics and softmax are always fp32
    attention_backend: str = "xla"
    remat: str = "none"
    splash_interpret: bool = False  # run the splash kernel in Pallas interpret mode (CPU)
    # the decoder's layers stacked [L, ...] and scanned (one layer compiled, not L): this
    # also fixes the parameters' layout, so it is given when the model is built
    scan_layers: bool = False


class ShapeOnlyRngs:
    """Stands in for `nnx.Rngs` when a model is built for its shapes only (`nnx.eval_shape`):
    one fixed key, no counter. Under a trace, each update of NNX's RNG counter costs time
    linear in the program traced so far (the 32B model took 14 s to build abstractly, 1.5 s
    with this)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def check_remat(remat: str) -> None:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {remat!r}")


def remat_policy(remat: str) -> Callable | None:
    """The `jax.checkpoint` policy of `remat` ("none": None, no rematerialisation)."""
    check_remat(remat)
    if remat == "none":
        return None
    return (jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims if remat == "dots"
            else jax.checkpoint_policies.nothing_saveable)


def remat_layer(fn: Callable, remat: str) -> Callable:
    """Wrap a decoder layer call `fn(layer, x)` with the rematerialisation policy `remat`."""
    policy = remat_policy(remat)
    return fn if policy is None else nnx.remat(fn, policy=policy)


def dot_2d(x, w, **kw):
    """`x @ w` with x's leading axes merged into one. On a [B, L, D] operand XLA:CPU copies the
    [B, L, F] output gradient into an [F, B, L] transpose before the weight-gradient dot (about
    0.4 of an MLP's backward at the `bench` size); on [B*L, D] it does not. The merge is free
    (the leading axes are contiguous and only the batch axis is ever sharded)."""
    y = jnp.dot(x.reshape(-1, x.shape[-1]), w, **kw)
    return y.reshape(*x.shape[:-1], w.shape[-1])


class Linear(nnx.Module):
    def __init__(self, din, dout, *, bias, axes, param_dtype, rngs):
        self.kernel = nnx.Param(default_init(rngs.params(), (din, dout), param_dtype), axes=axes)
        self.bias = (
            nnx.Param(jnp.zeros((dout,), param_dtype), axes=(axes[1],)) if bias else None
        )

    def __call__(self, x, dtype):
        y = dot_2d(x.astype(dtype), self.kernel[...].astype(dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim, *, eps, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * xf.astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (biased variance), statistics and affine in fp32."""

    def __init__(self, dim, *, eps, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=("norm",))
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        xc = xf - mean
        var = jnp.mean(xc * xc, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def act_fn(name: str) -> Callable:
    """The activation transformers' ACT2FN[name] applies."""
    if name == "silu":
        return jax.nn.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=name.endswith("tanh"))
    raise ValueError(f"unsupported activation {name!r}")


def rotate_half(x):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, cos, sin):
    """Rotary embedding in fp32, cast back (cos/sin broadcast over heads)."""
    xf = x.astype(jnp.float32)
    return (xf * cos + rotate_half(xf) * sin).astype(x.dtype)


def inv_freq(theta: float, dim: int) -> np.ndarray:
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)


def vision_rotary(rot_pos, theta: float, head_dim: int):
    """cos/sin [N, head_dim] of the vision towers' 2D rotary from (row, col) ids [N, 2]: the
    first half of each rotated pair reads the row, the second the column."""
    inv = jnp.asarray(inv_freq(theta, head_dim // 2))
    freqs = rot_pos[..., None].astype(jnp.float32) * inv  # [N, 2, hd/4]
    emb = freqs.reshape(freqs.shape[0], -1)
    emb = jnp.concatenate([emb, emb], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)); the Qwen2.5 vision tower's has biases, decoders' do not."""

    def __init__(self, d: int, f: int, act: str, *, bias: bool, param_dtype, rngs):
        kw = dict(bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(f, d, axes=("mlp", "embed"), **kw)
        self.act = act

    def __call__(self, x, dtype):
        act = act_fn(self.act)
        return self.down_proj(act(self.gate_proj(x, dtype)) * self.up_proj(x, dtype), dtype)


class Embed(nnx.Module):
    def __init__(self, vocab, dim, *, param_dtype, rngs, axes=("vocab", "embed")):
        self.embedding = nnx.Param(default_init(rngs.params(), (vocab, dim), param_dtype),
                                   axes=axes)

    def __call__(self, ids):
        return self.embedding[...][ids]


class CachedDecode:
    """KV-cache decoding for a text attention module that has `project(x, cos, sin, opts)`
    -> (q, k, v), `o_proj` and `head_dim` (both families' decoders)."""

    def decode(self, x, cos, sin, cache_k, cache_v, layer, index, kv_mask,
               opts: RuntimeOptions):
        """Attend new tokens written at slot `index` of layer `layer`'s cache (x [B, T, D];
        `cache_k`, `cache_v` [num_layers, B, S, Hkv, D], every layer's: the write is in
        place, the read one layer); `kv_mask` [B, T, S] says which cache slots each new token
        may read (the prompt's valid tokens and the tokens generated so far, itself
        included)."""
        b, seq = x.shape[:2]
        q, k, v = self.project(x, cos, sin, opts)
        at = (layer, 0, index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), at)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), at)
        ck = jax.lax.dynamic_index_in_dim(cache_k, layer, 0, keepdims=False)
        cv = jax.lax.dynamic_index_in_dim(cache_v, layer, 0, keepdims=False)
        # decoding is bandwidth-bound with one query row: the plain kernel serves every platform
        out = attention(q, ck.astype(q.dtype), cv.astype(q.dtype),
                        scale=self.head_dim**-0.5, backend="xla", mask=kv_mask)
        return self.o_proj(out.reshape(b, seq, -1), opts.dtype), cache_k, cache_v


class DecoderLayer(nnx.Module):
    """A pre-norm decoder layer (attention, then the gated MLP) around the family's text
    attention class; attribute names follow the Hugging Face module tree."""

    def __init__(self, cfg: Any, attention_cls: type, *, param_dtype, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                       param_dtype=param_dtype)
        self.self_attn = attention_cls(cfg, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps,
                                                param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=False,
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, valid, opts):
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, valid, opts)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), opts.dtype), kv

    def decode(self, x, cos, sin, cache_k, cache_v, layer, index, kv_mask, opts):
        attn, cache_k, cache_v = self.self_attn.decode(
            self.input_layernorm(x), cos, sin, cache_k, cache_v, layer, index, kv_mask, opts)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), opts.dtype), cache_k, cache_v


def segment_attention(q, k, v, index, valid, slot, opts: RuntimeOptions):
    """Bidirectional attention within packed segments (the vision towers' windows / frames).

    q, k, v [N, H, D]; `index` [S, Lmax] gathers each segment's tokens into a row, `valid`
    [S, Lmax] marks its real slots (a prefix), `slot` [N] is each token's flat slot. Returns
    [N, H * D] in token order. Attention costs `S * Lmax**2` instead of `N**2`, and one padded
    layout serves every backend.
    """
    s, lmax = index.shape
    # head-major: [N, H, D] -> [H, N, D] -> gather [H, S, Lmax, D] -> [S, H, Lmax, D]
    qs, ks, vs = (constrain(jnp.swapaxes(jnp.swapaxes(t, 0, 1)[:, index], 0, 1),
                            ("batch", "heads", None, None)) for t in (q, k, v))
    out = attention(
        qs, ks, vs, scale=q.shape[-1] ** -0.5, backend=opts.attention_backend,
        kv_valid=valid, causal=False, splash_interpret=opts.splash_interpret,
        heads_first=True, valid_is_prefix=True,  # segments padded at the end
    )
    return jnp.swapaxes(out, 1, 2).reshape(s * lmax, -1)[slot]


def host_array(x, who: str = "the model") -> np.ndarray | None:
    """A concrete numpy array from numpy / jax / torch input (host-side preparation)."""
    if x is None:
        return None
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{who} prepares inputs on the host and cannot be traced; inside jit use "
            "prepare_inputs(...) outside and model.forward(inputs) inside"
        )
    if hasattr(x, "detach"):  # torch tensors
        x = x.detach().cpu().float().numpy() if x.is_floating_point() else x.cpu().numpy()
    return np.asarray(x)
