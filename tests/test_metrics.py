"""Tests for the training-time grounding metrics (R1@m, mIoU, refusal accounting)."""

from __future__ import annotations

import math

import pytest

from tempo_jax.metrics import grounding_metrics, normalize_prediction
from tempo_jax.rl.rewards import REFUSE, accuracy_reward


def test_hand_computed_r1_and_miou():
    # IoUs on the relevant pairs: 1.0, 0.5 (exactly), 0.3 (exactly), 0.0 (refused),
    # 0.0 (unparsable)
    preds = [(0.0, 10.0), (0.0, 1.0), (0.0, 3.0), REFUSE, None]
    wins = [[[0, 10]], [[0, 2]], [[0, 10]], [[0, 10]], [[0, 10]]]
    m = grounding_metrics(preds, wins, [True] * 5)
    assert m["r1@0.3"] == pytest.approx(3 / 5)  # 0.3 itself counts
    assert m["r1@0.5"] == pytest.approx(2 / 5)  # 0.5 itself counts
    assert m["r1@0.7"] == pytest.approx(1 / 5)
    assert m["miou"] == pytest.approx((1.0 + 0.5 + 0.3) / 5)
    assert m["false_refusal_rate"] == pytest.approx(1 / 5)
    assert m["unparsable_rate"] == pytest.approx(1 / 5)
    assert m["num_relevant"] == 5 and m["num_irrelevant"] == 0
    assert math.isnan(m["refusal_accuracy"])  # empty irrelevant set -> NaN


def test_raw_strings_are_parsed_and_unparsable_counts_as_zero():
    preds = ["<answer>0 to 10</answer>", "I am not sure", "<answer>5 to 15</answer>"]
    wins = [[[0, 10]], [[0, 10]], [[0, 10]]]
    m = grounding_metrics(preds, wins, [True, True, True])
    assert m["miou"] == pytest.approx((1.0 + 0.0 + 5 / 15) / 3)
    assert m["r1@0.3"] == pytest.approx(2 / 3)
    assert m["r1@0.5"] == pytest.approx(1 / 3)
    assert m["unparsable_rate"] == pytest.approx(1 / 3)


def test_refusal_accounting():
    preds = [
        "<answer>none</answer>",  # irrelevant, refused: correct
        "<answer>2 to 3</answer>",  # irrelevant, answered: wrong
        "garbage",  # irrelevant, unparsable: not a refusal
        REFUSE,  # irrelevant, refused (pre-parsed)
        "<answer>none</answer>",  # relevant, refused: false refusal, IoU 0
        "<answer>0 to 4</answer>",  # relevant, IoU 1
    ]
    wins = [[], [], [], [], [[0, 4]], [[0, 4]]]
    rel = [False, False, False, False, True, True]
    m = grounding_metrics(preds, wins, rel)
    assert m["refusal_accuracy"] == pytest.approx(2 / 4)
    assert m["false_refusal_rate"] == pytest.approx(1 / 2)
    assert m["miou"] == pytest.approx(0.5)
    assert m["r1@0.7"] == pytest.approx(0.5)
    assert m["num_relevant"] == 2 and m["num_irrelevant"] == 4
    assert m["unparsable_rate"] == pytest.approx(1 / 6)


def test_only_irrelevant_pairs_gives_nan_grounding():
    m = grounding_metrics([REFUSE, None], [[], []], [False, False])
    assert m["refusal_accuracy"] == 0.5
    for k in ("r1@0.3", "r1@0.5", "r1@0.7", "miou", "false_refusal_rate"):
        assert math.isnan(m[k])
    assert m["num_relevant"] == 0


def test_empty_input():
    m = grounding_metrics([], [], [])
    assert m["num_relevant"] == 0 and m["num_irrelevant"] == 0
    assert math.isnan(m["unparsable_rate"]) and math.isnan(m["miou"])


def test_multiple_windows_and_duration_clipping_match_the_reward():
    preds = ["<answer>10 to 20</answer>", "<answer>20 to 40</answer>"]
    wins = [[[0, 5], [12, 22], [10, 30]], [[20, 30]]]
    dur = [100.0, 30.0]
    m = grounding_metrics(preds, wins, [True, True], duration=dur)
    # max IoU 8/12 on the first; the second is clipped to [20, 30]: IoU 1
    assert m["miou"] == pytest.approx((8 / 12 + 1.0) / 2)
    rewards = accuracy_reward(["p", "p"], preds, windows=wins, relevant=[True, True],
                              duration=dur)
    assert m["miou"] == pytest.approx(sum(rewards) / 2)
    # without clipping the second is 10/20
    m = grounding_metrics(preds, wins, [True, True])
    assert m["miou"] == pytest.approx((8 / 12 + 0.5) / 2)


def test_custom_thresholds_and_fraction_bounds():
    m = grounding_metrics([(0.0, 1.0)], [[[0, 4]]], [True], thresholds=(0.1, 0.25, 0.9))
    assert m["r1@0.1"] == 1.0 and m["r1@0.25"] == 1.0 and m["r1@0.9"] == 0.0
    for k, v in m.items():
        if not k.startswith("num_") and k != "refusal_accuracy":
            assert 0.0 <= v <= 1.0
    assert math.isnan(m["refusal_accuracy"])


def test_normalize_prediction():
    assert normalize_prediction([17.8, 12.5]) == (12.5, 17.8)
    assert normalize_prediction("refuse") == REFUSE
    assert normalize_prediction("NONE") == REFUSE
    assert normalize_prediction([-1, 2]) is None
    assert normalize_prediction([1, float("nan")]) is None
    assert normalize_prediction(3) is None
    assert normalize_prediction(None) is None


def test_length_mismatch_raises():
    with pytest.raises(ValueError):
        grounding_metrics([None], [], [True])
    with pytest.raises(ValueError):
        grounding_metrics([None], [[]], [True], duration=[1.0, 2.0])
