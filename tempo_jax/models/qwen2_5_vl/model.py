"""Qwen2.5-VL in Flax NNX: vision tower (window attention, 2D rotary, patch merger) and the
Qwen2 decoder with M-RoPE.

Module and attribute names mirror the Hugging Face module tree, so the checkpoint mapping
(`params.py`) is mechanical. Linear kernels are stored `[in, out]` and carry logical axis
names for `tempo_jax.sharding`.

Device code is pure: `Qwen25VL.forward(inputs)` takes a dict of arrays prepared on the host
(`prepare_inputs`), so it can be jitted, sharded and differentiated. `Qwen25VL.__call__` is
the transformers-style convenience entry point that prepares those arrays itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tempo_jax.models import inputs as inputs_lib
from tempo_jax.models.attention import attention
from tempo_jax.models.decoder import Decoder, VisionLanguageModel
from tempo_jax.models.layers import (
    LOGITS,
    PATCHES,
    REMAT_POLICIES,
    RESIDUAL,
    CachedDecode,
    GatedMLP,
    Linear,
    RMSNorm,
    RuntimeOptions,
    apply_rope,
    host_array,
    inv_freq,
    vision_rotary,
)
from tempo_jax.models.qwen2_5_vl import positions as pos_lib
from tempo_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, VisionConfig
from tempo_jax.models.qwen2_5_vl.vision_meta import vision_metadata
from tempo_jax.models.stack import make_stack, run_stack
from tempo_jax.models.vision import PatchEmbed, VisionBlock
from tempo_jax.sharding import constrain

__all__ = [  # RuntimeOptions, REMAT_POLICIES, RESIDUAL, LOGITS: re-exported from layers
    "LOGITS", "REMAT_POLICIES", "RESIDUAL", "Qwen25VL", "RuntimeOptions", "TextModel",
    "VisionTower", "extend_side", "prepare_inputs",
]

# --------------------------------------------------------------------------- vision tower
def _mlp(cfg: VisionConfig, *, param_dtype, rngs) -> GatedMLP:
    return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=True,
                    param_dtype=param_dtype, rngs=rngs)


class PatchMerger(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs):
        ctx = cfg.hidden_size * cfg.merge_unit
        self.hidden = ctx
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        self.mlp_0 = Linear(ctx, ctx, bias=True, axes=("embed", "mlp"), param_dtype=param_dtype,
                            rngs=rngs)
        self.mlp_2 = Linear(ctx, cfg.out_hidden_size, bias=True, axes=("mlp", "embed"),
                            param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, dtype):
        x = self.ln_q(x).reshape(-1, self.hidden)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x, dtype), approximate=False), dtype)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs, scan: bool = False):
        self.cfg = cfg
        self.scan = scan
        self.patch_embed = PatchEmbed(cfg, bias=False, param_dtype=param_dtype, rngs=rngs)
        self.blocks = make_stack(
            [VisionBlock(cfg, norm=RMSNorm, mlp=_mlp, param_dtype=param_dtype, rngs=rngs)
             for _ in range(cfg.depth)], scan)
        self.merger = PatchMerger(cfg, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixels, meta: dict, opts: RuntimeOptions):
        """pixels [N, 1176] -> merged features [N / 4, out_hidden] in input order."""
        # the patches of the whole batch split over the batch axes, like the rows they come
        # from: each device runs the tower on its share, not the whole batch's
        x = constrain(self.patch_embed(pixels, opts.dtype)[meta["patch_perm"]], PATCHES)
        cos, sin = vision_rotary(meta["rot_pos"], self.cfg.rope_theta, self.cfg.head_dim)
        is_full = np.isin(np.arange(self.cfg.depth), self.cfg.fullatt_block_indexes)

        def block(blk, h, i):
            def run(kind):
                return lambda h: blk(h, cos, sin, meta[f"{kind}_index"], meta[f"{kind}_valid"],
                                     meta[f"{kind}_slot"], opts)

            if isinstance(i, int):
                h = run("full" if is_full[i] else "win")(h)
            else:  # scanned: both kinds compiled once, the layer's picked at run time
                h = jax.lax.cond(jnp.asarray(is_full)[i], run("full"), run("win"), h)
            return constrain(h, PATCHES)

        x = run_stack(self.blocks, block, x, self.scan)
        return self.merger(x, opts.dtype)[meta["reverse_index"]]


# --------------------------------------------------------------------------- text decoder
class TextAttention(CachedDecode, nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, hd)
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, self.num_heads * hd, bias=True, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=True, axes=("embed", "kv_heads"),
                             **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=True, axes=("embed", "kv_heads"),
                             **kw)
        self.o_proj = Linear(self.num_heads * hd, d, bias=False, axes=("heads", "embed"), **kw)

    def project(self, x, cos, sin, opts: RuntimeOptions):
        """q [B, L, H, D] and k, v [B, L, Hkv, D] with M-RoPE applied to q and k."""
        b, seq = x.shape[:2]
        q = self.q_proj(x, opts.dtype).reshape(b, seq, self.num_heads, self.head_dim)
        k = self.k_proj(x, opts.dtype).reshape(b, seq, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, opts.dtype).reshape(b, seq, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        return q, k, v

    def __call__(self, x, cos, sin, valid, opts: RuntimeOptions):
        """Causal self-attention over the sequence (`valid` [B, L]: key padding); also returns
        (k, v) for a KV cache."""
        b, seq = x.shape[:2]
        q, k, v = self.project(x, cos, sin, opts)
        out = attention(
            q, k, v, scale=self.head_dim**-0.5, backend=opts.attention_backend, kv_valid=valid,
            causal=True, splash_interpret=opts.splash_interpret,
        )
        return self.o_proj(out.reshape(b, seq, -1), opts.dtype), (k, v)


class TextModel(Decoder):
    """The Qwen2 decoder (`models.decoder.Decoder`) with Qwen2.5-VL's M-RoPE: no side input."""

    attention_cls = TextAttention

    def mrope(self, position_ids):
        """cos/sin [B, L, head_dim] from [3, B, L] positions: frequency band i of the rotary
        dimensions reads axis i % 3 of the position (mrope_section sizes)."""
        inv = jnp.asarray(inv_freq(self.cfg.rope_theta, self.cfg.head_dim))
        freqs = position_ids[..., None].astype(jnp.float32) * inv  # [3, B, L, hd/2]
        bounds = np.cumsum((0, *self.cfg.mrope_section))
        parts = [freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(3)]
        f = jnp.concatenate(parts, axis=-1)
        emb = jnp.concatenate([f, f], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)


