"""Scale-out on fake CPU devices, in subprocesses (the rest of the suite keeps one device):
the trainer's SFT and PIR-GRPO update steps (`tempo_jax.training.steps.make_steps`: the
gradient steps and the donating `apply`) and its rollout (`training.grpo.rollout`) on a
(data 2, fsdp 2, tensor 2) mesh against one device, an Orbax checkpoint saved on that mesh
restored on (fsdp 4) and on one device, and a two-process `jax.distributed` run on localhost
(2 x 4 devices) against the one-process run. Greedy generation on 8 devices is covered by
tests/test_sharding.py."""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tempo_jax import distributed
from tempo_jax import sharding as shd
from tempo_jax.safetensors_io import CheckpointReader

WORKER = str(Path(__file__).parent / "scale_worker.py")
TOL = 1e-5


# ---------------------------------------------------------------------------- in process
def test_rule_sets_and_overrides():
    assert shd.get_rules("tpu") == shd.DEFAULT_RULES
    gpu = dict(shd.get_rules("gpu"))
    assert gpu["kv_heads"] is None and gpu["heads"] == "tensor" and gpu["embed"] == "fsdp"
    over = dict(shd.get_rules("default", {"kv_heads": "", "batch": "data,fsdp", "mlp": "fsdp"}))
    assert over["kv_heads"] is None and over["batch"] == ("data", "fsdp")
    assert over["mlp"] == "fsdp"
    with pytest.raises(ValueError, match="unknown sharding rules"):
        shd.get_rules("gpus")
    with pytest.raises(ValueError, match="not a mesh axis"):
        shd.get_rules("default", {"mlp": "model"})

    from tempo_jax.configs.tempo_r0 import get_config

    c = get_config("tiny")
    assert shd.rules_from_config(c.mesh) == shd.DEFAULT_RULES
    c.mesh.rules = "gpu"
    c.mesh.rule_overrides = "kv_heads=tensor;batch=data+fsdp"
    got = dict(shd.rules_from_config(c.mesh))
    assert got["kv_heads"] == "tensor" and got["batch"] == ("data", "fsdp")
    assert got["vocab"] == "tensor"
    c.mesh.rule_overrides = "kv_heads"
    with pytest.raises(ValueError, match="rule_overrides"):
        shd.rules_from_config(c.mesh)


def test_constrain_is_a_no_op_without_a_mesh():
    x = np.ones((2, 3, 4), np.float32)
    assert shd.constrain(x, ("batch", "seq", "embed")) is x
    lowered = jax.jit(lambda a: shd.constrain(a * 2, ("batch", "seq", "embed"))).lower(x)
    assert "sharding_constraint" not in lowered.as_text()
    # a one-device mesh: still nothing to constrain
    with shd.use_mesh(shd.make_mesh()):
        assert shd.constrain(x, ("batch", "seq", "embed")) is x


class _Dev:
    def __init__(self, i, process, slice_index=None):
        self.id, self.process_index, self.platform = i, process, "cpu"
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"D{self.id}"


