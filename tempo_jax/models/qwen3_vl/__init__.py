"""Qwen3-VL backbone (dense: vision tower with DeepStack + Qwen3 decoder with interleaved
M-RoPE) in Flax NNX, beside `tempo_jax.models.qwen2_5_vl` and sharing its interface."""

from tempo_jax.models.qwen3_vl.config import ModelConfig, TextConfig, VisionConfig, preset
from tempo_jax.models.qwen3_vl.model import Qwen3VL, RuntimeOptions, extend_side, prepare_inputs
from tempo_jax.models.qwen3_vl.params import load_pretrained, save_pretrained

__all__ = [
    "ModelConfig", "TextConfig", "VisionConfig", "preset", "Qwen3VL", "RuntimeOptions",
    "extend_side", "prepare_inputs", "load_pretrained", "save_pretrained",
]
