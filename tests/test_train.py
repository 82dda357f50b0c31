"""The trainer end to end on the tiny model: a short SFT -> PIR-GRPO run with its report, an
exact resume after SIGTERM, committed checkpoints on every way out (Orbax's commit slowed on
purpose, as on a loaded machine), and the non-finite-loss guard."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import slow_commit

from tempo_jax import cli
from tempo_jax import export as export_lib
from tempo_jax import train as train_lib
from tempo_jax.configs.tempo_r0 import get_config
from tempo_jax.safetensors_io import CheckpointReader
from tempo_jax.training import data as data_lib
from tempo_jax.training import optimizer, setup, sft, steps
from tempo_jax.training.metrics_logger import MetricsLogger, tensorboard_scalars
from tempo_jax.training.trainer import Trainer

SMALL = {
    "data.synthetic_train": 6, "data.synthetic_val": 4, "data.irrelevant_ratio": 0.34,
    "sft.steps": 6, "sft.batch_size": 4, "rl.steps": 2, "rl.batch_size": 2,
    "rl.num_generations": 2, "rl.max_new_tokens": 6, "eval_max_new_tokens": 6,
    "model.tiny_overrides.hidden_size": 64, "model.tiny_overrides.num_hidden_layers": 2,
    "model.tiny_overrides.intermediate_size": 128, "ckpt_every": 3, "log_every": 1,
    "saa.max_visual_tokens": 32, "saa.max_frames": 12,
}


def small_config(**over):
    return cli.set_fields(get_config("tiny"), {**SMALL, **over})


def _flags(over: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in {**SMALL, **over}.items()]


COMMIT_DELAY = 2.0  # seconds added to every checkpoint commit in these tests


def _run(cmd, env):
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


def _env() -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                           os.environ.get("PYTHONPATH", "")])}


def _final_params(workdir: Path) -> dict:
    r = CheckpointReader(workdir / "hf")
    return {k: r.read(k) for k in r.keys()}


def _ckpt_dirs(workdir: Path) -> list[str]:
    """What is under ckpt/ right now, committed or not (a `*-tmp` entry is a save in flight
    or one that never committed)."""
    return sorted((p.name for p in (workdir / "ckpt").iterdir()), key=lambda n: (len(n), n))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max())
               for k in a)


def _model_params(model) -> dict:
    from flax import nnx

    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _tb_scalars(workdir: Path) -> list[tuple[str, int]]:
    return tensorboard_scalars(workdir / "tb")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The short SFT -> PIR-GRPO run, every checkpoint commit slowed by COMMIT_DELAY."""
    workdir = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        slow_commit.install(COMMIT_DELAY, mp)
        report = train_lib.run(small_config(), workdir)
        listing = _ckpt_dirs(workdir)  # as `run` left it, before anything else can wait
    return workdir, report, listing


def test_run_returns_with_its_last_checkpoint_committed(demo_run):
    """`train.run` returns only once the final checkpoint is committed (with every commit
    slowed by 2 s, it used to return with `8.orbax-checkpoint-tmp` and lose it at exit), and
    that checkpoint holds the parameters the run ended with (its HF export)."""
    workdir, _, listing = demo_run
    last = SMALL["sft.steps"] + SMALL["rl.steps"]
    assert listing == ["6", str(last)], listing  # ckpt_keep = 2, nothing left uncommitted
    assert export_lib.available_steps(workdir) == [6, last]
    _, model = export_lib.load_workdir(workdir)
    from tempo_jax.models.qwen2_5_vl import load_pretrained

    exported = _model_params(load_pretrained(workdir / "hf", dtype=jnp.float32))
    assert _max_diff(_model_params(model), exported) == 0.0


