"""Tests for the offline Qwen2 tokenizer, ETA prompt layout, positions, loss masks, batching."""

from __future__ import annotations

import random
import unicodedata

import numpy as np
import pytest

from tempo_jax.data import prompts as P
from tempo_jax.data.prompts import (
    IM_END_ID,
    VIDEO_PAD_ID,
    VISION_END_ID,
    VISION_START_ID,
    PromptConfig,
    build_batch,
    build_prompt,
    format_answer,
    load_tokenizer,
    question_text,
)
from tempo_jax.models.qwen2_5_vl.positions import rope_index


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _random_text(rng: random.Random, n: int) -> str:
    pools = [(0x20, 0x7E), (0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x52F), (0x4E00, 0x9FFF),
             (0x3040, 0x30FF), (0xAC00, 0xD7A3), (0x1F300, 0x1F64F), (0x600, 0x6FF)]
    chars = []
    for _ in range(n):
        lo, hi = rng.choice(pools)
        chars.append(chr(rng.randint(lo, hi)))
        if rng.random() < 0.1:
            chars.append(rng.choice([" ", "  ", "\n", "\t", "\r\n", "'s", "123"]))
    return unicodedata.normalize("NFC", "".join(chars))


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_known_ids(tok):
    assert tok.encode("Hello world", add_special_tokens=False) == [9707, 1879]
    # The Qwen2 chat header, well known from every Qwen2/2.5 prompt dump.
    header = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    assert tok(header)["input_ids"] == [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13,
                                        151645, 198, 151644, 872, 198]
    assert tok("<|im_start|>assistant\n")["input_ids"] == [151644, 77091, 198]
    assert len(tok) == 151665
    # NFC normalizer, as the released tokenizer.json: a decomposed accent encodes like "é".
    assert tok.encode("cafe\u0301", add_special_tokens=False) == tok.encode(
        "caf\u00e9", add_special_tokens=False)


def test_load_tokenizer_from_dir(tok):
    """The checkpoint-dir path (here: the offline build's own files) gives the same ids."""
    other = load_tokenizer(str(P._offline_tokenizer_dir()))
    s = "<|im_start|>user\n3.5s<|vision_start|><|video_pad|><|vision_end|>Hello world"
    assert other(s)["input_ids"] == tok(s)["input_ids"]


