"""Qwen3-VL parity against transformers' `Qwen3VLForConditionalGeneration` (fp32, CPU, tiny
random models built from configs), with positions from transformers' own `get_rope_index`
(so these tests do not depend on our positions module); checkpoint I/O both ways; config
round trips; the presets' sizes against transformers' own count."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen3_reference import (
    batch,
    hf_positions,
    pixels,
    prompt,
    tiny_hf_model,
    torch_logits,
)
from safetensors.torch import load_file
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from tempo_jax.models import qwen3_vl
from tempo_jax.models.qwen3_vl import (
    ModelConfig,
    TextConfig,
    VisionConfig,
    extend_side,
    prepare_inputs,
    preset,
)
from tempo_jax.models.qwen3_vl.params import abstract_model

TOL = 1e-4


@nnx.jit
def _forward(model, inputs):
    return model.forward(inputs)


@nnx.jit
def _visual(model, pixel_values, meta):
    return model.visual(pixel_values, meta, model.options)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen3_vl")
    tiny_hf_model(seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return Qwen3VLForConditionalGeneration.from_pretrained(hf_dir).eval()


@pytest.fixture(scope="module")
def model(hf_dir):
    return qwen3_vl.load_pretrained(hf_dir, dtype=jnp.float32)


def compare(model, hf_model, inputs, label) -> float:
    pos = hf_positions(hf_model, inputs)
    ours = np.asarray(model(**inputs, position_ids=pos))
    ref = torch_logits(hf_model, inputs, pos)
    valid = np.asarray(inputs["attention_mask"]).astype(bool)
    err = float(np.abs(ours - ref)[valid].max())
    print(f"[qwen3-vl parity] {label}: max |logit diff| {err:.2e}")
    assert err <= TOL, f"{label}: max |logit diff| {err:.2e} > {TOL}"
    return err


# --------------------------------------------------------------------------- logits parity
def test_text_only(model, hf_model):
    rng = np.random.default_rng(1)
    ids = rng.integers(10, 1000, size=(1, 23))
    compare(model, hf_model, {"input_ids": ids, "attention_mask": np.ones_like(ids)}, "text")


def test_image(model, hf_model):
    rng = np.random.default_rng(2)
    grid = (1, 10, 14)
    ids = np.asarray([prompt(rng, [("image", grid)], [3, 6])])
    compare(model, hf_model, {
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "pixel_values": pixels(rng, [grid]), "image_grid_thw": np.asarray([grid]),
    }, "one image")


def test_video_with_timestamped_frames(model, hf_model):
    rng = np.random.default_rng(3)
    grid = (3, 8, 12)
    ids = np.asarray([prompt(rng, [("video", grid)], [5, 4])])
    compare(model, hf_model, {
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "pixel_values_videos": pixels(rng, [grid]), "video_grid_thw": np.asarray([grid]),
    }, "one video, 3 timestamped frames")


def test_two_videos_and_an_image(model, hf_model):
    rng = np.random.default_rng(4)
    v1, v2, im = (2, 8, 8), (2, 4, 12), (1, 6, 4)
    ids = np.asarray([prompt(rng, [("video", v1), ("image", im), ("video", v2)], [4, 2, 3, 5])])
    compare(model, hf_model, {
        "input_ids": ids, "attention_mask": np.ones_like(ids),
        "pixel_values_videos": pixels(rng, [v1, v2]), "video_grid_thw": np.asarray([v1, v2]),
        "pixel_values": pixels(rng, [im]), "image_grid_thw": np.asarray([im]),
    }, "two videos + an image")


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_padded_batch(model, hf_model, pad_side):
    rng = np.random.default_rng(5)
    g1, g2 = (2, 8, 12), (2, 4, 4)
    rows = [prompt(rng, [("video", g1)], [6, 9]), prompt(rng, [("video", g2)], [2, 3])]
    ids, mask = batch(rows, pad_side)
    compare(model, hf_model, {
        "input_ids": ids, "attention_mask": mask,
        "pixel_values_videos": pixels(rng, [g1, g2]), "video_grid_thw": np.asarray([g1, g2]),
    }, f"padded batch ({pad_side})")


def test_vision_tower_and_deepstack_features(model, hf_model):
    rng = np.random.default_rng(6)
    grids = [(2, 12, 16), (1, 6, 10)]
    pv = pixels(rng, grids)
    ids = np.asarray([prompt(rng, [("video", grids[0]), ("video", grids[1])], [1, 1, 1])])
    inputs = prepare_inputs(model.config, ids, pixel_values_videos=pv, video_grid_thw=grids,
                            position_ids=np.zeros((3, *ids.shape)))
    merged, deep = _visual(model, inputs["pixel_values"], inputs["vision_meta"])
    with torch.no_grad():
        ref = hf_model.model.visual(torch.as_tensor(pv), grid_thw=torch.as_tensor(grids))
    errs = [float(np.abs(np.asarray(merged) - ref.pooler_output.numpy()).max())]
    assert deep.shape[0] == len(ref.deepstack_features) == 2
    errs += [float(np.abs(np.asarray(d) - r.numpy()).max())
             for d, r in zip(deep, ref.deepstack_features, strict=True)]
    print(f"[qwen3-vl parity] vision merged / deepstack max |diff|: {errs}")
    assert max(errs) <= 1e-5, errs


def test_bucketed_vision_padding_is_invisible(model):
    """Static-shape padding of the patch batch and of the segment table (for bucketing)
    leaves every real row of the merged and DeepStack features unchanged (the decoder reads
    feature rows by index only, so its logits cannot change either)."""
    rng = np.random.default_rng(7)
    grid = (2, 6, 10)  # 120 patches in 2 frames -> 128 patches, 4 segments of 64
    ids = np.asarray([prompt(rng, [("video", grid)], [3, 3])])
    kw = dict(pixel_values_videos=pixels(rng, [grid]), video_grid_thw=[grid],
              position_ids=np.zeros((3, *ids.shape)))
    a = prepare_inputs(model.config, ids, **kw)
    b = prepare_inputs(model.config, ids, **kw, bucketed=True)
    assert b["pixel_values"].shape[0] > a["pixel_values"].shape[0]
    assert b["vision_meta"]["full_index"].shape > a["vision_meta"]["full_index"].shape
    (ma, da), (mb, db) = (_visual(model, x["pixel_values"], x["vision_meta"]) for x in (a, b))
    n = ma.shape[0]
    np.testing.assert_allclose(np.asarray(mb)[:n], np.asarray(ma), atol=1e-6)
    np.testing.assert_allclose(np.asarray(db)[:, :n], np.asarray(da), atol=1e-6)


# --------------------------------------------------------------------------- the interface
def test_decoder_interface_side_extend_and_decode(model, hf_model):
    """`embed_for_decoder` + `model.model(side=...)` is `forward`; appended completions with
    `extend_side` and KV-cache decoding of text tokens match the whole sequence's logits."""
    rng = np.random.default_rng(8)
    grid = (1, 8, 8)
    full = prompt(rng, [("image", grid)], [3, 4])
    n_new = 3
    ids = np.asarray([full])
    pv = pixels(rng, [grid])
    pos = hf_positions(hf_model, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                                  "image_grid_thw": [grid]})
    whole = prepare_inputs(model.config, ids, pixel_values=pv, image_grid_thw=[grid],
                           position_ids=pos)
    head = prepare_inputs(model.config, ids[:, :-n_new], pixel_values=pv,
                          image_grid_thw=[grid], position_ids=pos[..., :-n_new])
    opts = model.options

    @nnx.jit
    def run(model, whole, head):
        ref = model.forward(whole)
        x, side = model.embed_for_decoder(head)
        assert side is not None and side["deepstack"].shape[0] == 2
        # completions appended to the prompt (the trainer's path)
        new = model.model.embed_tokens(whole["input_ids"][:, -n_new:]).astype(opts.dtype)
        h = model.model(jnp.concatenate([x, new], 1), whole["position_ids"], None, opts,
                        side=extend_side(side, n_new))
        appended = model.logits_from_hidden(h)
        # prefill, then decode the new tokens against the KV cache (the sampler's path)
        hp, kvs = model.model(x, head["position_ids"], head["attention_mask"], opts,
                              return_kv=True, side=side)
        length = x.shape[1]
        caches = tuple(jnp.pad(a, ((0, 0), (0, 0), (0, n_new), (0, 0), (0, 0))) for a in kvs)
        kv_mask = jnp.arange(length + n_new)[None, None, :] <= (length + jnp.arange(n_new))[
            None, :, None]
        hd, _ = model.model.decode(new, whole["position_ids"][..., -n_new:], caches, length,
                                   kv_mask, opts)
        return ref, appended, model.logits_from_hidden(hd), model.logits_from_hidden(hp)

    ref, appended, decoded, prefill = (np.asarray(a) for a in run(model, whole, head))
    np.testing.assert_allclose(appended, ref, atol=1e-5)
    np.testing.assert_allclose(decoded, ref[:, -n_new:], atol=1e-5)
    np.testing.assert_allclose(prefill, ref[:, :-n_new], atol=1e-5)
    assert extend_side(None, 2) is None


