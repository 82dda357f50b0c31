"""Qwen3-VL (dense) in Flax NNX: the vision tower (learned, bilinearly resampled position
table, 2D rotary, per-frame attention, DeepStack mergers) and the Qwen3 decoder (q/k RMSNorm,
interleaved M-RoPE, DeepStack: vision features of intermediate tower layers added to the
visual positions after the first decoder layers).

Module and attribute names mirror the Hugging Face module tree, so the checkpoint mapping
(`params.py`) is mechanical; as in Qwen2.5-VL the decoder is `model` and the tower `visual`
(transformers nests both under `model.`: `model.language_model.*`, `model.visual.*`).

Device code is pure: `Qwen3VL.forward(inputs)` takes a dict of arrays prepared on the host
(`prepare_inputs`). The interface the trainer and the sampler share with Qwen2.5-VL:
`embed_for_decoder(inputs) -> (x, side)`, `model.model(x, position_ids, mask, opts,
return_kv=False, side=side)`, `model.model.decode(...)`, `extend_side(side, n_new)`.
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
    PATCHES,
    CachedDecode,
    Embed,
    LayerNorm,
    Linear,
    RMSNorm,
    RuntimeOptions,
    act_fn,
    apply_rope,
    host_array,
    inv_freq,
    vision_rotary,
)
from tempo_jax.models.qwen3_vl import positions as pos_lib
from tempo_jax.models.qwen3_vl.config import ModelConfig, TextConfig, VisionConfig
from tempo_jax.models.qwen3_vl.vision_meta import vision_metadata
from tempo_jax.models.stack import make_stack, run_stack
from tempo_jax.models.vision import PatchEmbed, VisionBlock
from tempo_jax.sharding import constrain

Side = dict[str, jax.Array] | None  # the decoder's input besides the embeddings (DeepStack)


# --------------------------------------------------------------------------- vision tower
class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs):
        kw = dict(bias=True, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"),
                                 **kw)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"),
                                 **kw)
        self.act = cfg.hidden_act

    def __call__(self, x, dtype):
        return self.linear_fc2(act_fn(self.act)(self.linear_fc1(x, dtype)), dtype)


class PatchMerger(nnx.Module):
    """2x2 merge -> MLP to the decoder width. The final merger normalises each patch before
    the shuffle; the DeepStack mergers (`postshuffle`) normalise the merged vector."""

    def __init__(self, cfg: VisionConfig, *, postshuffle: bool, param_dtype, rngs):
        ctx = cfg.hidden_size * cfg.merge_unit
        self.hidden, self.postshuffle = ctx, postshuffle
        self.norm = LayerNorm(ctx if postshuffle else cfg.hidden_size, eps=1e-6,
                              param_dtype=param_dtype)
        kw = dict(bias=True, param_dtype=param_dtype, rngs=rngs)
        self.linear_fc1 = Linear(ctx, ctx, axes=("embed", "mlp"), **kw)
        self.linear_fc2 = Linear(ctx, cfg.out_hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x, dtype):
        if self.postshuffle:
            x = self.norm(x.reshape(-1, self.hidden))
        else:
            x = self.norm(x).reshape(-1, self.hidden)
        return self.linear_fc2(jax.nn.gelu(self.linear_fc1(x, dtype), approximate=False), dtype)


class VisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, param_dtype, rngs, scan: bool = False):
        self.cfg = cfg
        self.scan = scan
        self.patch_embed = PatchEmbed(cfg, bias=True, param_dtype=param_dtype, rngs=rngs)
        self.pos_embed = Embed(cfg.num_position_embeddings, cfg.hidden_size,
                               param_dtype=param_dtype, rngs=rngs, axes=(None, "embed"))
        self.blocks = make_stack(
            [VisionBlock(cfg, norm=LayerNorm, mlp=VisionMLP, param_dtype=param_dtype,
                         rngs=rngs) for _ in range(cfg.depth)], scan)
        self.merger = PatchMerger(cfg, postshuffle=False, param_dtype=param_dtype, rngs=rngs)
        self.deepstack_merger_list = nnx.List(
            [PatchMerger(cfg, postshuffle=True, param_dtype=param_dtype, rngs=rngs)
             for _ in cfg.deepstack_visual_indexes]
        )

    def __call__(self, pixels, meta: dict, opts: RuntimeOptions):
        """pixels [N, patch_dim] -> (merged features [N / 4, out_hidden], DeepStack features
        [len(deepstack_visual_indexes), N / 4, out_hidden]), both in input order.
        `meta["patch_perm"]`, when present, gathers the patches into that order first (a
        multi-host batch: each host's pixels sit in its own block of the global array)."""
        x = self.patch_embed(pixels, opts.dtype)
        if "patch_perm" in meta:
            x = x[meta["patch_perm"]]
        table = self.pos_embed.embedding[...].astype(jnp.float32)
        pos = jnp.sum(table[meta["pos_index"]] * meta["pos_weight"][..., None], axis=1)
        x = x + pos.astype(x.dtype)
        cos, sin = vision_rotary(meta["rot_pos"], self.cfg.rope_theta, self.cfg.head_dim)
        # DeepStack taps the hidden states after these layers: unrolled, a list; scanned, a
        # carried [n_deep, N, D] buffer the tap layers write their slot of (the mergers run
        # after the stack, on the same states)
        slot = np.full(self.cfg.depth, -1, np.int32)
        slot[list(self.cfg.deepstack_visual_indexes)] = np.arange(
            len(self.cfg.deepstack_visual_indexes))
        x = constrain(x, PATCHES)  # each device runs the tower on its share of the patches

        def block(blk, carry, i):
            h, taps = carry
            h = constrain(blk(h, cos, sin, meta["full_index"], meta["full_valid"],
                              meta["full_slot"], opts), PATCHES)
            if isinstance(i, int):
                if slot[i] >= 0:
                    taps = list(taps)
                    taps[slot[i]] = h
            elif taps.shape[0]:
                j = jnp.asarray(slot)[i]
                taps = jax.lax.cond(j >= 0, lambda t: t.at[j].set(h), lambda t: t, taps)
            return h, taps

        n_deep = len(self.cfg.deepstack_visual_indexes)
        taps = (constrain(jnp.zeros((n_deep, *x.shape), x.dtype), (None, *PATCHES))
                if self.scan else [None] * n_deep)
        x, taps = run_stack(self.blocks, block, (x, taps), self.scan)
        deep = [m(taps[j], opts.dtype) for j, m in enumerate(self.deepstack_merger_list)]
        merged = self.merger(x, opts.dtype)
        deep = jnp.stack(deep) if deep else jnp.zeros((0, *merged.shape), merged.dtype)
        return merged, deep


# --------------------------------------------------------------------------- text decoder
def mrope_axes(cfg: TextConfig) -> np.ndarray:
    """Which position axis (0 temporal, 1 height, 2 width) each rotary frequency reads, the
    interleaved layout of transformers' `recomposition_frequencies`: frequency j reads height
    for j = 1, 4, 7, ... < 3 * section[1], width for j = 2, 5, 8, ... < 3 * section[2], and
    temporal otherwise. (Qwen3-VL always interleaves; transformers ignores the config's
    `mrope_interleaved` flag, and so do we.)"""
    axes = np.zeros(cfg.head_dim // 2, np.int32)
    axes[1:3 * cfg.mrope_section[1]:3] = 1
    axes[2:3 * cfg.mrope_section[2]:3] = 2
    return axes


class TextAttention(CachedDecode, nnx.Module):
    def __init__(self, cfg: TextConfig, *, param_dtype, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, hd)
        kw = dict(bias=cfg.attention_bias, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, self.num_heads * hd, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(self.num_heads * hd, d, axes=("heads", "embed"), **kw)
        self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def project(self, x, cos, sin, opts: RuntimeOptions):
        """q [B, L, H, D] and k, v [B, L, Hkv, D]: per-head RMSNorm on q and k, then M-RoPE."""
        b, seq = x.shape[:2]
        q = self.q_norm(self.q_proj(x, opts.dtype).reshape(b, seq, self.num_heads, self.head_dim))
        k = self.k_norm(
            self.k_proj(x, opts.dtype).reshape(b, seq, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x, opts.dtype).reshape(b, seq, self.num_kv_heads, self.head_dim)
        q = apply_rope(q, cos[:, :, None], sin[:, :, None])
        k = apply_rope(k, cos[:, :, None], sin[:, :, None])
        return q, k, v

    def __call__(self, x, cos, sin, valid, opts: RuntimeOptions):
        """Causal self-attention (`valid` [B, L]: key padding); also returns (k, v)."""
        b, seq = x.shape[:2]
        q, k, v = self.project(x, cos, sin, opts)
        out = attention(
            q, k, v, scale=self.head_dim**-0.5, backend=opts.attention_backend, kv_valid=valid,
            causal=True, splash_interpret=opts.splash_interpret,
        )
        return self.o_proj(out.reshape(b, seq, -1), opts.dtype), (k, v)


def deepstack_add(x, visual_index, feature):
    """Add DeepStack feature rows [N, D] at the visual positions (`visual_index` [B, L]: the
    row of each position, -1 where the token is not visual), as `_deepstack_process`."""
    picked = feature.astype(x.dtype)[jnp.maximum(visual_index, 0)]
    return x + jnp.where((visual_index >= 0)[..., None], picked, jnp.zeros((), x.dtype))


class TextModel(Decoder):
    """The Qwen3 decoder (`models.decoder.Decoder`) with interleaved M-RoPE and DeepStack:
    `side` (from `Qwen3VL.embed_for_decoder`) adds DeepStack feature k at the visual
    positions after layer k; None: text only."""

    attention_cls = TextAttention

    def mrope(self, position_ids):
        """cos/sin [B, L, head_dim] from [3, B, L] positions (interleaved M-RoPE)."""
        inv = jnp.asarray(inv_freq(self.cfg.rope_theta, self.cfg.head_dim))
        pos = jnp.moveaxis(position_ids[mrope_axes(self.cfg)], 0, -1)  # [B, L, hd/2]
        f = pos.astype(jnp.float32) * inv
        emb = jnp.concatenate([f, f], axis=-1)
        return jnp.cos(emb), jnp.sin(emb)

    def inject(self, x, i, side: Side):
        """DeepStack: feature i added after layer i < n_deep. Under scan the features stay a
        closure of the scanned body and `lax.cond` picks the layers that take one (feeding
        them as a scanned input padded with zeros to num_layers rows would hold
        num_layers / n_deep times their memory)."""
        if side is None:
            return x
        deep, where = side["deepstack"], side["visual_index"]
        n_deep = deep.shape[0]
        if isinstance(i, int):
            return deepstack_add(x, where, deep[i]) if i < n_deep else x
        k = jnp.minimum(i, n_deep - 1)
        return jax.lax.cond(i < n_deep, lambda h: deepstack_add(h, where, deep[k]),
                            lambda h: h, x)


# --------------------------------------------------------------------------- full model
class Qwen3VL(VisionLanguageModel):
    """Qwen3VLForConditionalGeneration (dense): `models.decoder.VisionLanguageModel` with this
    family's vision tower, decoder and input preparation."""

    vision_cls = VisionTower
    text_cls = TextModel

    # ---- pure device functions (jit / grad these)
    def embed_for_decoder(self, inputs: dict) -> tuple[jax.Array, Side]:
        """Token embeddings [B, L, D] with the merged vision features scattered at the
        image/video pad tokens, and the decoder's side input: None for text only, else
        `{"visual_index": int32 [B, L] (feature row, -1 off vision tokens), "deepstack":
        [n_deep, N, D]}` (image features first, then video, in token order)."""
        cfg, opts = self.config, self.options
        ids = inputs["input_ids"]
        x = self.model.embed_tokens(ids).astype(opts.dtype)
        if "pixel_values" not in inputs:
            return x, None
        feats, deep = self.visual(inputs["pixel_values"], inputs["vision_meta"], opts)
        flat = ids.reshape(-1)
        is_img = flat == cfg.image_token_id
        is_vid = flat == cfg.video_token_id
        idx = jnp.where(
            is_img, jnp.cumsum(is_img) - 1,
            jnp.where(is_vid, inputs["num_image_features"] + jnp.cumsum(is_vid) - 1, -1),
        ).astype(jnp.int32)
        picked = feats.astype(opts.dtype)[jnp.clip(idx, 0, feats.shape[0] - 1)]
        x = jnp.where((idx >= 0)[:, None], picked, x.reshape(flat.shape[0], -1))
        side = {"visual_index": idx.reshape(ids.shape), "deepstack": deep.astype(opts.dtype)}
        return x.reshape(*ids.shape, -1), side

    def embed(self, inputs: dict):
        """Token embeddings of text-only inputs. With vision inputs the decoder also needs
        DeepStack's features: `embed_for_decoder` gives both, and this refuses (Qwen2.5-VL's
        `model.model(model.embed(inputs))` pattern would silently drop them)."""
        if "pixel_values" in inputs:
            raise ValueError("Qwen3VL.embed: inputs with vision need DeepStack's features too; "
                             "use x, side = model.embed_for_decoder(inputs) and "
                             "model.model(x, ..., side=side)")
        return self.embed_for_decoder(inputs)[0]

    def extend_side(self, side: Side, n_new: int) -> Side:
        return extend_side(side, n_new)


def extend_side(side: Side, n_new: int) -> Side:
    """The side input after `n_new` appended positions (completions: never visual)."""
    if side is None:
        return None
    vi = jnp.pad(side["visual_index"], ((0, 0), (0, n_new)), constant_values=-1)
    return {**side, "visual_index": vi}


def _np(x):
    return host_array(x, "Qwen3VL.__call__")


def _vision_positions(config: ModelConfig, ids, mask, img_grid, vid_grid, seconds
                      ) -> np.ndarray:
    del seconds  # Qwen3-VL's positions step by frame, not by time
    pos, _ = pos_lib.rope_index(
        ids, mask, img_grid, vid_grid,
        spatial_merge_size=config.vision.spatial_merge_size,
        image_token_id=config.image_token_id,
        video_token_id=config.video_token_id,
        vision_start_token_id=config.vision_start_token_id,
    )
    return np.asarray(pos)


# Host side of a forward pass (`models.inputs.prepare_inputs`); `second_per_grid_ts` is
# ignored (kept so both families share one signature); vision rows' positions are
# `positions.rope_index`'s.
prepare_inputs = functools.partial(
    inputs_lib.prepare_inputs, vision_positions=_vision_positions,
    vision_metadata=vision_metadata, host=_np)
