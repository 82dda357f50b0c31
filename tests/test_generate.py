"""The sampling engine against a plain torch reference that recomputes the whole sequence at
every step (explicit positions: transformers' own `generate` misplaces M-RoPE in 5.x)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import IMAGE, VIDEO, VSTART, pixels, tiny_hf_model, vision_prompt

import tempo_jax
from tempo_jax.generate import compilation_count, generate
from tempo_jax.models.qwen2_5_vl import positions as pos_lib

NEW = 24


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    return tiny_hf_model(seed=0)


@pytest.fixture(scope="module")
def model(hf_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("gen_tiny")
    hf_model.save_pretrained(path)
    return tempo_jax.load_pretrained(path, dtype=jnp.float32)


def _positions(ids, grid, **eta):
    pos, _ = pos_lib.rope_index(
        np.asarray([ids]), None, None, np.asarray(grid), None, spatial_merge_size=2,
        tokens_per_second=2, image_token_id=IMAGE, video_token_id=VIDEO,
        vision_start_token_id=VSTART, **eta,
    )
    return pos


def torch_greedy(hf_model, ids, pv, grid, pos, n):
    """Greedy decoding by full recomputation; new tokens at max(prompt positions) + 1 + t."""
    cur = torch.as_tensor([ids])
    p = torch.as_tensor(pos, dtype=torch.long)
    start = int(pos.max()) + 1
    out = []
    with torch.no_grad():
        for t in range(n):
            logits = hf_model(
                input_ids=cur, attention_mask=torch.ones_like(cur), position_ids=p,
                pixel_values_videos=torch.as_tensor(pv), video_grid_thw=torch.as_tensor(grid),
            ).logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            cur = torch.cat([cur, torch.tensor([[tok]])], 1)
            p = torch.cat([p, torch.full((3, 1, 1), start + t)], 2)
    return out


def _two_prompts(seed):
    rng = np.random.default_rng(seed)
    g1, g2 = (3, 8, 12), (2, 4, 8)
    p1 = vision_prompt(rng, [("video", g1)], [7, 9])
    p2 = vision_prompt(rng, [("video", g2)], [2, 3])
    return (p1, g1, pixels(rng, [g1])), (p2, g2, pixels(rng, [g2]))


def _right_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
        mask[i, :len(p)] = 1
    return ids, mask


def test_greedy_matches_torch_batch_of_two_videos(model, hf_model):
    (p1, g1, v1), (p2, g2, v2) = _two_prompts(0)
    ids, mask = _right_padded([p1, p2])
    out = generate(model, ids, mask, pixel_values_videos=np.concatenate([v1, v2]),
                   video_grid_thw=[g1, g2], max_new_tokens=NEW, temperature=0)
    for row, (p, g, v) in enumerate([(p1, g1, v1), (p2, g2, v2)]):
        ref = torch_greedy(hf_model, p, v, [g], _positions(p, [g]), NEW)
        assert out.tokens[row].tolist() == ref
    assert out.lengths.tolist() == [NEW, NEW]


def test_greedy_matches_torch_with_eta_positions(model, hf_model):
    """ETA: every temporal patch its own segment with a timestamp; positions passed in."""
    rng = np.random.default_rng(1)
    seg = (1, 8, 8)
    ids = list(rng.integers(10, 1000, size=4))
    for _ in range(3):
        ids += list(rng.integers(10, 1000, size=2))  # the timestamp's tokens
        ids += vision_prompt(rng, [("video", seg)], [0, 0])
    ids += list(rng.integers(10, 1000, size=5))
    grids = [seg] * 3
    pos = _positions(ids, grids, video_segment_times=np.asarray([0.0, 3.7, 9.2]),
                     timestamp_lengths=np.asarray([2, 2, 2]))
    pv = pixels(rng, grids)
    out = generate(model, np.asarray([ids]), pixel_values_videos=pv, video_grid_thw=grids,
                   position_ids=pos, max_new_tokens=NEW, temperature=0)
    assert out.tokens[0].tolist() == torch_greedy(hf_model, ids, pv, grids, pos, NEW)


def test_logprobs_equal_full_forward_log_softmax(model):
    (p1, g1, v1), (p2, g2, v2) = _two_prompts(2)
    ids, mask = _right_padded([p1, p2])
    out = generate(model, ids, mask, pixel_values_videos=np.concatenate([v1, v2]),
                   video_grid_thw=[g1, g2], max_new_tokens=12, temperature=1.3, top_k=50,
                   num_samples=2, rng=jax.random.key(3))
    assert out.tokens.shape == (4, 12)
    for row in range(4):
        b = row // 2
        p, g, v = [(p1, g1, v1), (p2, g2, v2)][b]
        full = np.asarray(list(p) + out.tokens[row].tolist())
        pos = _positions(p, [g])
        new = int(pos.max()) + 1 + np.arange(12)
        pos = np.concatenate([pos, np.broadcast_to(new, (3, 1, 12))], axis=2)
        logits = np.asarray(model(full[None], pixel_values_videos=v, video_grid_thw=[g],
                                  position_ids=pos))[0]
        logp = jax.nn.log_softmax(logits[len(p) - 1:-1], axis=-1)
        ref = np.take_along_axis(np.asarray(logp), out.tokens[row][:, None], 1)[:, 0]
        np.testing.assert_allclose(out.logprobs[row], ref, atol=1e-4)


def test_sampling_reproducible_and_rows_prompt_major(model):
    rng = np.random.default_rng(4)
    ids = rng.integers(10, 1000, size=(2, 9))
    kw = dict(max_new_tokens=10, temperature=1.0, num_samples=3)
    a = generate(model, ids, rng=jax.random.key(7), **kw)
    b = generate(model, ids, rng=jax.random.key(7), **kw)
    c = generate(model, ids, rng=jax.random.key(8), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert (a.tokens != c.tokens).any()
    # greedy samples of one prompt are identical rows, equal to num_samples=1
    g3 = generate(model, ids, max_new_tokens=8, temperature=0, num_samples=3)
    g1 = generate(model, ids, max_new_tokens=8, temperature=0)
    np.testing.assert_array_equal(g3.tokens, np.repeat(g1.tokens, 3, axis=0))


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.3)])
def test_truncation_never_emits_outside_allowed_set(model, top_k, top_p):
    rng = np.random.default_rng(5)
    prompt = rng.integers(10, 1000, size=8)
    temp = 2.0
    out = generate(model, prompt[None], max_new_tokens=10, temperature=temp, top_k=top_k,
                   top_p=top_p, num_samples=4, rng=jax.random.key(0))
    for row in range(4):
        full = np.concatenate([prompt, out.tokens[row]])
        logits = np.asarray(model(full[None]))[0, len(prompt) - 1:-1] / temp
        for t, tok in enumerate(out.tokens[row]):
            order = np.argsort(-logits[t])
            if top_k:
                allowed = set(order[:top_k].tolist())
            else:
                p = np.exp(logits[t] - logits[t].max())
                p = p[order] / p.sum()
                n_keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
                allowed = set(order[:n_keep].tolist())
            assert int(tok) in allowed, (row, t, tok)


def test_eos_list_pads_after_first_eos(model):
    rng = np.random.default_rng(6)
    ids = rng.integers(10, 1000, size=(1, 10))
    free = generate(model, ids, max_new_tokens=12, temperature=0)
    eos = [int(free.tokens[0, 3]), 999_999 % 1024]
    out = generate(model, ids, max_new_tokens=12, temperature=0, eos_token_id=eos,
                   pad_token_id=0)
    first = int(np.argmax(free.tokens[0] == eos[0]))
    assert out.lengths[0] == first + 1
    np.testing.assert_array_equal(out.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert (out.tokens[0, first + 1:] == 0).all()
    assert (out.logprobs[0, first + 1:] == 0).all()


def test_prompt_longer_than_cache_fails_before_compiling(model):
    before = compilation_count()
    with pytest.raises(ValueError, match="exceeds the cache of 32 tokens"):
        generate(model, np.ones((1, 30), np.int64), max_new_tokens=8, max_length=32)
    assert compilation_count() == before


def test_bucketed_prompts_share_one_compilation(model):
    rng = np.random.default_rng(7)
    generate(model, rng.integers(10, 1000, size=(1, 37)), max_new_tokens=4, temperature=0)
    before = compilation_count()
    for n in (38, 39, 40):
        generate(model, rng.integers(10, 1000, size=(1, n)), max_new_tokens=4, temperature=0)
    assert compilation_count() == before


@pytest.mark.parametrize("vocab", [1000, 151936])
def test_inverse_cdf_sampler_draws_the_softmax(vocab):
    """The sampler's frequencies over 20k draws match softmax(logits) within 4.5 standard
    errors for every token with enough mass, masked entries are never drawn, and the two-level
    cumulative sum reaches tokens at both ends of the vocabulary."""
    from tempo_jax.generate import inverse_cdf_sample

    n, chunk = 20_000, 500
    rng = np.random.default_rng(0)
    logits = rng.normal(size=vocab).astype(np.float32) * 2
    hot = np.array([0, 1, vocab // 2, vocab - 1])
    logits[hot] += 12.0  # most of the mass on a few tokens, at the edges and a block border
    masked = rng.choice(np.setdiff1d(np.arange(vocab), hot), size=vocab // 3, replace=False)
    logits[masked] = np.finfo(np.float32).min
    p = np.exp(logits.astype(np.float64) - logits.max())
    p /= p.sum()
    draw = jax.jit(lambda k: inverse_cdf_sample(
        jnp.broadcast_to(jnp.asarray(logits), (chunk, vocab)), k))
    toks = np.concatenate([np.asarray(draw(jax.random.key(i))) for i in range(n // chunk)])
    freq = np.bincount(toks, minlength=vocab) / n
    assert freq[masked].sum() == 0
    se = np.sqrt(p * (1 - p) / n)
    big = p * n > 50
    assert big.sum() >= 4
    assert np.all(np.abs(freq[big] - p[big]) < 4.5 * se[big]), (freq[hot], p[hot])
    # the tail as a whole (tokens too rare to test one by one)
    tail_se = np.sqrt(p[~big].sum() * (1 - p[~big].sum()) / n)
    assert abs(freq[~big].sum() - p[~big].sum()) < 4.5 * tail_se + 1e-9