def test_short_run_writes_report_plots_and_export(demo_run):
    workdir, report, _ = demo_run
    saved = json.loads((workdir / "report.json").read_text())
    for part in ("baseline", "sft", "grpo"):
        for key in ("r1@0.5", "miou", "refusal_accuracy", "false_refusal_rate"):
            v = saved[part][key]
            assert v != v or 0.0 <= v <= 1.0, (part, key, v)  # NaN only for empty sets
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "grpo"]
    assert [r["step"] for r in sft] == list(range(1, 7))
    assert len(rl) == 2
    for key in ("reward", "reward_format", "reward_accuracy", "clip_fraction", "kl", "entropy",
                "response_length", "refusal_accuracy", "step_time", "tokens_per_s",
                "dropped_groups", "update_fill", "rollout_rounds"):
        assert key in rl[0], key
    for r in rl:  # dynamic sampling: refills stop once the batch is full or after max_refills
        assert 1 <= r["rollout_rounds"] <= 1 + get_config("tiny").rl.max_refills
        assert 0.0 <= r["dropped_groups"] <= 1.0 and 0.0 <= r["update_fill"] <= 1.0
        assert r["rollout_rounds"] == 1 or r["dropped_groups"] > 0
    # each stage's evaluation, with the PIR diagnostics, beside the training curves
    for stage, step in (("sft", 6), ("grpo", 8)):
        [ev] = [r for r in rows if r["stage"] == f"eval_{stage}"]
        assert ev["step"] == step and 0.0 <= ev["refusal_auc"] <= 1.0
        assert ev["refusal_auc"] == saved[stage]["refusal_auc"]
        # the held-out cross pairs: one per validation video, all irrelevant
        assert saved[stage]["num_irrelevant"] == 2 * saved[stage]["num_relevant"]
    assert sft[-1]["loss"] < sft[0]["loss"]  # a few steps on 6 videos already lower it
    for png in ("reward_curve.png", "timeline.png"):
        assert (workdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    hf = workdir / "hf"
    assert (hf / "config.json").exists()
    settings = json.loads((hf / "tempo_settings.json").read_text())
    assert settings["prompt"]["textual_timestamps"] is True
    assert settings["saa"]["max_visual_tokens"] == SMALL["saa.max_visual_tokens"]
    # every scalar of metrics.jsonl reached the TensorBoard event file before `run` returned
    # (TensorBoard tags spell "r1@0.5" as "r1_0.5")
    expected = sorted((f"{r['stage']}/{k}".replace("@", "_"), r["step"]) for r in rows
                      for k in r if k not in ("stage", "step"))
    assert sorted(_tb_scalars(workdir)) == expected
    assert not list(workdir.glob(".*partial*"))  # no staging file or directory left behind
    # every checkpoint carries the same settings in its metadata
    ckpts = sorted((workdir / "ckpt").iterdir())
    assert ckpts
    for c in ckpts:
        meta = json.loads((c / "meta" / "metadata").read_text())
        assert meta["settings"] == settings


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streaming"])
def test_sigterm_then_restart_equals_uninterrupted(demo_run, tmp_path, cached):
    """A run killed with SIGTERM mid-SFT and restarted ends with the same parameters: with
    in-memory examples (batches a function of the step) and with the streaming Grain loader
    (its iterator position restored from the checkpoint). Every run's commits are slowed:
    `python -m tempo_jax.train` exits, after SIGTERM or at the end, only once its last
    checkpoint is committed."""
    data = demo_run[0] / "data"
    over = {"stages": "sft", "sft.steps": 10, "ckpt_every": 100,
            "data.cache_examples": cached}
    env = _env()
    cmd = slow_commit.command(COMMIT_DELAY)
    runs = {}
    for name in ("straight", "killed"):
        wd = tmp_path / name
        shutil.copytree(data, wd / "data")  # same synthetic videos, no regeneration
        runs[name] = wd
    _run(cmd + _flags(over) + [f"--workdir={runs['straight']}"], env)
    assert _ckpt_dirs(runs["straight"]) == ["10"]
    proc = subprocess.Popen(cmd + _flags(over) + [f"--workdir={runs['killed']}"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = runs["killed"] / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 4:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()[-2000:]
    steps_before = len(metrics.read_text().splitlines())
    assert steps_before < 10 and not (runs["killed"] / "report.json").exists()
    assert _ckpt_dirs(runs["killed"]) == [str(steps_before)]  # the SIGTERM save, committed
    _run(cmd + _flags(over) + [f"--workdir={runs['killed']}"], env)
    assert _ckpt_dirs(runs["killed"]) == [str(steps_before), "10"]
    a, b = _final_params(runs["straight"]), _final_params(runs["killed"])
    assert a.keys() == b.keys()
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)).max())
                for k in a)
    assert worst <= 1e-6, worst


