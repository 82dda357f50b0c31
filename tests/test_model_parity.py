"""Logit parity of the NNX Qwen2.5-VL against the transformers PyTorch model (fp32, CPU),
loading and exporting through the public API."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import IMAGE, VIDEO, pixels, tiny_hf_model, torch_logits, vision_prompt
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

import tempo_jax
from tempo_jax.models.qwen2_5_vl import positions as pos_lib
from tempo_jax.models.qwen2_5_vl import prepare_inputs

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_hf")
    tiny_hf_model(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def model(hf_dir):
    return tempo_jax.load_pretrained(hf_dir, dtype=jnp.float32)


def _batch(rows, pad_side="right"):
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        sl = slice(0, len(r)) if pad_side == "right" else slice(width - len(r), width)
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def _positions(model, inputs):
    cfg = model.config
    if inputs.get("image_grid_thw") is None and inputs.get("video_grid_thw") is None:
        return pos_lib.text_positions(inputs["attention_mask"])
    pos, _ = pos_lib.rope_index(
        inputs["input_ids"], inputs["attention_mask"], inputs.get("image_grid_thw"),
        inputs.get("video_grid_thw"), inputs.get("second_per_grid_ts"),
        spatial_merge_size=2, tokens_per_second=cfg.vision.tokens_per_second,
        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=3,
    )
    return pos


def _compare(model, hf_model, inputs):
    pos = _positions(model, inputs)
    ours = np.asarray(model(**{**inputs, "position_ids": pos}))
    ref = torch_logits(hf_model, inputs, pos)
    valid = np.asarray(inputs["attention_mask"]).astype(bool)
    err = np.abs(ours - ref)[valid].max()
    print(f"[parity] max |logit diff| vs torch: {err:.2e}")
    assert err <= TOL, f"max |logit diff| {err:.2e} > {TOL}"
    # positions computed internally (not passed) give the same logits
    again = np.asarray(model(**inputs))
    np.testing.assert_allclose(again[valid], ours[valid], atol=1e-6)
    return err


def test_text_only(model, hf_model):
    rng = np.random.default_rng(1)
    ids = rng.integers(10, 1000, size=(1, 23))
    _compare(model, hf_model, {"input_ids": ids, "attention_mask": np.ones_like(ids)})


def test_one_video_three_temporal_patches_multi_window(model, hf_model):
    rng = np.random.default_rng(2)
    grid = (3, 12, 16)  # 6x8 merged units: 2x2 windows of 4x4, two of them partial
    ids = np.asarray([vision_prompt(rng, [("video", grid)], [5, 4])])
    inputs = {
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "pixel_values_videos": pixels(rng, [grid]), "video_grid_thw": np.asarray([grid]),
        "second_per_grid_ts": np.asarray([1.0]),
    }
    _compare(model, hf_model, inputs)


def test_image(model, hf_model):
    rng = np.random.default_rng(3)
    grid = (1, 10, 14)
    ids = np.asarray([vision_prompt(rng, [("image", grid)], [3, 6])])
    inputs = {
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "pixel_values": pixels(rng, [grid]), "image_grid_thw": np.asarray([grid]),
    }
    _compare(model, hf_model, inputs)


def test_two_videos_and_an_image_in_one_sequence(model, hf_model):
    rng = np.random.default_rng(4)
    v1, v2, im = (2, 8, 8), (4, 4, 12), (1, 6, 4)
    items = [("video", v1), ("image", im), ("video", v2)]
    ids = np.asarray([vision_prompt(rng, items, [4, 2, 3, 5])])
    inputs = {
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "pixel_values_videos": pixels(rng, [v1, v2]), "video_grid_thw": np.asarray([v1, v2]),
        "second_per_grid_ts": np.asarray([0.5, 1.5]),
        "pixel_values": pixels(rng, [im]), "image_grid_thw": np.asarray([im]),
    }
    _compare(model, hf_model, inputs)


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_padded_batch_of_two(model, hf_model, pad_side):
    rng = np.random.default_rng(5)
    g1, g2 = (2, 8, 12), (3, 4, 4)
    rows = [vision_prompt(rng, [("video", g1)], [6, 9]),
            vision_prompt(rng, [("video", g2)], [2, 3])]
    ids, mask = _batch(rows, pad_side)
    inputs = {
        "input_ids": ids, "attention_mask": mask,
        "pixel_values_videos": pixels(rng, [g1, g2]), "video_grid_thw": np.asarray([g1, g2]),
        "second_per_grid_ts": np.asarray([1.0, 2.0]),
    }
    _compare(model, hf_model, inputs)


def test_vision_tower_output(model, hf_model):
    rng = np.random.default_rng(6)
    grids = [(3, 12, 16), (1, 6, 10)]
    pv = pixels(rng, grids)
    ids = np.asarray([vision_prompt(rng, [("video", grids[0]), ("video", grids[1])], [1, 1, 1])])
    inputs = prepare_inputs(model.config, ids, pixel_values_videos=pv, video_grid_thw=grids)
    ours = np.asarray(model.visual(inputs["pixel_values"], inputs["vision_meta"], model.options))
    with torch.no_grad():
        ref = hf_model.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grids))
    err = np.abs(ours - ref.pooler_output.numpy()).max()
    print(f"[parity] vision tower max |diff|: {err:.2e}")
    assert err <= 1e-5, err


def test_padded_vision_patches_do_not_change_logits(model):
    """Static-shape padding of the patch batch (for bucketing) must be invisible."""
    rng = np.random.default_rng(7)
    grid = (2, 8, 8)
    ids = np.asarray([vision_prompt(rng, [("video", grid)], [3, 3])])
    pv = pixels(rng, [grid])
    cfg = model.config
    a = prepare_inputs(cfg, ids, pixel_values_videos=pv, video_grid_thw=[grid])
    b = prepare_inputs(cfg, ids, pixel_values_videos=pv, video_grid_thw=[grid], num_patches=256)
    c = prepare_inputs(cfg, ids, pixel_values_videos=pv, video_grid_thw=[grid], bucketed=True)
    assert c["vision_meta"]["win_index"].shape[1] == 64
    la, lb, lc = (np.asarray(model.forward(x)) for x in (a, b, c))
    np.testing.assert_allclose(la, lb, atol=1e-5)
    np.testing.assert_allclose(la, lc, atol=1e-5)


@pytest.mark.parametrize("shard_bytes", [None, 200_000])
def test_save_then_transformers_loads_identical(model, hf_model, tmp_path, shard_bytes):
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    files = tempo_jax.save_pretrained(model, tmp_path, **kw)
    assert (len(files) > 1) == (tmp_path / "model.safetensors.index.json").exists()
    assert len(files) > 1 or shard_bytes is None
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" not in cfg and cfg["rope_scaling"]["mrope_section"] == [2, 3, 3]
    reloaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    ref_sd, new_sd = hf_model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k, v in ref_sd.items():
        assert torch.equal(v, new_sd[k]), k
    rng = np.random.default_rng(8)
    grid = (2, 8, 8)
    ids = np.asarray([vision_prompt(rng, [("video", grid)], [3, 3])])
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "pixel_values_videos": pixels(rng, [grid]), "video_grid_thw": np.asarray([grid])}
    pos = _positions(model, inputs)
    np.testing.assert_array_equal(torch_logits(reloaded, inputs, pos),
                                  torch_logits(hf_model, inputs, pos))


def test_sharded_index_and_nested_key_layout(hf_dir, model, tmp_path):
    """A sharded checkpoint using the newer `model.language_model.*` / `model.visual.*` keys."""
    sd = load_file(str(hf_dir / "model.safetensors"))
    renamed = {}
    for k, v in sd.items():
        if k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        elif k.startswith("visual."):
            k = "model." + k
        renamed[k] = v
    keys = sorted(renamed)
    half = len(keys) // 2
    weight_map = {}
    for i, part in enumerate((keys[:half], keys[half:])):
        name = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: renamed[k] for k in part}, str(tmp_path / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    other = tempo_jax.load_pretrained(tmp_path, dtype=jnp.float32)
    for a, b in zip(jax.tree.leaves(jax.tree.map(np.asarray, other)),
                    jax.tree.leaves(jax.tree.map(np.asarray, model)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_tied_embeddings(tmp_path):
    hf = tiny_hf_model(seed=3, tie=True)
    hf.save_pretrained(tmp_path)
    ours = tempo_jax.load_pretrained(tmp_path, dtype=jnp.float32)
    assert ours.lm_head is None
    rng = np.random.default_rng(9)
    ids = rng.integers(10, 1000, size=(2, 11))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    pos = pos_lib.text_positions(inputs["attention_mask"])
    err = np.abs(np.asarray(ours(ids)) - torch_logits(hf, inputs, pos)).max()
    assert err <= TOL


def test_bf16_error_against_fp32(hf_dir, model, capsys):
    rng = np.random.default_rng(10)
    grid = (2, 8, 12)
    ids = np.asarray([vision_prompt(rng, [("video", grid)], [5, 5])])
    pv = pixels(rng, [grid])
    bf16 = tempo_jax.load_pretrained(hf_dir, dtype=jnp.bfloat16)
    assert jax.tree.leaves(bf16)[0].dtype == jnp.bfloat16
    f32 = np.asarray(model(ids, pixel_values_videos=pv, video_grid_thw=[grid]))
    b16 = np.asarray(bf16(ids, pixel_values_videos=pv, video_grid_thw=[grid]))
    err = np.abs(f32 - b16).max()
    rel = err / np.abs(f32).max()
    with capsys.disabled():
        print(f"\n[bf16 vs fp32] max |logit diff| {err:.3e} (relative to max |logit| {rel:.3e})")
    assert rel < 5e-2
    assert (np.argmax(f32, -1) == np.argmax(b16, -1)).mean() > 0.9


def test_checkpoint_errors_list_the_problems(hf_dir, tmp_path):
    sd = load_file(str(hf_dir / "model.safetensors"))
    sd.pop("model.norm.weight")
    sd.pop("visual.blocks.0.attn.qkv.bias")
    sd["model.extra.weight"] = torch.zeros(3)
    sd["lm_head.weight"] = torch.zeros(5, 64)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        tempo_jax.load_pretrained(tmp_path)
    msg = str(e.value)
    for needle in ("missing", "model.norm.weight", "visual.blocks.0.attn.qkv.bias",
                   "unexpected", "model.extra.weight", "mis-shaped", "lm_head.weight"):
        assert needle in msg, (needle, msg)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["model_type"] = "llava"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'llava'"):
        tempo_jax.load_pretrained(tmp_path)


def test_remat_and_gradients_match(hf_dir):
    """Rematerialisation changes memory, never values: same loss and gradients."""
    from flax import nnx

    rng = np.random.default_rng(11)
    grid = (2, 8, 8)
    ids = np.asarray([vision_prompt(rng, [("video", grid)], [4, 4])])
    pv = pixels(rng, [grid])

    def loss_and_grad(remat):
        opts = tempo_jax.RuntimeOptions(dtype=jnp.float32, remat=remat)
        m = tempo_jax.load_pretrained(hf_dir, dtype=jnp.float32, options=opts)
        inputs = prepare_inputs(m.config, ids, pixel_values_videos=pv, video_grid_thw=[grid])

        def loss_fn(m):
            logits = m.forward(inputs)
            return jax.nn.logsumexp(logits, -1).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(m)
        return loss, jax.tree.leaves(nnx.state(grads))

    l0, g0 = loss_and_grad("none")
    for policy in ("full", "dots"):
        l1, g1 = loss_and_grad(policy)
        np.testing.assert_allclose(l1, l0, rtol=1e-6)
        for a, b in zip(g0, g1, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_splash_backend_interpret_matches_xla(hf_dir, model):
    """The TPU kernel (Pallas interpret mode on CPU) inside the whole model: window and
    full-frame vision segments, causal text with padding."""
    opts = tempo_jax.RuntimeOptions(dtype=jnp.float32, attention_backend="splash",
                                    splash_interpret=True)
    splash = tempo_jax.load_pretrained(hf_dir, dtype=jnp.float32, options=opts)
    rng = np.random.default_rng(12)
    g1, g2 = (2, 8, 12), (1, 4, 4)
    rows = [vision_prompt(rng, [("video", g1)], [6, 9]),
            vision_prompt(rng, [("video", g2)], [2, 3])]
    ids, mask = _batch(rows, "left")
    kw = dict(attention_mask=mask, pixel_values_videos=pixels(rng, [g1, g2]),
              video_grid_thw=[g1, g2])
    a, b = np.asarray(splash(ids, **kw)), np.asarray(model(ids, **kw))
    np.testing.assert_allclose(a[mask.astype(bool)], b[mask.astype(bool)], atol=1e-4)


def test_bucket_sizes():
    from tempo_jax.models.inputs import bucket

    sizes = [bucket(n) for n in range(1, 5000)]
    assert all(b >= n for n, b in zip(range(1, 5000), sizes, strict=True))
    assert all(b <= max(1.25 * n, n + 1) for n, b in zip(range(1, 5000), sizes, strict=True))
    assert len(set(sizes)) < 60