def test_qwen2_5_vl_trivial_interface(tmp_path):
    from hf_reference import tiny_hf_model as tiny_qwen2_5_vl

    from tempo_jax.models import qwen2_5_vl

    assert qwen2_5_vl.ModelConfig.family == "qwen2_5_vl" and ModelConfig.family == "qwen3_vl"
    assert "family" not in qwen2_5_vl.preset("tiny").to_hf_dict()
    tiny_qwen2_5_vl(seed=0).save_pretrained(tmp_path)
    m = qwen2_5_vl.load_pretrained(tmp_path, dtype=jnp.float32)
    inputs = qwen2_5_vl.prepare_inputs(m.config, np.arange(10, 15)[None])

    @nnx.jit
    def run(m, inputs):
        x, side = m.embed_for_decoder(inputs)
        assert side is None and m.extend_side(side, 3) is None
        h = m.model(x, inputs["position_ids"], inputs["attention_mask"], m.options, side=side)
        return h, m.hidden_states(inputs)

    h, ref = run(m, inputs)
    np.testing.assert_array_equal(h, ref)


def test_gradient_of_logits_is_finite(model):
    rng = np.random.default_rng(9)
    grid = (2, 8, 8)
    ids = np.asarray([prompt(rng, [("video", grid)], [2, 2])])
    inputs = prepare_inputs(model.config, ids, pixel_values_videos=pixels(rng, [grid]),
                            video_grid_thw=[grid],
                            position_ids=np.broadcast_to(np.arange(ids.shape[1]),
                                                         (3, *ids.shape)))
    at = jnp.asarray([[ids.shape[1] - 3, ids.shape[1] - 1]])

    def loss_fn(m):
        return m.forward(inputs, logits_positions=at)[..., :50].sum()

    grads = nnx.jit(nnx.grad(loss_fn))(model)
    leaves = jax.tree.leaves(nnx.state(grads))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    # DeepStack reaches the loss: every merger, the position table and the tower get gradients
    vis = grads.visual
    for g in (vis.deepstack_merger_list[0].linear_fc2.kernel,
              vis.deepstack_merger_list[1].linear_fc2.kernel, vis.pos_embed.embedding,
              vis.patch_embed.proj.kernel):
        assert np.abs(np.asarray(g[...])).max() > 0


