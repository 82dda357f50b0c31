"""Tests for annotation loaders (real QVHighlights files, synthetic Charades-STA), validation,
video lookup, the grain source and PIR pairing."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import grain.python as gp
import pytest

from tempo_jax.data.sources import (
    AnnotationError,
    GroundingSource,
    VideoIndex,
    load_charades_durations,
    load_charades_sta,
    load_jsonl,
    load_qvhighlights,
    make_pir,
    parse_qvh_vid,
)

QVH_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "qvhighlights"
if not QVH_DIR.is_dir():
    QVH_DIR = Path("/work/shared/data/qvhighlights")


def _qvh_annotation_files() -> list[Path]:
    """Every QVHighlights JSONL that is an annotation file (prediction files carry
    `pred_relevant_windows` instead of ground truth and are left out)."""
    files = []
    for f in sorted(QVH_DIR.glob("*.jsonl")):
        with f.open() as fh:
            first = json.loads(fh.readline())
        if "pred_relevant_windows" not in first:
            files.append(f)
    return files


QVH_FILES = _qvh_annotation_files() if QVH_DIR.is_dir() else []
needs_qvh = pytest.mark.skipif(not QVH_FILES, reason="real QVHighlights annotations not at hand")


@pytest.fixture(scope="module")
def qvh() -> dict[str, list]:
    return {f.name: load_qvhighlights(f) for f in QVH_FILES}


# ----------------------------------------------------------------------------- QVHighlights


@needs_qvh
def test_qvh_files_found():
    names = {f.name for f in QVH_FILES}
    assert {"highlight_train_release.jsonl", "highlight_val_release.jsonl",
            "highlight_test_with_gt.jsonl"} <= names
    assert "sample_val_preds.jsonl" not in names


@needs_qvh
def test_qvh_all_files_load(qvh):
    for f in QVH_FILES:
        recs = qvh[f.name]
        n_lines = sum(1 for line in f.read_text().splitlines() if line.strip())
        assert len(recs) == n_lines and recs.num_skipped == 0, f.name
        qids = [r["qid"] for r in recs]
        assert len(set(qids)) == len(qids)
        for r in recs:
            assert set(r) >= {"qid", "video", "query", "windows", "duration", "relevant",
                              "source_vid"}
            assert r["relevant"] and r["windows"] and r["duration"] > 0
            for s, e in r["windows"]:
                assert 0 <= s <= e <= r["duration"]
            yt, start, end = parse_qvh_vid(r["video"])
            assert r["source_vid"] == yt
            assert r["video"] == f"{yt}_{start}_{end}"
            assert (r["clip_start"], r["clip_end"]) == (start, end)
            assert "saliency_scores" in r and "relevant_clip_ids" in r


@needs_qvh
def test_qvh_youtube_ids_with_underscores(qvh):
    recs = [r for rs in qvh.values() for r in rs]
    with_us = [r for r in recs if "_" in r["source_vid"]]
    assert with_us, "expected some YouTube ids containing '_'"
    lead = next(r for r in recs if r["video"] == "_6hnl_BrFvs_360.0_510.0")
    assert lead["source_vid"] == "_6hnl_BrFvs"
    assert parse_qvh_vid("_6hnl_BrFvs_360.0_510.0") == ("_6hnl_BrFvs", 360.0, 510.0)
    assert parse_qvh_vid("Ok-M_V_h-eY_210.0_360.0") == ("Ok-M_V_h-eY", 210.0, 360.0)
    with pytest.raises(ValueError):
        parse_qvh_vid("noclip")
    with pytest.raises(ValueError):
        parse_qvh_vid("abc_1.0_x")


@needs_qvh
def test_qvh_pir_never_pairs_clips_of_same_youtube_video(qvh):
    recs = qvh["highlight_val_release.jsonl"]
    by_src = Counter(r["source_vid"] for r in recs)
    assert max(by_src.values()) > 1  # several clips (and queries) per YouTube video
    out = make_pir(recs, irrelevant_ratio=0.5, seed=3)
    qid_src = {r["qid"]: r["source_vid"] for r in recs}
    irr = [r for r in out if not r["relevant"]]
    assert len(irr) == round(0.5 * len(recs))
    for r in irr:
        assert qid_src[r["pir_query_qid"]] != r["source_vid"]
        assert parse_qvh_vid(r["video"])[0] == r["source_vid"]


# ----------------------------------------------------------------------------- Charades-STA

CHARADES_HEADER = ("id,subject,scene,quality,relevance,verified,script,objects,descriptions,"
                   "actions,length")


def _charades(tmp_path: Path, lines: list[str]) -> tuple[Path, Path]:
    csv = tmp_path / "Charades_v1_test.csv"
    csv.write_text("\n".join([
        CHARADES_HEADER,
        '3MSZA,HR43,Bedroom,6,7,Yes,"A person turns on a light.",light;door,'
        '"A person, then ""another"" one.",c001 0.0 12.0,31.00',
        "0A8CF,P1,Kitchen,5,7,Yes,script,cup,desc,c002 1.0 3.0,25.5",
    ]) + "\n")
    sta = tmp_path / "charades_sta_test.txt"
    sta.write_text("\n".join(lines) + "\n")
    return sta, csv


def test_charades_loads(tmp_path):
    sta, csv = _charades(tmp_path, [
        "3MSZA 24.3 30.4##person turn a light on.",
        "3MSZA 0.0 6.9##person opening the door.",
        "0A8CF 10 25.6##a person drinks from a cup.",  # 0.1 s past the end: within tolerance
    ])
    assert load_charades_durations(csv) == {"3MSZA": 31.0, "0A8CF": 25.5}
    recs = load_charades_sta(sta, csv)
    assert len(recs) == 3 and recs.num_skipped == 0
    assert recs[0] == {
        "qid": "3MSZA_0", "video": "3MSZA", "query": "person turn a light on.",
        "windows": [[24.3, 30.4]], "duration": 31.0, "relevant": True, "source_vid": "3MSZA",
    }
    assert [r["qid"] for r in recs] == ["3MSZA_0", "3MSZA_1", "0A8CF_2"]
    assert recs[2]["windows"] == [[10.0, 25.5]]


def test_charades_malformed_strict_and_lenient(tmp_path, caplog):
    lines = [
        "3MSZA 24.3 30.4##person turn a light on.",
        "3MSZA 24.3##missing end",                      # line 2
        "3MSZA 30.4 24.3##end before start",            # line 3
        "ZZZZZ 1.0 2.0##unknown video",                 # line 4
        "3MSZA 1.0 40.0##past the end",                 # line 5
        "no separator at all",                          # line 6
        "0A8CF 1.0 2.0##fine",
    ]
    sta, csv = _charades(tmp_path, lines)
    with pytest.raises(AnnotationError, match=rf"{sta.name}:2: unparsable Charades-STA") as ei:
        load_charades_sta(sta, csv)
    assert ei.value.path == str(sta) and ei.value.line == 2
    with caplog.at_level(logging.WARNING, logger="tempo_jax.data.sources"):
        recs = load_charades_sta(sta, csv, strict=False)
    assert [r["query"] for r in recs] == ["person turn a light on.", "fine"]
    assert recs[1]["qid"] == "0A8CF_6"  # line-based qids survive skipping
    assert recs.num_skipped == 5 and [s.line for s in recs.skipped] == [2, 3, 4, 5, 6]
    reasons = [s.reason for s in recs.skipped]
    assert "end < start" in reasons[1] and "not in the durations CSV" in reasons[2]
    assert "outside [0, duration=31]" in reasons[3] and "no '##'" in reasons[4]
    assert f"{sta}:3: " in caplog.text and "skipped 5 bad line(s)" in caplog.text
    clipped = load_charades_sta(sta, csv, strict=False, clip_windows=True)
    assert [r["windows"] for r in clipped if r["qid"] == "3MSZA_4"] == [[[1.0, 31.0]]]


def test_charades_csv_without_length(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("id,subject\nA,B\n")
    with pytest.raises(AnnotationError, match="bad.csv:1: header needs"):
        load_charades_durations(csv)


# ----------------------------------------------------------------------------- generic JSONL


def test_jsonl_loads_and_validates(tmp_path):
    f = tmp_path / "ann.jsonl"
    rows = [
        {"video": "a/b.mp4", "query": "q1", "windows": [[1, 2], [3, 4.5]], "duration": 10},
        {"video": "c", "query": "q2", "windows": [], "duration": 5, "relevant": False,
         "qid": 7, "source_vid": "src"},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    recs = load_jsonl(f)
    assert recs[0] == {"qid": "a/b.mp4_0", "video": "a/b.mp4", "query": "q1",
                       "windows": [[1.0, 2.0], [3.0, 4.5]], "duration": 10.0, "relevant": True,
                       "source_vid": "a/b.mp4"}
    assert recs[1]["qid"] == "7" and not recs[1]["relevant"] and recs[1]["source_vid"] == "src"


@pytest.mark.parametrize("line, reason", [
    ('{"video": "v", "query": "q", "windows": [[1, 2]], "duration": 10', "malformed JSON"),
    ('{"video": "v", "windows": [[1, 2]], "duration": 10}', "missing field 'query'"),
    ('{"video": "v", "query": "q", "windows": [[3, 2]], "duration": 10}', "end < start"),
    ('{"video": "v", "query": "q", "windows": [[1, 12]], "duration": 10}', "outside"),
    ('{"video": "v", "query": "q", "windows": [[-2, 1]], "duration": 10}', "outside"),
    ('{"video": "v", "query": "q", "windows": [[1, 2]], "duration": 0}', "duration must be > 0"),
    ('{"video": "v", "query": "q", "windows": [[1]], "duration": 10}', "not [start, end]"),
    ('{"video": "v", "query": "q", "windows": [], "duration": 10, "relevant": true}',
     "needs at least one"),
    ('{"video": "v", "query": "q", "windows": [[1, 2]], "duration": 10, "relevant": false}',
     "must have windows []"),
    ('[1, 2]', "expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, line, reason):
    f = tmp_path / "bad.jsonl"
    good = '{"video": "v", "query": "q", "windows": [[1, 2]], "duration": 10}'
    f.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(AnnotationError) as ei:
        load_jsonl(f)
    assert str(ei.value).startswith(f"{f}:3: ") and reason in str(ei.value)
    recs = load_jsonl(f, strict=False)
    assert len(recs) == 2 and recs.skipped[0].line == 3 and reason in recs.skipped[0].reason


def test_qvh_malformed_line(tmp_path):
    f = tmp_path / "qvh.jsonl"
    ok = {"qid": 1, "query": "q", "duration": 150, "vid": "a_b_c_0.0_150.0",
          "relevant_windows": [[0, 16]]}
    bad = dict(ok, qid=2, vid="nodash")
    f.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(AnnotationError, match=r"qvh.jsonl:2: vid 'nodash'"):
        load_qvhighlights(f)
    recs = load_qvhighlights(f, strict=False)
    assert len(recs) == 1 and recs[0]["source_vid"] == "a_b_c" and recs.num_skipped == 1


# ----------------------------------------------------------------------------- videos / grain


def test_video_index(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "abc_1.0_2.0.mp4").write_bytes(b"x")
    (tmp_path / "sub" / "clip.webm").write_bytes(b"x")
    (tmp_path / "sub" / "notes.txt").write_text("x")
    idx = VideoIndex(tmp_path)
    assert idx.find("abc_1.0_2.0") == tmp_path / "abc_1.0_2.0.mp4"
    assert idx.find("abc_1.0_2.0.mp4") == tmp_path / "abc_1.0_2.0.mp4"
    assert idx.find("sub/clip.webm") == tmp_path / "sub" / "clip.webm"
    assert idx.find("sub/clip") == tmp_path / "sub" / "clip.webm"
    assert idx.find("clip") == tmp_path / "sub" / "clip.webm"  # recursive by stem
    assert "notes" not in idx and "clip" in idx
    with pytest.raises(FileNotFoundError, match="'missing' not found under"):
        idx.find("missing")
    with pytest.raises(FileNotFoundError):
        VideoIndex(tmp_path, recursive=False).find("clip")
    with pytest.raises(ValueError):
        idx.find("../etc/passwd")
    assert idx.missing([{"video": "clip"}, {"video": "gone"}]) == ["gone"]


def test_grounding_source():
    recs = [{"qid": str(i), "video": f"v{i}", "query": "q", "windows": [[0, 1]],
             "duration": 2.0, "relevant": True, "source_vid": f"v{i}"} for i in range(5)]
    src = GroundingSource(recs)
    assert isinstance(src, gp.RandomAccessDataSource)
    assert len(src) == 5 and src[3]["video"] == "v3"
    src[3]["windows"].append([5, 6])  # items are copies
    assert src[3]["windows"] == [[0, 1]]
    assert repr(src) == repr(GroundingSource(recs)) and "size=5" in repr(src)
    loader = gp.DataLoader(data_source=src, sampler=gp.IndexSampler(
        5, shard_options=gp.NoSharding(), shuffle=False, num_epochs=1, seed=0))
    assert [r["qid"] for r in loader] == ["0", "1", "2", "3", "4"]


# ----------------------------------------------------------------------------- PIR


def _toy(n_sources=7, per_source=3):
    return [{"qid": f"{s}-{j}", "video": f"src{s}_{j * 10}.0_{j * 10 + 10}.0",
             "query": f"query {s}-{j}", "windows": [[1.0, 2.0]], "duration": 10.0,
             "relevant": True, "source_vid": f"src{s}"}
            for s in range(n_sources) for j in range(per_source)]


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.33, 0.5, 1.0])
def test_pir_ratio_and_different_source(ratio):
    recs = _toy()
    out = make_pir(recs, irrelevant_ratio=ratio, seed=0)
    assert len(out) == len(recs)
    irr = [i for i, r in enumerate(out) if not r["relevant"]]
    assert len(irr) == round(ratio * len(recs))
    by_qid = {r["qid"]: r for r in recs}
    for i, (a, b) in enumerate(zip(recs, out, strict=True)):
        assert b["video"] == a["video"] and b["source_vid"] == a["source_vid"]
        if i in irr:
            donor = by_qid[b["pir_query_qid"]]
            assert b["windows"] == [] and b["query"] == donor["query"]
            assert donor["source_vid"] != a["source_vid"]
        else:
            assert b == a
    assert all(r["relevant"] for r in recs)  # input untouched


def test_pir_deterministic_and_seeded():
    recs = _toy()
    assert make_pir(recs, 0.4, seed=1) == make_pir(recs, 0.4, seed=1)
    assert make_pir(recs, 0.4, seed=1) != make_pir(recs, 0.4, seed=2)


def test_pir_donors_cover_other_sources():
    recs = _toy(n_sources=3, per_source=2)
    donors = Counter()
    for seed in range(200):
        for r in make_pir(recs, 1.0, seed=seed):
            donors[(r["source_vid"], r["pir_query_source_vid"])] += 1
    assert all(a != b for a, b in donors)
    assert len(donors) == 6  # every ordered pair of different sources shows up


def test_pir_single_source_fails():
    recs = _toy(n_sources=1, per_source=4)
    with pytest.raises(ValueError, match="two source videos"):
        make_pir(recs, 0.5)
    with pytest.raises(ValueError):
        make_pir(recs, 1.5)


def test_pir_compatible_redraws_donors_and_synthetic_colours_differ():
    from tempo_jax.data.synthetic import different_colours

    colours = ["red", "blue", "green"]
    recs = [{"qid": f"v{i}", "video": f"v{i}.mp4", "windows": [[1.0, 2.0]], "duration": 10.0,
             "relevant": True, "source_vid": f"v{i}",
             "query": f"the {colours[i % 3]} circle moves upward"} for i in range(30)]
    plain = make_pir(recs, 1.0, seed=0)
    same = sum(different_colours(a, {"query": b["query"]}) is False
               for a, b in zip(recs, plain, strict=True))
    assert same > 0  # without the test, some donors name the video's own colour
    out = make_pir(recs, 1.0, seed=0, compatible=different_colours)
    for a, b in zip(recs, out, strict=True):
        assert different_colours(a, {"query": b["query"]})
    with pytest.raises(ValueError, match="no compatible donor"):
        make_pir(recs, 1.0, seed=0, compatible=lambda r, d: False)
