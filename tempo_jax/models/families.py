"""The backbone families, one table: which code a config, a preset name or a checkpoint
directory belongs to.

The trainer, the sampler, the planner and the commands ask this module, never a family's
package by name, so a family is added here and nowhere else. Families are the `model_type`
of the Hugging Face `config.json`: `qwen2_5_vl` (the default; Tempo-R0's backbone) and
`qwen3_vl`. A family's package provides `ModelConfig` (with `family`), `preset`, the model
class, `prepare_inputs`, `load_pretrained` / `save_pretrained`, `abstract_model` (params),
`vision_metadata` (vision_meta) and `rope_index` / `decode_start` (positions).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any, Protocol

from tempo_jax.models.hf_io import read_config_json

DEFAULT = "qwen2_5_vl"
FAMILIES = ("qwen2_5_vl", "qwen3_vl")
MODEL_CLASSES = {"qwen2_5_vl": "Qwen25VL", "qwen3_vl": "Qwen3VL"}
# presets of the non-default families are spelled with their family's prefix
PRESET_PREFIXES = {"qwen3_vl": "qwen3_vl_"}



class VisionSpec(Protocol):
    """What the host side (the data pipeline, the processor, SAA) reads of a vision config:
    both families' `VisionConfig` are one, so the pipeline is typed by this interface rather
    than by either family's class."""

    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int

    @property
    def merge_unit(self) -> int: ...

    @property
    def patch_dim(self) -> int: ...


def _check(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose from {FAMILIES}")
    return family


def package(family: str) -> ModuleType:
    """The family's package (`tempo_jax.models.<family>`)."""
    return importlib.import_module(f"tempo_jax.models.{_check(family)}")


def submodule(family: str, name: str) -> ModuleType:
    """One module of the family's package: `config`, `model`, `params`, `positions`,
    `vision_meta`."""
    return importlib.import_module(f"tempo_jax.models.{_check(family)}.{name}")


def family_of(obj: Any) -> str:
    """The family of a model, a model config or a vision config: its `family` attribute (a
    model: its config's); a vision or text config carries none, so the family package that
    defines its class."""
    fam = getattr(obj, "family", None)
    if fam is None and hasattr(obj, "config"):
        fam = getattr(obj.config, "family", None)
    if fam is None:
        mod = type(obj).__module__
        fam = next((f for f in FAMILIES if mod.startswith(f"tempo_jax.models.{f}.")), None)
    if fam is None:
        raise TypeError(f"cannot tell the model family of {type(obj).__name__}")
    return _check(fam)


def preset_family(name: str) -> tuple[str, str]:
    """(family, the family's own preset name) of a config preset name: `qwen3_vl_8b` ->
    ("qwen3_vl", "qwen3_vl_8b"), `qwen3_vl_tiny` -> ("qwen3_vl", "tiny"), `7b` ->
    ("qwen2_5_vl", "7b")."""
    for fam, prefix in PRESET_PREFIXES.items():
        if name.startswith(prefix):
            own = name[len(prefix):]
            return fam, own if own in ("tiny", "bench") else name
    return DEFAULT, name


def preset(name: str):
    """The architecture of a preset name of any family (see `preset_family`)."""
    fam, own = preset_family(name)
    return submodule(fam, "config").preset(own)


def checkpoint_family(path: str | os.PathLike) -> str:
    """The family of a Hugging Face checkpoint directory, from its `config.json`'s
    `model_type`."""
    mt = read_config_json(path).get("model_type")
    if mt not in FAMILIES:
        raise ValueError(f"{path}/config.json: unsupported model_type {mt!r}: tempo_jax "
                         f"implements {', '.join(FAMILIES)}")
    return mt


def config_from_pretrained(path: str | os.PathLike):
    """The `ModelConfig` of a checkpoint directory, whatever its family."""
    return submodule(checkpoint_family(path), "config").ModelConfig.from_pretrained(path)


def model_class(family_or_config: Any) -> type:
    fam = (family_or_config if isinstance(family_or_config, str)
           else family_of(family_or_config))
    return getattr(package(fam), MODEL_CLASSES[fam])


def build(config, **kw):
    """A randomly initialised model of `config`'s family (kwargs of the model class)."""
    return model_class(config)(config, **kw)


def load_pretrained(path: str | os.PathLike, *args, **kw):
    """Load a Hugging Face checkpoint directory of any supported family (its `model_type`)."""
    return package(checkpoint_family(path)).load_pretrained(path, *args, **kw)


def save_pretrained(model, path: str | os.PathLike, *args, **kw):
    """Write `model` as a Hugging Face checkpoint of its family."""
    return package(family_of(model)).save_pretrained(model, path, *args, **kw)


def abstract_model(config, *args, **kw):
    """The model's shapes and shardings, no memory (the planner and restores)."""
    return submodule(family_of(config), "params").abstract_model(config, *args, **kw)


def prepare_inputs(config, *args, **kw) -> dict:
    """Host side of a forward pass (positions, vision metadata) for `config`'s family."""
    return submodule(family_of(config), "model").prepare_inputs(config, *args, **kw)


def vision_metadata(grid_thw, vision, **kw) -> dict:
    """The vision tower's host-side metadata for `vision`'s family."""
    return submodule(family_of(vision), "vision_meta").vision_metadata(grid_thw, vision, **kw)


def decode_start(family: str, position_ids, attention_mask=None):
    """Where generation continues after a prompt (the same rule in both families today)."""
    return submodule(family, "positions").decode_start(position_ids, attention_mask)
