"""Scanned layers (`model.scan_layers`: the decoder's layers and the vision tower's blocks)
against the unrolled ones, both families, fp32:
the same logits, gradients of the SFT loss and of the GRPO objective (remat policies
included), the same greedy tokens, byte-identical Hugging Face exports, either layout loading
either export, and an Orbax checkpoint of one layout refused by the other with the switch
named. `test_parity_suites_with_scan_on` reruns the transformers parity tests with every
model built scanned."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import hf_reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwen3_reference
from flax import nnx

from tempo_jax.generate import generate_from_inputs
from tempo_jax.models import families
from tempo_jax.models.layers import RuntimeOptions
from tempo_jax.rl import grpo as grpo_lib
from tempo_jax.training import steps

REFS = {"qwen2_5_vl": hf_reference, "qwen3_vl": qwen3_reference}


def _prompt(fam, rng, grid):
    if fam == "qwen2_5_vl":
        return hf_reference.vision_prompt(rng, [("video", grid)], [5, 6])
    return qwen3_reference.prompt(rng, [("video", grid)], [5, 6])


@pytest.fixture(scope="module", params=sorted(REFS))
def pair(request, tmp_path_factory):
    """(family, unrolled model, scanned model, inputs of two video prompts, the checkpoint)."""
    fam, ref = request.param, REFS[request.param]
    path = tmp_path_factory.mktemp(f"scan_{fam}")
    ref.tiny_hf_model(seed=0).save_pretrained(path)
    models = {scan: families.load_pretrained(path, dtype=jnp.float32,
                                             options=RuntimeOptions(scan_layers=scan))
              for scan in (False, True)}
    rng = np.random.default_rng(0)
    grids = [(2, 4, 4), (4, 4, 8)]
    rows = [_prompt(fam, rng, g) for g in grids]
    ids, mask = qwen3_reference.batch(rows)  # right-padded
    inputs = families.prepare_inputs(models[False].config, ids, mask,
                                     pixel_values_videos=ref.pixels(rng, grids),
                                     video_grid_thw=np.asarray(grids))
    return fam, models[False], models[True], inputs, path


def _stacked(tree: dict) -> dict:
    """An unrolled pure parameter dict in the scanned layout (the decoder's layers and the
    vision tower's blocks stacked)."""
    out = dict(tree)
    for top, name in (("model", "layers"), ("visual", "blocks")):
        layers = out[top][name]
        out[top] = {**out[top], name: jax.tree.map(
            lambda *xs: jnp.stack(xs), *[layers[i] for i in sorted(layers)])}
    return out


def _max_diff(a: dict, b: dict) -> float:
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    return max(float(jnp.max(jnp.abs(x - y))) for (_, x), (_, y) in zip(la, lb, strict=True))


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def test_logits_equal(pair):
    _, unrolled, scanned, inputs, _ = pair
    fwd = nnx.jit(lambda m, x: m.forward(x))
    a, b = np.asarray(fwd(unrolled, inputs)), np.asarray(fwd(scanned, inputs))
    assert np.abs(a - b).max() <= 1e-6, np.abs(a - b).max()


@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_sft_gradients_equal(pair, remat):
    """The SFT loss's gradients, the remat policy wrapping the scanned body as it wraps each
    unrolled layer."""
    _, unrolled, scanned, inputs, _ = pair
    b, length = inputs["input_ids"].shape
    rng = np.random.default_rng(1)
    pred_pos = jnp.asarray(np.sort(rng.integers(0, length - 1, (b, 6)), axis=1))
    targets = jnp.asarray(rng.integers(10, 1000, (b, 6)), jnp.int32)
    valid = jnp.ones((b, 6), jnp.float32)
    grads = {}
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        model = nnx.clone(model)
        model.options = RuntimeOptions(remat=remat, scan_layers=name == "scanned")
        graphdef, params, rest = _split(model)
        g = jax.jit(jax.grad(steps.sft_loss, has_aux=True), static_argnums=2)(
            params, rest, graphdef, inputs, pred_pos, targets, valid)[0]
        grads[name] = nnx.to_pure_dict(g)
    assert _max_diff(_stacked(grads["unrolled"]), grads["scanned"]) <= 1e-5


def test_grpo_gradients_equal(pair):
    fam, unrolled, scanned, inputs, _ = pair
    g, t = 2, 5
    b = inputs["input_ids"].shape[0]
    rng = np.random.default_rng(2)
    completions = jnp.asarray(rng.integers(10, 1000, (b * g, t)), jnp.int32)
    comp_mask = jnp.asarray(rng.random((b * g, t)) < 0.9, jnp.float32)
    start = jnp.asarray(np.repeat(families.decode_start(fam, inputs["position_ids"],
                                                        inputs["attention_mask"]), g),
                        jnp.int32)
    old = jnp.asarray(-rng.random((b * g, t)), jnp.float32)
    adv = jnp.asarray(rng.standard_normal(b * g), jnp.float32)
    cfg = grpo_lib.GRPOConfig(num_generations=g, beta=0.04)
    grads = {}
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        graphdef, params, rest = _split(model)
        fn = jax.jit(jax.grad(steps.grpo_objective, has_aux=True), static_argnums=(2, 10, 11))
        grads[name] = nnx.to_pure_dict(fn(params, rest, graphdef, inputs, completions,
                                          comp_mask, start, old, old - 0.1, adv, cfg, g)[0])
    assert _max_diff(_stacked(grads["unrolled"]), grads["scanned"]) <= 1e-5


def test_greedy_tokens_identical(pair):
    _, unrolled, scanned, inputs, _ = pair
    kw = dict(max_new_tokens=12, temperature=0.0, eos_token_id=2)
    a = generate_from_inputs(unrolled, inputs, **kw)
    b = generate_from_inputs(scanned, inputs, **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)


def test_export_byte_identical_and_either_layout_loads_it(pair, tmp_path):
    _, unrolled, scanned, inputs, _ = pair
    digests = {}
    for name, model in (("unrolled", unrolled), ("scanned", scanned)):
        out = tmp_path / name
        families.save_pretrained(model, out)
        digests[name] = {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
                         for f in sorted(out.iterdir())}
    assert digests["unrolled"] == digests["scanned"]
    back = families.load_pretrained(tmp_path / "scanned", dtype=jnp.float32,
                                    options=RuntimeOptions(scan_layers=True))
    assert _max_diff(nnx.to_pure_dict(nnx.state(back, nnx.Param)),
                     nnx.to_pure_dict(nnx.state(scanned, nnx.Param))) == 0.0


def test_orbax_checkpoint_of_the_other_layout_names_the_switch(pair, tmp_path):
    from tempo_jax.configs.tempo_r0 import get_config
    from tempo_jax.training.checkpoints import Checkpoints, LayoutMismatch

    _, unrolled, scanned, _, _ = pair
    config = get_config("tiny")
    config.stages = "sft"
    ckpt = Checkpoints(tmp_path / "ckpt", config)
    try:
        ckpt.save("sft", 1, nnx.state(unrolled, nnx.Param), {}, jnp.zeros(2, jnp.uint32))
        ckpt.manager.wait_until_finished()
        with pytest.raises(LayoutMismatch, match=r"unrolled decoder layers \(model.scan_layers="
                           r"False\) and this model scanned ones: rerun with "
                           r"--config.model.scan_layers=False"):
            ckpt.read(1, nnx.state(scanned, nnx.Param), {}, jnp.zeros(2, jnp.uint32))
        got, _, _ = ckpt.read(1, nnx.state(unrolled, nnx.Param), {}, jnp.zeros(2, jnp.uint32))
        assert _max_diff(got, nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))) == 0.0
    finally:
        ckpt.close()


def test_parity_suites_with_scan_on():
    """The transformers parity tests of both families, every model built scanned
    (`TEMPO_JAX_TEST_SCAN_LAYERS=1`: conftest.py makes scanned layers the default)."""
    tests = Path(__file__).parent
    env = {**os.environ, "TEMPO_JAX_TEST_SCAN_LAYERS": "1", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(tests / "test_model_parity.py"), str(tests / "test_qwen3_vl_model.py")],
        env=env, capture_output=True, text=True, timeout=1500, cwd=tests.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "scanned decoder layers by default" in out.stdout, out.stdout[-2000:]
