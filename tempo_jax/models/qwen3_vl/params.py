"""Hugging Face Qwen3-VL checkpoint <-> NNX state: one mapping table serves import and export.

The released checkpoints and transformers 5.x use one key layout: `model.language_model.*`
(our `model.*`), `model.visual.*` (our `visual.*`) and `lm_head.weight` (absent when tied).
Reading, checking, placing and writing are `tempo_jax.models.hf_io`'s.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from tempo_jax import sharding as shd
from tempo_jax.models import hf_io
from tempo_jax.models.qwen3_vl.config import ModelConfig
from tempo_jax.models.qwen3_vl.model import Qwen3VL, RuntimeOptions

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


def _is_patch_kernel(path: tuple) -> bool:
    return path[:2] == ("visual", "patch_embed") and path[-1] == "kernel"


def to_hf(path: tuple, value: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Our layout -> HF tensor layout (Linear kernels are [in, out] here, [out, in] there; the
    patch embedding is a Conv3d [out, C, T, P, P])."""
    if path[-1] != "kernel":
        return value
    if _is_patch_kernel(path):
        v = config.vision
        return value.T.reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size
        )
    return value.T


def from_hf(path: tuple, value: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return value
    if _is_patch_kernel(path):
        return value.reshape(value.shape[0], -1).T
    return value.T


def abstract_model(
    config: ModelConfig, dtype=jnp.bfloat16, options: RuntimeOptions | None = None
) -> Qwen3VL:
    """The model's structure with shapes only (nothing allocated)."""
    return hf_io.abstract_model(Qwen3VL, config, dtype, options)


def load_pretrained(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    mesh: Mesh | None = None,
    *,
    rules: shd.Rules = shd.DEFAULT_RULES,
    options: RuntimeOptions | None = None,
) -> Qwen3VL:
    """Load a Hugging Face Qwen3-VL (dense) checkpoint directory, tensor by tensor, each
    placed on its sharding when `mesh` is given."""
    return hf_io.load_family_checkpoint(
        Qwen3VL, ModelConfig.from_pretrained(path), path, hf_key=hf_key, from_hf=from_hf,
        to_hf=to_hf, dtype=dtype, mesh=mesh, rules=rules, options=options,
        what="the Qwen3-VL config", ignored_suffixes=_IGNORED_SUFFIXES)


def save_pretrained(
    model: Qwen3VL, path: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30
) -> list[str]:
    """Write `config.json` (released layout) and sharded safetensors with an index that
    `transformers.Qwen3VLForConditionalGeneration.from_pretrained` loads."""
    return hf_io.save_family_checkpoint(model, path, hf_key=hf_key, to_hf=to_hf,
                                        max_shard_bytes=max_shard_bytes)
