"""The random initialisation schemes (`model.init_scale`, `tempo_jax.models.init`), both
families: the stds each scheme promises, the same weights scanned or unrolled, `hf` leaving
the model as built, a checkpoint never redrawn, a bad name refused."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tempo_jax.configs.tempo_r0 import get_config
from tempo_jax.models import families
from tempo_jax.models.init import reinitialize
from tempo_jax.models.layers import RuntimeOptions
from tempo_jax.training import setup

PRESETS = {"qwen2_5_vl": "tiny", "qwen3_vl": "qwen3_vl_tiny"}


def _params(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _model(preset: str, scan: bool = False, seed: int = 0):
    return families.build(setup.model_config(get_config(preset)), param_dtype=jnp.float32,
                          options=RuntimeOptions(scan_layers=scan), rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("fam", sorted(PRESETS))
@pytest.mark.parametrize("scheme", ["width", "width_residual"])
def test_width_schemes_give_the_promised_stds(fam, scheme):
    model = _model(PRESETS[fam])
    before = _params(model)
    cfg = model.config
    after = _params(reinitialize(model, scheme, seed=3))
    depth = {"model": cfg.text.num_hidden_layers, "visual": cfg.vision.depth}
    checked = {"kernel": 0, "embedding": 0, "kept": 0, "residual": 0}
    for name, value in after.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in ("kernel", "embedding"):  # norm scales and biases as built
            np.testing.assert_array_equal(value, before[name], err_msg=name)
            checked["kept"] += 1
            continue
        want = (value.shape[-1] if leaf == "embedding"
                else math.prod(value.shape[:-1])) ** -0.5
        parts = name.split(".")
        residual = (scheme == "width_residual" and leaf == "kernel"
                    and parts[-2] in ("o_proj", "down_proj", "proj", "linear_fc2")
                    and ("layers" in parts or "blocks" in parts))
        if residual:
            want /= math.sqrt(2 * depth[parts[0]])
            checked["residual"] += 1
        if value.size >= 2048:  # enough draws for the sample std to be within 10%
            assert abs(value.std() / want - 1) < 0.1, (name, value.std(), want)
            assert abs(value.mean()) < 0.1 * want, name
        checked[leaf] += 1
    assert checked["kernel"] > 10 and checked["embedding"] >= 1 and checked["kept"] > 5
    assert (checked["residual"] > 0) == (scheme == "width_residual")
    # the tiny models are 128 wide: std 1/sqrt(128) = 0.088 vs the 0.02 they are built with
    emb = after["model.embed_tokens.embedding"]
    assert abs(emb.std() - 128 ** -0.5) < 0.005 and abs(before[
        "model.embed_tokens.embedding"].std() - 0.02) < 0.002


@pytest.mark.parametrize("fam", sorted(PRESETS))
def test_scanned_and_unrolled_get_the_same_weights(fam):
    unrolled = _params(reinitialize(_model(PRESETS[fam], scan=False), "width_residual", 5))
    scanned = _params(reinitialize(_model(PRESETS[fam], scan=True), "width_residual", 5))
    assert len(scanned) < len(unrolled)
    for name, value in scanned.items():
        parts = name.split(".")
        stack = next((k for k, p in enumerate(parts) if p in ("layers", "blocks")), None)
        if stack is None or value.ndim == 0:
            np.testing.assert_array_equal(value, unrolled[name])
            continue
        for i in range(value.shape[0]):
            one = ".".join([*parts[:stack + 1], str(i), *parts[stack + 1:]])
            np.testing.assert_array_equal(value[i], unrolled[one], err_msg=one)


def test_hf_leaves_the_model_and_seeds_differ():
    model = _model("tiny")
    before = _params(model)
    after = _params(reinitialize(model, "hf", 0))
    assert all(np.array_equal(before[k], after[k]) for k in before)
    a = _params(reinitialize(_model("tiny"), "width", 0))
    b = _params(reinitialize(_model("tiny"), "width", 1))
    assert not np.array_equal(a["model.embed_tokens.embedding"],
                              b["model.embed_tokens.embedding"])


def test_build_model_honours_the_switch_and_never_redraws_a_checkpoint(tmp_path):
    config = get_config("tiny")
    config.model.init_scale = "width"
    emb = _params(setup.build_model(config))["model.embed_tokens.embedding"]
    assert abs(emb.std() - 128 ** -0.5) < 0.005
    model = _model("tiny")
    families.save_pretrained(model, tmp_path / "ckpt")
    config.model.init_checkpoint = str(tmp_path / "ckpt")
    loaded = _params(setup.build_model(config))
    saved = _params(model)
    assert all(np.array_equal(loaded[k], saved[k]) for k in saved)
    config.model.init_checkpoint = ""
    config.model.init_scale = "xavier"
    with pytest.raises(ValueError, match=r"init_scale must be one of \('hf', 'width', "
                                         r"'width_residual'\), got 'xavier'"):
        setup.build_model(config)