# --------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("shard_bytes", [None, 100_000])
def test_save_then_transformers_loads_identical(model, hf_model, tmp_path, shard_bytes):
    kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
    files = qwen3_vl.save_pretrained(model, tmp_path, **kw)
    assert (len(files) > 1) == (tmp_path / "model.safetensors.index.json").exists()
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["text_config"]["rope_scaling"]["mrope_section"] == [4, 4, 4]
    reloaded = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path).eval()
    ref_sd, new_sd = hf_model.state_dict(), reloaded.state_dict()
    assert set(ref_sd) == set(new_sd)
    for k, v in ref_sd.items():
        assert torch.equal(v, new_sd[k]), k
    rng = np.random.default_rng(10)
    grid = (2, 8, 8)
    ids = np.asarray([prompt(rng, [("video", grid)], [3, 3])])
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "pixel_values_videos": pixels(rng, [grid]), "video_grid_thw": np.asarray([grid])}
    pos = hf_positions(hf_model, inputs)
    np.testing.assert_array_equal(torch_logits(reloaded, inputs, pos),
                                  torch_logits(hf_model, inputs, pos))


def test_tied_embeddings_both_ways(tmp_path):
    hf = tiny_hf_model(seed=3, tie=True)
    hf.save_pretrained(tmp_path / "hf")
    ours = qwen3_vl.load_pretrained(tmp_path / "hf", dtype=jnp.float32)
    assert ours.lm_head is None
    rng = np.random.default_rng(11)
    ids = rng.integers(10, 1000, size=(2, 11))
    inputs = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    pos = np.broadcast_to(np.arange(11), (3, 2, 11))
    err = np.abs(np.asarray(ours(ids, position_ids=pos)) - torch_logits(hf, inputs, pos)).max()
    print(f"[qwen3-vl parity] tied embeddings, text: max |logit diff| {err:.2e}")
    assert err <= TOL
    qwen3_vl.save_pretrained(ours, tmp_path / "ours")
    assert "lm_head.weight" not in load_file(str(tmp_path / "ours" / "model.safetensors"))
    back = Qwen3VLForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    for k, v in hf.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_checkpoint_errors_list_the_problems(hf_dir, tmp_path):
    from safetensors.torch import save_file

    sd = load_file(str(hf_dir / "model.safetensors"))
    sd.pop("model.language_model.layers.0.self_attn.q_norm.weight")
    sd["model.visual.extra.weight"] = torch.zeros(3)
    sd["model.visual.pos_embed.weight"] = torch.zeros(5, 32)
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(ValueError) as e:
        qwen3_vl.load_pretrained(tmp_path)
    for needle in ("Qwen3-VL", "missing", "q_norm", "unexpected", "model.visual.extra.weight",
                   "mis-shaped", "model.visual.pos_embed.weight"):
        assert needle in str(e.value), (needle, str(e.value))


