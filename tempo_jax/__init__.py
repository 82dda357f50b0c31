"""tempo_jax: Tempo-R0 temporal video grounding in JAX/Flax NNX, on a Qwen2.5-VL backbone (the
default) or a Qwen3-VL one (`tempo_jax.models.families`)."""

from tempo_jax.models.families import load_pretrained, prepare_inputs, save_pretrained
from tempo_jax.models.qwen2_5_vl import ModelConfig, Qwen25VL, RuntimeOptions
from tempo_jax.models.qwen3_vl import Qwen3VL

__all__ = [
    "ModelConfig", "Qwen25VL", "Qwen3VL", "RuntimeOptions", "load_pretrained",
    "prepare_inputs", "save_pretrained",
]
__version__ = "0.1.0"