# --------------------------------------------------------------------------- full model
class Qwen25VL(VisionLanguageModel):
    """Qwen2_5_VLForConditionalGeneration: `models.decoder.VisionLanguageModel` with this
    family's vision tower, decoder and input preparation."""

    vision_cls = VisionTower
    text_cls = TextModel

    # ---- pure device functions (jit / grad these)
    def embed(self, inputs: dict):
        """Token embeddings with the vision features scattered at the image/video pad tokens."""
        cfg, opts = self.config, self.options
        ids = inputs["input_ids"]
        x = self.model.embed_tokens(ids).astype(opts.dtype)
        if "pixel_values" not in inputs:
            return x
        feats = self.visual(inputs["pixel_values"], inputs["vision_meta"], opts).astype(opts.dtype)
        flat = ids.reshape(-1)
        is_img = flat == cfg.image_token_id
        is_vid = flat == cfg.video_token_id
        idx = jnp.where(
            is_img, jnp.cumsum(is_img) - 1,
            jnp.where(is_vid, inputs["num_image_features"] + jnp.cumsum(is_vid) - 1, 0),
        )
        picked = feats[jnp.clip(idx, 0, feats.shape[0] - 1)]
        x = jnp.where((is_img | is_vid)[:, None], picked, x.reshape(flat.shape[0], -1))
        return x.reshape(*ids.shape, -1)

    def embed_for_decoder(self, inputs: dict) -> tuple[jax.Array, None]:
        """`(x, side)` for `self.model(x, ..., side=side)`, the interface both families share;
        Qwen2.5-VL's decoder needs nothing besides the embeddings, so `side` is None."""
        return self.embed(inputs), None

    def extend_side(self, side: None, n_new: int) -> None:
        """The decoder side input after `n_new` appended text positions (None stays None)."""
        return extend_side(side, n_new)


def extend_side(side: None, n_new: int) -> None:
    """Qwen2.5-VL has no decoder side input: nothing to extend."""
    if side is not None:
        raise ValueError("Qwen2.5-VL's decoder takes no side inputs (side must be None)")
    return None


def _np(x):
    return host_array(x, "Qwen25VL.__call__")


def _vision_positions(config: ModelConfig, ids, mask, img_grid, vid_grid, seconds):
    pos, _ = pos_lib.rope_index(
        ids, mask, img_grid, vid_grid, seconds,
        spatial_merge_size=config.vision.spatial_merge_size,
        tokens_per_second=config.vision.tokens_per_second,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )
    return pos


# Host side of a forward pass (`models.inputs.prepare_inputs`: M-RoPE positions when not
# given, vision metadata, one vision batch); `second_per_grid_ts` sets the temporal position
# step of each video (Qwen2.5-VL's absolute time encoding).
prepare_inputs = functools.partial(
    inputs_lib.prepare_inputs, vision_positions=_vision_positions,
    vision_metadata=vision_metadata, host=_np)
