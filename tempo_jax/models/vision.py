"""The vision-tower parts both families share: the attention over packed segments (frames or
windows), the pre-norm block and the patch embedding. A family passes its norm (Qwen2.5-VL's
RMSNorm, Qwen3-VL's LayerNorm), its MLP and whether the patch projection has a bias; the
parameter names (`norm1`, `attn.qkv`, `mlp.*`, `patch_embed.proj`) are the checkpoints'."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from tempo_jax.models.layers import Linear, RuntimeOptions, apply_rope, segment_attention


class VisionAttention(nnx.Module):
    def __init__(self, cfg, *, param_dtype, rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(bias=True, param_dtype=param_dtype, rngs=rngs)
        self.qkv = Linear(d, 3 * d, axes=("embed", "heads"), **kw)
        self.proj = Linear(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x, cos, sin, index, valid, slot, opts: RuntimeOptions):
        n = x.shape[0]
        qkv = self.qkv(x, opts.dtype).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q = apply_rope(q, cos[:, None], sin[:, None])
        k = apply_rope(k, cos[:, None], sin[:, None])
        return self.proj(segment_attention(q, k, v, index, valid, slot, opts), opts.dtype)


class VisionBlock(nnx.Module):
    """Pre-norm attention then MLP, each with its residual; `norm(width, eps=, param_dtype=)`
    and `mlp(cfg, param_dtype=, rngs=)` are the family's."""

    def __init__(self, cfg, *, norm: Callable, mlp: Callable, param_dtype, rngs):
        self.norm1 = norm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        self.norm2 = norm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
        self.mlp = mlp(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, cos, sin, index, valid, slot, opts):
        x = x + self.attn(self.norm1(x), cos, sin, index, valid, slot, opts)
        return x + self.mlp(self.norm2(x), opts.dtype)


class PatchEmbed(nnx.Module):
    """The reference Conv3d with kernel == stride is a matmul on flattened patches (with a
    bias in Qwen3-VL)."""

    def __init__(self, cfg, *, bias: bool, param_dtype, rngs):
        self.proj = Linear(cfg.patch_dim, cfg.hidden_size, bias=bias, axes=("patch", "embed"),
                           param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, dtype):
        return self.proj(x, dtype)
