"""tempo_jax: Tempo-R0 temporal video grounding on a Qwen2.5-VL backbone in JAX/Flax NNX."""

from tempo_jax.models.qwen2_5_vl import (
    ModelConfig,
    Qwen25VL,
    RuntimeOptions,
    load_pretrained,
    prepare_inputs,
    save_pretrained,
)

__all__ = [
    "ModelConfig", "Qwen25VL", "RuntimeOptions", "load_pretrained", "prepare_inputs",
    "save_pretrained",
]
__version__ = "0.1.0"
