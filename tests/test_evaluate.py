"""`python -m tempo_jax.evaluate run`: model evaluation end to end on synthetic videos with an
exported (random) tiny model: official-format predictions, missing videos reported and kept
in every denominator, resume after a crash, the official QVHighlights set for that dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from tempo_jax import cli
from tempo_jax import evaluate as ev
from tempo_jax.configs.tempo_r0 import get_config
from tempo_jax.data.synthetic import SyntheticSpec, generate
from tempo_jax.grounding.metrics import load_jsonl_records, qvhighlights_metrics
from tempo_jax.models.qwen2_5_vl.params import save_pretrained
from tempo_jax.training import setup as train_setup

TINY = {"model.tiny_overrides.hidden_size": 64, "model.tiny_overrides.num_hidden_layers": 2,
        "model.tiny_overrides.intermediate_size": 128, "saa.max_visual_tokens": 32,
        "saa.max_frames": 12}


def _config() -> ml_collections.ConfigDict:
    return cli.set_fields(get_config("tiny"), TINY)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = _config()
    model = train_setup.build_model(config)
    hf_dir = root / "hf"
    save_pretrained(model, hf_dir)
    (hf_dir / train_setup.SETTINGS_FILE).write_text(json.dumps(train_setup.settings_dict(config)))
    ann = generate(root / "videos", SyntheticSpec(num=3, seed=5, max_events=1,
                                                  distractor_prob=0.0), progress=False)
    return root, hf_dir, ann


def _records(ann: Path, missing: bool = True) -> list[dict]:
    recs = [dict(r) for r in ev.load_records("jsonl", ann)]
    if missing:
        extra = dict(recs[0], qid="gone_q0", video="videos/does_not_exist.mp4")
        recs.append(extra)
    return recs


def test_run_writes_submission_answers_metrics_and_reports_missing(setup, tmp_path):
    root, hf_dir, ann = setup
    records = _records(ann)
    out = tmp_path / "out"
    metrics = ev.evaluate_model(hf_dir, records, str(ann.parent), out, max_new_tokens=8,
                                batch_size=4)
    subs = load_jsonl_records(out / "predictions.jsonl")
    answers = load_jsonl_records(out / "answers.jsonl")
    assert [s["qid"] for s in subs] == [r["qid"] for r in records]  # nothing dropped
    assert {a["qid"] for a in answers} == {r["qid"] for r in records}
    gone = next(a for a in answers if a["qid"] == "gone_q0")
    assert "does_not_exist" in gone["error"]
    assert metrics["num_failed"] == 1 and "gone_q0" in metrics["failed"]
    assert metrics["num_queries"] == len(records)
    # the missing one is a relevant query: it stays in the denominator as IoU 0
    assert metrics["num_relevant"] == sum(r["relevant"] for r in records)
    for s, r in zip(subs, records, strict=True):
        wins = s["pred_relevant_windows"]
        assert len(wins) == 1 and len(wins[0]) == 3  # never an empty list
        assert 0 <= wins[0][0] <= wins[0][1] <= r["duration"]
        assert len(s["pred_saliency_scores"]) == int(r["duration"] / 2)
    sub_gone = next(s for s in subs if s["qid"] == "gone_q0")
    assert sub_gone["pred_relevant_windows"] == [[0.0, 0.0, 0.0]]
    assert json.loads((out / "metrics.json").read_text())["num_failed"] == 1
    assert (out / "timeline.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "settings.json").read_text())
    assert saved["prompt"] == json.loads((hf_dir / "tempo_settings.json").read_text())["prompt"]


def test_run_resumes_after_a_crash(setup, tmp_path):
    root, hf_dir, ann = setup
    records = _records(ann, missing=False)
    out = tmp_path / "out"
    ev.evaluate_model(hf_dir, records, str(ann.parent), out, max_new_tokens=8)
    lines = (out / "answers.jsonl").read_text().splitlines()
    # a crash after two answers, mid-write of the third; the kept answers are marked so
    # that re-answering them would show
    kept = [json.loads(x) for x in lines[:2]]
    for row in kept:
        row["answer"] = "<answer>1 to 2</answer>"
    (out / "answers.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in kept) + lines[2][: len(lines[2]) // 2])
    metrics = ev.evaluate_model(hf_dir, records, str(ann.parent), out, max_new_tokens=8)
    final = {a["qid"]: a for a in load_jsonl_records_tolerant(out / "answers.jsonl")}
    assert set(final) == {r["qid"] for r in records}
    for row in kept:
        assert final[row["qid"]]["answer"] == "<answer>1 to 2</answer>"  # not redone
    first = next(s for s in load_jsonl_records(out / "predictions.jsonl")
                 if s["qid"] == kept[0]["qid"])
    assert first["pred_relevant_windows"][0][:2] == [1.0, 2.0]
    assert metrics["num_queries"] == len(records)


def load_jsonl_records_tolerant(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_qvhighlights_run_adds_the_official_metrics(setup, tmp_path):
    """A QVHighlights-format split built from the synthetic videos: the official set is
    computed on the written submission file, equal to scoring that file directly."""
    root, hf_dir, ann = setup
    vroot = tmp_path / "videos"
    vroot.mkdir()
    gt = []
    for i, r in enumerate(r for r in load_jsonl_records(ann) if r["relevant"]):
        vid = f"yt{i}_{i * 10}.0_{i * 10 + 150}.0"
        shutil.copy(ann.parent / r["video"], vroot / f"{vid}.mp4")
        n = int(r["duration"] / 2)
        clips = [c for c in range(n) if r["windows"][0][0] <= 2 * c + 1 <= r["windows"][0][1]]
        gt.append({"qid": 100 + i, "query": r["query"], "duration": r["duration"], "vid": vid,
                   "relevant_windows": r["windows"], "relevant_clip_ids": clips or [0],
                   "saliency_scores": [[2, 3, 4]] * len(clips or [0])})
    gt_path = tmp_path / "highlight_val_release.jsonl"
    gt_path.write_text("".join(json.dumps(g) + "\n" for g in gt))
    out = tmp_path / "out"
    code = ev.main(["run", "--checkpoint", str(hf_dir), "--dataset", "qvhighlights",
                    "--video-root", str(vroot), "--annotations", str(gt_path),
                    "--out", str(out), "--max-new-tokens", "8"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    subs = load_jsonl_records(out / "predictions.jsonl")
    assert [s["qid"] for s in subs] == [g["qid"] for g in gt]  # official ids, as ints
    # (compared as JSON text: empty length splits are NaN, which never equals itself)
    assert json.dumps(metrics["official"]) == json.dumps(qvhighlights_metrics(subs, gt))
    assert "MR-full-R1@0.5" in metrics["official"]["brief"]


def test_submission_row():
    rec = {"qid": "7", "query": "q", "video": "v_0.0_150.0", "duration": 9.0}
    row = ev.submission_row(rec, (2.5, 5.1))
    assert row["qid"] == 7 and row["vid"] == "v_0.0_150.0"
    assert row["pred_relevant_windows"] == [[2.5, 5.1, 1.0]]
    # clips of 2 s: centres 1, 3, 5, 7 -> inside [2.5, 5.1]: 3 and 5
    assert row["pred_saliency_scores"] == [0.0, 1.0, 1.0, 0.0]
    clipped = ev.submission_row(rec, (-3.0, 40.0))["pred_relevant_windows"]
    assert clipped == [[0.0, 9.0, 1.0]]
    for bad in ("refuse", None):
        row = ev.submission_row(rec, bad)
        assert row["pred_relevant_windows"] == [[0.0, 0.0, 0.0]]
        assert not np.any(row["pred_saliency_scores"])


def test_overrides_and_bad_checkpoint(setup, tmp_path):
    settings = {"saa": {"max_visual_tokens": 96}, "prompt": {"query_first": True}}
    got = ev.apply_overrides(settings, ["saa.max_visual_tokens=2048", "prompt.query_first=false"])
    assert got == {"saa": {"max_visual_tokens": 2048}, "prompt": {"query_first": False}}
    assert settings["saa"]["max_visual_tokens"] == 96  # input untouched
    with pytest.raises(ValueError, match="no field 'nope'"):
        ev.apply_overrides(settings, ["saa.nope=1"])
    with pytest.raises(ValueError, match="SECTION|saa.FIELD"):
        ev.apply_overrides(settings, ["max_visual_tokens=1"])
    with pytest.raises(FileNotFoundError, match="neither a training workdir"):
        ev.load_checkpoint(tmp_path)
    code = ev.main(["run", "--checkpoint", str(tmp_path), "--video-root", str(tmp_path),
                    "--annotations", str(setup[2]), "--out", str(tmp_path / "o")])
    assert code == 1
