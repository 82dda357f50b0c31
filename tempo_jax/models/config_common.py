"""What the two families' configurations share: the special token ids and the tied-embedding
flag (`VLMConfigBase`, with their reading from either `config.json` layout), a vision
section's derived sizes (`VisionShapes`), and building a frozen config section from a
`config.json` section (`section_from`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Qwen2.5-VL and Qwen3-VL share the tokenizer's special tokens
TOKEN_IDS = {"image_token_id": 151655, "video_token_id": 151656,
             "vision_start_token_id": 151652, "vision_end_token_id": 151653,
             "bos_token_id": 151643, "eos_token_id": 151645}


class VisionShapes:
    """Derived sizes of a vision section (both families name its fields alike)."""

    hidden_size: int
    num_heads: int
    in_channels: int
    temporal_patch_size: int
    patch_size: int
    spatial_merge_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Flattened length of one 3D patch: channels x temporal x patch x patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one visual token (2 x 2)."""
        return self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class VLMConfigBase:
    """Fields every family's `ModelConfig` has after its `text` and `vision` sections."""

    tie_word_embeddings: bool = False
    image_token_id: int = TOKEN_IDS["image_token_id"]
    video_token_id: int = TOKEN_IDS["video_token_id"]
    vision_start_token_id: int = TOKEN_IDS["vision_start_token_id"]
    vision_end_token_id: int = TOKEN_IDS["vision_end_token_id"]
    bos_token_id: int = TOKEN_IDS["bos_token_id"]
    eos_token_id: int = TOKEN_IDS["eos_token_id"]

    def replace(self, **kw: Any):
        return dataclasses.replace(self, **kw)

    @staticmethod
    def shared_from_hf(d: Mapping[str, Any], text: Mapping[str, Any]) -> dict[str, Any]:
        """The shared fields from a `config.json` dict `d` whose text fields are `text` (the
        top level in Qwen2.5-VL's flat layout, `text_config` in the nested one)."""
        tie = d.get("tie_word_embeddings")
        if tie is None:
            tie = text.get("tie_word_embeddings", False)
        out = {k: d.get(k, v) for k, v in TOKEN_IDS.items() if k.startswith(("image", "video",
                                                                              "vision"))}
        for k in ("bos_token_id", "eos_token_id"):
            out[k] = text.get(k, d.get(k, TOKEN_IDS[k]))
        return {"tie_word_embeddings": bool(tie), **out}


def section_from(cls, src: Mapping[str, Any], required: tuple[str, ...] = (), **given: Any):
    """The frozen dataclass `cls` (a text or vision section) from a `config.json` section:
    each field from `given`, else `src[field]`, else the field's default (but `required`
    fields must be there); tuple and float fields converted (JSON has lists, and ints where
    floats are meant)."""
    missing = [k for k in required if k not in given and k not in src]
    if missing:
        raise ValueError(f"config.json: {cls.__name__} needs {', '.join(missing)}")
    kw = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            kw[f.name] = given[f.name]
            continue
        value = src.get(f.name, f.default)
        if isinstance(f.default, tuple):
            value = tuple(value)
        elif isinstance(f.default, float):
            value = float(value)
        kw[f.name] = value
    return cls(**kw)