def test_special_tokens_ids(tok):
    for i, (content, _) in enumerate(P.SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(content) == 151643 + i
        assert tok.decode([151643 + i]) == content
    assert tok.convert_tokens_to_ids("<|vision_start|>") == VISION_START_ID == 151652
    assert tok.convert_tokens_to_ids("<|vision_end|>") == VISION_END_ID
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok.convert_tokens_to_ids("<|video_pad|>") == VIDEO_PAD_ID == 151656
    assert tok.convert_tokens_to_ids("<|file_sep|>") == 151664
    assert tok.eos_token_id == IM_END_ID and tok.pad_token_id == 151643
    # Released flags: the tool-call / FIM tokens are added but not `special`.
    assert tok.decode([151644, 151657], skip_special_tokens=True) == "<tool_call>"


def test_qwen3_tokenizer_variant(tok):
    """family="qwen3_vl": the same BPE plus Qwen3's 4 added tokens (not `special`), so
    `<think>` / `</think>` are single tokens; built and cached apart from Qwen2.5's, which
    keeps its 22 added tokens (`<think>` is plain text there)."""
    q3 = load_tokenizer(None, family="qwen3_vl")
    assert q3 is not tok and len(q3) == 151669 and len(tok) == 151665
    assert P._offline_tokenizer_dir("qwen3_vl") != P._offline_tokenizer_dir()
    for i, (content, _) in enumerate(P.added_tokens("qwen3_vl")):
        assert q3.convert_tokens_to_ids(content) == 151643 + i
    assert [q3.convert_tokens_to_ids(t) for t in ("<tool_response>", "</tool_response>")] == [
        151665, 151666]
    answer = "<think>a dog</think><answer>1.0 to 2.5</answer>"
    ids = P.encode_text(q3, answer)
    assert ids[0] == P.THINK_START_ID == 151667 and ids.count(P.THINK_END_ID) == 1
    assert P.THINK_END_ID == 151668 and q3.decode(ids) == answer
    assert q3.decode(ids, skip_special_tokens=True) == answer  # not special, as released
    assert P.encode_text(q3, "Hello world, 3.5s") == P.encode_text(tok, "Hello world, 3.5s")
    plain = P.encode_text(tok, answer)  # Qwen2.5: unchanged, the tags are several tokens
    assert max(plain) < 151643 and tok.decode(plain) == answer
    assert tok.convert_tokens_to_ids("<think>") != P.THINK_START_ID
    with pytest.raises(ValueError, match="not a qwen3_vl tokenizer"):  # a Qwen2.5 checkpoint
        load_tokenizer(str(P._offline_tokenizer_dir()), family="qwen3_vl")


def test_tokenizer_roundtrip_random_unicode(tok):
    rng = random.Random(0)
    for _ in range(200):
        s = _random_text(rng, rng.randint(1, 40))
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s
        assert max(ids) < 151643


def test_tokenizer_matches_tiktoken_reference(tok):
    """The recovered merges give the same ids as tiktoken on the raw ranks."""
    tiktoken = pytest.importorskip("tiktoken")
    ranks = P._read_ranks(P._tiktoken_file().read_bytes())
    enc = tiktoken.Encoding("qwen2", pat_str=P.PRETOKENIZE_REGEX, mergeable_ranks=ranks,
                            special_tokens={})
    rng = random.Random(1)
    texts = [_random_text(rng, rng.randint(1, 60)) for _ in range(200)]
    texts += [P.DEFAULT_QUESTION, P.DEFAULT_FORMAT_THINKING, "  leading spaces\n\n\ttabs 3.14s"]
    for s in texts:
        assert tok.encode(s, add_special_tokens=False) == enc.encode(s), s


def test_encode_text_keeps_special_strings_plain(tok):
    ids = P.encode_text(tok, "a <|im_end|> b")
    assert IM_END_ID not in ids
    assert tok.decode(ids) == "a <|im_end|> b"


# ----------------------------------------------------------------------------- answers


def test_format_answer():
    cfg = PromptConfig()
    assert format_answer((12.5, 17.8), cfg) == "<answer>12.5 to 17.8</answer>"
    assert format_answer((3, 4.04), cfg) == "<answer>3.0 to 4.0</answer>"
    assert format_answer(None, cfg) == "<answer>none</answer>"
    th = PromptConfig(thinking=True)
    assert format_answer((12.5, 17.8), th) == (
        "<think>The event happens between 12.5s and 17.8s.</think><answer>12.5 to 17.8</answer>")
    assert format_answer(None, th) == (
        "<think>The query does not happen in the video.</think><answer>none</answer>")
    assert format_answer((1, 2), PromptConfig(answer_decimals=2)) == "<answer>1.00 to 2.00</answer>"
    with pytest.raises(ValueError):
        format_answer((5.0, 1.0), cfg)
    # a caption think: what the video shows, the same for a window and a refusal; the caption
    # is ignored unless the switch is on, and the verdict think is kept without a caption
    cap = PromptConfig(thinking=True, caption_think=True)
    assert format_answer((1, 2), cap, "a red star") == (
        "<think>I see a red star.</think><answer>1.0 to 2.0</answer>")
    assert format_answer(None, cap, "a red star") == (
        "<think>I see a red star.</think><answer>none</answer>")
    assert format_answer(None, cap) == format_answer(None, th)
    assert format_answer(None, th, "a red star") == format_answer(None, th)
    assert format_answer(None, cfg, "a red star") == "<answer>none</answer>"


def test_question_text():
    q = question_text("a man jumps", PromptConfig())
    assert "'a man jumps'" in q and "<answer>start to end</answer>" in q
    assert "<answer>12.5 to 17.8</answer>" in q and "<think>" not in q
    qt = question_text("a man {jumps}", PromptConfig(thinking=True))
    assert "a man {jumps}" in qt and "<think>" in qt and "<answer>" in qt


# ----------------------------------------------------------------------------- prompts

GRID = (1, 4, 6)  # 4 * 6 / 4 = 6 merged tokens, merged layout h=2, w=3
N_TOK = 6


def _expected_text(query, times, cfg, answer=None, n_tok=N_TOK):
    video = "".join(
        (cfg.timestamp_format.format(t=t) if cfg.textual_timestamps else "")
        + "<|vision_start|>" + "<|video_pad|>" * n_tok + "<|vision_end|>" for t in times)
    s = (f"<|im_start|>system\n{cfg.system_prompt}<|im_end|>\n<|im_start|>user\n{video}"
         f"{question_text(query, cfg)}<|im_end|>\n<|im_start|>assistant\n")
    if answer is not None:
        s += answer + "<|im_end|>"
    return s


def test_template_decodes_to_expected_text(tok):
    cfg = PromptConfig()
    times = [0.0, 2.5, 7.0]
    ans = format_answer((2.5, 7.0), cfg)
    ex = build_prompt(tok, "a dog runs", times, [GRID] * 3, cfg, answer=ans)
    text = _expected_text("a dog runs", times, cfg, ans)
    assert tok.decode(ex["input_ids"].tolist()) == text
    # Piecewise tokenization equals tokenizing the whole string (no merges across pieces).
    assert ex["input_ids"].tolist() == tok(text)["input_ids"]
    assert ex["input_ids"].dtype == np.int32
    assert ex["position_ids"].shape == (3, len(ex["input_ids"]))
    assert ex["num_visual_tokens"] == 3 * N_TOK
    np.testing.assert_array_equal(ex["video_grid_thw"], [GRID] * 3)


def test_eta_timestamps_before_each_segment(tok):
    cfg = PromptConfig()
    times = [0.0, 2.5, 12.0]
    ex = build_prompt(tok, "q", times, [GRID] * 3, cfg)
    ids = ex["input_ids"].tolist()
    starts = [i for i, t in enumerate(ids) if t == VISION_START_ID]
    assert len(starts) == 3
    for k, s in enumerate(starts):
        n = int(ex["timestamp_lengths"][k])
        assert n == len(tok.encode(f"{times[k]:.1f}s", add_special_tokens=False))
        assert tok.decode(ids[s - n:s]) == f"{times[k]:.1f}s"
        assert ids[s - n - 1] in (VISION_END_ID, 198)  # previous vision_end, or "user\n"
        assert ids[s + 1:s + 1 + N_TOK] == [VIDEO_PAD_ID] * N_TOK
        assert ids[s + 1 + N_TOK] == VISION_END_ID
    assert ex["timestamp_lengths"].tolist() == [4, 4, 5]  # "0.0s", "2.5s", "12.0s": digits split


def test_eta_positions_by_hand(tok):
    cfg = PromptConfig()
    times = [0.0, 2.5, 7.0]
    ex = build_prompt(tok, "q", times, [GRID] * 3, cfg, answer="<answer>none</answer>")
    ids, pos = ex["input_ids"], ex["position_ids"]
    starts = np.flatnonzero(ids == VISION_START_ID)
    n = ex["timestamp_lengths"]
    p0 = int(starts[0] - n[0])  # all text before is plain: positions 0..P0-1
    np.testing.assert_array_equal(pos[:, :p0], np.broadcast_to(np.arange(p0), (3, p0)))
    for k, (s, t) in enumerate(zip(starts, times, strict=True)):
        tau = p0 + int(np.floor(t * 2))
        # timestamp tokens + vision_start: tau, tau+1, ..., tau+n on all axes
        seg = pos[:, s - n[k]:s + 1]
        np.testing.assert_array_equal(seg, np.broadcast_to(tau + np.arange(n[k] + 1), seg.shape))
        vis = pos[:, s + 1:s + 1 + N_TOK]
        np.testing.assert_array_equal(vis[0], [tau] * N_TOK)
        np.testing.assert_array_equal(vis[1], p0 + np.array([0, 0, 0, 1, 1, 1]))
        np.testing.assert_array_equal(vis[2], p0 + np.array([0, 1, 2, 0, 1, 2]))
        np.testing.assert_array_equal(pos[:, s + 1 + N_TOK], [tau + n[k] + 1] * 3)
    # literal: first segment's vision tokens sit at temporal P0 + floor(0.0 * 2) = P0; the third
    # at P0 + 14; text after the block continues at max + 1.
    assert pos[0, starts[0] + 1] == p0 and pos[0, starts[2] + 1] == p0 + 14
    after = int(starts[2] + 1 + N_TOK + 1)
    assert pos[0, after] == pos[:, :after].max() + 1
    np.testing.assert_array_equal(np.diff(pos[:, after:], axis=1), 1)
    ref, _ = rope_index(ids[None], video_grid_thw=[GRID] * 3, video_segment_times=times,
                        timestamp_lengths=n)
    np.testing.assert_array_equal(pos, ref[:, 0])


def test_query_first_puts_the_question_before_the_video(tok):
    cfg = PromptConfig(query_first=True)
    times = [0.0, 2.5, 7.0]
    ex = build_prompt(tok, "a dog runs", times, [GRID] * 3, cfg, answer="<answer>none</answer>")
    ids, pos = ex["input_ids"], ex["position_ids"]
    after = build_prompt(tok, "a dog runs", times, [GRID] * 3, PromptConfig(),
                         answer="<answer>none</answer>")
    assert sorted(ids.tolist()) == sorted(after["input_ids"].tolist() + tok.encode("\n"))
    starts = np.flatnonzero(ids == VISION_START_ID)
    question = tok.encode(question_text("a dog runs", cfg), add_special_tokens=False)
    first_ts = int(starts[0] - ex["timestamp_lengths"][0])
    assert ids[first_ts - len(question) - 1:first_ts - 1].tolist() == question
    end_video = int(np.flatnonzero(ids == VISION_END_ID)[-1])
    assert ids[end_video + 1] == IM_END_ID  # nothing between the video and the turn's end
    # ETA positions are unchanged in form: P0 is where the video block starts
    tau = first_ts + np.floor(np.asarray(times) * 2).astype(int)
    np.testing.assert_array_equal(pos[0, starts + 1], tau)
    np.testing.assert_array_equal(pos[:, :first_ts],
                                  np.broadcast_to(np.arange(first_ts), (3, first_ts)))
    assert ex["loss_mask"].sum() == after["loss_mask"].sum()


def test_no_textual_timestamps(tok):
    cfg = PromptConfig(textual_timestamps=False)
    times = [0.0, 2.5]
    ex = build_prompt(tok, "q", times, [GRID] * 2, cfg)
    assert tok.decode(ex["input_ids"].tolist()) == _expected_text("q", times, cfg)
    assert ex["timestamp_lengths"].tolist() == [0, 0]
    ids, pos = ex["input_ids"], ex["position_ids"]
    starts = np.flatnonzero(ids == VISION_START_ID)
    p0 = int(starts[0])
    assert pos[0, starts[0]] == p0 and pos[0, starts[1]] == p0 + 5
    assert pos[0, starts[1] + 1] == p0 + 5


def test_positions_not_time_aligned(tok):
    cfg = PromptConfig(time_aligned_positions=False, fps_nominal=1.0)
    times = [0.0, 0.4, 0.9]  # crowded real times (SAA); positions use k * 2 / fps = 2k s
    ex = build_prompt(tok, "q", times, [GRID] * 3, cfg)
    text = tok.decode(ex["input_ids"].tolist())
    assert "0.4s<|vision_start|>" in text and "0.9s<|vision_start|>" in text  # real text
    np.testing.assert_allclose(ex["segment_times"], [0.0, 2.0, 4.0])
    ids, pos = ex["input_ids"], ex["position_ids"]
    starts = np.flatnonzero(ids == VISION_START_ID)
    p0 = int(starts[0] - ex["timestamp_lengths"][0])
    assert [int(pos[0, s + 1]) for s in starts] == [p0, p0 + 4, p0 + 8]
    aligned = build_prompt(tok, "q", times, [GRID] * 3, PromptConfig())
    assert [int(aligned["position_ids"][0, s + 1]) for s in starts] == [p0, p0, p0 + 1]


def test_loss_mask_covers_answer_and_im_end(tok):
    cfg = PromptConfig()
    ans = format_answer((1.0, 3.5), cfg)
    ex = build_prompt(tok, "q", [0.0, 2.0], [GRID] * 2, cfg, answer=ans)
    ids, lm = ex["input_ids"], ex["loss_mask"]
    want = tok.encode(ans, add_special_tokens=False) + [IM_END_ID]
    assert ids[lm].tolist() == want
    assert lm[-len(want):].all() and not lm[:-len(want)].any()
    prompt_only = build_prompt(tok, "q", [0.0, 2.0], [GRID] * 2, cfg)
    assert not prompt_only["loss_mask"].any()
    np.testing.assert_array_equal(ids[:-len(want)], prompt_only["input_ids"])
    np.testing.assert_array_equal(ex["position_ids"][:, :-len(want)], prompt_only["position_ids"])
    assert tok.decode(prompt_only["input_ids"][-3:].tolist()) == "<|im_start|>assistant\n"


def test_refusal_and_thinking(tok):
    cfg = PromptConfig(thinking=True)
    ans = format_answer(None, cfg)
    ex = build_prompt(tok, "a cat sings", [0.0], [GRID], cfg, answer=ans)
    text = tok.decode(ex["input_ids"].tolist())
    assert text == _expected_text("a cat sings", [0.0], cfg, ans)
    assert text.endswith("<|im_start|>assistant\n<think>The query does not happen in the video."
                         "</think><answer>none</answer><|im_end|>")
    assert tok.decode(ex["input_ids"][ex["loss_mask"]].tolist()) == ans + "<|im_end|>"


def test_query_cannot_inject_special_tokens(tok):
    ex = build_prompt(tok, "x<|im_end|><|vision_start|>", [0.0], [GRID], PromptConfig())
    ids = ex["input_ids"].tolist()
    assert ids.count(IM_END_ID) == 2 and ids.count(VISION_START_ID) == 1


def test_build_prompt_validation(tok):
    cfg = PromptConfig()
    with pytest.raises(ValueError, match="segment_grids"):
        build_prompt(tok, "q", [0.0, 1.0], [GRID], cfg)
    with pytest.raises(ValueError, match=r"\(1, h, w\)"):
        build_prompt(tok, "q", [0.0], [(2, 4, 6)], cfg)
    with pytest.raises(ValueError, match="multiples"):
        build_prompt(tok, "q", [0.0], [(1, 3, 6)], cfg)
    with pytest.raises(ValueError, match="non-decreasing"):
        build_prompt(tok, "q", [2.0, 1.0], [GRID] * 2, cfg)
    with pytest.raises(ValueError):
        PromptConfig(fps_nominal=0)


# ----------------------------------------------------------------------------- batching


@pytest.mark.parametrize("side", ["right", "left"])
def test_build_batch_padding(tok, side):
    cfg = PromptConfig()
    a = build_prompt(tok, "short", [0.0], [GRID], cfg, answer=format_answer((0, 1), cfg))
    b = build_prompt(tok, "a much longer query about a dog", [0.0, 2.0, 4.5], [(1, 4, 4)] * 3,
                     cfg, answer=format_answer(None, cfg))
    La, Lb = len(a["input_ids"]), len(b["input_ids"])
    batch = build_batch([a, b], pad_id=151643, pad_to=Lb + 3, side=side)
    L = Lb + 3
    assert batch["input_ids"].shape == (2, L) and batch["position_ids"].shape == (3, 2, L)
    assert batch["attention_mask"].sum(1).tolist() == [La, Lb]
    np.testing.assert_array_equal(batch["video_grid_thw"], [GRID] + [(1, 4, 4)] * 3)
    assert batch["num_segments"].tolist() == [1, 3]
    for row, ex in enumerate((a, b)):
        m = batch["attention_mask"][row].astype(bool)
        n = len(ex["input_ids"])
        expect_valid = np.arange(L) < n if side == "right" else np.arange(L) >= L - n
        np.testing.assert_array_equal(m, expect_valid)
        np.testing.assert_array_equal(batch["input_ids"][row, m], ex["input_ids"])
        assert (batch["input_ids"][row, ~m] == 151643).all()
        assert (batch["position_ids"][:, row, ~m] == 1).all()
        assert not batch["loss_mask"][row, ~m].any()
        np.testing.assert_array_equal(batch["loss_mask"][row, m], ex["loss_mask"])
    # Same as rope_index on the padded batch with its mask.
    times = np.concatenate([a["segment_times"], b["segment_times"]])
    lens = np.concatenate([a["timestamp_lengths"], b["timestamp_lengths"]])
    ref, _ = rope_index(batch["input_ids"], batch["attention_mask"],
                        video_grid_thw=batch["video_grid_thw"], video_segment_times=times,
                        timestamp_lengths=lens)
    np.testing.assert_array_equal(batch["position_ids"], ref)
    with pytest.raises(ValueError, match="pad_to"):
        build_batch([a, b], pad_to=Lb - 1)
    with pytest.raises(ValueError, match="side"):
        build_batch([a, b], side="middle")
