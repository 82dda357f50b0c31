"""Video data-pipeline throughput: ours (PyAV + SAA + numpy/PIL) vs qwen-vl-utils + transformers.

Why: the data pipeline must keep up with training without torch in the main venv, and it must
feed the model the pixels the torch reference would. This script measures clips/s for the
whole per-clip preprocessing on 2-minute 640x360 synthetic H.264 clips, both sides at the same
visual-token budget, in the same process, interleaved (so load from other processes hits both):

* ours: ``video.read_for_saa`` (one decode pass: probe, grey thumbnails, ``change_scores``,
  SAA ``plan``, then RGB and the processor's resize for the chosen frames only, on
  ``decode_threads()`` threads) -> ``process_video`` (tempo_jax.data), as the data pipeline
  runs it;
* reference: qwen-vl-utils ``fetch_video({"video": path, "fps": 2.0, "total_pixels": ...,
  "min_pixels": ...})`` with its decord backend (``FORCE_QWENVL_VIDEO_READER=decord``), then
  transformers' ``Qwen2VLVideoProcessor`` with the released Qwen2.5-VL preprocessor settings
  (min_pixels 3136, max_pixels 12845056; the class defaults are Qwen2-VL's video defaults,
  which would upscale the frames and change the token count).

Budget: 3584 merged visual tokens per video, as the open R1-style TVG recipes run Qwen2.5-VL
(``total_pixels = 3584 * 28 * 28``, ``min_pixels = 16 * 28 * 28``); SAAConfig's defaults are
the same numbers, so both sides pick 240 frames at 112x196 for a 2-minute 640x360 clip.
The token counts of both sides are reported (and must agree).

It also measures our throughput with 0, 1 and 2 worker processes (a plain multiprocessing Pool
over clips, no data-loader framework; workers return only shapes, so the numbers are the
processing, not the transfer; each of k workers decodes with max(1, cpus // k) threads), and
checks ``processor.resize_frames`` against torchvision's ``resize(BICUBIC, antialias=True)``
on uint8 frames at down- and up-scales (goal: within 2/255) and our ``process_video`` against
the transformers processor on the same frames.

The reference needs torchvision and decord, which cannot live in the main venv, so run it in
a separate one::

    bash scripts/make_bench_venv.sh          # = python3 -m venv .venv-bench &&
        # .venv-bench/bin/pip install torch==2.14.1 torchvision==0.29.1 decord==0.6.0 \
        #     qwen-vl-utils && .venv-bench/bin/pip install -e .
    .venv-bench/bin/python scripts/bench_data.py [--data-dir /tmp/tempo_bench_data] \
        [--clips 4] [--rounds 3] [--fps 30]

The last output line is a JSON object (``ours_clips_per_s``, ``reference_clips_per_s``,
``ratio_vs_reference``, ``visual_tokens_ours``, ``visual_tokens_reference``, ``workers``,
``resize_max_abs_diff_vs_torchvision``, stage timings and versions).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

# qwen-vl-utils reads this once, at import time: set it before importing it.
if importlib.util.find_spec("decord") is not None:
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "decord")
else:  # decord has no wheel for this Python: fall back to torchvision's reader, and say so
    os.environ.setdefault("FORCE_QWENVL_VIDEO_READER", "torchvision")

from tempo_jax.data import saa, video  # noqa: E402
from tempo_jax.data.preview import thumbnail_size  # noqa: E402
from tempo_jax.data.processor import process_video, resize_frame, resize_frames  # noqa: E402
from tempo_jax.data.synthetic import SyntheticSpec, generate  # noqa: E402

BUDGET_TOKENS = 3584  # merged visual tokens per video (R1-style TVG recipes)
TOKEN_PIXELS = 28 * 28
# Released Qwen2.5-VL preprocessor_config.json (the video processor falls back to it).
QWEN25_MIN_PIXELS = 3136
QWEN25_MAX_PIXELS = 12845056
GOAL_RATIO = 1.5


# ------------------------------------------------------------------------------ ours


def ours_one(path: str, cfg: saa.SAAConfig, stages: dict[str, float] | None = None) -> dict:
    """Our full per-clip pipeline; adds per-stage seconds into ``stages`` when given."""
    t0 = time.perf_counter()

    def plan_fn(info: video.VideoInfo, times: np.ndarray, grey: np.ndarray) -> saa.Plan:
        scores = saa.change_scores(grey, smooth=cfg.smooth, noise=cfg.score_noise)
        return saa.plan(info.duration, (info.height, info.width), times, scores, cfg)

    read = video.read_for_saa(
        path, plan_fn, candidate_fps=cfg.candidate_fps, thumb_size=thumbnail_size,
        keep_fps=max(cfg.candidate_fps, cfg.max_fps),
        transform=lambda plan, frame: resize_frame(frame, *plan.resized_hw),
    )
    p, frames = read.plan, read.frames
    t1 = time.perf_counter()
    out = process_video(frames, p.resized_hw)
    t2 = time.perf_counter()
    if stages is not None:
        for k, v in (("read_for_saa", t1 - t0), ("process_video", t2 - t1)):
            stages[k] = stages.get(k, 0.0) + v
    grid = [int(v) for v in out["video_grid_thw"][0]]
    return {
        "frames": int(frames.shape[0]),
        "resized_hw": [int(v) for v in p.resized_hw],
        "grid": grid,
        "tokens": grid[0] * (grid[1] // 2) * (grid[2] // 2),
        "pixel_values_shape": list(out["pixel_values_videos"].shape),
        "single_pass": read.single_pass,
    }


def _set_decode_threads(n: int) -> None:
    os.environ[video.DECODE_THREADS_ENV] = str(n)


def _worker(args: tuple[str, dict[str, Any]]) -> dict:
    path, cfg = args
    return ours_one(path, saa.SAAConfig.from_dict(cfg))


# ------------------------------------------------------------------------- reference


class Reference:
    """qwen-vl-utils ``fetch_video`` + transformers' Qwen2.5-VL video processor."""

    def __init__(self, budget_tokens: int, min_pixels: int) -> None:
        from qwen_vl_utils import vision_process
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import (
            Qwen2VLVideoProcessor,
        )

        self.fetch_video = vision_process.fetch_video
        self.backend = vision_process.get_video_reader_backend()
        self.processor = Qwen2VLVideoProcessor(
            min_pixels=QWEN25_MIN_PIXELS, max_pixels=QWEN25_MAX_PIXELS
        )
        self.ele = {"fps": 2.0, "total_pixels": budget_tokens * TOKEN_PIXELS,
                    "min_pixels": min_pixels}

    def one(self, path: str, stages: dict[str, float] | None = None) -> dict:
        t0 = time.perf_counter()
        vid, meta = self.fetch_video({"video": path, **self.ele}, return_video_metadata=True)
        t1 = time.perf_counter()
        # The frames are already budgeted by fetch_video: no second per-frame cap.
        out = self.processor(videos=[vid], return_tensors="pt", cap_pixels_per_frame=False)
        t2 = time.perf_counter()
        if meta.get("video_backend") != self.backend:
            raise RuntimeError(
                f"qwen-vl-utils fell back from {self.backend} to {meta.get('video_backend')} "
                f"on {path}: the reference would not be the one asked for"
            )
        if stages is not None:
            for k, v in (("fetch_video", t1 - t0), ("video_processor", t2 - t1)):
                stages[k] = stages.get(k, 0.0) + v
        grid = [int(v) for v in out["video_grid_thw"][0]]
        return {
            "frames": int(vid.shape[0]),
            "resized_hw": [int(vid.shape[2]), int(vid.shape[3])],
            "grid": grid,
            "tokens": grid[0] * (grid[1] // 2) * (grid[2] // 2),
            "pixel_values_shape": list(out["pixel_values_videos"].shape),
        }


# ---------------------------------------------------------------------------- checks


def resize_parity(paths: Sequence[str], sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    """Max |ours - torchvision| (0-255 units) of antialiased bicubic resizes of uint8 frames.

    Down- and up-scales of real decoded frames (8 per clip, spread over the clip).
    """
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    worst = 0
    per_size: dict[str, int] = {}
    mean_diffs = []
    for path in paths:
        info = video.probe(path)
        frames, _ = video.read_frames(path, np.linspace(0, info.duration * 0.95, 8))
        ref_in = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
        for h, w in sizes:
            ours = resize_frames(frames, h, w).astype(np.int16)
            ref = tvf.resize(ref_in, [h, w], interpolation=InterpolationMode.BICUBIC,
                             antialias=True)
            ref = ref.permute(0, 2, 3, 1).numpy().astype(np.int16)
            d = np.abs(ours - ref)
            key = f"{h}x{w}"
            per_size[key] = max(per_size.get(key, 0), int(d.max()))
            mean_diffs.append(float(d.mean()))
            worst = max(worst, int(d.max()))
    return {"max": worst, "per_size": per_size, "mean": float(np.mean(mean_diffs))}


def processor_parity(path: str, ref: Reference, resized_hw: tuple[int, int]) -> float:
    """Max |ours - transformers| of pixel_values_videos on the same uint8 frames (resized by
    each side's own resize), in normalised units."""
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as tvf

    info = video.probe(path)
    frames, _ = video.read_frames(path, np.linspace(0, info.duration * 0.95, 16))
    ours = process_video(frames, resized_hw)["pixel_values_videos"]
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).contiguous()
    x = tvf.resize(x, list(resized_hw), interpolation=InterpolationMode.BICUBIC,
                   antialias=True).float()  # exactly what fetch_video hands the processor
    theirs = ref.processor(videos=[x], return_tensors="pt", cap_pixels_per_frame=False)
    theirs = theirs["pixel_values_videos"].numpy()
    if theirs.shape != ours.shape:
        raise RuntimeError(f"pixel_values shapes differ: ours {ours.shape}, ref {theirs.shape}")
    return float(np.abs(ours - theirs).max())


# ----------------------------------------------------------------------------- timing


def _rounds(fns: dict[str, Callable[[str], Any]], paths: Sequence[str], rounds: int
            ) -> dict[str, list[float]]:
    """Per round, the seconds each side takes for all clips; sides alternate order per clip."""
    totals: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        acc = dict.fromkeys(names, 0.0)
        for i, path in enumerate(paths):
            order = names if (r + i) % 2 == 0 else names[::-1]
            for name in order:
                t0 = time.perf_counter()
                fns[name](path)
                acc[name] += time.perf_counter() - t0
        for name in names:
            totals[name].append(acc[name])
        print(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{n} {acc[n]:.2f}s ({len(paths) / acc[n]:.3f} clips/s)" for n in names), flush=True)
    return totals


def workers_throughput(paths: Sequence[str], cfg: saa.SAAConfig, counts: Sequence[int],
                       repeat: int) -> dict[str, float]:
    """Clips/s of our pipeline inline (0) and over Pool(k) workers, started and warmed first.

    The pool uses spawn (the parent has torch loaded; forking it is not safe) and each job
    list repeats the clips ``repeat`` times so that every worker has several jobs.
    """
    jobs = [(p, cfg.to_dict()) for p in paths] * repeat
    out: dict[str, float] = {}
    cpus = video.decode_threads()
    for k in counts:
        if k == 0:
            _worker(jobs[0])  # warm caches like the pools below
            t0 = time.perf_counter()
            for job in jobs:
                _worker(job)
            dt = time.perf_counter() - t0
        else:
            threads = max(1, cpus // k)
            with mp.get_context("spawn").Pool(k, _set_decode_threads, (threads,)) as pool:
                pool.map(_worker, jobs[:k], chunksize=1)  # start-up and imports, untimed
                t0 = time.perf_counter()
                pool.map(_worker, jobs, chunksize=1)
                dt = time.perf_counter() - t0
        out[str(k)] = len(jobs) / dt
        print(f"  workers={k}: {len(jobs)} clips in {dt:.2f}s = {out[str(k)]:.3f} clips/s",
              flush=True)
    return out


# ------------------------------------------------------------------------------- main


def make_clips(data_dir: Path, n: int, width: int, height: int, fps: float, seconds: float
               ) -> list[str]:
    """Generate (once; cached) ``n`` synthetic clips; a subfolder per look (named by a hash of
    the whole spec but ``num``), so looks never mix."""
    spec = SyntheticSpec(num=n, seed=0, width=width, height=height, fps=fps,
                         min_duration=seconds, max_duration=seconds)
    look = hashlib.sha1(json.dumps(spec.looks(), sort_keys=True).encode()).hexdigest()[:8]
    sub = data_dir / f"{width}x{height}_{fps:g}fps_{seconds:g}s_{look}"
    t0 = time.perf_counter()
    generate(sub, spec, progress=True)
    print(f"clips ready in {sub} ({time.perf_counter() - t0:.1f}s)", flush=True)
    return [str(sub / "videos" / f"syn{i:05d}.mp4") for i in range(n)]


def _versions() -> dict[str, str]:
    import av
    import PIL
    import torch
    import torchvision
    import transformers

    v = {"python": sys.version.split()[0], "numpy": np.__version__, "av": av.__version__,
         "pillow": PIL.__version__, "torch": torch.__version__,
         "torchvision": torchvision.__version__, "transformers": transformers.__version__,
         "torch_threads": str(torch.get_num_threads()), "cpus": str(os.cpu_count())}
    try:
        from importlib.metadata import version as dist_version

        v["qwen_vl_utils"] = dist_version("qwen-vl-utils")
        if importlib.util.find_spec("decord") is not None:
            import decord

            v["decord"] = decord.__version__
    except Exception as exc:  # versions are informational only
        v["version_error"] = repr(exc)
    return v


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/tempo_bench_data"))
    ap.add_argument("--clips", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=float, default=30.0, help="source frame rate of the clips")
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the clips")
    ap.add_argument("--budget", type=int, default=BUDGET_TOKENS, help="visual tokens per video")
    ap.add_argument("--worker-repeat", type=int, default=2,
                    help="each worker-throughput run processes clips x this many jobs")
    ap.add_argument("--skip-workers", action="store_true")
    args = ap.parse_args(argv)

    paths = make_clips(args.data_dir, args.clips, args.width, args.height, args.fps,
                       args.seconds)
    cfg = saa.SAAConfig(max_visual_tokens=args.budget)
    ref = Reference(args.budget, cfg.min_pixels)
    print(f"reference video reader: {ref.backend}", flush=True)

    # Same budget -> same tokens: check on every clip before timing anything.
    ours_info = [ours_one(p, cfg) for p in paths]
    print(f"decoder threads {video.decode_threads()}, single pass on "
          f"{sum(a['single_pass'] for a in ours_info)}/{len(paths)} clips", flush=True)
    ref_info = [ref.one(p) for p in paths]
    for p, a, b in zip(paths, ours_info, ref_info, strict=True):
        print(f"  {Path(p).name}: ours {a['frames']} frames {a['resized_hw']} grid {a['grid']} "
              f"= {a['tokens']} tokens | reference {b['frames']} frames {b['resized_hw']} "
              f"grid {b['grid']} = {b['tokens']} tokens", flush=True)
    tok_ours = sorted({a["tokens"] for a in ours_info})
    tok_ref = sorted({b["tokens"] for b in ref_info})
    if tok_ours != tok_ref:
        print(f"WARNING: token counts differ: ours {tok_ours}, reference {tok_ref}", flush=True)

    print(f"timing {args.rounds} rounds over {len(paths)} clips "
          f"({args.width}x{args.height}, {args.fps:g} fps, {args.seconds:g}s)", flush=True)
    stages_ours: dict[str, float] = {}
    stages_ref: dict[str, float] = {}
    totals = _rounds(
        {"ours": lambda p: ours_one(p, cfg, stages_ours),
         "reference": lambda p: ref.one(p, stages_ref)},
        paths, args.rounds,
    )
    n_timed = args.rounds * len(paths)
    med = {k: statistics.median(v) for k, v in totals.items()}
    ours_cps = len(paths) / med["ours"]
    ref_cps = len(paths) / med["reference"]

    print("resize parity vs torchvision (uint8, BICUBIC, antialias=True)", flush=True)
    h, w = ours_info[0]["resized_hw"]
    src_h, src_w = args.height, args.width
    # The benchmark's own size, other downscales, and upscales (small videos get upscaled to
    # min_pixels by both pipelines).
    sizes = [(h, w), (56, 112), (224, 392), (336, 588), (280, 280), (src_h + 28, src_w + 56),
             (2 * src_h, 2 * src_w)]
    sizes = [(max(28, a // 28 * 28), max(28, b // 28 * 28)) for a, b in sizes]
    parity = resize_parity(paths[:2], sizes)
    print(f"  max abs diff {parity['max']} (per size {parity['per_size']}), "
          f"mean {parity['mean']:.4f}", flush=True)
    proc_diff = processor_parity(paths[0], ref, (h, w))
    print(f"  pixel_values max abs diff vs transformers on the same frames: {proc_diff:.3g}",
          flush=True)

    workers: dict[str, float] = {}
    if not args.skip_workers:
        print("our throughput by worker processes", flush=True)
        workers = workers_throughput(paths, cfg, (0, 1, 2), args.worker_repeat)

    result = {
        "ours_clips_per_s": round(ours_cps, 4),
        "reference_clips_per_s": round(ref_cps, 4),
        "ratio_vs_reference": round(ours_cps / ref_cps, 3),
        "goal_ratio": GOAL_RATIO,
        "visual_tokens_ours": tok_ours[0] if len(tok_ours) == 1 else tok_ours,
        "visual_tokens_reference": tok_ref[0] if len(tok_ref) == 1 else tok_ref,
        "budget_tokens": args.budget,
        "frames_ours": ours_info[0]["frames"],
        "frames_reference": ref_info[0]["frames"],
        "resized_hw_ours": ours_info[0]["resized_hw"],
        "resized_hw_reference": ref_info[0]["resized_hw"],
        "workers": {k: round(v, 4) for k, v in workers.items()},
        "decode_threads": video.decode_threads(),
        "single_pass": all(a["single_pass"] for a in ours_info),
        "resize_max_abs_diff_vs_torchvision": parity["max"],
        "resize_mean_abs_diff_vs_torchvision": round(parity["mean"], 5),
        "resize_max_abs_diff_by_size": parity["per_size"],
        "pixel_values_max_abs_diff_vs_transformers": round(proc_diff, 6),
        "seconds_per_clip_ours": {k: round(v / n_timed, 4) for k, v in stages_ours.items()},
        "seconds_per_clip_reference": {k: round(v / n_timed, 4) for k, v in stages_ref.items()},
        "round_seconds": {k: [round(x, 3) for x in v] for k, v in totals.items()},
        "reference_reader": ref.backend,
        "clips": {"n": len(paths), "width": args.width, "height": args.height,
                  "fps": args.fps, "seconds": args.seconds},
        "versions": _versions(),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
