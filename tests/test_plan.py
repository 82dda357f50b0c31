"""The memory planner: parameter counts, shard bytes against an independent computation,
the optimizer phase against a hand count and against the trainer's `apply` compiled on this
CPU, the fits verdict, the smallest-mesh search and the CLI. Abstract shapes only (no
weights are allocated)."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding

from tempo_jax import plan as P
from tempo_jax import sharding as shd
from tempo_jax.cli import load_config
from tempo_jax.models.qwen2_5_vl.config import preset
from tempo_jax.models.qwen2_5_vl.params import abstract_model


@pytest.fixture(scope="module")
def cfg7b():
    return load_config("configs/tempo_r0.py:7b")


@pytest.fixture(scope="module")
def cfg3b():
    return load_config("configs/tempo_r0.py:3b")


def test_param_counts_equal_the_released_models(cfg7b, cfg3b):
    assert P.plan(cfg7b, {"fsdp": 64}, "v5p", search=False)["param_count"] == 8_292_166_656
    assert P.plan(cfg3b, {"fsdp": 64}, "v5p", search=False)["param_count"] == 3_754_622_976


@pytest.mark.parametrize("size", ["qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b"])
def test_qwen3_vl_plans_count_what_transformers_builds(size):
    """The planner sizes the Qwen3-VL configs (the family picked by the config alone) with
    the parameter count of transformers' own model of the same config (meta device)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = load_config(f"configs/tempo_r0.py:{size}")
    plan = P.plan(config, {"fsdp": 64}, "v5p", search=False)
    with torch.device("meta"):
        ref = Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(**P.model_config(config).to_hf_dict()))
    assert plan["param_count"] == sum(p.numel() for p in ref.parameters())
    assert plan["vision_param_count"] == sum(p.numel() for p in ref.model.visual.parameters())
    assert plan["peak_phase"] in plan["phases"] and plan["per_device_bytes"] > 0


def test_parameter_bytes_scale_with_fsdp(cfg7b):
    mcfg = P.model_config(cfg7b)
    one = P.tensor_plans(mcfg, {"data": 1, "fsdp": 1, "tensor": 1})
    assert sum(p.shard_bytes for p in one) == 8_292_166_656 * 2  # bf16, nothing split
    for n in (8, 64):
        plans = P.tensor_plans(mcfg, {"data": 1, "fsdp": n, "tensor": 1})
        split = [p for p in plans if p.shard_size < p.size]
        # a tensor whose fsdp dimension divides holds exactly 1/n of itself
        assert all(p.shard_size * n == p.size for p in split)
        total = sum(p.shard_bytes for p in plans)
        whole = sum(p.size * p.itemsize for p in plans)
        # only small tensors (norm scales, non-divisible biases) stay whole
        assert whole / n <= total < whole / n * 1.01


def test_shard_bytes_match_an_independent_count():
    """Per-device bytes on a 2 x 2 x 2 mesh equal JAX's own shard shapes of every parameter
    of the abstract model under the rules."""
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    amesh = AbstractMesh((2, 2, 2), shd.MESH_AXES)
    model = abstract_model(preset("tiny"), jnp.bfloat16)
    expect = 0
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        spec = shd.logical_to_spec(var.get_metadata().get("axes"), shd.DEFAULT_RULES, amesh,
                                   value.shape)
        local = NamedSharding(amesh, spec).shard_shape(value.shape)
        expect += math.prod(local) * jnp.dtype(value.dtype).itemsize
    plans = P.tensor_plans(preset("tiny"), mesh, dtype="bfloat16")
    assert sum(p.shard_bytes for p in plans) == expect
    # something really is split over each axis that has a rule
    assert any(p.spec and "tensor" in jax.tree.leaves(tuple(p.spec)) for p in plans)
    assert any(p.spec and "fsdp" in jax.tree.leaves(tuple(p.spec)) for p in plans)


def test_fits_flips_as_the_chip_shrinks(cfg3b):
    mesh = {"fsdp": 64}
    big = P.plan(cfg3b, mesh, "v5p", search=False)
    small = P.plan(cfg3b, mesh, "v5e", search=False)
    assert big["per_device_bytes"] == small["per_device_bytes"]
    assert big["fits"] and not small["fits"]
    assert big["per_device_bytes"] <= big["hbm_bytes"]
    assert small["per_device_bytes"] > small["hbm_bytes"]


