"""The preview CLI end to end: JSON contract, token budget, uniform spacing, PNG, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tempo_jax.data import preview as P
from tempo_jax.data.synthetic import SyntheticSpec, generate

MAX_TOKENS = 120  # below the 8 s video's unconstrained need, so the budget really binds


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preview")
    spec = SyntheticSpec(num=1, seed=3, width=128, height=96, min_duration=8.0, max_duration=8.0)
    generate(out, spec, progress=False)
    return out / "videos" / "syn00000.mp4"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MPLBACKEND": "Agg", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "tempo_jax.data.preview", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _check_plan(d: dict, path: Path, max_tokens: int) -> np.ndarray:
    assert list(d) == list(P.JSON_KEYS)
    assert d["video"] == str(path)
    assert d["duration"] == pytest.approx(8.0, abs=0.01)
    times = np.asarray(d["frame_times"])
    assert times.size >= 2 and times.size % 2 == 0
    assert np.all(np.diff(times) >= 0)
    assert times[0] >= 0 and times[-1] <= d["duration"]
    h, w = d["resized_hw"]
    t, gh, gw = d["video_grid_thw"]
    assert h % 28 == 0 and w % 28 == 0
    assert (gh, gw) == (h // 14, w // 14) and t == times.size // 2
    assert d["num_visual_tokens"] == t * (h // 28) * (w // 28)
    assert d["num_visual_tokens"] <= max_tokens
    return times


def test_saa_json(clip: Path) -> None:
    r = _run(str(clip), "--saa", "--max-tokens", str(MAX_TOKENS), "--json")
    assert r.returncode == 0, r.stderr
    _check_plan(_last_json(r.stdout), clip, MAX_TOKENS)
    d = _last_json(r.stdout)
    assert d["mode"] == "saa"
    assert "visual tokens" in r.stdout and f"budget {MAX_TOKENS}" in r.stdout


def test_uniform_is_2fps(clip: Path) -> None:
    r = _run(str(clip), "--uniform", "--json")
    assert r.returncode == 0, r.stderr
    d = _last_json(r.stdout)
    times = _check_plan(d, clip, 3584)
    assert d["mode"] == "uniform"
    np.testing.assert_allclose(np.diff(times), 0.5, atol=1e-6)
    assert times.size == 16


def test_png_contact_sheet(clip: Path, tmp_path: Path) -> None:
    png = tmp_path / "sheet.png"
    r = _run(str(clip), "--png", str(png))
    assert r.returncode == 0, r.stderr
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000


def test_preview_function_matches_cli_budget(clip: Path) -> None:
    from tempo_jax.data.saa import SAAConfig

    d = P.preview(clip, SAAConfig(max_visual_tokens=MAX_TOKENS))
    _check_plan({k: d[k] for k in P.JSON_KEYS}, clip, MAX_TOKENS)
    assert len(d["candidate_times"]) == len(d["change_scores"]) > 0


def _zero_frames(path: Path) -> None:
    """A container whose video stream holds no frames (its audio has some)."""
    import av

    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=8)
        v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
        a = c.add_stream("pcm_s16le", rate=8000, layout="mono")
        c.start_encoding()
        fr = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        fr.sample_rate, fr.pts = 8000, 0
        c.mux(a.encode(fr))
        c.mux(a.encode())
        c.mux(v.encode())


@pytest.mark.parametrize("kind", ["missing", "truncated", "zero_frames"])
def test_bad_input_is_one_error_line(clip: Path, tmp_path: Path, kind: str) -> None:
    bad = tmp_path / (f"{kind}.mkv" if kind == "zero_frames" else f"{kind}.mp4")
    if kind == "truncated":
        data = clip.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "zero_frames":
        _zero_frames(bad)
    r = _run(str(bad), "--json")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and str(bad) in lines[0]
    assert r.stdout == ""
