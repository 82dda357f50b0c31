"""The text decoder both families share: token embedding, the stack of decoder layers, the
final norm, the prefill that fills a KV cache and the cached decoding step.

A family subclasses `Decoder` with what differs: its text attention class (`attention_cls`:
Qwen3's has q/k norms), its M-RoPE layout (`mrope`) and, for Qwen3-VL, DeepStack's side
input (`inject`). Everything else is written once here.

`scan=True` stores the layers stacked and runs them with `jax.lax.scan` (`models.stack`):
XLA compiles one layer instead of `num_layers` copies. The rematerialisation policy wraps
the scanned body.

The KV cache has one layout in both modes: `(K, V)`, each `[num_layers, B, S, Hkv, D]`; a
decoding step writes the new token's slot of layer i in place (inside the scan's carry),
never copying a layer's cache.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tempo_jax.models.layers import (
    RESIDUAL,
    DecoderLayer,
    Embed,
    RMSNorm,
    RuntimeOptions,
    remat_layer,
)
from tempo_jax.models.stack import make_stack, scan_layers
from tempo_jax.sharding import constrain

KVCache = tuple[jax.Array, jax.Array]  # (K, V), each [num_layers, B, S, Hkv, D]


class Decoder(nnx.Module):
    """Embedding, decoder layers (unrolled or scanned), final norm. Subclasses set
    `attention_cls` and `mrope`, and `inject` when the family has a side input."""

    attention_cls: type

    def __init__(self, cfg: Any, *, param_dtype, rngs, scan: bool = False):
        self.cfg = cfg
        self.scan = scan
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype,
                                  rngs=rngs)
        layers = [DecoderLayer(cfg, self.attention_cls, param_dtype=param_dtype, rngs=rngs)
                  for _ in range(cfg.num_hidden_layers)]
        self.layers = make_stack(layers, scan)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    # ---- what a family supplies
    def mrope(self, position_ids) -> tuple[jax.Array, jax.Array]:
        """cos, sin [B, L, head_dim] of [3, B, L] positions."""
        raise NotImplementedError

    def inject(self, x, i, side):
        """The residual stream after layer `i` (an int, or traced under scan) given the side
        input `side`; no side input by default."""
        if side is not None:
            raise ValueError(f"{type(self).__name__} takes no side inputs (side must be None)")
        return x

    # ---- the stack
    def __call__(self, x, position_ids, attention_mask, opts: RuntimeOptions,
                 return_kv: bool = False, side: Any = None):
        """Final-norm hidden states; with `return_kv`, also the KV cache `(K, V)` of the
        sequence, each [num_layers, B, L, Hkv, D] (a prefill). `attention_mask` None: no key
        is padding (or padding only trails each row). `side`: the family's decoder side
        input (`embed_for_decoder`), None for text only."""
        cos, sin = self.mrope(position_ids)
        valid = None if attention_mask is None else attention_mask.astype(bool)

        def one(layer, h, i):
            h, kv = layer(h, cos, sin, valid, opts)
            return constrain(self.inject(h, i, side), RESIDUAL), (kv if return_kv else None)

        x = constrain(x, RESIDUAL)
        if self.scan:
            x, kvs = scan_layers(self.layers, one, x, opts.remat, with_outputs=return_kv)
        else:
            outs = []
            for i, layer in enumerate(self.layers):
                x, kv = remat_layer(lambda lyr, h, i=i: one(lyr, h, i), opts.remat)(layer, x)
                outs.append(kv)
            kvs = (jnp.stack([k for k, _ in outs]), jnp.stack([v for _, v in outs])) \
                if return_kv else None
        x = self.norm(x)
        return (x, kvs) if return_kv else x

    def decode(self, x, position_ids, caches: KVCache, index, kv_mask, opts: RuntimeOptions):
        """New tokens x [B, T, D] at `position_ids` [3, B, T], written at cache slot `index`,
        attending over `caches` (`kv_mask` [B, T, S]: the slots each may read). Returns the
        final-norm hidden states and the updated caches."""
        cos, sin = self.mrope(position_ids)

        def one(layer, carry, i):
            h, ck, cv = carry
            h, ck, cv = layer.decode(h, cos, sin, ck, cv, i, index, kv_mask, opts)
            return (constrain(h, RESIDUAL), ck, cv), None

        carry = (x, *caches)
        if self.scan:
            carry, _ = scan_layers(self.layers, one, carry, "none", with_outputs=False)
        else:
            for i, layer in enumerate(self.layers):
                carry, _ = one(layer, carry, i)
        x, ck, cv = carry
        return self.norm(x), (ck, cv)




class VisionLanguageModel(nnx.Module):
    """What both families' `...ForConditionalGeneration` share around the decoder: the
    construction (vision tower, decoder, LM head or tied embeddings), hidden states, the
    LM head in fp32, `forward` (logits where asked) and the transformers-style `__call__`.

    A family sets `vision_cls` and `text_cls` and defines `embed_for_decoder(inputs) ->
    (x, side)` and `extend_side`; its `prepare_inputs` is found by `families`."""

    vision_cls: type
    text_cls: type

    def __init__(self, config: Any, *, param_dtype=jnp.float32,
                 options: RuntimeOptions | None = None, rngs: Any = None):
        from tempo_jax.models.attention import check_backend
        from tempo_jax.models.layers import Linear, check_remat

        rngs = rngs or nnx.Rngs(0)
        self.config = config
        self.options = options or RuntimeOptions(dtype=param_dtype)
        check_backend(self.options.attention_backend)
        check_remat(self.options.remat)
        self.visual = self.vision_cls(config.vision, param_dtype=param_dtype, rngs=rngs,
                                      scan=self.options.scan_layers)
        self.model = self.text_cls(config.text, param_dtype=param_dtype, rngs=rngs,
                                   scan=self.options.scan_layers)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.text.hidden_size, config.text.vocab_size, bias=False,
                                  axes=("embed", "vocab"), param_dtype=param_dtype, rngs=rngs)
        else:
            self.lm_head = None

    # ---- pure device functions (jit / grad these)
    def hidden_states(self, inputs: dict):
        """Final-norm hidden states [B, L, D]."""
        x, side = self.embed_for_decoder(inputs)
        return self.model(x, inputs["position_ids"], inputs["attention_mask"], self.options,
                          side=side)

    def logits_from_hidden(self, h):
        """LM head in fp32 output (loss and sampling read these)."""
        from tempo_jax.models.layers import LOGITS, dot_2d

        dt = self.options.dtype
        if self.lm_head is None:
            w = self.model.embed_tokens.embedding[...].astype(dt).T
        else:
            w = self.lm_head.kernel[...].astype(dt)
        out = dot_2d(h.astype(dt), w, preferred_element_type=jnp.float32)
        return constrain(out, LOGITS) if out.ndim == 3 else out

    def forward(self, inputs: dict, logits_positions=None):
        """Logits [B, L, V] (fp32), or [B, K, V] at `logits_positions` [B, K] only (the LM head
        over a 150k vocabulary is the largest cost of a step; compute it where needed)."""
        h = self.hidden_states(inputs)
        if logits_positions is not None:
            h = jnp.take_along_axis(h, logits_positions[..., None], axis=1)
        return self.logits_from_hidden(h)

    # ---- transformers-style entry point
    def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 position_ids=None) -> jax.Array:
        """Logits [B, L, vocab] like the transformers model's `(...).logits`, with its
        argument names (Qwen3-VL ignores `second_per_grid_ts`: its time is in timestamp
        text). Host-side preparation (positions, vision metadata) needs concrete arrays:
        inside your own `jax.jit`, call `prepare_inputs` outside and `forward` inside."""
        from tempo_jax.models import families  # the family modules import this one

        inputs = families.prepare_inputs(
            self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
            pixel_values_videos, video_grid_thw, second_per_grid_ts, position_ids)
        return _jit_forward(self, inputs)


@nnx.jit
def _jit_forward(model: VisionLanguageModel, inputs: dict):
    return model.forward(inputs)
