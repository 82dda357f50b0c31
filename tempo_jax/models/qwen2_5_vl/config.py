"""Frozen Qwen2.5-VL configuration, read from and written to Hugging Face `config.json`.

Two on-disk layouts exist: the released flat one (text fields at the top level, `rope_scaling`
with `mrope_section`) and the nested one newer transformers writes (`text_config`,
`rope_parameters`). We read both and always write the released flat layout, which
transformers 4.5x and 5.x both load.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

from tempo_jax.models.config_common import VisionShapes, VLMConfigBase, section_from

MODEL_TYPE = "qwen2_5_vl"


@dataclasses.dataclass(frozen=True)
class VisionConfig(VisionShapes):
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    tokens_per_second: float = 2
    hidden_act: str = "silu"
    rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class ModelConfig(VLMConfigBase):
    family: ClassVar[str] = MODEL_TYPE  # which model family (a class constant, not a field)

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()

    def __post_init__(self):
        t = self.text
        if t.hidden_size % t.num_attention_heads:
            raise ValueError(
                f"hidden_size {t.hidden_size} not divisible by heads {t.num_attention_heads}"
            )
        if t.num_attention_heads % t.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if 2 * sum(t.mrope_section) != t.head_dim:
            raise ValueError(
                f"mrope_section {t.mrope_section} must sum to head_dim/2 = {t.head_dim // 2}"
            )
        if self.vision.hidden_size % self.vision.num_heads:
            raise ValueError("vision hidden_size not divisible by num_heads")

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a transformers `config.json` dict, flat or nested layout."""
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ValueError(
                f"unsupported model_type {model_type!r}: tempo_jax implements {MODEL_TYPE!r} "
                "(Qwen2.5-VL) only"
            )
        text = dict(d)
        if isinstance(d.get("text_config"), dict):
            text = {**d, **d["text_config"]}
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        text_cfg = section_from(
            TextConfig, text, required=("vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads"),
            num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
            rope_theta=float(rope.get("rope_theta", text.get("rope_theta",
                                                             TextConfig.rope_theta))),
            mrope_section=tuple(rope.get("mrope_section", TextConfig.mrope_section)))
        v = d.get("vision_config") or {}
        vision_cfg = section_from(
            VisionConfig, v, out_hidden_size=v.get("out_hidden_size", text_cfg.hidden_size),
            in_channels=v.get("in_channels", v.get("in_chans", 3)),
            patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
            rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
        return cls(text=text_cfg, vision=vision_cfg, **cls.shared_from_hf(d, text))

    def to_hf_dict(self, torch_dtype: str = "bfloat16") -> dict[str, Any]:
        """The released flat `config.json` layout (Qwen/Qwen2.5-VL-7B-Instruct)."""
        t, v = self.text, self.vision
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": MODEL_TYPE,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "vision_token_id": 151654,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "hidden_act": t.hidden_act,
            "hidden_size": t.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": t.intermediate_size,
            "max_position_embeddings": t.max_position_embeddings,
            "max_window_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_hidden_layers": t.num_hidden_layers,
            "num_key_value_heads": t.num_key_value_heads,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_theta": t.rope_theta,
            "sliding_window": 32768,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": torch_dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vision_config": {
                "model_type": "qwen2_5_vl",
                "depth": v.depth,
                "hidden_act": v.hidden_act,
                "hidden_size": v.hidden_size,
                "intermediate_size": v.intermediate_size,
                "num_heads": v.num_heads,
                "in_chans": v.in_channels,
                "out_hidden_size": v.out_hidden_size,
                "patch_size": v.patch_size,
                "spatial_merge_size": v.spatial_merge_size,
                "spatial_patch_size": v.patch_size,
                "window_size": v.window_size,
                "fullatt_block_indexes": list(v.fullatt_block_indexes),
                "tokens_per_second": v.tokens_per_second,
                "temporal_patch_size": v.temporal_patch_size,
            },
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_section)},
            "vocab_size": t.vocab_size,
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        from tempo_jax.models.hf_io import read_config_json

        return cls.from_hf_dict(read_config_json(path))


# ---------------------------------------------------------------------------- presets
def qwen2_5_vl_7b() -> ModelConfig:
    """Qwen/Qwen2.5-VL-7B-Instruct."""
    return ModelConfig()


def qwen2_5_vl_3b() -> ModelConfig:
    """Qwen/Qwen2.5-VL-3B-Instruct (tied embeddings)."""
    return ModelConfig(
        text=TextConfig(
            vocab_size=151936,
            hidden_size=2048,
            intermediate_size=11008,
            num_hidden_layers=36,
            num_attention_heads=16,
            num_key_value_heads=2,
        ),
        vision=VisionConfig(out_hidden_size=2048),
        tie_word_embeddings=True,
    )


def bench() -> ModelConfig:
    """Benchmark size: small enough for CPU timing, full vocabulary so the LM head costs what it
    does for real."""
    return ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=768, intermediate_size=2048,
                        num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=2,
                        mrope_section=(8, 12, 12)),
        vision=VisionConfig(depth=8, hidden_size=384, intermediate_size=1024, num_heads=6,
                            out_hidden_size=768, fullatt_block_indexes=(3, 7)),
        tie_word_embeddings=True)


def tiny() -> ModelConfig:
    """CPU size for tests and the demo; the real Qwen vocabulary so the real tokenizer fits."""
    return ModelConfig(
        text=TextConfig(vocab_size=151936, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        mrope_section=(2, 3, 3)),
        vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                            out_hidden_size=64, fullatt_block_indexes=(1,)),
        tie_word_embeddings=True)


PRESETS = {"7b": qwen2_5_vl_7b, "3b": qwen2_5_vl_3b, "bench": bench, "tiny": tiny}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()
