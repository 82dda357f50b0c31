"""Qwen3-VL through the project's shared code paths: the GRPO update's completion logits
(prompts embedded once, DeepStack's per-position index carried through the row reordering)
and the sampling engine's greedy decoding against a torch loop that recomputes the whole
sequence with `Qwen3VLForConditionalGeneration` at every step."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen3_reference import batch, hf_positions, pixels, prompt, tiny_hf_model

import tempo_jax
from tempo_jax.generate import generate
from tempo_jax.models import families
from tempo_jax.models.qwen3_vl import positions as pos_lib
from tempo_jax.training import steps

NEW = 12


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_model(seed=1)


@pytest.fixture(scope="module")
def model(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3_stack")
    hf_model.save_pretrained(path)
    assert families.checkpoint_family(path) == "qwen3_vl"
    return tempo_jax.load_pretrained(path, dtype=jnp.float32)  # picks the family itself


def _two_video_prompts(seed):
    rng = np.random.default_rng(seed)
    g1, g2 = (3, 8, 8), (2, 4, 8)
    p1 = prompt(rng, [("video", g1)], [7, 9])
    p2 = prompt(rng, [("video", g2)], [2, 3])
    return (p1, g1, pixels(rng, [g1])), (p2, g2, pixels(rng, [g2]))


def torch_greedy(hf_model, ids, pv, grid, n):
    """Greedy decoding by full recomputation; positions from transformers' get_rope_index of
    the prompt, new tokens at max(prompt positions) + 1 + t."""
    pos = hf_positions(hf_model, {"input_ids": np.asarray([ids]),
                                  "attention_mask": np.ones((1, len(ids))),
                                  "video_grid_thw": [grid]})
    cur, p = torch.as_tensor([ids]), torch.as_tensor(pos, dtype=torch.long)
    start = int(pos.max()) + 1
    out = []
    with torch.no_grad():
        for t in range(n):
            logits = hf_model(
                input_ids=cur, attention_mask=torch.ones_like(cur), position_ids=p,
                pixel_values_videos=torch.as_tensor(pv), video_grid_thw=torch.as_tensor([grid]),
            ).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            cur = torch.cat([cur, torch.tensor([[tok]])], 1)
            p = torch.cat([p, torch.full((3, 1, 1), start + t)], 2)
    return out


def test_greedy_matches_torch_full_recompute(model, hf_model):
    """A right-padded batch of two videos (positions computed by our `rope_index`, the
    sampler left-aligns the rows itself) decodes the same greedy tokens as transformers."""
    (p1, g1, v1), (p2, g2, v2) = _two_video_prompts(0)
    ids, mask = batch([p1, p2])
    out = generate(model, ids, mask, pixel_values_videos=np.concatenate([v1, v2]),
                   video_grid_thw=[g1, g2], max_new_tokens=NEW, temperature=0)
    for row, (p, g, v) in enumerate([(p1, g1, v1), (p2, g2, v2)]):
        assert out.tokens[row].tolist() == torch_greedy(hf_model, p, v, g, NEW), row
    assert out.lengths.tolist() == [NEW, NEW]


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_completion_logits_with_deepstack_equal_unpadded_forward(model, pad_side):
    """The GRPO update's logits (training.steps.completion_logits: the prompts' videos
    embedded once and broadcast to G samples, rows reordered so padding trails) equal a plain
    forward of each unpadded prompt + completion, DeepStack included."""
    (p1, g1, v1), (p2, g2, v2) = _two_video_prompts(1)
    cfg = model.config
    ids, mask = batch([p1, p2], pad_side)
    inputs = families.prepare_inputs(cfg, ids, mask, pixel_values_videos=np.concatenate([v1, v2]),
                                     video_grid_thw=[g1, g2])
    g, t = 2, 5
    rng = np.random.default_rng(2)
    comp = rng.integers(10, 1000, (2 * g, t)).astype(np.int32)
    comp_len = np.asarray([5, 2, 3, 5])
    comp_mask = np.arange(t)[None] < comp_len[:, None]
    start = np.repeat(pos_lib.decode_start(inputs["position_ids"], mask), g)
    logits = nnx.jit(steps.completion_logits, static_argnums=5)
    got = np.asarray(logits(model, inputs, jnp.asarray(comp), jnp.asarray(comp_mask),
                            jnp.asarray(start), g))
    for r in range(2 * g):
        p, grid, v = [(p1, g1, v1), (p2, g2, v2)][r // g]
        seq = np.concatenate([p, comp[r, :comp_len[r]]])
        ref = np.asarray(model(seq[None], pixel_values_videos=v, video_grid_thw=[grid]))[0]
        n = len(p)
        np.testing.assert_allclose(got[r, :comp_len[r]], ref[n - 1:n - 1 + comp_len[r]],
                                   atol=2e-5, rtol=1e-5)
    # without DeepStack the logits differ: the test would see a dropped side input
    @nnx.jit
    def with_and_without(model, inputs):
        x, side = model.embed_for_decoder(inputs)
        args = (x, inputs["position_ids"], inputs["attention_mask"], model.options)
        return model.model(*args), model.model(*args, side=side)

    h, h_side = with_and_without(model, inputs)
    assert float(jnp.abs(h - h_side).max()) > 1e-3