def test_error_mid_run_commits_earlier_checkpoints_and_resumes(demo_run, tmp_path,
                                                               monkeypatch, caplog):
    """An exception escaping the SFT loop at step 5 (the step-4 save still committing, slowed
    by 2 s) leaves checkpoints 2 and 4 committed, is logged and re-raised. A save that never
    committed (a `-tmp` directory, as a kill mid-save leaves) is never listed, restored or
    exported, and asking for it says so. The restart resumes from step 4."""
    wd = tmp_path / "err"
    shutil.copytree(demo_run[0] / "data", wd / "data")
    config = small_config(stages="sft", **{"sft.steps": 6, "ckpt_every": 2})
    slow_commit.install(COMMIT_DELAY, monkeypatch)
    log_row = MetricsLogger.log

    def failing(self, stage, step, metrics):
        if step == 5:
            raise RuntimeError("injected failure at step 5")
        return log_row(self, stage, step, metrics)

    with monkeypatch.context() as mp:
        mp.setattr(MetricsLogger, "log", failing)
        with pytest.raises(RuntimeError, match="injected failure"):
            train_lib.run(config, wd)
    assert _ckpt_dirs(wd) == ["2", "4"]
    assert "SFT stopped by RuntimeError: injected failure at step 5" in caplog.text
    _, model = export_lib.load_workdir(wd, step=4)
    assert all(np.isfinite(v).all() for v in _model_params(model).values())

    # a save of step 6 that never committed
    shutil.copytree(wd / "ckpt" / "4", wd / "ckpt" / "6.orbax-checkpoint-tmp")
    assert export_lib.available_steps(wd) == [2, 4]
    with pytest.raises(ValueError, match="step 6 is incomplete"):
        export_lib.load_workdir(wd, step=6)
    with pytest.raises(ValueError, match="no checkpoint at step 5"):
        export_lib.load_workdir(wd, step=5)

    caplog.clear()
    with caplog.at_level("INFO", logger="tempo_jax.train"):
        train_lib.run(config, wd)
    assert "resuming from checkpoint 4" in caplog.text
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == "sft"] == [1, 2, 3, 4, 5, 6]
    assert _ckpt_dirs(wd) == ["4", "6"]  # the stale -tmp removed, step 6 committed


def test_non_finite_loss_skips_the_update(demo_run, tmp_path, monkeypatch, caplog):
    wd = tmp_path / "nan"
    shutil.copytree(demo_run[0] / "data", wd / "data")
    original = steps.sft_loss

    def poisoned(*args):
        loss, aux = original(*args)
        return loss * jnp.nan, aux

    monkeypatch.setattr(steps, "sft_loss", poisoned)
    config = small_config(stages="sft", **{"sft.steps": 3})
    with Trainer(config, wd) as trainer:  # closed: commits awaited
        before = {k: np.asarray(v) for k, v in trainer.params.flat_state()}
        data = data_lib.prepare_data(config, wd)
        out = sft.run_sft(trainer, data, 0, None)  # returns with its checkpoint committed
        assert out["skipped_updates"] == 3
        assert "non-finite" in caplog.text
        for k, v in trainer.params.flat_state():
            np.testing.assert_array_equal(np.asarray(v), before[k])
        # the checkpoint holds the untouched parameters, never NaN
        restored = trainer.ckpt.restore_params(trainer.ckpt.latest_step(), trainer.params)
        leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(restored)]
        assert all(np.isfinite(x).all() for x in leaves)


def test_streaming_run_skips_a_corrupt_video_and_counts_it(demo_run, tmp_path):
    """With the streaming loader (no cache) both stages run; a corrupt training video is
    dropped, logged and counted in the metrics instead of stopping the run."""
    wd = tmp_path / "stream"
    shutil.copytree(demo_run[0] / "data", wd / "data")
    bad = sorted((wd / "data" / "train" / "videos").glob("*.mp4"))[0]
    bad.write_bytes(b"not a video" * 100)
    config = small_config(**{"data.cache_examples": False, "data.irrelevant_ratio": 0.0,
                             "sft.steps": 4, "rl.steps": 3})  # 3 x 2 prompts: an epoch
    report = train_lib.run(config, wd)
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"sft", "grpo", "eval_sft", "eval_grpo"}
    grpo = [r for r in rows if r["stage"] == "grpo"]
    assert grpo[-1]["skipped_examples"] >= 1  # the GRPO stream met the corrupt video too
    assert max(r["skipped_examples"] for r in rows if r["stage"] == "sft") >= 1
    assert 0.0 <= report["grpo"]["r1@0.5"] <= 1.0


