"""A user's mistake on any command line is one `error:` line naming the flag, file or line
and what is wrong, with a non-zero exit status; nothing here trains or loads a model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tempo_jax import cli, plan, predict
from tempo_jax import evaluate as ev
from tempo_jax import train as train_lib
from tempo_jax.data import synthetic


def _bad_jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "bad.jsonl"
    path.write_text('not json\n{"video": "a.mp4", "query": "x", "duration": 10, '
                    '"windows": [[5, 2]]}\n')
    return path


@pytest.mark.parametrize("args, message", [
    (["--config", "tempo_r0.py:huge"], "--config tempo_r0.py:huge: config argument must be "
     "one of tiny, 3b, 7b, qwen3_vl_tiny, qwen3_vl_2b, qwen3_vl_4b, qwen3_vl_8b, got 'huge'"),
    (["--config", "nothere.py:tiny"], "--config nothere.py:tiny: no such config file "
     "(shipped: tempo_r0.py)"),
    (["--config.rl.betaa=0"], "--config.rl.betaa: config.rl has no field 'betaa'; did you "
     "mean 'beta'? (fields: batch_size, beta,"),
    (["--config.rl.beta=abc"], "--config.rl.beta expects float, got 'abc'"),
    (["--config.data.cache_examples=maybe"], "expects true or false, got 'maybe'"),
    (["--config.rl=3"], "--config.rl is a group of fields"),
    (["--workdirr=x"], "unrecognised argument '--workdirr=x'"),
    (["--config.data.source=jsonl"], "--config.data.train: no annotation file given"),
    (["--config.data.source=youtube", "--config.data.train=x"],
     "--config.data.source=youtube: expected synthetic, qvhighlights, charades or jsonl"),
])
def test_train_bad_arguments(args, message, tmp_path):
    with pytest.raises(cli.UsageError) as err:
        train_lib.main(["--workdir", str(tmp_path / "w"), *args])
    assert message in str(err.value)


def test_train_dataset_without_a_usable_line(tmp_path):
    """Every line bad: the file, how many lines were skipped and the first reasons (before,
    it died inside numpy's `rng.choice`)."""
    bad = _bad_jsonl(tmp_path)
    with pytest.raises(cli.UsageError) as err:
        train_lib.main(["--workdir", str(tmp_path / "w"), "--config.data.source=jsonl",
                        f"--config.data.train={bad}", f"--config.data.val={bad}",
                        f"--config.data.video_root={tmp_path}"])
    msg = str(err.value)
    assert msg.startswith(f"{bad}: no usable example, every line was skipped: 2 skipped")
    assert f"{bad}:1: malformed JSON" in msg and f"{bad}:2: window [5, 2] has end < start" in msg


def test_train_videos_that_cannot_be_loaded(tmp_path):
    """Good annotation lines whose videos are all missing: the videos' folder, the count and
    the first reasons."""
    ann = tmp_path / "ok.jsonl"
    ann.write_text(json.dumps({"video": "gone.mp4", "query": "a red circle moves",
                               "duration": 10, "windows": [[1, 2]], "qid": "q1"}) + "\n")
    with pytest.raises(cli.UsageError) as err:
        train_lib.main(["--workdir", str(tmp_path / "w"), "--config.data.source=jsonl",
                        f"--config.data.train={ann}", f"--config.data.val={ann}",
                        f"--config.data.video_root={tmp_path}", "--config.sft.steps=1",
                        "--config.model.tiny_overrides.num_hidden_layers=1"])
    msg = str(err.value)
    assert "no example could be loaded, 1 skipped (first: q1: video 'gone.mp4' not found" in msg


def test_train_command_prints_one_line_and_exits_2(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-m", "tempo_jax.train", "--config",
                          "configs/tempo_r0.py:huge", "--workdir", str(tmp_path)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: --config configs/tempo_r0.py:huge: config argument must be one of tiny, 3b, 7b, "
        "qwen3_vl_tiny, qwen3_vl_2b, qwen3_vl_4b, qwen3_vl_8b, got 'huge'"]


def test_evaluate_bad_inputs(tmp_path, capsys):
    bad = _bad_jsonl(tmp_path)
    cases = [
        (["--checkpoint", str(tmp_path / "nope")], "--checkpoint"),
        (["--checkpoint", str(tmp_path), "--video-root", str(tmp_path / "nope")],
         "--video-root"),
        (["--checkpoint", str(tmp_path), "--annotations", str(tmp_path / "none.jsonl")],
         "--annotations"),
        (["--checkpoint", str(tmp_path), "--annotations", str(bad)],
         f"{bad}: no usable example, every line was skipped: 2 skipped (first: {bad}:1:"),
    ]
    for extra, message in cases:
        args = ["run", "--video-root", str(tmp_path), "--out", str(tmp_path / "o"), *extra]
        assert ev.main(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_predict_bad_inputs(tmp_path, capsys):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"x")
    bad = _bad_jsonl(tmp_path)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = [
        ([str(tmp_path / "nope.mp4"), "q"], "nope.mp4: no such video, folder or JSONL file"),
        ([str(video)], "give at least one query after the video"),
        ([str(empty_dir), "q"], "empty: no videos in this folder"),
        ([str(bad)], f"{bad}:1: not JSON"),
        ([str(bad), "q"], "the queries come from the JSONL file"),
        ([str(video), "q", "--batch-size", "0"], "--batch-size and --max-new-tokens"),
    ]
    for args, message in cases:
        assert predict.main(["--checkpoint", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"video": "v.mp4", "query": "q"}\n{"video": "v.mp4"}\n')
    assert predict.main(["--checkpoint", str(tmp_path), str(pairs)]) == 2
    assert f"{pairs}:2: expected" in capsys.readouterr().err
    # a directory that is no checkpoint
    assert predict.main(["--checkpoint", str(tmp_path), str(video), "q"]) == 2
    assert "neither a training workdir" in capsys.readouterr().err


def test_plan_bad_override(capsys):
    with pytest.raises(SystemExit) as e:
        plan.main(["--mesh", "fsdp=4", "--chip", "v5p", "--config.rl.bet=1"])
    assert e.value.code == 2
    assert "--config.rl.bet: config.rl has no field 'bet'; did you mean 'beta'?" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("args, message", [
    (["--num", "0"], "--num must be >= 1"),
    (["--num", "2", "--min-duration", "10", "--max-duration", "5"],
     "need 1 <= min_duration <= max_duration"),
])
def test_synthetic_bad_arguments(args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        synthetic.main(["--out", str(tmp_path / "s"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_synthetic_out_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SystemExit):
        synthetic.main(["--out", str(f), "--num", "1"])
    assert "exists and is not a directory" in capsys.readouterr().err


def test_export_will_not_replace_a_directory_that_is_no_export(tmp_path):
    from tempo_jax import export as export_lib

    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a Hugging Face directory"):
        export_lib.main(["--checkpoint", str(tmp_path), "--out", str(out)])
    assert (out / "notes.txt").read_text() == "keep me"


def test_streaming_training_without_a_loadable_video_stops(tmp_path):
    """The streaming loader (the 3b/7b default) repeats forever: when every video fails in a
    row it says so instead of skipping them forever."""
    from tempo_jax.data.pipeline import NoUsableData

    ann = tmp_path / "ok.jsonl"
    ann.write_text("".join(json.dumps({"video": f"gone{i}.mp4", "query": "a red circle moves",
                                       "duration": 10, "windows": [[1, 2]], "qid": f"q{i}"})
                           + "\n" for i in range(3)))
    with pytest.raises(NoUsableData) as err:
        train_lib.main(["--workdir", str(tmp_path / "w"), "--config.data.source=jsonl",
                        f"--config.data.train={ann}", f"--config.data.val={ann}",
                        f"--config.data.video_root={tmp_path}", "--config.sft.steps=2",
                        "--config.data.cache_examples=False",
                        "--config.model.tiny_overrides.num_hidden_layers=1"])
    msg = str(err.value)
    assert msg.startswith("none of the 3 examples could be loaded, 3 skipped (first: ")
    assert "gone0.mp4" in msg