def test_make_mesh_dcn_keeps_fast_axes_inside_a_host():
    """dcn_data=2 over 2 hosts x 4 devices: the data axis crosses hosts, fsdp and tensor stay
    inside one (a plain reshape when devices have no slice_index)."""
    devs = [_Dev(i, i // 4) for i in range(8)][::-1]  # any order in, sorted by process
    mesh = shd.make_mesh(data=1, fsdp=2, tensor=2, devices=devs, dcn_data=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    for d in range(2):
        assert {x.process_index for x in mesh.devices[d].flat} == {d}
    mesh = shd.make_mesh(data=2, fsdp=-1, tensor=1, devices=devs, dcn_fsdp=2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for i in range(2):  # fsdp = (2 hosts, outer) x (2 devices, inner)
        assert [x.process_index for x in mesh.devices[i].flat] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="do not split"):
        shd.make_mesh(devices=devs[:6], dcn_data=4)
    with pytest.raises(ValueError, match="needs 8 devices per slice"):
        shd.make_mesh(data=2, fsdp=2, tensor=2, devices=devs, dcn_data=2)


def test_make_mesh_uses_the_hybrid_mesh_for_slices(monkeypatch):
    from jax.experimental import mesh_utils

    devs = [_Dev(i, i // 2, slice_index=i // 4) for i in range(8)]
    seen = {}

    def hybrid(ici, dcn, devices):
        seen.update(ici=list(ici), dcn=list(dcn))
        return np.asarray(devices, dtype=object).reshape([a * b for a, b in zip(ici, dcn,
                                                                                strict=True)])

    monkeypatch.setattr(mesh_utils, "create_hybrid_device_mesh", hybrid)
    mesh = shd.make_mesh(data=1, fsdp=-1, tensor=1, devices=devs, dcn_data=2)
    assert seen == {"ici": [1, 4, 1], "dcn": [2, 1, 1]}
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}


def test_distributed_detection():
    assert distributed.detect({}) is None
    assert distributed.detect({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert distributed.detect({"SLURM_NTASKS": "16", "SLURM_PROCID": "3"}) == "slurm"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert distributed.detect({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert distributed.detect({"TEMPO_MULTIHOST": "1"}) == "forced"
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "2"}
    assert distributed.detect(env) == "env"
    assert distributed.init_kwargs("env", env) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert distributed.init_kwargs("slurm", {}) == {}
    assert distributed.initialize(env={}) is False  # single host: nothing started


# ---------------------------------------------------------------------------- subprocesses
@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> Path:
    """8 processed synthetic examples: in every group of 4, two with 12 frames then two with
    4 (different patch counts per host in the two-process run)."""
    from tempo_jax.configs.tempo_r0 import get_config
    from tempo_jax.training.data import load_all, prepare_data
    from tempo_jax.training.setup import model_config, pipeline_config

    wd = tmp_path_factory.mktemp("scale")
    c = get_config("tiny")
    c.data.synthetic_train, c.data.synthetic_val, c.data.irrelevant_ratio = 8, 1, 0.25
    c.saa.max_visual_tokens, c.saa.max_frames = 32, 12
    data = prepare_data(c, wd)
    vision = model_config(c).vision  # the tiny vision tower (its shape only)
    long = load_all(data.train[:4], data.video_root, pipeline_config(c), vision, "long")
    c.saa.max_frames = 4
    short = load_all(data.train[4:8], data.video_root, pipeline_config(c), vision, "short")
    assert long[0]["pixel_values"].shape[0] != short[0]["pixel_values"].shape[0]
    exs = [long[0], long[1], short[0], short[1], long[2], long[3], short[2], short[3]]
    path = wd / "examples.pkl"
    path.write_bytes(pickle.dumps(exs))
    return path


@pytest.fixture(scope="module")
def qwen3_examples(tmp_path_factory) -> Path:
    """8 synthetic examples processed for the Qwen3-VL tower (16-pixel patches)."""
    from tempo_jax.configs.tempo_r0 import get_config
    from tempo_jax.training.data import load_all, prepare_data
    from tempo_jax.training.setup import model_config, pipeline_config

    wd = tmp_path_factory.mktemp("scale_qwen3")
    c = get_config("qwen3_vl_tiny")
    c.data.synthetic_train, c.data.synthetic_val, c.data.irrelevant_ratio = 8, 1, 0.25
    c.saa.max_visual_tokens, c.saa.max_frames = 32, 8
    data = prepare_data(c, wd)
    exs = load_all(data.train[:8], data.video_root, pipeline_config(c), model_config(c).vision,
                   "qwen3")
    assert exs[0]["pixel_values"].shape[1] == 3 * 2 * 16 * 16
    path = wd / "examples.pkl"
    path.write_bytes(pickle.dumps(exs))
    return path


def test_qwen3_vl_steps_and_rollout_on_mesh_match_one_device(qwen3_examples, tmp_path):
    """Qwen3-VL on the (data 2, fsdp 2, tensor 2) mesh: its SFT steps, PIR-GRPO update
    (gradients included) and sampled rollout equal one device's."""
    run = subprocess.run([sys.executable, WORKER, "qwen3", str(qwen3_examples), str(tmp_path)],
                         env=_env(8), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    res = json.loads((tmp_path / "qwen3.json").read_text())
    np.testing.assert_allclose(res["sft_losses_8"], res["sft_losses_1"], rtol=0, atol=TOL)
    assert res["sft_param_change"] > 100 * TOL and res["sft_param_diff"] <= TOL, res
    assert abs(res["grpo_loss_8"] - res["grpo_loss_1"]) <= TOL, res
    assert res["grpo_grad_max"] > 100 * TOL and res["grpo_grad_diff"] <= TOL, res
    assert res["grpo_param_diff"] <= TOL, res
    one, eight = res["rollout_1"], res["rollout_8"]
    assert eight["tokens"] == one["tokens"] and eight["lengths"] == one["lengths"]
    np.testing.assert_allclose(eight["logps"], one["logps"], rtol=0, atol=1e-5)


def _env(devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "TPU_"))}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu", **extra)
    return env


@pytest.fixture(scope="module")
def mesh8(examples, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("mesh8")
    run = subprocess.run([sys.executable, WORKER, "mesh8", str(examples), str(out)],
                         env=_env(8), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "mesh8.json").read_text()), out


def test_sft_step_on_mesh_matches_one_device(mesh8):
    res, _ = mesh8
    assert res["input_spec"] == str(P(("data", "fsdp"), None))
    assert res["q_spec"] == str(P("fsdp", "tensor"))
    np.testing.assert_allclose(res["sft_losses_8"], res["sft_losses_1"], rtol=0, atol=TOL)
    assert res["sft_losses_8"][1] != res["sft_losses_8"][0]
    assert res["sft_param_change"] > 100 * TOL  # the steps moved the parameters
    assert res["sft_param_diff"] <= TOL, res
    # the residual stream and logits are constrained by logical name on the mesh only
    assert res["constraints_1"] == 0
    assert res["constraints_8"] >= 3


def test_grpo_step_on_mesh_matches_one_device(mesh8):
    res, _ = mesh8
    assert abs(res["grpo_loss_8"] - res["grpo_loss_1"]) <= TOL, res
    assert res["grpo_metric_rel_diff"] <= TOL, res  # loss, pg, kl, clip fraction, entropy
    assert res["grpo_grad_max"] > 100 * TOL
    assert res["grpo_grad_diff"] <= TOL, res
    assert res["grpo_param_diff"] <= TOL, res
    assert 0 < res["grpo_clip_fraction"] < 1  # both branches of the clipped objective


def test_rollout_on_mesh_matches_one_device(mesh8):
    """Sampling (temperature 1) on the (2, 2, 2) mesh draws the same tokens with the same
    log-probabilities as on one device."""
    res, _ = mesh8
    one, eight = res["rollout_1"], res["rollout_8"]
    assert len(one["tokens"]) == 8 and len({tuple(t) for t in one["tokens"]}) > 1
    assert eight["tokens"] == one["tokens"] and eight["lengths"] == one["lengths"]
    np.testing.assert_allclose(eight["logps"], one["logps"], rtol=0, atol=1e-5)


def test_checkpoint_reshards_to_fsdp4_and_one_device(mesh8):
    res, _ = mesh8
    assert res["ckpt_fsdp4_diff"] == 0.0
    assert res["ckpt_one_diff"] == 0.0
    assert res["ckpt_fsdp4_devices"] == 4 and res["ckpt_fsdp4_spec"] == str(P("fsdp", None))
    assert res["ckpt_one_devices"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_run_matches_one_process(mesh8, examples, tmp_path):
    """2 processes x 4 CPU devices (jax.distributed over localhost, gloo collectives), each
    with its own half of every batch: same losses and same exported weights as the one-process
    run on the whole batches; only process 0 writes the export."""
    res1, out1 = mesh8
    port = _free_port()
    procs = []
    for i in range(2):
        env = _env(4, JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(i))
        procs.append(subprocess.Popen([sys.executable, WORKER, "proc", str(examples),
                                       str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    errs = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        errs.append(err)
    for p, err in zip(procs, errs, strict=True):
        assert p.returncode == 0, err[-4000:]
    got = [json.loads((tmp_path / f"proc_{i}.json").read_text()) for i in range(2)]
    for g in got:
        assert g["global_rows"] == 4
        np.testing.assert_allclose(g["losses"], res1["sft_losses_1"], rtol=0, atol=TOL)
        assert g["mesh_data_processes"] == [[0], [1]]  # data (DCN) axis across the hosts
        assert g["pixels_local"]  # each host's pixels stay on its own devices
    assert got[0]["local_patches"] != got[1]["local_patches"]
    # PIR-GRPO rollout across the two hosts: each gets its own prompts' samples, equal to the
    # one-process rows (prompt-major, 2 samples per prompt)
    one = res1["rollout_1"]
    for i, g in enumerate(got):
        rows = slice(4 * i, 4 * i + 4)
        assert g["rollout"]["tokens"] == one["tokens"][rows], i
        assert g["rollout"]["lengths"] == one["lengths"][rows], i
        np.testing.assert_allclose(g["rollout"]["logps"], one["logps"][rows], rtol=0, atol=1e-5)
    # evaluation during training across the two hosts (global sampler, temperature 0): every
    # process gets all rows, in order, with the one-process answers and P(none) (distinct per
    # row by more than 1e-4 relative, so a row out of place fails the 2e-5 comparison)
    ref = res1["eval_1"]
    assert len(ref["qids"]) == 8
    assert np.diff(np.sort(ref["p_none"])).min() > 1e-4 * max(ref["p_none"])
    for g in got:
        assert g["eval"]["qids"] == ref["qids"]
        assert g["eval"]["answers"] == ref["answers"]
        np.testing.assert_allclose(g["eval"]["p_none"], ref["p_none"], rtol=2e-5, atol=0)
        assert g["eval"]["metrics"].keys() == ref["metrics"].keys()
        for k, v in ref["metrics"].items():
            assert g["eval"]["metrics"][k] == pytest.approx(v, rel=1e-4, abs=1e-6, nan_ok=True), k
    from tempo_jax.training.evaluation import BATCH, PAD_SUFFIX

    def real(part):
        return [q for q in part if not q.endswith(PAD_SUFFIX)]

    for g in got:  # lock-step streamed shares: as many batches everywhere, padded to BATCH
        assert [len(part) for part in g["lockstep"]] == [BATCH, BATCH]
    assert [len(real(p)) for p in got[0]["lockstep"]] == [2, 1]
    assert [len(real(p)) for p in got[1]["lockstep"]] == [1, 0]
    a, b = CheckpointReader(tmp_path / "hf"), CheckpointReader(out1 / "ref_hf")
    assert sorted(a.keys()) == sorted(b.keys())
    worst = max(float(np.abs(a.read(k).astype(np.float64) - b.read(k).astype(np.float64)).max())
                for k in a.keys())
    assert worst <= TOL, worst
    assert len(list(tmp_path.glob("hf/*.safetensors"))) >= 1
