"""The Grain loader end to end on real synthetic mp4 files: static shapes, broken videos
skipped and counted, exact resume, per-host shards, worker processes, and batches the model
runs on."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tempo_jax.data import saa as saa_lib
from tempo_jax.data.pipeline import PipelineConfig, make_loader, model_inputs
from tempo_jax.data.sources import load_jsonl
from tempo_jax.data.synthetic import SyntheticSpec, generate
from tempo_jax.data.video import VideoError
from tempo_jax.models.qwen2_5_vl.config import preset

VISION = preset("tiny").vision
SAA = saa_lib.SAAConfig(max_visual_tokens=48, min_frames=4, max_frames=16,
                        min_pixels=4 * 28 * 28, mean_fps=1.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    generate(root, SyntheticSpec(num=4, seed=3, min_duration=6, max_duration=8), progress=False)
    # one truncated video and one missing video, referenced by annotations
    src = root / "videos" / "syn00000.mp4"
    (root / "videos" / "broken.mp4").write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    lines = (root / "annotations.jsonl").read_text().splitlines()
    extra = [
        {"video": "videos/broken.mp4", "query": "a red circle", "windows": [[1.0, 2.0]],
         "duration": 8.0, "qid": "broken"},
        {"video": "videos/missing.mp4", "query": "a red circle", "windows": [[1.0, 2.0]],
         "duration": 8.0, "qid": "missing"},
    ]
    (root / "ann_bad.jsonl").write_text("\n".join(lines + [json.dumps(e) for e in extra]) + "\n")
    return root


def _cfg(**kw):
    base = dict(batch_size=2, saa=SAA, shuffle=True, num_epochs=1, seed=0)
    base.update(kw)
    return PipelineConfig(**base)


def _all(loader):
    return list(loader)


def test_batches_are_static_and_broken_videos_are_skipped(data):
    records = load_jsonl(data / "ann_bad.jsonl")
    loader = make_loader(records, str(data), _cfg(max_seq_len=768), VISION)
    batches = _all(loader)
    assert loader.skipped == 2
    seen = {m["qid"] for b in batches for m in b["meta"]}
    failed = loader.skip_counter.failed
    assert set(failed) == {str(r["qid"]) for r in records} - seen  # which ones, and why
    assert all(reason for reason in failed.values())
    n_ok = len(records) - 2
    assert sum(len(b["meta"]) for b in batches) == n_ok
    shapes = {(b["input_ids"].shape, b["pixel_values"].shape) for b in batches[:-1]}
    assert shapes == {((2, 768), (2 * 4 * 48, 1176))}
    for b in batches:
        for i, m in enumerate(b["meta"]):
            row = b["loss_mask"][i]
            assert row.any() and m["duration"] > 0
            # the answer tokens come last among the valid tokens
            valid = np.flatnonzero(b["attention_mask"][i])
            assert np.flatnonzero(row).max() == valid.max()
        assert int(b["video_grid_thw"][:, 0].max()) == 1  # one grid per temporal patch (ETA)


def test_strict_mode_names_the_file(data):
    records = [r for r in load_jsonl(data / "ann_bad.jsonl") if r["qid"] == "broken"]
    loader = make_loader(records, str(data), _cfg(strict=True), VISION)
    with pytest.raises(VideoError, match="broken.mp4"):
        next(iter(loader))


def test_restored_iterator_yields_exactly_the_next_batch(data):
    records = load_jsonl(data / "annotations.jsonl")
    cfg = _cfg(num_epochs=None)
    a = make_loader(records, str(data), cfg, VISION)
    next(a), next(a)
    state = a.get_state()
    expected = next(a)
    b = make_loader(records, str(data), cfg, VISION)
    b.set_state(state)
    got = next(b)
    np.testing.assert_array_equal(got["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(got["pixel_values"], expected["pixel_values"])
    assert [m["qid"] for m in got["meta"]] == [m["qid"] for m in expected["meta"]]


def test_per_host_shards_partition_the_data(data):
    records = load_jsonl(data / "annotations.jsonl")
    qids = []
    for i in range(2):
        loader = make_loader(records, str(data), _cfg(), VISION, shard_index=i, shard_count=2)
        qids.append({m["qid"] for b in loader for m in b["meta"]})
    assert not qids[0] & qids[1]
    assert qids[0] | qids[1] == {r["qid"] for r in records}


def test_worker_processes_give_the_same_batches(data):
    records = load_jsonl(data / "annotations.jsonl")
    serial = _all(make_loader(records, str(data), _cfg(), VISION))
    parallel = _all(make_loader(records, str(data), _cfg(num_workers=2), VISION))
    assert [[m["qid"] for m in b["meta"]] for b in serial] == \
        [[m["qid"] for m in b["meta"]] for b in parallel]
    np.testing.assert_array_equal(serial[0]["pixel_values"], parallel[0]["pixel_values"])


def test_model_runs_on_a_batch(data):
    import jax.numpy as jnp
    from flax import nnx

    from tempo_jax.models.qwen2_5_vl import Qwen25VL

    records = load_jsonl(data / "annotations.jsonl")
    batch = next(iter(make_loader(records, str(data), _cfg(), VISION)))
    model = Qwen25VL(preset("tiny"), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    logits = np.asarray(model.forward(model_inputs(batch)))
    assert logits.shape[:2] == batch["input_ids"].shape
    assert np.isfinite(logits).all()


def test_missing_video_root_is_reported(data, tmp_path):
    records = load_jsonl(data / "annotations.jsonl")[:2]
    shutil.copytree(data, tmp_path / "copy")
    shutil.rmtree(tmp_path / "copy" / "videos")
    loader = make_loader(records, str(tmp_path / "copy"), _cfg(), VISION)
    assert _all(loader) == [] and loader.skipped == 2
