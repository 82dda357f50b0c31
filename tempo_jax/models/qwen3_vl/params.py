"""Hugging Face Qwen3-VL checkpoint <-> NNX state: one mapping table serves import and export.

The released checkpoints and transformers 5.x use one key layout: `model.language_model.*`
(our `model.*`), `model.visual.*` (our `visual.*`) and `lm_head.weight` (absent when tied).
Reading, checking, placing and writing are `tempo_jax.models.hf_io`'s.
"""

from __future__ import annotations

from tempo_jax.models import hf_io
from tempo_jax.models.qwen3_vl.config import ModelConfig
from tempo_jax.models.qwen3_vl.model import Qwen3VL

# checkpoint keys that carry no weights we use
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PREFIX = {"model": "model.language_model", "visual": "model.visual"}


def hf_key(path: tuple) -> str:
    """NNX state path -> HF key, e.g. ('model', 'layers', 0, 'self_attn', 'q_norm', 'weight')
    -> 'model.language_model.layers.0.self_attn.q_norm.weight'."""
    parts = [str(p) for p in path]
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    if parts[0] in _PREFIX:
        parts[0] = _PREFIX[parts[0]]
    return ".".join(parts)


_IO = hf_io.FamilyIO(Qwen3VL, ModelConfig, hf_key, "Qwen3-VL",
                    ignored_suffixes=_IGNORED_SUFFIXES)
abstract_model = _IO.abstract_model
load_pretrained = _IO.load_pretrained
save_pretrained = _IO.save_pretrained
to_hf = hf_io.kernel_to_hf
from_hf = hf_io.kernel_from_hf
