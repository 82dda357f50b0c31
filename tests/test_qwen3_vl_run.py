"""`qwen3_vl_tiny` through the whole stack: a short SFT -> PIR-GRPO run on synthetic videos
(the family chosen by the config alone), its Hugging Face export loaded by transformers'
`Qwen3VLForConditionalGeneration` (the same tensors, the same logits on a real validation
prompt built by `tempo_jax.hf.prepare_inputs`, the same greedy answer), and `evaluate` on
that export answering as the trainer's own evaluation did."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from test_train import SMALL
from transformers import Qwen3VLForConditionalGeneration

from tempo_jax import cli, hf
from tempo_jax import evaluate as ev
from tempo_jax import train as train_lib
from tempo_jax.configs.tempo_r0 import get_config
from tempo_jax.grounding.metrics import load_jsonl_records
from tempo_jax.models import families


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qwen3_run")
    config = cli.set_fields(get_config("qwen3_vl_tiny"), SMALL)
    report = train_lib.run(config, workdir)
    return workdir, config, report


def test_run_trains_both_stages_on_qwen3_vl(run):
    workdir, config, report = run
    assert families.checkpoint_family(workdir / "hf") == "qwen3_vl"
    assert json.loads((workdir / "hf" / "config.json").read_text())["architectures"] == [
        "Qwen3VLForConditionalGeneration"]
    settings = json.loads((workdir / "hf" / "tempo_settings.json").read_text())
    assert settings["prompt"]["time_aligned_positions"] is False  # not Qwen3-VL's layout
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    sft = [r["loss"] for r in rows if r.get("stage") == "sft"]
    grpo = [r for r in rows if r.get("stage") == "grpo"]
    assert len(sft) == SMALL["sft.steps"] and len(grpo) == SMALL["rl.steps"]
    assert all(math.isfinite(v) for v in sft) and sft[-1] < sft[0]  # SFT learns
    for stage in ("sft", "grpo"):
        assert 0.0 <= report[stage]["refusal_auc"] <= 1.0
        assert report[stage]["num_relevant"] + report[stage]["num_irrelevant"] == len(
            load_jsonl_records(workdir / "predictions.jsonl"))


def test_export_loads_in_transformers_with_equal_tensors_and_logits(run):
    workdir, _, _ = run
    hf_dir = workdir / "hf"
    torch_model = Qwen3VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    ours = load_file(str(hf_dir / "model.safetensors"))
    sd = torch_model.state_dict()
    tied = {"lm_head.weight"} - set(ours)  # tied embeddings: not stored, shared in torch
    assert set(sd) - tied == set(ours)
    for k, v in ours.items():
        np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)
    # a validation prompt of the run's own videos, built the trainer's way (SAA, timestamps)
    row = load_jsonl_records(workdir / "predictions.jsonl")[0]
    video = workdir / "data" / row["video"]
    inputs = hf.prepare_inputs(video, row["query"], hf_dir, return_tensors="np")
    inputs.pop("frame_times")
    model = families.load_pretrained(hf_dir, dtype=jnp.float32)
    assert model.config.family == "qwen3_vl"
    assert (inputs["input_ids"] == model.config.video_token_id).sum() > 0
    ours_logits = np.asarray(model(**inputs))
    with torch.no_grad():
        ref = torch_model(**{k: torch.as_tensor(v) for k, v in inputs.items()}).logits.numpy()
    err = float(np.abs(ours_logits - ref).max())
    print(f"[qwen3-vl export] max |logit diff| vs transformers {err:.2e}")
    assert err <= 1e-4
    # transformers users' greedy answer (hf.greedy_generate, KV-cached) is the trainer's
    pt = hf.prepare_inputs(video, row["query"], hf_dir)
    pt.pop("frame_times")
    answer = hf.greedy_generate(torch_model, pt, max_new_tokens=SMALL["eval_max_new_tokens"])
    assert answer == row["answer"]


def test_evaluate_on_the_export_answers_as_the_trainer(run, tmp_path):
    workdir, _, _ = run
    trainer_rows = {r["qid"]: r for r in load_jsonl_records(workdir / "predictions.jsonl")}
    records = [r for r in json.loads(json.dumps(list(trainer_rows.values())))[:3]]
    for r in records:
        r.setdefault("windows", [])
    metrics = ev.evaluate_model(workdir / "hf", records, str(workdir / "data"),
                                tmp_path / "out", max_new_tokens=SMALL["eval_max_new_tokens"],
                                batch_size=4)
    assert metrics["num_queries"] == 3 and metrics["num_failed"] == 0
    answers = {a["qid"]: a for a in load_jsonl_records(tmp_path / "out" / "answers.jsonl")}
    for qid, a in answers.items():
        assert a["answer"] == trainer_rows[qid]["answer"], qid
