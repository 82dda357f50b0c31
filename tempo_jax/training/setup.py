"""Set-up from the config: the SAA / ETA / prompt settings, the model, the trainable split.

Everything here is a function of the config alone, so the trainer, the planner, the export
and the tests build the same model from the same config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections
from flax import nnx

from tempo_jax import sharding as shd
from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data import saa as saa_lib
from tempo_jax.data.pipeline import PipelineConfig, config_from_settings
from tempo_jax.models import families
from tempo_jax.models.attention import resolve_backend
from tempo_jax.models.init import reinitialize
from tempo_jax.models.layers import RuntimeOptions

SETTINGS_FILE = "tempo_settings.json"  # SAA / ETA / prompt settings, saved beside every export


def pipeline_config(config: ml_collections.ConfigDict, **kw) -> PipelineConfig:
    """The SAA / ETA / prompt part of the config: it is part of the model."""
    kw.setdefault("num_workers", config.data.num_workers)
    kw.setdefault("seed", config.seed)
    kw.setdefault("max_seq_len", config.data.max_seq_len or None)
    return config_from_settings(settings_dict(config), **kw)


def settings_dict(config: ml_collections.ConfigDict) -> dict:
    """Every SAA and prompt field, defaults resolved, so a later change of a default never
    changes what a saved model is fed."""
    saa = saa_lib.SAAConfig(**config.saa.to_dict())
    prompt = prompts_lib.PromptConfig(**config.prompt.to_dict())
    return {"saa": dataclasses.asdict(saa), "prompt": dataclasses.asdict(prompt)}


# ============================================================================ model
def build_model(config: ml_collections.ConfigDict, mesh=None, rules=shd.DEFAULT_RULES
                ) -> nnx.Module:
    """The model of either family (the preset's, or the checkpoint's `model_type`); a
    checkpoint is read straight onto `mesh` (each tensor placed on its sharding as it is
    read, never the whole model on one device)."""
    dtype = jnp.dtype(config.model.dtype)
    opts = RuntimeOptions(dtype=dtype,
                          attention_backend=resolve_backend(config.model.attention_backend),
                          remat=config.model.remat,
                          scan_layers=config.model.get("scan_layers", False))
    if config.model.init_checkpoint:
        return families.load_pretrained(config.model.init_checkpoint, dtype=dtype,
                                        options=opts, mesh=mesh, rules=rules)
    model = families.build(model_config(config), param_dtype=dtype, options=opts,
                           rngs=nnx.Rngs(config.seed))
    # a random start only: a checkpoint's weights are never redrawn
    return reinitialize(model, config.model.get("init_scale", "hf"), config.seed)


def model_config(config: ml_collections.ConfigDict):
    """The architecture `build_model` builds (the checkpoint's `config.json` when one is
    named), without building it: the planner sizes the same model."""
    if config.model.init_checkpoint:
        return families.config_from_pretrained(config.model.init_checkpoint)
    cfg = families.preset(config.model.preset)
    if families.preset_family(config.model.preset)[1] == "tiny" and config.model.get(
            "tiny_overrides"):
        text = dataclasses.replace(cfg.text, **config.model.tiny_overrides)
        if cfg.family == "qwen2_5_vl":  # head_dim = hidden / heads changed: keep Qwen2.5's
            hd = text.head_dim  # 2:3:3 split of the rotary bands over (t, h, w)
            text = dataclasses.replace(text, mrope_section=(hd // 8, 3 * hd // 16,
                                                            3 * hd // 16))
        vision = dataclasses.replace(cfg.vision, out_hidden_size=text.hidden_size,
                                     **config.model.get("tiny_vision_overrides", {}))
        cfg = cfg.replace(text=text, vision=vision)
    return cfg


def trainable_filter(config: ml_collections.ConfigDict):
    """What training updates: every parameter, or all but the vision tower when
    `model.freeze_vision`."""
    if config.model.freeze_vision:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    return nnx.Param



def load_tokenizer(family: str = families.DEFAULT):
    """The tokenizer every stage uses: the family's, built offline (Qwen3-VL's adds
    `<think>` / `</think>` as single tokens)."""
    return prompts_lib.load_tokenizer(None, family=family)


def make_mesh(config: ml_collections.ConfigDict):
    """(mesh or None on one device, logical-axis rules) of `config.mesh`."""
    import jax

    rules = shd.rules_from_config(config.mesh)
    mesh = shd.mesh_from_config(config.mesh) if jax.device_count() > 1 else None
    return mesh, rules