def test_fp32_optimizer_state_for_bf16_parameters():
    """optim.fp32_state: both Adam moments in fp32 (optax's mu_dtype covers only the first)
    and the update computed in fp32, then cast to the bf16 parameters."""
    import jax
    import optax

    oc = get_config("3b").optim
    params = {"w": jnp.asarray([1.0, -2.0, 3.0], jnp.bfloat16)}
    grads = {"w": jnp.asarray([1e-3, 0.5, -0.25], jnp.bfloat16)}
    tx = optimizer.make_optimizer(1e-2, 1, 10, oc)
    state = tx.init(params)
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) == 1]
    assert len(moments) == 2 and all(m.dtype == jnp.float32 for m in moments)
    updates, state = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert new["w"].dtype == jnp.bfloat16
    oc32 = get_config("3b").optim
    oc32.fp32_state = False
    tx32 = optimizer.make_optimizer(1e-2, 1, 10, oc32)
    f32 = jax.tree.map(lambda x: x.astype(jnp.float32), (params, grads))
    up32, _ = tx32.update(f32[1], tx32.init(f32[0]), f32[0])
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(up32["w"]), rtol=1e-6)
    # without the switch, the second moment follows the bf16 parameters
    plain = get_config("3b").optim
    plain.fp32_state = False
    low = [x for x in jax.tree.leaves(optimizer.make_optimizer(1e-2, 1, 10, plain).init(params))
           if getattr(x, "ndim", 0) == 1]
    assert all(m.dtype == jnp.bfloat16 for m in low)


def test_pir_resampled_pairs_equal_loaded_ones(demo_run, tmp_path):
    """A PIR pair drawn at step time (the video's processed frames with another video's
    query) is exactly what the loader makes of that (video, query) record; the pairing
    changes from step to step and never borrows the video's own colour."""
    from tempo_jax.data.pipeline import load_example
    from tempo_jax.data.prompts import load_tokenizer
    from tempo_jax.data.sources import VideoIndex
    from tempo_jax.data.synthetic import query_colour

    wd = tmp_path / "pir"
    shutil.copytree(demo_run[0] / "data", wd / "data")
    config = small_config(**{"data.pir_resample": True, "data.irrelevant_ratio": 0.5})
    with Trainer(config, wd) as trainer:  # closed: commits awaited
        data = data_lib.prepare_data(config, wd)
        assert all(r["relevant"] for r in data.train) and data.pir_ratio == 0.5
        pcfg = setup.pipeline_config(config, batch_size=4)
        examples = trainer.examples(data, "train", pcfg)
        by_qid = {r["qid"]: r for r in data.train}
        seen = set()
        for step in range(6):
            rng = np.random.default_rng([0, 1, step])
            for ex in sampler(trainer, data).pick(examples, rng, 8, pcfg):
                if ex["relevant"]:
                    continue
                own_qid, donor_qid = ex["qid"].split("|pir:")
                own = by_qid[own_qid]
                seen.add(ex["qid"])
                assert query_colour(ex["query"]) not in own["colours"]
                rec = {**own, "query": by_qid[donor_qid]["query"], "windows": [], "relevant": False}
                ref = load_example(rec, VideoIndex(data.video_root), load_tokenizer(None), pcfg,
                                   trainer.model.config.vision)
                for key in ("input_ids", "position_ids", "loss_mask", "pixel_values"):
                    np.testing.assert_array_equal(ex[key], ref[key])
        assert len(seen) >= 4  # new pairings across steps, not one fixed set


