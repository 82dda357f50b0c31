"""ModelConfig <-> HF config.json, and the presets against transformers' own model sizes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from tempo_jax.models.qwen2_5_vl.config import ModelConfig, preset
from tempo_jax.models.qwen2_5_vl.params import abstract_model


def _hf_param_count(cfg: ModelConfig) -> int:
    hf_cfg = Qwen2_5_VLConfig(**cfg.to_hf_dict())
    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(hf_cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["3b", "7b", "bench", "tiny"])
def test_preset_parameter_count_matches_transformers(name):
    cfg = preset(name)
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg, jnp.bfloat16))))
    assert ours == _hf_param_count(cfg)
    if name == "7b":
        assert ours == 8_292_166_656  # Qwen2.5-VL-7B-Instruct as released
    if name == "3b":
        assert ours == 3_754_622_976  # Qwen2.5-VL-3B-Instruct as released


def test_flat_and_nested_layouts_read_the_same(tmp_path):
    cfg = preset("3b")
    flat = cfg.to_hf_dict()
    assert "text_config" not in flat and flat["rope_scaling"]["type"] == "mrope"
    assert ModelConfig.from_hf_dict(flat) == cfg
    # what transformers 5.x writes: nested text_config with rope_parameters
    Qwen2_5_VLConfig(**flat).save_pretrained(tmp_path)
    nested = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in nested
    assert ModelConfig.from_pretrained(tmp_path) == cfg


def test_unsupported_model_type_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2_vl'"):
        ModelConfig.from_hf_dict({"model_type": "qwen2_vl"})
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        ModelConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path / "missing")


def test_invalid_mrope_section_is_rejected():
    d = preset("tiny").to_hf_dict()
    d["rope_scaling"]["mrope_section"] = [2, 2, 2]
    with pytest.raises(ValueError, match="mrope_section"):
        ModelConfig.from_hf_dict(d)