# --------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b",
                                  "tiny"])
def test_config_round_trip(name, tmp_path):
    cfg = preset(name)
    d = cfg.to_hf_dict()
    assert ModelConfig.from_hf_dict(d) == cfg
    hf = Qwen3VLConfig(**d)
    t, v = hf.text_config, hf.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.head_dim, t.intermediate_size, t.vocab_size) == (
        cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.text.num_attention_heads,
        cfg.text.num_key_value_heads, cfg.text.head_dim, cfg.text.intermediate_size,
        cfg.text.vocab_size)
    assert t.rope_parameters["rope_theta"] == cfg.text.rope_theta
    assert list(t.rope_parameters["mrope_section"]) == list(cfg.text.mrope_section)
    assert (v.depth, v.hidden_size, v.intermediate_size, v.num_heads, v.out_hidden_size,
            v.num_position_embeddings, list(v.deepstack_visual_indexes)) == (
        cfg.vision.depth, cfg.vision.hidden_size, cfg.vision.intermediate_size,
        cfg.vision.num_heads, cfg.vision.out_hidden_size, cfg.vision.num_position_embeddings,
        list(cfg.vision.deepstack_visual_indexes))
    assert hf.tie_word_embeddings == cfg.tie_word_embeddings
    # what transformers 5.x writes (rope_parameters, many more keys) reads back the same
    hf.save_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(tmp_path) == cfg


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unsupported model_type 'qwen2_5_vl'"):
        ModelConfig.from_hf_dict({"model_type": "qwen2_5_vl"})
    tiny = preset("tiny")
    with pytest.raises(ValueError, match="mrope_section"):
        tiny.replace(text=TextConfig(head_dim=32, mrope_section=(8, 5, 5)))
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        tiny.replace(vision=VisionConfig(depth=3, deepstack_visual_indexes=(0, 3)))
    with pytest.raises(ValueError, match="unknown Qwen3-VL preset"):
        preset("qwen3_vl_7b")


def _hf_param_count(cfg: ModelConfig) -> int:
    with torch.device("meta"):
        hf = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg.to_hf_dict()))
    # tied: the head shares the embedding's storage; parameters() counts it once
    return sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("name", ["qwen3_vl_2b", "qwen3_vl_4b", "qwen3_vl_8b", "qwen3_vl_32b",
                                  "tiny"])
def test_preset_parameter_count_matches_transformers(name):
    cfg = preset(name)
    ours = sum(x.size for x in jax.tree.leaves(nnx.state(abstract_model(cfg, jnp.bfloat16))))
    print(f"[qwen3-vl] {name}: {ours:,} parameters")
    assert ours == _hf_param_count(cfg)