def test_contrast_pairs_exact_counts_and_teacher_forced_p_none(demo_run, tmp_path):
    """SFT contrast pairs are one video asked its own query and another video's; GRPO batches
    hold exactly `irrelevant` PIR pairs; the evaluation's P(none) is the softmax of a plain
    full-sequence forward at the position where a refusal's answer departs from a window."""
    from tempo_jax.data.synthetic import query_colour

    wd = tmp_path / "contrast"
    shutil.copytree(demo_run[0] / "data", wd / "data")
    config = small_config(**{"data.irrelevant_ratio": 0.5})
    with Trainer(config, wd) as trainer:
        data = data_lib.prepare_data(config, wd)
        pcfg = setup.pipeline_config(config, batch_size=4)
        examples = trainer.examples(data, "train", pcfg)
        by_qid = {r["qid"]: r for r in data.train}
        for step in range(4):
            rng = np.random.default_rng([0, 1, step])
            picked = sampler(trainer, data).pick(examples, rng, 8, pcfg, contrast_share=0.5)
            assert len(picked) == 8
            for own, pair in (picked[0:2], picked[2:4]):
                assert own["relevant"] and own["windows"] and not pair["relevant"]
                assert pair["qid"].startswith(own["qid"] + "|pir:")
                np.testing.assert_array_equal(own["pixel_values"], pair["pixel_values"])
                assert query_colour(pair["query"]) not in by_qid[own["qid"]]["colours"]
            for k in (0, 1, 3):
                picked = sampler(trainer, data).pick(examples, rng, 4, pcfg, irrelevant=k)
                assert sum(not ex["relevant"] for ex in picked) == k

        check_p_none(trainer, data, config)


def sampler(trainer, data):
    """The trainer's PIR sampler over `data`."""
    return data_lib.PirSampler(data, trainer.tokenizer, trainer.model.config.vision)


def check_p_none(trainer, data, config):
    """P(none) from `refusal_probabilities` equals the softmax of a plain full-sequence
    forward at the position right after the answer's `<answer>` (found by decoding)."""
    from tempo_jax.data.pipeline import collate, model_inputs
    from tempo_jax.inference import refusal_probabilities

    val = trainer.examples(data, "val", setup.pipeline_config(config))
    tf = setup.pipeline_config(config, batch_size=len(val))
    batch = collate(val, tf, trainer.model.config.vision)
    model = trainer.merged()
    got = refusal_probabilities(model, [batch], trainer.tokenizer, tf.prompt)
    logits = np.asarray(model.forward(model_inputs(batch)), np.float64)
    none_id = trainer.tokenizer.encode("none")[0]
    assert set(got) == {ex["qid"] for ex in val}
    assert not all(ex["relevant"] for ex in val)
    for i, ex in enumerate(val):
        first = int(np.argmax(batch["loss_mask"][i]))
        ids = batch["input_ids"][i]
        k = next(k for k in range(1, 64)
                 if trainer.tokenizer.decode(ids[first:first + k]).endswith("<answer>"))
        pos = first + k  # the choice's position
        assert (ids[pos] == none_id) == (not ex["relevant"])
        p = np.exp(logits[i, pos - 1] - logits[i, pos - 1].max())
        assert got[ex["qid"]] == pytest.approx(p[none_id] / p.sum(), rel=1e-4)


