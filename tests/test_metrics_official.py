"""Tests for the official QVHighlights metrics (`qvhighlights_metrics`) and the evaluate CLI.

The real-file test pins the output of moment_detr's `standalone_eval/eval.py` (shipped as
`sample_val_preds_metrics_raw.json`); every other expected number is derived by hand in
the comments next to it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tempo_jax.evaluate import main
from tempo_jax.grounding.metrics import QVH_IOU_THRESHOLDS, load_jsonl_records, qvhighlights_metrics

QVH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "qvhighlights"
if not QVH_DIR.is_dir():
    QVH_DIR = Path("/work/shared/data/qvhighlights")

THR_KEYS = [str(t) for t in QVH_IOU_THRESHOLDS]
SPLITS = ("full", "short", "middle", "long")


def _gt(qid, windows, duration=150, clips=(), saliency=()):
    return {
        "qid": qid, "query": f"query {qid}", "duration": duration, "vid": f"v{qid}_0.0_150.0",
        "relevant_windows": windows, "relevant_clip_ids": list(clips),
        "saliency_scores": [list(s) for s in saliency],
    }


def _pred(qid, windows=None, saliency=None):
    rec = {"qid": qid, "query": f"query {qid}", "vid": f"v{qid}_0.0_150.0"}
    if windows is not None:
        rec["pred_relevant_windows"] = windows
    if saliency is not None:
        rec["pred_saliency_scores"] = saliency
    return rec


def _per_threshold(table, values):
    """`values` = one expected number for every threshold, or a dict threshold -> number."""
    return {k: (values[k] if isinstance(values, dict) else values) for k in THR_KEYS} == {
        k: table[k] for k in THR_KEYS
    }


# ------------------------------------------------------------------------------ real files


@pytest.mark.skipif(not QVH_DIR.is_dir(), reason="shared QVHighlights data not available")
def test_reproduces_official_evaluator_output_exactly():
    preds = load_jsonl_records(QVH_DIR / "sample_val_preds.jsonl")
    gts = load_jsonl_records(QVH_DIR / "highlight_val_release.jsonl")
    raw_text = (QVH_DIR / "sample_val_preds_metrics_raw.json").read_text()
    official = json.loads(raw_text)

    got = qvhighlights_metrics(preds, gts)

    assert got == official  # every key, every rounded number
    assert list(got) == list(official)  # the official key order, brief first
    assert list(got["brief"]) == list(official["brief"])
    for split in SPLITS:
        assert list(got[split]["MR-mAP"]) == list(official[split]["MR-mAP"])
    assert json.dumps(got, indent=4) == raw_text.rstrip("\n")  # even the file text


# ------------------------------------------------------------------------------ hand cases


def test_r1_scores_the_first_listed_window_not_the_best_scored_one():
    # The first listed window [0, 5] misses [10, 20] (IoU 0) -> R1 = 0 at every threshold,
    # although the higher-scored second window is exact -> AP = 1 at every threshold.
    m = qvhighlights_metrics([_pred(1, [[0, 5, 0.1], [10, 20, 0.9]])], [_gt(1, [[10, 20]])])
    assert _per_threshold(m["full"]["MR-R1"], 0.0)
    assert _per_threshold(m["full"]["MR-mAP"], 100.0)
    assert m["brief"]["MR-full-R1@0.5"] == 0.0 and m["brief"]["MR-full-mAP"] == 100.0
    # the only window is 10 s long: short; middle and long have no query -> NaN, no crash
    assert m["short"] == m["full"]
    assert math.isnan(m["brief"]["MR-middle-mAP"]) and math.isnan(m["long"]["MR-R1"]["0.5"])
    # no pred_saliency_scores in the first prediction: no highlight tables (as officially)
    assert "HL-min-Fair" not in m and not any(k.startswith("HL") for k in m["brief"])


def test_ap_with_a_false_positive_ranked_first():
    # sorted by score: [50,60] (FP), [10,20] (TP). precision [0, 1/2], recall [0, 1];
    # interpolated envelope at recall 1 is 1/2 -> AP = (1 - 0) * 1/2 = 0.5 at every threshold
    m = qvhighlights_metrics([_pred(1, [[50, 60, 0.9], [10, 20, 0.8]])], [_gt(1, [[10, 20]])])
    assert _per_threshold(m["full"]["MR-mAP"], 50.0)
    assert m["full"]["MR-mAP"]["average"] == 50.0
    assert _per_threshold(m["full"]["MR-R1"], 0.0)  # first listed window is the FP


def test_score_ties_keep_the_listed_order():
    # equal scores: the official sort is stable, so the listed order decides the ranking
    gts = [_gt(1, [[10, 20]])]
    fp_first = qvhighlights_metrics([_pred(1, [[50, 60, 0.5], [10, 20, 0.5]])], gts)
    tp_first = qvhighlights_metrics([_pred(1, [[10, 20, 0.5], [50, 60, 0.5]])], gts)
    assert fp_first["full"]["MR-mAP"]["average"] == 50.0  # FP then TP, as above
    assert tp_first["full"]["MR-mAP"]["average"] == 100.0  # TP at precision 1, recall 1


def test_multiple_ground_truth_windows():
    # GT A=[20,30], B=[0,10]. Ranked: [0,10] -> TP (B); [0,10] again -> B is taken, A has
    # IoU 0 -> FP; [20,30] -> TP (A). precision [1, 1/2, 2/3], recall [1/2, 1/2, 1];
    # envelope [1, 2/3, 2/3] -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6 = 83.33 %.
    gts = [_gt(1, [[20, 30], [0, 10]])]
    m = qvhighlights_metrics([_pred(1, [[0, 10, 0.9], [0, 10, 0.8], [20, 30, 0.7]])], gts)
    assert _per_threshold(m["full"]["MR-mAP"], 83.33)
    # R1: the first window [0,10] is compared with its best GT (B, listed second): IoU 1
    assert _per_threshold(m["full"]["MR-R1"], 100.0)

    # a duplicated GT window can be matched once per prediction: one TP at recall 1/2,
    # then recall 1 is never reached -> AP = 1/2 * 1 + 1/2 * 0 = 0.5
    m = qvhighlights_metrics([_pred(1, [[0, 10, 0.9]])], [_gt(1, [[0, 10], [0, 10]])])
    assert _per_threshold(m["full"]["MR-mAP"], 50.0)
    assert _per_threshold(m["full"]["MR-R1"], 100.0)


def test_refusal_window_and_empty_window_list():
    # q1: the refusal window [0,0,0] against [0,10]: intersection 0, union 10 -> IoU 0, AP 0.
    # q2: exact -> 1. q3: no windows at all -> counted as AP 0 and an R1 miss (the official
    # code would crash in R1). Every threshold: (0 + 1 + 0) / 3 = 33.33 %.
    gts = [_gt(1, [[0, 10]]), _gt(2, [[30, 40]]), _gt(3, [[0, 10]])]
    preds = [_pred(1, [[0, 0, 0]]), _pred(2, [[30, 40, 1.0]]), _pred(3, [])]
    m = qvhighlights_metrics(preds, gts)
    for kind in ("MR-mAP", "MR-R1"):
        assert _per_threshold(m["full"][kind], 33.33)
    # without q3 it is (0 + 1) / 2
    m2 = qvhighlights_metrics(preds[:2], gts[:2])
    assert m2["brief"]["MR-full-mAP"] == 50.0 and m2["brief"]["MR-full-R1@0.5"] == 50.0


def test_iou_exactly_at_a_threshold_counts_and_thresholds_are_rounded():
    # [0,6] vs [0,10]: IoU = 0.6 exactly, and IoU >= t is a hit: 0.5, 0.55, 0.6 pass
    m = qvhighlights_metrics([_pred(1, [[0, 6, 1.0]])], [_gt(1, [[0, 10]])])
    expected = {k: (100.0 if float(k) <= 0.6 else 0.0) for k in THR_KEYS}
    assert _per_threshold(m["full"]["MR-R1"], expected)
    assert _per_threshold(m["full"]["MR-mAP"], expected)
    assert m["full"]["MR-mAP"]["average"] == 30.0  # 3 of 10 thresholds at 100

    # [0.3,1.2] vs [0.3,1.3]: IoU 0.9 on paper, 0.8999999999999999 in floating point.
    # np.linspace(0.5, 0.95, 10)[8] is 0.8999999999999999 too, but the official code rounds
    # the thresholds to 2 decimals, so at 0.9 this is a miss (and a hit at 0.85).
    m = qvhighlights_metrics([_pred(1, [[0.3, 1.2, 1.0]])], [_gt(1, [[0.3, 1.3]])])
    for kind in ("MR-R1", "MR-mAP"):
        assert m["full"][kind]["0.85"] == 100.0 and m["full"][kind]["0.9"] == 0.0


def test_short_middle_long_split_by_window_length():
    # split membership is per GT window: short (0, 10], middle (10, 30], long (30, 150].
    gts = [
        _gt(1, [[0, 8]]),  # short
        _gt(2, [[0, 20]]),  # middle
        _gt(3, [[0, 30]]),  # middle (30 is inclusive)
        _gt(4, [[0, 10], [50, 90]]),  # short via [0,10] (10 inclusive), long via [50,90]
        _gt(5, [[0, 31]]),  # long
        _gt(6, [[0, 12]]),  # middle
    ]
    preds = [
        _pred(1, [[0, 8, 1.0]]),  # exact
        _pred(2, [[100, 120, 1.0]]),  # miss
        _pred(3, [[0, 30, 1.0]]),  # exact
        _pred(4, [[50, 90, 0.9]]),  # hits the long window only
        _pred(5, [[0, 31, 1.0]]),  # exact
        _pred(6, [[0, 12, 1.0]]),  # exact
    ]
    m = qvhighlights_metrics(preds, gts)
    b = m["brief"]
    # short: q1 AP 1, q4 (only [0,10] kept, so [50,90] is a FP) AP 0 -> 50; R1 same
    assert b["MR-short-mAP"] == 50.0 and m["short"]["MR-R1"]["0.5"] == 50.0
    # middle: q2 0, q3 1, q6 1 -> 2/3
    assert b["MR-middle-mAP"] == 66.67 and m["middle"]["MR-R1"]["0.95"] == 66.67
    # long: q4 (only [50,90] kept) 1, q5 1
    assert b["MR-long-mAP"] == 100.0 and m["long"]["MR-R1"]["0.7"] == 100.0
    # full: q4 keeps both windows: one TP at recall 1/2 -> AP 1/2;
    # mAP = (1 + 0 + 1 + 1/2 + 1 + 1) / 6 = 75 %; R1: only q2 misses -> 5/6
    assert b["MR-full-mAP"] == 75.0 and b["MR-full-mAP@0.75"] == 75.0
    assert b["MR-full-R1@0.5"] == 83.33 and b["MR-full-R1@0.7"] == 83.33


def test_highlight_map_and_hit1_on_two_clip_videos():
    # duration 4 s -> 2 clips. Scores per clip are [annotator0, annotator1, annotator2].
    gts = [
        _gt(1, [[0, 4]], duration=4, clips=[0, 1], saliency=[[4, 3, 1], [2, 1, 4]]),
        _gt(2, [[2, 4]], duration=4, clips=[1], saliency=[[4, 4, 4]]),
    ]
    preds = [_pred(1, saliency=[0.1, 0.9]), _pred(2, saliency=[0.2, 0.2])]
    m = qvhighlights_metrics(preds, gts)
    # q1 ranks clip1 first. A label vector [l_clip0, l_clip1] gives AP: [1,1] -> 1 (all
    # positive), [0,0] -> 0, [0,1] -> 1 (positive first), [1,0] -> 1/2 (precision 1/2 at
    # recall 1).
    #   Fair (>=2):     a0 [1,1] 1, a1 [1,0] 1/2, a2 [0,1] 1 -> 2.5
    #   Good (>=3):     a0 [1,0] 1/2, a1 [1,0] 1/2, a2 [0,1] 1 -> 2.0
    #   VeryGood (>=4): a0 [1,0] 1/2, a1 [0,0] 0, a2 [0,1] 1 -> 1.5
    #   Hit1: clip1 is positive for annotator 2 at every level (max over annotators) -> 1
    # q2: labels [0,1] for everyone; the tied scores form one PR point (precision 1/2 at
    #   recall 1) -> AP 1/2, x3 = 1.5 per level. Hit1: argmax of the tie is clip0 -> 0.
    # HL-mAP = mean over 2 queries x 3 annotators.
    assert m["HL-min-Fair"] == {"HL-mAP": 66.67, "HL-Hit1": 50.0}  # 4.0 / 6
    assert m["HL-min-Good"] == {"HL-mAP": 58.33, "HL-Hit1": 50.0}  # 3.5 / 6
    assert m["HL-min-VeryGood"] == {"HL-mAP": 50.0, "HL-Hit1": 50.0}  # 3.0 / 6
    assert list(m) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood"]
    assert list(m["brief"]) == [
        "HL-min-Fair-mAP", "HL-min-Fair-Hit1", "HL-min-Good-mAP", "HL-min-Good-Hit1",
        "HL-min-VeryGood-mAP", "HL-min-VeryGood-Hit1",
    ]
    assert m["brief"]["HL-min-Good-mAP"] == 58.33


def test_highlight_scores_truncated_or_zero_padded_to_the_clip_count():
    # duration 6 s -> 3 clips; only clip2 is positive (labels [0, 0, 1] for everyone).
    gts = [_gt(1, [[4, 6]], duration=6, clips=[2], saliency=[[4, 4, 4]])]
    # 4 scores: AP uses the first 3 (clip2 ranked first -> AP 1), but Hit1 takes the argmax
    # of all 4 (index 3, no such clip) -> a miss, although clip2 is the best of the first 3
    m = qvhighlights_metrics([_pred(1, saliency=[0.1, 0.2, 0.9, 1.0])], gts)
    assert m["HL-min-Fair"] == {"HL-mAP": 100.0, "HL-Hit1": 0.0}
    # 4 scores whose 4th is ignored by AP: ranking clip0, clip2, clip1 -> precision 1/2 at
    # full recall -> AP 1/2 (had the 4th score been used, there'd be a 4th clip)
    m = qvhighlights_metrics([_pred(1, saliency=[0.3, 0.1, 0.2, 0.0])], gts)
    assert m["HL-min-Good"] == {"HL-mAP": 50.0, "HL-Hit1": 0.0}
    # 1 score: padded to [0.5, 0, 0]; clip1 and clip2 tie at 0 -> one point with 1 TP of 3
    # -> AP 1/3; argmax clip0 is negative -> miss
    m = qvhighlights_metrics([_pred(1, saliency=[0.5])], gts)
    assert m["HL-min-VeryGood"] == {"HL-mAP": 33.33, "HL-Hit1": 0.0}


# ------------------------------------------------------------------------------ errors


def test_missing_extra_and_duplicate_qids_raise_clear_errors():
    gts = [_gt(1, [[0, 10]]), _gt(2, [[0, 10]]), _gt(3, [[0, 10]])]
    preds = [_pred(1, [[0, 10, 1.0]]), _pred(3, [[0, 10, 1.0]])]
    with pytest.raises(ValueError, match=r"1 qid\(s\) without a prediction: 2"):
        qvhighlights_metrics(preds, gts)
    with pytest.raises(ValueError, match=r"not in the ground truth: 7"):
        qvhighlights_metrics(preds + [_pred(7, [[0, 1, 1.0]])], gts[::2])
    with pytest.raises(ValueError, match="duplicate qid 1"):
        qvhighlights_metrics(preds + [_pred(1, [[0, 1, 1.0]])], gts)
    # the official match_number=False: score only the shared qids (both exact here)
    m = qvhighlights_metrics(preds, gts, match_qids=False)
    assert m["brief"]["MR-full-mAP"] == 100.0
    with pytest.raises(ValueError, match=r"qid 1: pred_relevant_windows must be"):
        qvhighlights_metrics([_pred(1, [[0, 10]])], gts[:1])  # no score


def test_load_jsonl_records_names_file_and_line(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"qid": 1}\n\n{"qid": 2}\n')
    assert load_jsonl_records(good) == [{"qid": 1}, {"qid": 2}]  # blank line skipped
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1}\n{"qid": 2,\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_jsonl_records(bad)
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"list\.jsonl:1: expected a JSON object, got list"):
        load_jsonl_records(not_obj)


# ------------------------------------------------------------------------------ CLI


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _toy_files(tmp_path):
    # every split non-empty (so no NaN, and the written JSON compares equal)
    gts = [
        _gt(1, [[0, 8]], duration=10, clips=[0, 1], saliency=[[4, 2, 3], [1, 0, 2]]),
        _gt(2, [[0, 20]], duration=30, clips=[3], saliency=[[2, 2, 2]]),
        _gt(3, [[10, 50]], duration=60, clips=[5, 6], saliency=[[3, 4, 4], [0, 1, 0]]),
    ]
    preds = [
        _pred(1, [[0, 8, 0.9], [2, 6, 0.2]], saliency=[0.9, 0.1, 0.0, 0.0, 0.0]),
        _pred(2, [[5, 20, 0.8]], saliency=[0.0] * 15),
        _pred(3, [[0, 0, 0]], saliency=[0.5] * 30),
    ]
    return (_write_jsonl(tmp_path / "preds.jsonl", preds),
            _write_jsonl(tmp_path / "gt.jsonl", gts), preds, gts)


def test_cli_metrics_prints_table_and_writes_official_json(tmp_path, capsys):
    pred_path, gt_path, preds, gts = _toy_files(tmp_path)
    out = tmp_path / "sub" / "metrics.json"
    rc = main(["metrics", "--predictions", str(pred_path), "--ground-truth", str(gt_path),
               "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "MR-full-R1@0.5" in printed and "HL-min-VeryGood" in printed
    assert "full MR-mAP" in printed and "long MR-R1" in printed
    written = json.loads(out.read_text())
    assert written == qvhighlights_metrics(preds, gts)
    assert list(written) == ["brief", "HL-min-Fair", "HL-min-Good", "HL-min-VeryGood",
                             "full", "long", "middle", "short"]
    # q2: [5,20] vs [0,20] IoU 0.75; q1 exact; q3 refusal -> R1@0.7 = 2/3, R1@0.8 = 1/3
    assert written["full"]["MR-R1"]["0.7"] == 66.67 and written["full"]["MR-R1"]["0.8"] == 33.33


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    pred_path, gt_path, preds, gts = _toy_files(tmp_path)
    short = _write_jsonl(tmp_path / "preds2.jsonl", preds[:2])
    rc = main(["metrics", "--predictions", str(short), "--ground-truth", str(gt_path)])
    assert rc == 1
    assert "without a prediction: 3" in capsys.readouterr().err
    rc = main(["metrics", "--predictions", str(short), "--ground-truth", str(gt_path),
               "--shared-qids-only"])
    assert rc == 0


def test_cli_runs_as_a_module(tmp_path):
    pred_path, gt_path, preds, gts = _toy_files(tmp_path)
    out = tmp_path / "m.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tempo_jax.evaluate", "metrics", "--predictions",
         str(pred_path), "--ground-truth", str(gt_path), "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 0, proc.stderr
    assert "MR-full-R1@0.5" in proc.stdout
    assert json.loads(out.read_text()) == qvhighlights_metrics(preds, gts)
