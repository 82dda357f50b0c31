"""Tests for the training-time grounding metrics (R1@m, mIoU, refusal accounting)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tempo_jax.grounding.metrics import grounding_metrics, normalize_prediction
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


def _roc_area(scores, positive):
    """Trapezoidal area under the ROC curve swept over every distinct threshold."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    pts = [(0.0, 0.0)]
    for th in sorted(set(s.tolist()), reverse=True):
        pts.append((np.mean(s[~y] >= th), np.mean(s[y] >= th)))
    pts.append((1.0, 1.0))
    fpr, tpr = np.array(pts).T
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def test_refusal_auc_is_the_roc_area():
    from tempo_jax.grounding.metrics import refusal_auc

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(30) < 0.4
        s = np.round(rng.normal(y * 0.7, 1.0), 1)  # ties included
        assert refusal_auc(s, y) == pytest.approx(_roc_area(s, y), abs=1e-12)
    assert refusal_auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert refusal_auc([0.5, 0.5], [True, False]) == 0.5
    assert np.isnan(refusal_auc([0.5], [True]))


def test_refusal_diagnostics_split_cross_pairs():
    from tempo_jax.grounding.metrics import refusal_diagnostics

    rows = [
        {"qid": "a_q0", "relevant": True, "parsed": [1, 2], "p_none": 0.1},
        {"qid": "a_r0", "relevant": False, "parsed": "refuse", "p_none": 0.9},
        {"qid": "a_q0|pir:b_q0", "relevant": False, "parsed": [1, 2], "p_none": 0.05},
        {"qid": "b_q0|pir:a_q0", "relevant": False, "parsed": "refuse", "p_none": 0.6},
    ]
    d = refusal_diagnostics(rows)
    assert d["refusal_accuracy_cross"] == 0.5 and d["refusal_accuracy_generated"] == 1.0
    assert d["refusal_auc"] == pytest.approx(2 / 3)
    assert d["p_none_relevant"] == pytest.approx(0.1)
    assert d["p_none_irrelevant"] == pytest.approx((0.9 + 0.05 + 0.6) / 3)
    assert "caption_accuracy" not in d  # no captions, no figure


def test_caption_accuracy_reads_the_think():
    from tempo_jax.grounding.metrics import refusal_diagnostics

    rows = [
        {"qid": "a", "relevant": True, "parsed": [1, 2], "caption": "a red star",
         "answer": "<think>I see a Red Star.</think><answer>1 to 2</answer>"},
        {"qid": "b", "relevant": False, "parsed": "refuse", "caption": "a blue circle",
         "answer": "<think>I see a blue star.</think><answer>none</answer>"},
        # the caption outside the think does not count
        {"qid": "c", "relevant": True, "parsed": None, "caption": "a red star",
         "answer": "<answer>a red star</answer>"},
        {"qid": "d", "relevant": True, "parsed": None, "caption": None, "answer": "x"},
    ]
    assert refusal_diagnostics(rows, caption_think=True)["caption_accuracy"] == pytest.approx(
        1 / 3)
    assert "caption_accuracy" not in refusal_diagnostics(rows)  # no caption think, no figure