def test_caption_think_targets_and_p_none(demo_run, tmp_path):
    """With a caption think, a video's relevant and irrelevant targets share the think (what
    the video shows, from its annotation) and differ only after `<answer>`; P(none) is read
    there, whatever the caption's length."""
    from tempo_jax.data.synthetic import query_colour

    wd = tmp_path / "caption"
    shutil.copytree(demo_run[0] / "data", wd / "data")
    config = small_config(**{"prompt.thinking": True, "prompt.caption_think": True,
                             "data.irrelevant_ratio": 0.5})
    with Trainer(config, wd) as trainer:
        data = data_lib.prepare_data(config, wd)
        pcfg = setup.pipeline_config(config, batch_size=4)
        examples = trainer.examples(data, "train", pcfg)
        rng = np.random.default_rng(0)
        own, pair = sampler(trainer, data).pick(examples, rng, 2, pcfg, contrast_share=1.0)
        caption = {r["qid"]: r["caption"] for r in data.train}[own["qid"]]
        assert caption.startswith("a ") and query_colour(own["query"]) in caption
        texts = [trainer.tokenizer.decode(ex["input_ids"][np.flatnonzero(ex["loss_mask"])])
                 for ex in (own, pair)]
        assert texts[0].startswith(f"<think>I see {caption}.</think><answer>")
        assert texts[1].startswith(f"<think>I see {caption}.</think><answer>none</answer>")
        check_p_none(trainer, data, config)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_completion_logits_equal_unpadded_forward(pad_side):
    """The GRPO update's logits (prompts embedded once, rows reordered so padding trails and
    no attention mask is used) equal a plain forward of each unpadded prompt + completion."""
    from flax import nnx

    from tempo_jax.models.qwen2_5_vl import Qwen25VL, prepare_inputs, preset
    from tempo_jax.models.qwen2_5_vl import positions as pos_lib

    cfg = preset("tiny")
    model = Qwen25VL(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    lens, g, t = [9, 5], 2, 6
    width = max(lens)
    ids = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), np.int32)
    for i, n in enumerate(lens):
        sl = slice(width - n, width) if pad_side == "left" else slice(0, n)
        ids[i, sl] = rng.integers(10, 1000, n)
        mask[i, sl] = 1
    inputs = prepare_inputs(cfg, ids, mask)
    comp = rng.integers(10, 1000, (2 * g, t)).astype(np.int32)
    comp_len = np.asarray([6, 2, 4, 6])
    comp_mask = np.arange(t)[None] < comp_len[:, None]
    start = np.repeat(pos_lib.decode_start(inputs["position_ids"], mask), g)
    got = np.asarray(steps.completion_logits(
        model, inputs, jnp.asarray(comp), jnp.asarray(comp_mask), jnp.asarray(start), g))
    for r in range(2 * g):
        prompt = ids[r // g][mask[r // g].astype(bool)]
        seq = np.concatenate([prompt, comp[r, :comp_len[r]]])
        ref = np.asarray(model.forward(prepare_inputs(cfg, seq[None])))[0]
        n = len(prompt)
        np.testing.assert_allclose(got[r, :comp_len[r]], ref[n - 1:n - 1 + comp_len[r]],
                                   atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_accumulation_equals_one_large_batch_in_one_program(demo_run, tmp_path, monkeypatch,
                                                            stage):
    """`optim.accum_steps=4` (micro-batches of 2 examples, or 1 GRPO group) gives the
    parameters of one batch 4x as large (fp32, within 1e-5), the trainer calling its jitted
    gradient step once per update: the micro-batches are scanned inside that program."""
    calls: list[bool] = []
    factory = steps.make_steps

    def counting(tx):
        s = factory(tx)
        name = "sft_grad" if stage == "sft" else "grpo_grad"
        jitted = getattr(s, name)

        def call(*args):
            calls.append(isinstance(args[3], tuple))  # micro-batches as tuples
            return jitted(*args)

        call.lower = jitted.lower
        return steps.Steps(**{**s.__dict__, name: call})

    from tempo_jax.training import grpo as grpo_stage

    monkeypatch.setattr(sft if stage == "sft" else grpo_stage, "make_steps", counting)
    original_score = grpo_stage.score

    def varied(texts, meta, rc, thinking):
        """The rewards plus a deterministic function of each completion's text (the tiny
        model's answers all earn the same reward: no advantage to learn from)."""
        total, parts = original_score(texts, meta, rc, thinking)
        return total + np.asarray([len(t) % 5 for t in texts], float) / 4, parts

    monkeypatch.setattr(grpo_stage, "score", varied)
    params = {}
    for accum in (1, 4):
        calls.clear()
        wd = tmp_path / f"accum{accum}"
        shutil.copytree(demo_run[0] / "data", wd / "data")
        # no warm-up, so both updates move the parameters
        over = {"optim.accum_steps": accum, "sft.steps": 2, "sft.batch_size": 8,
                "sft.warmup_steps": 0, "rl.warmup_steps": 0, "rl.learning_rate": 1e-3,
                "rl.steps": 2, "rl.batch_size": 4, "rl.num_iterations": 1}
        config = small_config(stages=stage, **over)
        with Trainer(config, wd) as trainer:
            before = {k: np.asarray(v) for k, v in trainer.params.flat_state()}
            data = data_lib.prepare_data(config, wd)
            if stage == "sft":
                sft.run_sft(trainer, data, 0, None)
            else:
                grpo_stage.run_grpo(trainer, data, 0, None)
            params[accum] = {k: np.asarray(v) for k, v in trainer.params.flat_state()}
        assert calls == [accum > 1] * 2  # one gradient call per update
    diff = max(float(np.abs(params[1][k] - params[4][k]).max()) for k in params[1])
    moved = max(float(np.abs(params[1][k] - before[k]).max()) for k in params[1])
    print(f"{stage}: accumulated vs one batch max |diff| {diff:.2e}, update {moved:.2e}")
    assert diff <= 1e-5 and moved > 1e-3, (diff, moved)