def test_smallest_mesh_fits_and_half_of_it_does_not(cfg7b):
    p = P.plan(cfg7b, {"fsdp": 8}, "v4")
    assert not p["fits"]
    best = p["smallest_mesh"]
    assert best is not None
    mesh = best["mesh"]
    assert P.plan(cfg7b, mesh, "v4", search=False)["fits"]
    half = dict(mesh)
    if half["tensor"] > 1:
        half["tensor"] //= 2
    else:
        half["fsdp"] //= 2
    assert not P.plan(cfg7b, half, "v4", search=False)["fits"]
    # and no smaller candidate fits either
    for cand in P.candidate_meshes({"data": 1}):
        if math.prod(cand.values()) < best["devices"]:
            assert not P.plan(cfg7b, cand, "v4", search=False)["fits"], cand


def test_phases_hold_what_train_holds(cfg7b):
    p = P.plan(cfg7b, {"fsdp": 64}, "v5p", search=False)
    b = p["bytes"]
    # the vision tower is frozen: gradients cover the trainable (text) part only, the
    # reference model is a copy of it (beta > 0), adamw keeps both moments in fp32 = 8 bytes
    assert p["trainable_param_count"] == p["param_count"] - p["vision_param_count"]
    assert b["gradients"] == b["reference model"] < b["parameters"]
    assert b["optimizer state"] == b["gradients"] // 2 * 8
    assert set(p["phases"]) == {"sft step", "grpo rollout", "grpo update", "optimizer apply"}
    # rollout KV cache: 256 rows / 64 devices x (8192 + 256) x 28 layers x K,V x 4 x 128 x bf16
    assert b["rollout KV cache"] == 4 * (8192 + 256) * 28 * 2 * 4 * 128 * 2
    no_ref = cfg7b.copy_and_resolve_references()
    no_ref.rl.beta = 0.0
    assert P.plan(no_ref, {"fsdp": 64}, "v5p", search=False)["bytes"]["reference model"] == 0


def _hand_count(cfg):
    """(parameter bytes, trainable elements) from the abstract model's parameter shapes."""
    dtype = jnp.dtype(cfg.model.dtype)
    model = abstract_model(P.model_config(cfg), dtype)
    total, trainable = 0, 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        total += math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
        if not (cfg.model.freeze_vision and "visual" in path):
            trainable += math.prod(value.shape)
    return total, trainable


def test_optimizer_apply_holds_one_donated_copy(cfg7b):
    """The update donates the parameters and the optimizer state (training.steps.apply_fn):
    one copy of each, fp32 Adam moments (8 bytes per trainable parameter, with bf16
    parameters), the gradients, one optimizer state of the skip guard's temporaries."""
    params_b, trainable = _hand_count(cfg7b)
    assert params_b == 8_292_166_656 * 2 and trainable == 7_615_616_512
    p = P.plan(cfg7b, {"fsdp": 1}, "h200", search=False)
    ph = p["phases"]["optimizer apply"]
    assert p["bytes"]["parameters"] == ph["parameters"] == params_b
    assert p["bytes"]["optimizer state"] == ph["optimizer state"] == trainable * 8
    assert ph["gradients"] == trainable * 2
    assert ph["update temporaries (skip guard)"] == trainable * 8
    assert ph["reference model"] == trainable * 2
    named = params_b + trainable * (2 + 8 + 8 + 2)
    assert ph["total"] == named + int(P.MARGIN * named)


def _cpu_mesh():
    return shd.make_mesh(data=1, fsdp=1, tensor=1, devices=jax.devices()[:1])


