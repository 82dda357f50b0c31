"""Hugging Face checkpoint I/O shared by the model families: streamed, checked loading into an
abstract NNX model, and sharded export.

A family supplies only its mapping (NNX path -> HF key, layout conversions both ways); the
reading, the one error that lists every missing / unexpected / mis-shaped tensor, the
placement of each tensor on its sharding, the per-tensor multi-host gathers and the sharded
writing are the same for every family and live here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from tempo_jax import sharding as shd
from tempo_jax.models.stack import is_stacked, unstacked_path
from tempo_jax.safetensors_io import CheckpointReader, write_sharded

log = logging.getLogger(__name__)

NP_DTYPES = {
    jnp.dtype(jnp.bfloat16): np.dtype(ml_dtypes.bfloat16),
    jnp.dtype(jnp.float32): np.dtype(np.float32),
    jnp.dtype(jnp.float16): np.dtype(np.float16),
}
TORCH_DTYPE_NAMES = {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}

Path = tuple  # an NNX state path, e.g. ('model', 'layers', 0, 'self_attn', 'q_proj', 'kernel')


def read_config_json(path: str | os.PathLike) -> dict[str, Any]:
    """The `config.json` of a checkpoint directory, with errors that name the file."""
    f = epath.Path(path) / "config.json"
    if not f.exists():
        raise FileNotFoundError(f"{f}: no config.json in the checkpoint directory")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e


def load_into(
    model: nnx.Module,
    path: str | os.PathLike,
    *,
    hf_key: Callable[[Path], str],
    from_hf: Callable[[Path, np.ndarray], np.ndarray],
    hf_shape: Callable[[Path, tuple], tuple],
    dtype: Any,
    mesh: Mesh | None = None,
    rules: shd.Rules = shd.DEFAULT_RULES,
    normalize_key: Callable[[str], str] = lambda k: k,
    ignored_suffixes: tuple[str, ...] = (),
    optional_keys: Collection[str] = (),
    what: str = "the model config",
) -> nnx.Module:
    """Fill the abstract `model` (from `nnx.eval_shape`) with the checkpoint at `path`.

    Tensors are read one at a time (no file mapping kept), converted to `dtype`, and placed on
    their sharding when `mesh` is given, so peak host memory stays near one model copy.
    Checkpoint keys pass through `normalize_key` before matching `hf_key(path)`; keys ending in
    `ignored_suffixes` or listed in `optional_keys` (e.g. a tied LM head) may be present unused.
    A mismatch raises one ValueError listing the missing, unexpected and mis-shaped tensors.
    """
    path = epath.Path(path)
    reader = CheckpointReader(path)
    by_ours: dict[str, str] = {}
    for key in reader.keys():
        norm = normalize_key(key)
        if norm in by_ours:
            raise ValueError(f"{path}: tensor {norm} appears twice (as {by_ours[norm]} and {key})")
        by_ours[norm] = key

    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    missing, mis_shaped, loaded = [], [], []
    for p, var in flat:
        shape = var.get_value().shape
        parts, each = _hf_parts(p, var.get_metadata().get("axes"), shape)
        keys = []
        for q in parts:
            key = hf_key(q)
            expect = tuple(hf_shape(q, each))
            if key not in by_ours:
                missing.append(key)
                continue
            ckpt_key = by_ours.pop(key)
            got = tuple(reader.shape(ckpt_key))
            if got != expect:
                mis_shaped.append(f"{ckpt_key}: checkpoint {got}, model expects {expect}")
                continue
            keys.append(ckpt_key)
        if len(keys) == len(parts):
            loaded.append((p, var, parts, keys))
    optional = set(optional_keys)
    unexpected = [
        k for n, k in by_ours.items()
        if not (ignored_suffixes and n.endswith(ignored_suffixes)) and n not in optional
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"{path}: checkpoint does not match {what}"]
        for name, items in (("missing", missing), ("unexpected", unexpected),
                            ("mis-shaped", mis_shaped)):
            if items:
                lines.append(f"  {len(items)} {name}: " + ", ".join(sorted(items)[:20])
                             + (" ..." if len(items) > 20 else ""))
        raise ValueError("\n".join(lines))

    np_dtype = NP_DTYPES[jnp.dtype(dtype)]
    new_vars = []
    for p, var, parts, keys in loaded:
        arrs = [from_hf(q, reader.read(k)).astype(np_dtype, copy=False)
                for q, k in zip(parts, keys, strict=True)]
        # a scanned model's stacked parameter: its layers' tensors stacked, one parameter at
        # a time (host memory: num_layers tensors of one kind)
        arr = np.ascontiguousarray(arrs[0] if parts == [p] else np.stack(arrs))
        del arrs
        axes = var.get_metadata().get("axes")
        if mesh is not None:
            sharding = shd.named_sharding(mesh, axes, arr.shape, rules)
            value = jax.make_array_from_callback(arr.shape, sharding, lambda idx, a=arr: a[idx])
        else:
            value = jax.device_put(arr)
        del arr
        new_vars.append((p, var.replace(value=value)))
    return nnx.merge(graphdef, nnx.from_flat_state(new_vars))


def host_params(model: nnx.Module) -> Iterator[tuple[Path, np.ndarray]]:
    """(NNX path, full numpy value) of every parameter, one at a time, in the unrolled layout
    (a scanned model's stacked parameter comes out as one tensor per layer).

    A parameter sharded over several hosts is gathered (a collective: every process must
    iterate), so no host ever holds more than one full tensor of the model besides its shards.
    """
    flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    i = 0
    while i < len(flat):
        p, var = flat[i]
        if not is_stacked(p, var.get_metadata().get("axes")):
            yield p, _on_host(var.get_value())
            i += 1
            continue
        # a scanned model's stacked parameters: layer by layer, each layer's tensors in the
        # order an unrolled model lists them (so both write the same safetensors bytes), one
        # layer's slice gathered at a time
        j = i
        while j < len(flat) and is_stacked(flat[j][0], flat[j][1].get_metadata().get("axes")):
            j += 1
        group = flat[i:j]
        for layer in range(group[0][1].get_value().shape[0]):
            for q, v in group:
                yield unstacked_path(q, layer), _on_host(v.get_value()[layer])
        i = j


def _on_host(value) -> np.ndarray:
    """A parameter's full value as numpy (gathered across hosts when sharded over several:
    a collective)."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def _hf_parts(path: Path, axes, shape: tuple) -> tuple[list[Path], tuple]:
    """The unrolled paths a parameter stands for, and each one's shape: itself, or for a
    stacked decoder parameter (`[num_layers, ...]`, scanned layers) one path per layer."""
    if is_stacked(path, axes):
        return [unstacked_path(path, i) for i in range(shape[0])], tuple(shape[1:])
    return [path], tuple(shape)


