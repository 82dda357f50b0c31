"""Hugging Face checkpoint <-> NNX state: one mapping table serves import and export.

Import accepts the released key layout (`model.layers.*`, `visual.*`, `lm_head`) and the one
newer tools write (`model.language_model.*`, `model.visual.*`); export always writes the
released layout, which every transformers version loads.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tempo_jax import sharding as shd
from tempo_jax.models import hf_io
from tempo_jax.models.qwen2_5_vl.config import ModelConfig
from tempo_jax.models.qwen2_5_vl.model import Qwen25VL, RuntimeOptions

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


def to_hf(path: tuple, value: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Our layout -> HF tensor layout (Linear kernels are [in, out] here, [out, in] there)."""
    if path[-1] != "kernel":
        return value
    if path[:2] == ("visual", "patch_embed"):
        v = config.vision
        return value.T.reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
        )
    return value.T


def from_hf(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if path[:2] == ("visual", "patch_embed"):
        return value.reshape(value.shape[0], -1).T
    return value.T


def abstract_model(
    config: ModelConfig, dtype=jnp.bfloat16, options: RuntimeOptions | None = None
) -> Qwen25VL:
    """The model's structure with shapes only (nothing allocated)."""
    return hf_io.abstract_model(Qwen25VL, config, dtype, options)


def load_pretrained(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    mesh: Mesh | None = None,
    *,
    rules: shd.Rules = shd.DEFAULT_RULES,
    options: RuntimeOptions | None = None,
) -> Qwen25VL:
    """Load a Hugging Face Qwen2.5-VL checkpoint directory.

    Tensors are read one at a time (no file mapping kept), converted to `dtype`, and placed
    on their sharding when `mesh` is given, so peak host memory stays near one model copy.
    """
    return hf_io.load_family_checkpoint(
        Qwen25VL, ModelConfig.from_pretrained(path), path, hf_key=hf_key, from_hf=from_hf,
        to_hf=to_hf, dtype=dtype, mesh=mesh, rules=rules, options=options,
        what="the Qwen2.5-VL config", normalize_key=normalize_key,
        ignored_suffixes=_IGNORED_SUFFIXES)


def save_pretrained(
    model: Qwen25VL, path: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30
) -> list[str]:
    """Write `config.json` (released flat layout) and sharded safetensors with an index that
    `transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained` loads."""
    return hf_io.save_family_checkpoint(model, path, hf_key=hf_key, to_hf=to_hf,
                                        max_shard_bytes=max_shard_bytes)
