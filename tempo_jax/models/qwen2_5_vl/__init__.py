"""Qwen2.5-VL backbone (vision tower + Qwen2 decoder with M-RoPE) in Flax NNX."""

from tempo_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, VisionConfig, preset
from tempo_jax.models.qwen2_5_vl.model import Qwen25VL, RuntimeOptions, prepare_inputs
from tempo_jax.models.qwen2_5_vl.params import load_pretrained, save_pretrained

__all__ = [
    "ModelConfig", "TextConfig", "VisionConfig", "preset", "Qwen25VL", "RuntimeOptions",
    "prepare_inputs", "load_pretrained", "save_pretrained",
]