def param_dtype_name(model: nnx.Module) -> str:
    """The `torch_dtype` to record in `config.json`: the first parameter's dtype."""
    first = next(iter(nnx.to_flat_state(nnx.state(model, nnx.Param))))[1].get_value()
    return TORCH_DTYPE_NAMES.get(jnp.dtype(first.dtype).name, "float32")


def write_checkpoint(
    path: str | os.PathLike,
    hf_config: dict[str, Any],
    tensors: Iterator[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int = 4 * 2**30,
) -> list[str]:
    """Write `config.json` and sharded safetensors (with an index when there are several).

    Call it on every process: only process 0 writes; the others drain `tensors` so that they
    take part in its per-tensor gathers (`host_params`).
    """
    path = epath.Path(path)
    if jax.process_index() != 0:
        for _ in tensors:
            pass
        return []
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    files = write_sharded(path, tensors, max_shard_bytes=max_shard_bytes)
    log.info("saved %d safetensors file(s) to %s", len(files), path)
    return files


def abstract_model(model_cls: type, config: Any, dtype: Any, options: Any = None
                   ) -> nnx.Module:
    """A family's model with shapes only (nothing allocated), in the layout `options` asks
    for (stacked decoder layers when `scan_layers`)."""
    from tempo_jax.models.layers import RuntimeOptions, ShapeOnlyRngs

    opts = options or RuntimeOptions(dtype=dtype)
    return nnx.eval_shape(
        lambda: model_cls(config, param_dtype=dtype, options=opts, rngs=ShapeOnlyRngs()))


def save_family_checkpoint(model: nnx.Module, path: str | os.PathLike, *,
                           hf_key: Callable[[Path], str],
                           to_hf: Callable[[Path, np.ndarray, Any], np.ndarray],
                           max_shard_bytes: int) -> list[str]:
    """`config.json` (the family's released layout) and sharded safetensors of `model`,
    tensor by tensor through the family's mapping (every process calls it)."""
    tensors = ((hf_key(p), np.ascontiguousarray(to_hf(p, value, model.config)))
               for p, value in host_params(model))
    cfg = model.config.to_hf_dict(torch_dtype=param_dtype_name(model))
    return write_checkpoint(path, cfg, tensors, max_shard_bytes=max_shard_bytes)


def load_family_checkpoint(model_cls: type, config: Any, path: str | os.PathLike, *,
                           hf_key: Callable[[Path], str],
                           from_hf: Callable[[Path, np.ndarray], np.ndarray],
                           to_hf: Callable[[Path, np.ndarray, Any], np.ndarray],
                           dtype: Any, mesh: Mesh | None, rules: shd.Rules, options: Any,
                           what: str, **kw) -> nnx.Module:
    """A family's checkpoint at `path` (its `config` already read) into that family's model,
    in the layout `options` asks for: `load_into` with the shapes `to_hf` gives and a tied
    LM head optional."""
    def hf_shape(p: Path, shape: tuple) -> tuple:
        return to_hf(p, np.empty(shape, dtype=np.uint8), config).shape

    return load_into(
        abstract_model(model_cls, config, dtype, options), path, hf_key=hf_key,
        from_hf=from_hf, hf_shape=hf_shape, dtype=dtype, mesh=mesh, rules=rules,
        optional_keys={"lm_head.weight"} if config.tie_word_embeddings else (), what=what, **kw)


def _is_patch_kernel(path: tuple) -> bool:
    return tuple(path[:2]) == ("visual", "patch_embed") and path[-1] == "kernel"


def kernel_to_hf(path: tuple, value: np.ndarray, config: Any) -> np.ndarray:
    """Our layout -> HF tensor layout, both families: Linear kernels are [in, out] here and
    [out, in] there; the patch embedding is a Conv3d [out, C, T, P, P] there."""
    if path[-1] != "kernel":
        return value
    if _is_patch_kernel(path):
        v = config.vision
        return value.T.reshape(
            v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return value.T


def kernel_from_hf(path: tuple, value: np.ndarray) -> np.ndarray:
    """HF tensor layout -> ours (`kernel_to_hf` inverted)."""
    if path[-1] != "kernel":
        return value
    if _is_patch_kernel(path):
        return value.reshape(value.shape[0], -1).T
    return value.T


@dataclasses.dataclass(frozen=True)
class FamilyIO:
    """A family's checkpoint entry points, from its model class, config class and key
    mapping (`hf_key`: our state path -> the released checkpoint's key)."""

    model_cls: type
    config_cls: type
    hf_key: Callable[[Path], str]
    name: str  # "Qwen2.5-VL", for messages
    normalize_key: Callable[[str], str] | None = None
    ignored_suffixes: tuple[str, ...] = ()

    def abstract_model(self, config: Any, dtype: Any = jnp.bfloat16,
                       options: Any = None) -> nnx.Module:
        """The model's structure with shapes only (nothing allocated)."""
        return abstract_model(self.model_cls, config, dtype, options)

    def load_pretrained(self, path: str | os.PathLike, dtype: Any = jnp.bfloat16,
                        mesh: Mesh | None = None, *, rules: shd.Rules = shd.DEFAULT_RULES,
                        options: Any = None) -> nnx.Module:
        """Load a Hugging Face checkpoint directory of this family. Tensors are read one at
        a time (no file mapping kept), converted to `dtype`, and placed on their sharding
        when `mesh` is given, so peak host memory stays near one model copy."""
        kw = {"normalize_key": self.normalize_key} if self.normalize_key else {}
        return load_family_checkpoint(
            self.model_cls, self.config_cls.from_pretrained(path), path, hf_key=self.hf_key,
            from_hf=kernel_from_hf, to_hf=kernel_to_hf, dtype=dtype, mesh=mesh, rules=rules,
            options=options, what=f"the {self.name} config",
            ignored_suffixes=self.ignored_suffixes, **kw)

    def save_pretrained(self, model: nnx.Module, path: str | os.PathLike, *,
                        max_shard_bytes: int = 4 * 2**30) -> list[str]:
        """Write `config.json` (the family's released layout) and sharded safetensors with
        an index that transformers' model class of this family loads."""
        return save_family_checkpoint(model, path, hf_key=self.hf_key, to_hf=kernel_to_hf,
                                      max_shard_bytes=max_shard_bytes)
