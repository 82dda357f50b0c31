"""Hugging Face checkpoint <-> NNX state: one mapping table serves import and export.

Import accepts the released key layout (`model.layers.*`, `visual.*`, `lm_head`) and the one
newer tools write (`model.language_model.*`, `model.visual.*`); export always writes the
released layout, which every transformers version loads.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from tempo_jax import sharding as shd
from tempo_jax.models.qwen2_5_vl.config import ModelConfig
from tempo_jax.models.qwen2_5_vl.model import Qwen25VL, RuntimeOptions
from tempo_jax.safetensors_io import CheckpointReader, write_sharded

log = logging.getLogger(__name__)

# checkpoint keys that carry no weights we use
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_NP_DTYPES = {
    jnp.dtype(jnp.bfloat16): np.dtype(ml_dtypes.bfloat16),
    jnp.dtype(jnp.float32): np.dtype(np.float32),
    jnp.dtype(jnp.float16): np.dtype(np.float16),
}
_TORCH_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}


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


def _expected_hf_shape(path: tuple, shape: tuple, config: ModelConfig) -> tuple:
    return to_hf(path, np.empty(shape, dtype=np.uint8), config).shape


def abstract_model(
    config: ModelConfig, dtype=jnp.bfloat16, options: RuntimeOptions | None = None
) -> Qwen25VL:
    """The model's structure with shapes only (nothing allocated)."""
    opts = options or RuntimeOptions(dtype=dtype)
    return nnx.eval_shape(lambda: Qwen25VL(config, param_dtype=dtype, options=opts))


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
    path = epath.Path(path)
    config = ModelConfig.from_pretrained(path)
    model = abstract_model(config, dtype, options)
    reader = CheckpointReader(path)
    by_ours = {}
    for key in reader.keys():
        norm = normalize_key(key)
        if norm in by_ours:
            raise ValueError(f"{path}: tensor {norm} appears twice (as {by_ours[norm]} and {key})")
        by_ours[norm] = key

    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    missing, mis_shaped, loaded = [], [], []
    for p, var in flat:
        key = hf_key(p)
        expect = _expected_hf_shape(p, var.get_value().shape, config)
        if key not in by_ours:
            missing.append(key)
            continue
        ckpt_key = by_ours.pop(key)
        got = tuple(reader.shape(ckpt_key))
        if got != tuple(expect):
            mis_shaped.append(f"{ckpt_key}: checkpoint {got}, model expects {tuple(expect)}")
            continue
        loaded.append((p, var, ckpt_key))
    tied_head = config.tie_word_embeddings and "lm_head.weight"
    unexpected = [
        k for n, k in by_ours.items() if not n.endswith(_IGNORED_SUFFIXES) and n != tied_head
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"{path}: checkpoint does not match the Qwen2.5-VL config"]
        for name, items in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", mis_shaped)):
            if items:
                lines.append(f"  {len(items)} {name}: " + ", ".join(sorted(items)[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))

    np_dtype = _NP_DTYPES[jnp.dtype(dtype)]
    new_vars = []
    for p, var, ckpt_key in loaded:
        arr = from_hf(p, reader.read(ckpt_key))
        if arr.dtype != np_dtype:
            arr = arr.astype(np_dtype)
        arr = np.ascontiguousarray(arr)
        axes = var.get_metadata().get("axes")
        if mesh is not None:
            sharding = shd.named_sharding(mesh, axes, arr.shape, rules)
            value = jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx])
        else:
            value = jax.device_put(arr)
        del arr
        new_vars.append((p, var.replace(value=value)))
    state = nnx.from_flat_state(new_vars)
    return nnx.merge(graphdef, state)


def hf_tensors(model: Qwen25VL) -> Iterator[tuple[str, np.ndarray]]:
    """(released HF key, numpy tensor) for every parameter, one at a time."""
    config = model.config
    for p, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
            # sharded over several hosts: gather this one tensor (a collective: every process
            # iterates), so no host ever holds more than one full tensor of the model
            from jax.experimental import multihost_utils

            value = multihost_utils.process_allgather(value, tiled=True)
        value = np.asarray(jax.device_get(value))
        yield hf_key(p), np.ascontiguousarray(to_hf(p, value, config))


def save_pretrained(
    model: Qwen25VL, path: str | os.PathLike, *, max_shard_bytes: int = 4 * 2**30
) -> list[str]:
    """Write `config.json` (released flat layout) and sharded safetensors with an index that
    `transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained` loads."""
    path = epath.Path(path)
    if jax.process_index() != 0:  # several hosts: take part in the per-tensor gathers only
        for _ in hf_tensors(model):
            pass
        return []
    path.mkdir(parents=True, exist_ok=True)
    first = next(iter(nnx.to_flat_state(nnx.state(model, nnx.Param))))[1].get_value()
    dtype_name = _TORCH_DTYPE_NAMES.get(jnp.dtype(first.dtype).name, "float32")
    cfg = model.config.to_hf_dict(torch_dtype=dtype_name)
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    files = write_sharded(path, hf_tensors(model), max_shard_bytes=max_shard_bytes)
    log.info("saved %d safetensors file(s) to %s", len(files), path)
    return files
