"""Frozen Qwen3-VL configuration, read from and written to Hugging Face `config.json`.

Qwen3-VL checkpoints use the nested layout (`text_config`, `vision_config`). The released
files give the text rotary as `rope_scaling` + `rope_theta`; transformers 5.x writes
`rope_parameters`. We read both and write the released layout, which transformers 4.57+ and
5.x load.

The attributes the rest of the stack reads on Qwen2.5-VL's config keep their names here
(`vision.patch_size`, `vision.merge_unit`, `vision.patch_dim`, `text.hidden_size`, the token
ids, ...); `family` tells the two apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

from tempo_jax.models.config_common import VisionShapes, VLMConfigBase, section_from
from tempo_jax.models.hf_io import read_config_json

MODEL_TYPE = "qwen3_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionShapes):
    """The SigLIP-2 based vision tower with DeepStack mergers (defaults: the 8B/32B tower)."""

    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    out_hidden_size: int = 4096
    num_position_embeddings: int = 2304  # a square grid of learned positions (48 x 48)
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    hidden_act: str = "gelu_pytorch_tanh"
    rope_theta: float = 10000.0

    @property
    def num_grid_per_side(self) -> int:
        return math.isqrt(self.num_position_embeddings)


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The Qwen3 dense decoder (defaults: Qwen3-VL-8B)."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5000000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True  # kept for config.json; the model always interleaves
    max_position_embeddings: int = 262144
    hidden_act: str = "silu"
    attention_bias: bool = False


@dataclasses.dataclass(frozen=True)
class ModelConfig(VLMConfigBase):
    family: ClassVar[str] = MODEL_TYPE  # which model family (a class constant, not a field)

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()

    def __post_init__(self):
        t, v = self.text, self.vision
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if len(t.mrope_section) != 3 or 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(
                f"mrope_section {t.mrope_section} must be 3 sizes summing to head_dim/2 = "
                f"{t.head_dim // 2}"
            )
        if v.hidden_size % v.num_heads:
            raise ValueError("vision hidden_size not divisible by num_heads")
        if v.num_grid_per_side**2 != v.num_position_embeddings:
            raise ValueError(
                f"num_position_embeddings {v.num_position_embeddings} must be a square"
            )
        ds = v.deepstack_visual_indexes
        if len(set(ds)) != len(ds) or any(not 0 <= i < v.depth for i in ds):
            raise ValueError(
                f"deepstack_visual_indexes {ds} must be distinct vision layers in [0, {v.depth})"
            )
        if len(ds) > t.num_hidden_layers:
            raise ValueError("more DeepStack features than decoder layers to add them to")

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict (released or transformers-5 layout)."""
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"unsupported model_type {model_type!r}: tempo_jax.models.qwen3_vl implements "
                f"{MODEL_TYPE!r} (Qwen3-VL, dense) only"
            )
        text = d.get("text_config") or {}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        td = TextConfig()
        text_cfg = section_from(
            TextConfig, text, required=("hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads"),
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            head_dim=text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"],
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta", td.rope_theta))),
            mrope_section=tuple(rope.get("mrope_section", td.mrope_section)),
            mrope_interleaved=bool(rope.get("mrope_interleaved", td.mrope_interleaved)),
            attention_bias=bool(text.get("attention_bias", td.attention_bias)))
        v = d.get("vision_config") or {}
        vision_cfg = section_from(
            VisionConfig, v,
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta",
                                                                   VisionConfig.rope_theta)))
        return cls(text=text_cfg, vision=vision_cfg, **cls.shared_from_hf(d, text))

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The released `config.json` layout (Qwen/Qwen3-VL-8B-Instruct)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "text_config": {
                "model_type": "qwen3_vl_text",
                "attention_bias": t.attention_bias,
                "attention_dropout": 0.0,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "head_dim": t.head_dim,
                "hidden_act": t.hidden_act,
                "hidden_size": t.hidden_size,
                "initializer_range": 0.02,
                "intermediate_size": t.intermediate_size,
                "max_position_embeddings": t.max_position_embeddings,
                "num_attention_heads": t.num_attention_heads,
                "num_hidden_layers": t.num_hidden_layers,
                "num_key_value_heads": t.num_key_value_heads,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_scaling": {
                    "rope_type": "default",
                    "mrope_interleaved": t.mrope_interleaved,
                    "mrope_section": list(t.mrope_section),
                },
                "rope_theta": t.rope_theta,
                "tie_word_embeddings": self.tie_word_embeddings,
                "torch_dtype": torch_dtype,
                "use_cache": True,
                "vocab_size": t.vocab_size,
            },
            "vision_config": {
                "model_type": "qwen3_vl_vision",
                "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "in_channels": v.in_channels,
                "initializer_range": 0.02,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "num_position_embeddings": v.num_position_embeddings,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "temporal_patch_size": v.temporal_patch_size,
            },
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        return cls.from_hf_dict(read_config_json(path))


# ---------------------------------------------------------------------------- presets
# Values of the released dense Qwen/Qwen3-VL-*-Instruct config.json files.
_SMALL_TOWER = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                    deepstack_visual_indexes=(5, 11, 17))  # 2B / 4B
_LARGE_TOWER = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16,
                    deepstack_visual_indexes=(8, 16, 24))  # 8B / 32B


def qwen3_vl_2b() -> ModelConfig:
    """Qwen/Qwen3-VL-2B-Instruct (tied embeddings)."""
    return ModelConfig(
        text=TextConfig(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                        num_attention_heads=16, num_key_value_heads=8),
        vision=VisionConfig(out_hidden_size=2048, **_SMALL_TOWER),
        tie_word_embeddings=True,
    )


def qwen3_vl_4b() -> ModelConfig:
    """Qwen/Qwen3-VL-4B-Instruct (tied embeddings)."""
    return ModelConfig(
        text=TextConfig(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8),
        vision=VisionConfig(out_hidden_size=2560, **_SMALL_TOWER),
        tie_word_embeddings=True,
    )


def qwen3_vl_8b() -> ModelConfig:
    """Qwen/Qwen3-VL-8B-Instruct."""
    return ModelConfig(
        text=TextConfig(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8),
        vision=VisionConfig(out_hidden_size=4096, **_LARGE_TOWER),
    )


def qwen3_vl_32b() -> ModelConfig:
    """Qwen/Qwen3-VL-32B-Instruct."""
    return ModelConfig(
        text=TextConfig(hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                        num_attention_heads=64, num_key_value_heads=8),
        vision=VisionConfig(out_hidden_size=5120, **_LARGE_TOWER),
    )


def tiny() -> ModelConfig:
    """CPU size for tests and the demo; the real Qwen vocabulary so the real tokenizer fits."""
    return ModelConfig(
        text=TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        mrope_section=(6, 5, 5)),
        vision=VisionConfig(depth=3, hidden_size=64, intermediate_size=128, num_heads=2,
                            out_hidden_size=128, num_position_embeddings=256,
                            deepstack_visual_indexes=(0, 1)),
        tie_word_embeddings=True)


PRESETS = {
    "qwen3_vl_2b": qwen3_vl_2b, "qwen3_vl_4b": qwen3_vl_4b, "qwen3_vl_8b": qwen3_vl_8b,
    "qwen3_vl_32b": qwen3_vl_32b, "tiny": tiny,
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown Qwen3-VL preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
