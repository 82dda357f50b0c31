"""Hugging Face checkpoint <-> NNX state: one mapping table serves import and export.

Import accepts the released key layout (`model.layers.*`, `visual.*`, `lm_head`) and the one
newer tools write (`model.language_model.*`, `model.visual.*`); export always writes the
released layout, which every transformers version loads.
"""

from __future__ import annotations

from tempo_jax.models import hf_io
from tempo_jax.models.qwen2_5_vl.config import ModelConfig
from tempo_jax.models.qwen2_5_vl.model import Qwen25VL

# checkpoint keys that carry no weights we use
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def normalize_key(key: str) -> str:
    """Map the newer nested key layout onto the released one."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model."):]
    if key.startswith("model.visual."):
        return key[len("model."):]
    return key


def hf_key(path: tuple) -> str:
    """NNX state path -> released HF key, e.g. ('model', 'layers', 0, 'self_attn', 'q_proj',
    'kernel') -> 'model.layers.0.self_attn.q_proj.weight'."""
    parts = [str(p) for p in path]
    parts = ["mlp.0" if p == "mlp_0" else "mlp.2" if p == "mlp_2" else p for p in parts]
    if parts[-1] in ("kernel", "embedding"):
        parts[-1] = "weight"
    return ".".join(parts)


_IO = hf_io.FamilyIO(Qwen25VL, ModelConfig, hf_key, "Qwen2.5-VL",
                    normalize_key=normalize_key, ignored_suffixes=_IGNORED_SUFFIXES)
abstract_model = _IO.abstract_model
load_pretrained = _IO.load_pretrained
save_pretrained = _IO.save_pretrained
to_hf = hf_io.kernel_to_hf
from_hf = hf_io.kernel_from_hf
