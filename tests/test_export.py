"""Export of a training checkpoint to Hugging Face, and running the export with transformers.

One short SFT run of the tiny model (vision tower frozen, so the frozen-parameter path is
exercised) is exported with the CLI entry point; the stock torch model then has to agree with
our JAX model on logits (ETA inputs built by `tempo_jax.hf.prepare_inputs`), on greedy
decoding, and with the answers our evaluator wrote during training.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

from tempo_jax import cli, hf
from tempo_jax import export as export_lib
from tempo_jax import train as train_lib
from tempo_jax.configs.tempo_r0 import get_config
from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data.pipeline import collate, load_example, model_inputs
from tempo_jax.data.sources import VideoIndex
from tempo_jax.generate import generate_from_inputs
from tempo_jax.safetensors_io import CheckpointReader
from tempo_jax.training import setup

TOL = 1e-4  # logits of one forward pass, transformers vs JAX (fp32)
# log-probabilities of decoded tokens, transformers vs our KV-cached sampler: a log-softmax
# over 152k entries after a differently-ordered cached decode differs by ~1e-4; an
# off-by-one decode position moves them by 3e-2 and more
LOGP_TOL = 1e-3
STEPS, EVERY = 40, 20  # checkpoints at 20 and 40
EVAL_TOKENS = 12
OVERRIDES = {  # the tiny model of tests/test_train.py, trained long enough to answer "<answer>"
    "stages": "sft", "seed": 0,
    "data.synthetic_train": 4, "data.synthetic_val": 2, "data.irrelevant_ratio": 0.34,
    "sft.steps": STEPS, "sft.batch_size": 4, "sft.warmup_steps": 1, "sft.learning_rate": 1e-2,
    "model.tiny_overrides.hidden_size": 64, "model.tiny_overrides.num_hidden_layers": 2,
    "model.tiny_overrides.intermediate_size": 128, "model.freeze_vision": True,
    "ckpt_every": EVERY, "ckpt_keep": 3, "log_every": 10,
    "eval_max_new_tokens": EVAL_TOKENS, "saa.max_visual_tokens": 32, "saa.max_frames": 12,
}
SAMPLE = "Find 12.5s to 17.8s: a red circle moves <|im_end|> naïve 東京 <answer>none</answer>"


def small_config() -> ml_collections.ConfigDict:
    return cli.set_fields(get_config("tiny"), OVERRIDES)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = tmp_path_factory.mktemp("run")
    train_lib.run(small_config(), wd)
    return wd


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "hf"
    got = export_lib.main(["--checkpoint", str(workdir), "--out", str(out)])
    assert Path(got) == out.absolute()
    return out


@pytest.fixture(scope="module")
def torch_model(exported):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        exported, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def jax_model(workdir):
    return export_lib.load_workdir(workdir)


def _val_rows(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "predictions.jsonl").read_text().splitlines() if x]


def _video(workdir, row) -> Path:
    return workdir / "data" / row["video"]


def _weights(path) -> dict[str, np.ndarray]:
    r = CheckpointReader(path)
    return {k: r.read(k) for k in r.keys()}


def _torch_logits(model, inputs, position_ids=True) -> np.ndarray:
    kw = {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values_videos",
                                 "video_grid_thw")}
    if position_ids:
        kw["position_ids"] = inputs["position_ids"]
    with torch.no_grad():
        return model(**kw).logits[0].numpy()


# ----------------------------------------------------------------------------- the export


def test_export_writes_weights_settings_tokenizer_and_equals_the_trainers(workdir, exported):
    names = {p.name for p in exported.iterdir()}
    for f in ("config.json", "model.safetensors", "tempo_settings.json", "tokenizer.json",
              "tokenizer_config.json", "preprocessor_config.json"):
        assert f in names, f
    config = small_config()
    assert json.loads((exported / "tempo_settings.json").read_text()) == \
        setup.settings_dict(config)
    # the latest checkpoint, with the frozen vision tower rebuilt from the config, is exactly
    # what the trainer itself exported at the end of the run
    ours, trainers = _weights(exported), _weights(workdir / "hf")
    # one export path: the trainer's hf/ holds the same files, byte for byte apart from the
    # safetensors (their tensors compared below; the header order may differ)
    assert {p.name for p in (workdir / "hf").iterdir()} == names
    for f in names - {n for n in names if n.endswith(".safetensors")}:
        assert (workdir / "hf" / f).read_bytes() == (exported / f).read_bytes(), f
    assert set(ours) == set(trainers)
    assert any(k.startswith("visual.") for k in ours)
    for k, v in trainers.items():
        np.testing.assert_array_equal(ours[k], v, err_msg=k)
    pre = json.loads((exported / "preprocessor_config.json").read_text())
    assert (pre["min_pixels"], pre["max_pixels"]) == (config.saa.min_pixels,
                                                      config.saa.max_pixels)
    proc = AutoImageProcessor.from_pretrained(exported)
    assert (proc.size["shortest_edge"], proc.size["longest_edge"]) == (
        config.saa.min_pixels, config.saa.max_pixels)
    assert (proc.patch_size, proc.temporal_patch_size, proc.merge_size) == (14, 2, 2)


def test_step_flag_picks_that_checkpoint(workdir, exported, tmp_path):
    assert export_lib.available_steps(workdir) == [EVERY, STEPS]
    out = export_lib.main(["--checkpoint", str(workdir), "--step", str(EVERY),
                           "--out", str(tmp_path / "hf20")])
    early, latest = _weights(out), _weights(exported)
    changed = [k for k in latest if not np.array_equal(early[k], latest[k])]
    trainable = [k for k in latest if not k.startswith("visual.")]
    assert set(changed) == set(trainable), "every trainable tensor moves between steps 20 and 40"
    for k in latest:  # the frozen tower is the same at every step
        if k.startswith("visual."):
            np.testing.assert_array_equal(early[k], latest[k], err_msg=k)


def test_missing_step_workdir_and_settings_give_clear_errors(workdir, tmp_path):
    with pytest.raises(ValueError, match=rf"no checkpoint at step 7; available steps: "
                                         rf"{EVERY}, {STEPS}"):
        export_lib.main(["--checkpoint", str(workdir), "--step", "7",
                         "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no config.json"):
        export_lib.load_workdir(empty)
    (empty / "config.json").write_text((workdir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"{empty}: no checkpoints"):
        export_lib.load_workdir(empty)
    with pytest.raises(FileNotFoundError, match="tempo_settings.json not found"):
        hf.load_settings(empty)
    # the command line reports the problem in one line and a non-zero status
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    res = subprocess.run([sys.executable, "-m", "tempo_jax.export", "--checkpoint",
                          str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    assert "error:" in res.stderr and "no config.json" in res.stderr
    assert "Traceback" not in res.stderr


def test_init_checkpoint_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "qwen"
    src.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                 "preprocessor_config.json", "chat_template.json", "generation_config.json"):
        (src / name).write_text(f'{{"from": "{name}"}}')
    (src / "model.safetensors").write_bytes(b"weights")  # never copied: ours replace them
    config = ml_collections.ConfigDict({"model": {"init_checkpoint": str(src)}})
    out = tmp_path / "out"
    out.mkdir()
    got = export_lib.write_tokenizer_files(config, None, out)
    assert sorted(got) == sorted(p.name for p in out.iterdir())
    assert "model.safetensors" not in got and "preprocessor_config.json" in got
    for name in got:
        assert (out / name).read_text() == (src / name).read_text()
    (src / "tokenizer.json").unlink()
    (src / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        export_lib.write_tokenizer_files(config, None, tmp_path)


def test_saved_tokenizer_encodes_like_ours(exported):
    theirs = AutoTokenizer.from_pretrained(exported)
    ours = prompts_lib.load_tokenizer(None)
    a = theirs(SAMPLE, add_special_tokens=False)["input_ids"]
    b = ours(SAMPLE, add_special_tokens=False)["input_ids"]
    assert a == b
    assert prompts_lib.IM_END_ID in a  # special tokens survive the round trip
    assert theirs.convert_tokens_to_ids("<|video_pad|>") == prompts_lib.VIDEO_PAD_ID
    assert theirs.decode(a) == SAMPLE


# ----------------------------------------------------------------------------- transformers


def test_prepare_inputs_is_the_evaluators_prompt(workdir, exported, jax_model):
    config, model = jax_model
    row = _val_rows(workdir)[0]
    settings = hf.load_settings(exported)
    got = hf.prepare_inputs(_video(workdir, row), row["query"], settings, return_tensors="np")
    pt = hf.prepare_inputs(_video(workdir, row), row["query"], exported)  # dir, torch tensors
    for k, v in got.items():
        assert isinstance(pt[k], torch.Tensor)
        np.testing.assert_array_equal(pt[k].numpy(), v, err_msg=k)
    pcfg = setup.pipeline_config(config, batch_size=8, with_answer=False, pad_side="left")
    ex = load_example(row, VideoIndex(workdir / "data"),
                      prompts_lib.load_tokenizer(None), pcfg, model.config.vision)
    np.testing.assert_array_equal(got["input_ids"][0], ex["input_ids"])
    np.testing.assert_array_equal(got["position_ids"][:, 0], ex["position_ids"])
    np.testing.assert_array_equal(got["pixel_values_videos"], ex["pixel_values"])
    np.testing.assert_array_equal(got["video_grid_thw"], ex["video_grid_thw"])
    np.testing.assert_allclose(got["frame_times"], row["frame_times"])
    k = len(got["video_grid_thw"])
    assert k >= 2 and (got["video_grid_thw"][:, 0] == 1).all()  # one ETA segment per patch
    ids = got["input_ids"][0]
    assert (ids == prompts_lib.VISION_START_ID).sum() == k
    text = prompts_lib.load_tokenizer(None).decode(ids)
    assert f"{row['frame_times'][0]:.1f}s<|vision_start|>" in text  # textual timestamps


def test_logits_match_ours(workdir, exported, torch_model, jax_model):
    _, model = jax_model
    settings = hf.load_settings(exported)
    worst = 0.0
    for row in _val_rows(workdir)[:2]:  # a relevant and an irrelevant query
        inputs = hf.prepare_inputs(_video(workdir, row), row["query"], settings)
        ref = _torch_logits(torch_model, inputs)
        ours = np.asarray(model(
            inputs["input_ids"].numpy(), pixel_values_videos=inputs["pixel_values_videos"].numpy(),
            video_grid_thw=inputs["video_grid_thw"].numpy(),
            position_ids=inputs["position_ids"].numpy()))[0]
        err = float(np.abs(ours - ref).max())
        worst = max(worst, err)
        assert err <= TOL, f"max |logit diff| {err:.2e} > {TOL}"
        # the ETA positions matter: the stock positions transformers computes give other logits
        stock = _torch_logits(torch_model, inputs, position_ids=False)
        assert np.abs(stock - ref).max() > 100 * TOL
    print(f"[export] max |logit diff| transformers vs JAX: {worst:.2e}")


def _evaluator_answer(model, row, workdir, config, eos, max_new_tokens):
    """Our evaluator's path: the pipeline's left-padded batch, `generate_from_inputs` greedy.
    Returns the ids, their log-probabilities and the decoded text."""
    pcfg = setup.pipeline_config(config, batch_size=8, with_answer=False, pad_side="left")
    tok = prompts_lib.load_tokenizer(None)
    ex = load_example(row, VideoIndex(workdir / "data"), tok, pcfg, model.config.vision)
    batch = collate([ex], pcfg, model.config.vision)
    out = generate_from_inputs(model, model_inputs(batch), max_new_tokens=max_new_tokens,
                               temperature=0, eos_token_id=eos,
                               pad_token_id=prompts_lib.ENDOFTEXT_ID)
    n = int(out.lengths[0])
    ids = out.tokens[0, :n].tolist()
    return ids, np.asarray(out.logprobs[0, :n]), tok.decode(ids, skip_special_tokens=True)


def _chosen_logprobs(logits: np.ndarray, ids: list[int]) -> np.ndarray:
    logp = torch.log_softmax(torch.as_tensor(logits), dim=-1).numpy()
    return logp[np.arange(len(ids)), ids]


def test_greedy_generate_matches_our_evaluator(workdir, exported, torch_model, jax_model):
    config, model = jax_model
    settings = hf.load_settings(exported)
    eos = [prompts_lib.IM_END_ID, prompts_lib.ENDOFTEXT_ID]
    rows = _val_rows(workdir)
    answers = set()
    for row in rows:
        inputs = hf.prepare_inputs(_video(workdir, row), row["query"], settings)
        text = hf.greedy_generate(torch_model, inputs, max_new_tokens=EVAL_TOKENS)
        ids, logps, ours = _evaluator_answer(model, row, workdir, config, eos, EVAL_TOKENS)
        got, logits = hf.greedy_ids(torch_model, inputs, EVAL_TOKENS, return_logits=True)
        assert got == ids
        np.testing.assert_allclose(_chosen_logprobs(logits, got), logps, atol=LOGP_TOL)
        assert text == ours
        assert text == row["answer"]  # what the trainer's evaluation wrote for this query
        answers.add(text)
    assert any(a.startswith("<answer>") for a in answers), answers  # the model learnt a little


def test_greedy_decoding_continues_eta_positions(workdir, exported, torch_model, jax_model):
    """Without an eos the decode runs its full length: every new token's position is
    max(prompt positions) + 1 + t, with the KV cache and with full recomputation, and the
    log-probabilities equal our sampler's (an off-by-one position would move them)."""
    config, model = jax_model
    row = _val_rows(workdir)[1]
    inputs = hf.prepare_inputs(_video(workdir, row), row["query"], exported)
    n = 10
    cached, logits = hf.greedy_ids(torch_model, inputs, n, eos_token_id=[], return_logits=True)
    assert len(cached) == n and logits.shape == (n, torch_model.config.text_config.vocab_size)
    full, full_logits = hf.greedy_ids(torch_model, inputs, n, eos_token_id=[], use_cache=False,
                                      return_logits=True)
    assert full == cached
    np.testing.assert_allclose(full_logits, logits, atol=TOL)
    ids, logps, _ = _evaluator_answer(model, row, workdir, config, None, n)
    assert ids == cached
    diff = np.abs(_chosen_logprobs(logits, cached) - logps).max()
    print(f"[export] max |log-prob diff| of {n} decoded tokens vs our sampler: {diff:.2e}")
    assert diff <= LOGP_TOL


