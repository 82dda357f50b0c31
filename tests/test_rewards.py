"""Tests for the PIR-GRPO rewards: lenient parser, strict format, IoU accuracy, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tempo_jax.rl.rewards import (
    REFUSE,
    REWARDS,
    accuracy_reward,
    best_iou,
    format_reward,
    get_reward,
    parse_answer,
    register,
    temporal_iou,
    time_r1_score,
    total_reward,
)

# --- parse_answer ----------------------------------------------------------------------------

PARSE_CASES = [
    ("<answer>12.5 to 17.8</answer>", (12.5, 17.8)),
    ("<think>it starts at 3s</think><answer>12.5 to 17.8</answer>", (12.5, 17.8)),
    ("<answer>12.5 to 17.8</answer><|im_end|>", (12.5, 17.8)),
    ("<answer>12.5s to 17.8s</answer>", (12.5, 17.8)),
    ("<answer>12.5 sec to 17.8 seconds</answer>", (12.5, 17.8)),
    ("<answer>12.5s - 17.8s</answer>", (12.5, 17.8)),
    ("12.5s - 17.8s", (12.5, 17.8)),
    ("<answer>12.5-17.8</answer>", (12.5, 17.8)),
    ("<answer>12.5 – 17.8</answer>", (12.5, 17.8)),
    ("<answer>[12.5, 17.8]</answer>", (12.5, 17.8)),
    ("<answer>from 3 and 7</answer>", (3.0, 7.0)),
    ("from 3 and 7", (3.0, 7.0)),
    ("<answer>17.8 to 12.5</answer>", (12.5, 17.8)),  # swapped ends
    ("<answer>5 to 5</answer>", (5.0, 5.0)),
    ("<answer>1:05 to 1:10</answer>", (65.0, 70.0)),  # mm:ss
    ("<answer>01:02.5 to 01:04.25</answer>", (62.5, 64.25)),  # mm:ss.f
    ("<answer>1:00:05 to 1:00:10</answer>", (3605.0, 3610.0)),  # hh:mm:ss
    ("<answer>0 TO 3</answer>", (0.0, 3.0)),
    ("<ANSWER>2 to 4</ANSWER>", (2.0, 4.0)),
    # the LAST block counts
    ("<answer>1 to 2</answer> hmm <answer>3 to 4</answer>", (3.0, 4.0)),
    ("<answer>1 to 2</answer><answer>none</answer>", REFUSE),
    ("<answer>none</answer><answer>1 to 2</answer>", (1.0, 2.0)),
    # text outside the block is ignored when a block exists ...
    ("between 1 and 2 <answer>3 to 4</answer> or 5 to 6", (3.0, 4.0)),
    ("the event is at 3 to 5 <answer>garbage</answer>", None),
    # ... and is the fallback only without a complete block (last pair wins)
    ("maybe 1 to 2, no: 3 to 4", (3.0, 4.0)),
    ("<answer>5 to 7", (5.0, 7.0)),  # truncated generation
    # refusals
    ("<answer>none</answer>", REFUSE),
    ("<answer>NONE</answer>", REFUSE),
    ("<answer> none. </answer>", REFUSE),
    ("<answer>\n None!\n</answer>", REFUSE),
    ("<think>not in the video</think><answer>none</answer>", REFUSE),
    ("NONE", REFUSE),
    ("none.", REFUSE),
    ("<answer>none of it</answer>", None),
    ("I found none", None),
    # unreadable
    ("", None),
    ("garbage", None),
    ("<answer></answer>", None),
    ("<answer>12.5</answer>", None),
    ("<answer>twelve to seventeen</answer>", None),
    ("<answer>nan to inf</answer>", None),
    ("nan to inf", None),
    ("1e2 to 3e2", None),
    ("<answer>" + "9" * 400 + " to 5</answer>", None),  # overflows to inf
    ("<answer>1:75 to 2:00</answer>", None),  # not a clock
    # negative numbers are rejected
    ("<answer>-3 to 5</answer>", None),
    ("<answer>3 to -5</answer>", None),
    ("<answer>-3.5s - -1s</answer>", None),
    ("-3 to 5", None),
]


@pytest.mark.parametrize("text,expected", PARSE_CASES)
def test_parse_answer_cases(text, expected):
    got = parse_answer(text)
    if isinstance(expected, tuple):
        assert isinstance(got, tuple)
        assert got == pytest.approx(expected)
        assert got[0] <= got[1]
    else:
        assert got == expected


def test_parse_answer_non_string_is_none():
    for bad in (None, 3, b"<answer>1 to 2</answer>", ["x"]):
        assert parse_answer(bad) is None


def test_parse_answer_reads_the_prompt_formatter_output():
    from tempo_jax.data.prompts import PromptConfig, format_answer

    for thinking in (False, True):
        cfg = PromptConfig(thinking=thinking, answer_decimals=1)
        assert parse_answer(format_answer((12.5, 17.8), cfg)) == pytest.approx((12.5, 17.8))
        assert parse_answer(format_answer(None, cfg)) == REFUSE
        assert format_reward([""], [format_answer((12.5, 17.8), cfg)], thinking=thinking) == [1.0]
        assert format_reward([""], [format_answer(None, cfg)], thinking=thinking) == [1.0]


# --- format_reward ---------------------------------------------------------------------------

PLAIN_FORMAT = [
    ("<answer>12.5 to 17.8</answer>", 1.0),
    ("<answer>12 to 17</answer>", 1.0),
    ("<answer>none</answer>", 1.0),
    ("  <answer>12.5 to 17.8</answer>\n", 1.0),
    ("<answer>12.5 to 17.8</answer><|im_end|>", 1.0),
    ("<answer>12.5 to 17.8</answer>\n<|im_end|>\n", 1.0),
    ("<answer>12.5 to 17.8</answer> done", 0.0),  # extra text
    ("Sure! <answer>12.5 to 17.8</answer>", 0.0),
    ("<answer>12.5 to 17.8", 0.0),  # missing closing tag
    ("12.5 to 17.8</answer>", 0.0),
    ("<answer>12.5s to 17.8s</answer>", 0.0),  # lenient parser, strict format
    ("<answer>12.5 - 17.8</answer>", 0.0),
    ("<answer>12.5  to 17.8</answer>", 0.0),
    ("<answer> 12.5 to 17.8 </answer>", 0.0),
    ("<answer>NONE</answer>", 0.0),
    ("<answer>-1 to 2</answer>", 0.0),
    ("<answer>.5 to 2</answer>", 0.0),
    ("<think>x</think><answer>1 to 2</answer>", 0.0),  # thinking in thinking-free style
    ("<answer>1 to 2</answer><answer>1 to 2</answer>", 0.0),
    ("", 0.0),
]

THINK_FORMAT = [
    ("<think>The event happens between 1.0s and 2.0s.</think><answer>1.0 to 2.0</answer>", 1.0),
    ("<think>not there</think><answer>none</answer>", 1.0),
    ("<think></think><answer>3 to 4</answer>", 1.0),
    ("<think>multi\nline</think><answer>3 to 4</answer><|im_end|>", 1.0),
    ("<answer>3 to 4</answer>", 0.0),  # no thinking in thinking style
    ("<think>a</think> <answer>3 to 4</answer>", 0.0),
    ("<think>a</think><answer>3 to 4</answer>trailing", 0.0),
    ("<think>a <b> c</think><answer>3 to 4</answer>", 0.0),  # no tags inside thinking
    ("<think>a</think><answer>3 to 4", 0.0),
    ("<think>a<answer>3 to 4</answer>", 0.0),
    ("<think>a</think><think>b</think><answer>3 to 4</answer>", 0.0),
]


@pytest.mark.parametrize("text,expected", PLAIN_FORMAT)
def test_format_reward_plain(text, expected):
    assert format_reward(["p"], [text]) == [expected]


@pytest.mark.parametrize("text,expected", THINK_FORMAT)
def test_format_reward_thinking(text, expected):
    assert format_reward(["p"], [text], thinking=True) == [expected]


def test_format_reward_batch_and_extra_fields():
    out = format_reward(
        ["a", "b", "c"],
        ["<answer>1 to 2</answer>", "nope", None],
        windows=[[[1, 2]]] * 3,
        relevant=[True] * 3,
    )
    assert out == [1.0, 0.0, 0.0]


# --- IoU / accuracy --------------------------------------------------------------------------

def test_temporal_iou_by_hand():
    assert temporal_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert temporal_iou((0, 10), (0, 10)) == 1.0
    assert temporal_iou((0, 10), (2, 4)) == pytest.approx(2 / 10)
    assert temporal_iou((0, 1), (2, 3)) == 0.0  # disjoint
    assert temporal_iou((0, 1), (1, 2)) == 0.0  # touching
    assert temporal_iou((3, 3), (3, 3)) == 0.0  # empty union
    assert temporal_iou((5, 5), (0, 10)) == 0.0  # zero-length prediction
    assert temporal_iou((15, 5), (0, 10)) == pytest.approx(5 / 15)  # reversed input
    assert temporal_iou((0, math.nan), (0, 1)) == 0.0


def test_accuracy_max_over_ground_truth_windows():
    r = accuracy_reward(
        ["p"], ["<answer>10 to 20</answer>"],
        windows=[[[0, 5], [12, 22], [10, 30]]], relevant=[True],
    )
    # IoUs: 0, 8/12, 10/20 -> max 2/3
    assert r == [pytest.approx(8 / 12)]


def test_accuracy_clips_to_duration():
    kw = dict(windows=[[[20, 30]]], relevant=[True])
    text = ["<answer>20 to 40</answer>"]
    assert accuracy_reward(["p"], text, **kw) == [pytest.approx(10 / 20)]
    # clipped to [0, 30]: 20 to 30 matches exactly
    assert accuracy_reward(["p"], text, duration=[30.0], **kw) == [pytest.approx(1.0)]
    # clipped to [0, 25]: 20 to 25 -> 5 / 10
    assert accuracy_reward(["p"], text, duration=[25.0], **kw) == [pytest.approx(0.5)]
    # a prediction entirely past the end collapses to a point: IoU 0
    assert accuracy_reward(
        ["p"], ["<answer>50 to 60</answer>"], duration=[30.0], **kw
    ) == [0.0]
    # per-item None duration means no clipping
    assert accuracy_reward(["p"], text, duration=[None], **kw) == [pytest.approx(0.5)]


def test_accuracy_relevance_refusal_table():
    texts = [
        "<answer>2 to 4</answer>",  # relevant, window
        "<answer>none</answer>",  # relevant, refusal -> 0
        "garbage",  # relevant, unparsable -> 0
        "<answer>2 to 4</answer>",  # irrelevant, window -> 0
        "<answer>none</answer>",  # irrelevant, refusal -> 1
        "garbage",  # irrelevant, unparsable -> 0
        "<answer>-1 to 4</answer>",  # irrelevant, rejected answer -> 0
    ]
    rel = [True, True, True, False, False, False, False]
    wins = [[[2, 4]]] * 3 + [[]] * 4
    out = accuracy_reward(["p"] * 7, texts, windows=wins, relevant=rel)
    assert out == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_accuracy_time_r1_by_hand():
    # pred [10, 20], gt [12, 22], D = 100: IoU 8/12, factors (1 - 2/100)^2
    kw = dict(windows=[[[12, 22]]], relevant=[True], duration=[100.0], iou_type="time_r1")
    out = accuracy_reward(["p"], ["<answer>10 to 20</answer>"], **kw)
    assert out == [pytest.approx(8 / 12 * 0.98 * 0.98)]
    # best-matching window among several; a refusal is still 0
    out = accuracy_reward(
        ["p", "p"], ["<answer>10 to 20</answer>", "<answer>none</answer>"],
        windows=[[[50, 60], [10, 20]], [[10, 20]]], relevant=[True, True],
        duration=[40.0, 40.0], iou_type="time_r1",
    )
    assert out == [pytest.approx(1.0), 0.0]
    # without a duration, D = max end over prediction and ground truth (here 22)
    assert time_r1_score((10, 20), [(12, 22)]) == pytest.approx(
        8 / 12 * (1 - 2 / 22) * (1 - 2 / 22)
    )
    assert time_r1_score((10, 20), []) == 0.0


def test_accuracy_rejects_bad_config():
    with pytest.raises(ValueError):
        accuracy_reward(["p"], ["x"], windows=[[[0, 1]]], relevant=[True], iou_type="giou")
    with pytest.raises(ValueError):
        accuracy_reward(["p", "p"], ["x", "y"], windows=[[[0, 1]]], relevant=[True, True])


def test_best_iou_skips_bad_ground_truth():
    assert best_iou((0, 10), [(0, math.inf), "xx", (0, 10)]) == 1.0
    assert best_iou((0, 10), []) == 0.0


# --- registry / total ------------------------------------------------------------------------

def test_registry_and_total():
    assert REWARDS["format"] is format_reward and get_reward("accuracy") is accuracy_reward
    with pytest.raises(KeyError, match="known"):
        get_reward("nope")
    texts = ["<answer>2 to 4</answer>", "the answer is 2 to 3", "<answer>none</answer>"]
    total, parts = total_reward(
        ["p"] * 3, texts, windows=[[[2, 4]], [[2, 4]], [[2, 4]]],
        relevant=[True, True, False], thinking=False,
    )
    np.testing.assert_allclose(parts["format"], [1, 0, 1])
    np.testing.assert_allclose(parts["accuracy"], [1, 0.5, 1])
    np.testing.assert_allclose(total, [2, 0.5, 2])
    assert total.dtype == np.float64 and set(parts) == {"format", "accuracy"}


def test_register_custom_reward():
    name = "_test_length"

    @register(name)
    def length_reward(prompts, completions, **fields):
        return [float("nan") if c == "nan" else 0.5 for c in completions]

    try:
        total, parts = total_reward(["p", "p"], ["a", "nan"], names=(name,))
        np.testing.assert_allclose(total, [0.5, 0.0])  # non-finite counted as 0
        with pytest.raises(ValueError):
            register(name)(format_reward)
    finally:
        REWARDS.pop(name)


# --- never raises, always bounded ------------------------------------------------------------

FRAGMENTS = [
    "<answer>", "</answer>", "<think>", "</think>", "<|im_end|>", "none", "NONE", " to ",
    " and ", "-", "–", ",", "s", "sec", " seconds", ":", ".", "12.5", "0", "3", "17.8",
    "1:05", "01:02:03", "-4", "nan", "inf", "9" * 30, " ", "\n", "from ", "[", "]", "e",
    "<", ">", "é", "٣",
]
answer_like = st.lists(st.sampled_from(FRAGMENTS), max_size=20).map("".join)
any_text = st.one_of(st.text(max_size=200), answer_like)


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(any_text, min_size=1, max_size=4), data=st.data())
def test_rewards_never_raise_and_are_bounded(texts, data):
    n = len(texts)
    for t in texts:
        ans = parse_answer(t)
        assert ans is None or ans == REFUSE or (
            isinstance(ans, tuple) and 0 <= ans[0] <= ans[1] and math.isfinite(ans[1])
        )
    windows = data.draw(st.lists(
        st.lists(
            st.tuples(st.floats(0, 500), st.floats(0, 500)).map(sorted), max_size=3
        ), min_size=n, max_size=n,
    ))
    relevant = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    duration = data.draw(st.one_of(
        st.none(),
        st.lists(st.one_of(st.none(), st.floats(0, 600)), min_size=n, max_size=n),
    ))
    for thinking in (False, True):
        for iou_type in ("iou", "time_r1"):
            total, parts = total_reward(
                ["p"] * n, texts, windows=windows, relevant=relevant, duration=duration,
                thinking=thinking, iou_type=iou_type,
            )
            for v in parts.values():
                assert np.all(np.isfinite(v)) and np.all((v >= 0) & (v <= 1))
            assert np.all(np.isfinite(total)) and np.all((total >= 0) & (total <= 2))