def _analytic(ph: dict) -> int:
    """A phase's bytes without the margin for unnamed XLA temporaries."""
    return ph["total"] - ph["xla temporaries margin"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optimizer_apply_matches_the_compiled_step(dtype):
    """The trainer's donating `apply` (make_steps), compiled on this CPU by the planner's AOT
    path: its outputs alias the donated parameters and moments, and its peak plus what stays
    resident (the reference copy) is the analytic phase within 1%."""
    cfg = load_config("configs/tempo_r0.py:tiny")
    cfg.model.dtype = dtype
    # a GPU chip: its count keeps the guard's temporaries, as XLA:CPU allocates them (XLA:TPU
    # fuses them away; the TPU compiler's test checks that count)
    p = P.plan(cfg, {"fsdp": 1}, "h100", search=False)
    ph = p["phases"]["optimizer apply"]
    got = P.compile_phases(cfg, _cpu_mesh(), platform="cpu",
                           phases=["optimizer apply"])["phases"]["optimizer apply"]
    aliased = got["alias_size_in_bytes"] - ph["parameters"] - ph["optimizer state"]
    assert 0 <= aliased <= 64  # and the optimizer's step counters
    assert got["total"] == pytest.approx(_analytic(ph), rel=0.01)
    # the count before (no donation: two copies of the parameters and of the moments, no
    # guard temporaries) is off by far more than that
    undonated = _analytic(ph) + ph["parameters"] + ph["optimizer state"] - ph[
        "update temporaries (skip guard)"]
    assert undonated > 1.05 * got["total"]


@pytest.mark.slow
def test_gradient_steps_compile_near_the_analytic_count():
    """The factory's sft_grad and grpo_grad, lowered and compiled on this CPU by the AOT path
    (tiny config): the compiler's peak plus the resident state is within a factor 1.5 of the
    analytic phase (the activation formulas are estimates; the CPU compiler fuses less than
    TPU's)."""
    cfg = load_config("configs/tempo_r0.py:tiny")
    p = P.plan(cfg, {"fsdp": 1}, "v5p", search=False)
    got = P.compile_phases(cfg, _cpu_mesh(), platform="cpu",
                           phases=["sft step", "grpo update"])["phases"]
    assert set(got) == {"sft step", "grpo update"}
    for name, ph in got.items():
        ratio = ph["total"] / _analytic(p["phases"][name])
        assert 1 / 1.5 < ratio < 1.5, (name, ratio)


def test_json_last_line(capsys):
    P.main(["--config", "configs/tempo_r0.py:tiny", "--mesh", "fsdp=2", "--chip", "v5e",
            "--method", "analytic", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    data = json.loads(out[-1])
    for key in ("param_count", "per_device_bytes", "fits", "method"):
        assert key in data
    assert data["method"] == "analytic" and data["fits"] is True
    assert "per device, GiB" in "\n".join(out[:-1])


def test_config_overrides_reach_the_plan(capsys):
    p = P.main(["--config", "configs/tempo_r0.py:7b", "--mesh", "fsdp=64", "--chip", "v5p",
                "--method", "analytic", "--config.rl.beta=0",
                "--config.model.attention_backend=splash"])
    assert p["bytes"]["reference model"] == 0 and p["attention_backend"] == "splash"


@pytest.mark.parametrize("text, message", [
    ("fsdp", "expected AXIS=SIZE"),
    ("fsdp=x", "positive integer"),
    ("fsdp=0", "positive integer"),
    ("pipeline=4", "expected AXIS=SIZE"),
    ("fsdp=2,fsdp=4", "given twice"),
    ("", "empty --mesh"),
])
def test_bad_mesh_is_a_clear_error(text, message, capsys):
    with pytest.raises(ValueError, match=message):
        P.parse_mesh(text)
    with pytest.raises(SystemExit):
        P.main(["--mesh", text, "--chip", "v5p", "--method", "analytic"])
    assert message in capsys.readouterr().err


def test_parse_mesh_defaults():
    assert P.parse_mesh("fsdp=64") == {"data": 1, "fsdp": 64, "tensor": 1}
    assert P.parse_mesh("data=2, fsdp=32,tensor=1") == {"data": 2, "fsdp": 32, "tensor": 1}
    with pytest.raises(ValueError, match="unknown mesh axes"):
        P.plan(load_config("configs/tempo_r0.py:tiny"), {"pipeline": 2}, "v5p")


def test_aot_unavailable_falls_back_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(P.aot, "libtpu_available", lambda: (False, "libtpu is not installed"))
    P.main(["--config", "configs/tempo_r0.py:tiny", "--mesh", "fsdp=4", "--chip", "v5p",
            "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1])["method"] == "analytic"
    assert any("AOT unavailable, analytic count used: libtpu is not installed" in line
               for line in out)
    P.main(["--config", "configs/tempo_r0.py:tiny", "--mesh", "fsdp=4", "--chip", "h100"])
    assert "AOT compilation needs a TPU target" in capsys.readouterr().out


def test_topology_names():
    v5p, v4, v5e = P.CHIPS["v5p"], P.CHIPS["v4"], P.CHIPS["v5e"]
    assert P.topology_name(v5p, 8)[0] == "v5:2x2x2"
    assert P.topology_name(v5p, 16)[0] == "v5:2x2x4"
    assert P.topology_name(v5p, 64) == ("v5:4x4x4", (2, 2, 1), (True, True, True))
    assert P.topology_name(v5p, 256)[0] == "v5:4x8x8"
    assert P.topology_name(v4, 32)[0] == "v4:2x4x4"
    assert P.topology_name(v5e, 16)[0] == "v5e:4x4"
    assert P.topology_name(v5e, 128)[0] == "v5e:8x16"
    with pytest.raises(ValueError, match="power-of-two"):
        P.topology_name(v5p, 24)


@pytest.mark.skipif(not P.libtpu_available()[0], reason="libtpu not installed")
def test_tpu_compiler_plans_every_phase_of_the_tiny_config(capsys):
    """The trainer's steps (tempo_jax.training.steps) and the rollout's sampling program,
    compiled by the real TPU compiler (libtpu) for a 4-chip v5p slice on this CPU, as pods
    run them: decoder scanned, splash attention (a Mosaic kernel, run per device under
    shard_map). The optimizer apply's compiled arguments are the planner's parameters +
    gradients + optimizer state, exactly up to the TPU's layout padding."""
    cfg = load_config("configs/tempo_r0.py:tiny")
    cfg.model.scan_layers = True
    cfg.model.attention_backend = "auto"  # splash on TPU
    p = P.run(cfg, {"fsdp": 4}, "v5p", method="aot")
    assert p["method"] == "aot:v5:2x2x1" and p["fits"] and p["attention_backend"] == "splash"
    compiled = p["aot"]["phases"]
    assert set(compiled) == set(P.aot.PHASES)
    for name, ph in compiled.items():
        assert ph["peak"] > 0 and ph["total"] >= ph["peak"], name
        assert p["aot"]["compile_seconds"][name] > 0
    apply, count = compiled["optimizer apply"], p["phases"]["optimizer apply"]
    expected = count["parameters"] + count["gradients"] + count["optimizer state"]
    padding = apply["argument_size_in_bytes"] - expected
    print(f"apply arguments: compiled {apply['argument_size_in_bytes']:,} B, planned "
          f"{expected:,} B, layout padding {padding:,} B ({100 * padding / expected:.2f}%)")
    assert 0 <= padding <= 0.02 * expected
    # the donated parameters and moments come back in place, and XLA:TPU needs no guard
    # temporaries: the count for TPU (none) is the compiled figure within 15%
    assert apply["alias_size_in_bytes"] >= count["parameters"] + count["optimizer state"]
    assert count["update temporaries (skip guard)"] == 0
    assert apply["total"] == pytest.approx(count["total"], rel=0.15)
    assert apply["peak_memory_in_bytes"] > 0  # XLA's own figure, reported beside
    # the gradients leave sharded like the parameters (explicit layout): per device, the
    # SFT step returns one shard of them, not a whole copy
    assert compiled["sft step"]["output_size_in_bytes"] < 1.05 * count["gradients"]
    text = P.format_plan(p)
    assert "compiled / analytic" in text and "compile seconds" in text
    assert "[plan] compiling sft step" in capsys.readouterr().err  # progress per phase


@pytest.mark.skipif(not P.libtpu_available()[0], reason="libtpu not installed")
def test_compiler_out_of_memory_is_a_verdict_not_an_error():
    """The tiny config's GRPO batch scaled until its update cannot fit one 16 GiB v5e chip:
    the compiler's RESOURCE_EXHAUSTED comes back as `fits: False` with the bytes it needed
    and had, and the plan says so (also under --method auto)."""
    cfg = load_config("configs/tempo_r0.py:tiny")
    cfg.stages = "grpo"
    cfg.rl.batch_size = 512
    for method in ("aot", "auto"):
        p = P.run(cfg, {"fsdp": 1}, "v5e", method=method, phases=["grpo update"])
        assert p["method"].startswith("aot:v5e") and p["fits"] is False
        refused = p["compiler_refused"]["grpo update"]
        assert refused["needed"] > refused["available"] > 15 * 2**30
        assert "RESOURCE_EXHAUSTED" in refused["message"]
        assert "the compiler refused grpo update" in P.format_plan(p)


def test_out_of_memory_messages_parse():
    got = P.aot.out_of_memory(RuntimeError(
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
        "temporaries (90.48G) exceeds available HBM (15.75G)."))
    assert got["needed"] == int(90.48 * 2**30) and got["available"] == int(15.75 * 2**30)
    assert got["needed_for"] == "HLO temporaries" and got["fits"] is False
    got = P.aot.out_of_memory(RuntimeError(
        "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
        "space hbm. Used 120.5G of 95.74G hbm. Exceeded hbm capacity by 24.8G."))
    assert got["needed"] == int(120.5 * 2**30) and got["available"] == int(95.74 * 2**30)
    assert P.aot.out_of_memory(RuntimeError("INVALID_ARGUMENT: a shape")) is None