# ----------------------------------------------------------------------------- predict


def test_predict_answers_as_evaluate_run_does(workdir, tmp_path, capsys):
    """`python -m tempo_jax.predict` on (video, query) pairs gives, query for query, the
    answer `evaluate run` gives (same settings, same sampler, same batches), decodes each
    video once, and draws one picture per video."""
    from tempo_jax import evaluate as ev
    from tempo_jax import predict

    val = workdir / "data" / "val"
    records = list(ev.load_records("jsonl", val / "annotations.jsonl"))
    ev.evaluate_model(workdir, records, str(val), tmp_path / "eval", batch_size=4,
                      max_new_tokens=EVAL_TOKENS, timeline=0)
    answers = {r["qid"]: r for r in map(json.loads,
                                        (tmp_path / "eval" / "answers.jsonl").open())}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"video": str(val / r["video"]), "query": r["query"]})
                             + "\n" for r in records))
    png = tmp_path / "answers.png"
    capsys.readouterr()  # the evaluator's progress
    code = predict.main(["--checkpoint", str(workdir), str(pairs), "--json", "--batch-size", "4",
                         "--max-new-tokens", str(EVAL_TOKENS), "--png", str(png)])
    assert code == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(rows) == len(records) >= 4
    for row, rec in zip(rows, records, strict=True):
        want = answers[rec["qid"]]
        assert row["answer"] == want["answer"], (rec["qid"], row["answer"], want["answer"])
        parsed = want["parsed"]
        assert row["window"] == (parsed if isinstance(parsed, list) else None)
        assert row["refused"] == (parsed == "refuse")
        assert row["frame_times"] and row["frame_times"] == sorted(row["frame_times"])
    assert any(r["answer"].startswith("<answer>") for r in rows)
    videos = sorted({Path(r["video"]).stem for r in records})
    for stem in videos:
        assert (tmp_path / f"answers-{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_folder_and_a_broken_video(workdir, tmp_path, capsys):
    """A folder: every video asked every query, one line each; a broken video among them is
    reported on one line and the others are still answered (exit status 1)."""
    import shutil

    from tempo_jax import predict

    folder = tmp_path / "videos"
    shutil.copytree(workdir / "data" / "val" / "videos", folder)
    (folder / "zz_broken.mp4").write_bytes(b"not a video" * 50)
    queries = ["when does the red circle move to the left?", "a blue square shows up"]
    code = predict.main(["--checkpoint", str(workdir), str(folder), *queries,
                         "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    n_videos = len(list(folder.glob("*.mp4")))
    assert code == 1
    assert len(lines) == n_videos * len(queries)
    assert all(" -> " in x for x in lines)
    broken = [x for x in lines if "zz_broken" in x]
    assert len(broken) == 2 and all("error:" in x for x in broken)
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "zz_broken.mp4" in errors[0]  # one line for the video
