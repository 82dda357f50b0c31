"""From annotation records to model-ready numpy batches, in Grain worker processes.

Per example (in a worker): one decode pass over the video (`video.read_for_saa`: luma
thumbnails, SAA change scores and plan, then RGB and the processor's resize for the chosen
frames only), the backbone's processor with one grid per temporal patch, and the ETA prompt
with its M-RoPE positions. The backbone family (Qwen2.5-VL or Qwen3-VL) is read off the vision
config (`processor.vision_family`); it decides the patch size and normalisation, the
timestamps' text and times, the positions and the vision tower's metadata. Per batch: pad
text to a bucketed length and the patches to a fixed capacity, and build the vision tower's
metadata, so the device sees a handful of static shapes. A broken video never stops a run:
the example is dropped, counted and logged with its file and reason (or raised, with
`strict`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data import saa as saa_lib
from tempo_jax.data.processor import (
    QWEN3_VL,
    PatchSpec,
    patch_spec,
    process_segments,
    resize_frame,
    temporal_patch_times,
    vision_family,
)
from tempo_jax.data.sources import GroundingSource, VideoIndex, skipped_summary
from tempo_jax.data.video import VideoError, read_for_saa
from tempo_jax.models import families
from tempo_jax.models.families import VisionSpec
from tempo_jax.models.inputs import bucket

log = logging.getLogger(__name__)

# fields of a batch that are per-example metadata (python objects), not device arrays
META_KEYS = ("qid", "video", "query", "windows", "duration", "relevant", "frame_times")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How examples are made and batched (model-side settings live in the model config)."""

    batch_size: int = 4
    saa: saa_lib.SAAConfig = saa_lib.SAAConfig()
    prompt: prompts_lib.PromptConfig = prompts_lib.PromptConfig()
    thumbnail_size: tuple[int, int] = (32, 32)  # (width, height) of the change-score thumbnails
    with_answer: bool = True  # SFT targets; False for rollouts and evaluation
    pad_side: str = "right"  # "left" for generation
    max_seq_len: int | None = None  # pad text to this; None: bucketed per batch
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    seed: int = 0
    num_workers: int = 0  # Grain worker processes
    read_threads: int = 2  # threads per process loading examples (decoding releases the GIL)
    strict: bool = False  # raise on a broken example instead of skipping it
    # decoded candidate frames one video may hold (single decode pass); above it, two passes
    max_keep_bytes: int = 1 << 30
    tokenizer_path: str | None = None  # None: the backbone family's offline tokenizer


def config_from_settings(settings: dict, **kw) -> PipelineConfig:
    """A `PipelineConfig` from saved SAA / prompt settings (`tempo_settings.json`, or
    `training.setup.settings_dict`): training, evaluation and the `transformers` helpers all build
    their prompts through here, so they agree. Other keys of `settings` are ignored."""
    saa = saa_lib.SAAConfig.from_dict(dict(settings.get("saa", {})))
    prompt = prompts_lib.PromptConfig(**settings.get("prompt", {}))
    return PipelineConfig(saa=saa, prompt=prompt, **kw)


def plan_video(info: Any, cand_times: np.ndarray, grey: np.ndarray,
               cfg: saa_lib.SAAConfig, spec: PatchSpec | None = None) -> saa_lib.Plan:
    """SAA change scores of the thumbnails and the plan (frame times and resolution, in
    multiples of `spec.factor`: the vision tower's, `patch_spec(vision)`; default Qwen2.5-VL's)."""
    scores = saa_lib.change_scores(grey, smooth=cfg.smooth, noise=cfg.score_noise)
    return saa_lib.plan(info.duration, (info.height, info.width), cand_times, scores, cfg, spec)


def load_example(
    record: dict, videos: VideoIndex, tokenizer, cfg: PipelineConfig, vision: VisionSpec,
    *, keep_frames: bool = False,
) -> dict[str, Any]:
    """One record -> prompt tokens, positions, loss mask and patches (numpy).

    The frame times in the prompt (ETA) and in `frame_times` are the real times of the frames
    used, which `read_for_saa` takes from the frames it kept on its candidate grid (within
    half a grid step of the planned times). `keep_frames` also keeps those frames (uint8,
    at the model's resolution) as `frames`, for pictures of what the model saw.
    """
    path = videos.find(record["video"])
    spec = patch_spec(vision)
    read = read_for_saa(
        path, lambda info, cand, grey: plan_video(info, cand, grey, cfg.saa, spec),
        candidate_fps=cfg.saa.candidate_fps, thumb_size=cfg.thumbnail_size,
        keep_fps=max(cfg.saa.candidate_fps, cfg.saa.max_fps),
        transform=lambda plan, frame: resize_frame(frame, *plan.resized_hw),
        max_keep_bytes=cfg.max_keep_bytes,
    )
    info, plan, pts = read.info, read.plan, read.pts
    pixels, grids = process_segments(read.frames, plan.resized_hw, **spec.as_kwargs())
    relevant = bool(record.get("relevant", True))
    window = tuple(record["windows"][0]) if relevant and record.get("windows") else None
    caption = record.get("caption") or None
    ex = _prompt(tokenizer, record["query"], pts, grids, cfg, vision, window, caption)
    ex["caption"] = caption
    ex["pixel_values"] = pixels
    ex["qid"] = str(record.get("qid", ""))
    ex["video"] = str(record["video"])
    ex["query"] = record["query"]
    ex["windows"] = [list(map(float, w)) for w in record.get("windows", [])]
    ex["duration"] = float(record.get("duration") or info.duration)
    ex["relevant"] = relevant
    ex["frame_times"] = pts
    if keep_frames:
        ex["frames"] = read.frames
    return ex


def with_query(ex: dict, query: str, tokenizer, cfg: PipelineConfig, vision: VisionSpec,
               window: tuple[float, float] | None = None) -> dict[str, Any]:
    """`ex`'s processed video asked `query` instead (answer `window`, None: a refusal):
    only the text is rebuilt, exactly as `load_example` builds it, so another question
    about a video costs a tokenization, not a decode."""
    built = _prompt(tokenizer, query, ex["frame_times"], ex["video_grid_thw"], cfg, vision,
                    window, ex.get("caption"))
    return {**ex, **built, "query": query}


def _prompt(tokenizer, query: str, frame_times, grids, cfg: PipelineConfig,
            vision: VisionSpec, window, caption: str | None = None) -> dict[str, Any]:
    """The family's prompt: a temporal patch's time is its first frame's (ETA, Qwen2.5-VL) or
    the mean of its frames' (Qwen3-VL, as its processor), from the real frame times."""
    answer = (prompts_lib.format_answer(window, cfg.prompt, caption) if cfg.with_answer
              else None)
    family = vision_family(vision)
    tp = vision.temporal_patch_size
    if family == QWEN3_VL:
        times = temporal_patch_times(frame_times, tp)
    else:
        times = np.asarray(frame_times)[0::tp]
    return prompts_lib.build_prompt(
        tokenizer, query, times, grids, cfg.prompt, answer=answer,
        spatial_merge_size=vision.spatial_merge_size,
        tokens_per_second=getattr(vision, "tokens_per_second", 2), family=family)


class LoadExample(grain.transforms.Map):
    """Grain transform: runs in the worker processes; loads the tokenizer once per worker.

    Returns `{"skip": "<file>: <problem>"}` for a broken example (unless `strict`), so that the
    main process counts and logs it without stopping.
    """

    def __init__(self, video_root: str, cfg: PipelineConfig, vision: VisionSpec):
        cfg.prompt.check_family(vision_family(vision))  # a bad setting fails here, not per example
        self.video_root = video_root
        self.cfg = cfg
        self.vision = vision
        self._tok = None
        self._videos = None
        self._lock = threading.Lock()

    def __getstate__(self):  # workers rebuild the tokenizer and the lock
        return {**self.__dict__, "_tok": None, "_videos": None, "_lock": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def map(self, record: dict) -> dict:
        with self._lock:  # Grain maps in threads; build once (lazy imports are not thread-safe)
            if self._tok is None:
                self._tok = prompts_lib.load_tokenizer(self.cfg.tokenizer_path,
                                                       family=vision_family(self.vision))
                self._videos = VideoIndex(self.video_root)
        try:
            return load_example(record, self._videos, self._tok, self.cfg, self.vision)
        except (VideoError, FileNotFoundError, ValueError) as e:
            if self.cfg.strict:
                raise
            return {"skip": str(e), "qid": str(record.get("qid", ""))}


class NoUsableData(ValueError):
    """Every example of a training stream failed to load, one after another: a stream that
    repeats forever would otherwise skip them forever."""


class SkipCounter:
    """Main-process filter: drops skipped examples, counting and logging each one. With
    `give_up_after` (the number of records a stream cycles through), that many skips in a
    row, i.e. every record failed, raise `NoUsableData` instead of spinning."""

    def __init__(self, give_up_after: int | None = None):
        self.count = 0
        self.in_a_row = 0
        self.give_up_after = give_up_after
        self.reasons: list[str] = []
        self.failed: dict[str, str] = {}  # qid -> reason (first 100k), for reports

    def __call__(self, ex: dict) -> bool:
        if "skip" not in ex:
            self.in_a_row = 0
        else:
            self.count += 1
            self.in_a_row += 1
            if len(self.reasons) < 1000:
                self.reasons.append(ex["skip"])
            if len(self.failed) < 100_000:
                self.failed[str(ex.get("qid", ""))] = ex["skip"]
            log.warning("skipping example %s: %s", ex.get("qid", "?"), ex["skip"])
            if self.give_up_after and self.in_a_row >= self.give_up_after:
                raise NoUsableData(f"none of the {self.give_up_after} examples could be "
                                   f"loaded, {skipped_summary(self.reasons, total=self.count)}")
            return False
        return True


def collate(
    examples: Sequence[dict], cfg: PipelineConfig, vision: VisionSpec,
    patch_capacity: int | None = None, shapes: dict | None = None,
) -> dict[str, Any]:
    """Pad a list of examples to static shapes: text to `max_seq_len` (or a bucket), patches to
    `patch_capacity` (or a bucket), and build the vision tower's metadata. `shapes` (from
    `batch_shapes`) pads to another batch's shapes instead, when they are at least as large."""
    shapes = shapes or {}
    lengths = [len(ex["input_ids"]) for ex in examples]
    pad_to = shapes.get("seq") or cfg.max_seq_len or bucket(max(lengths), 64)
    if max(lengths) > pad_to:
        raise ValueError(f"example of {max(lengths)} tokens exceeds max_seq_len {pad_to}")
    text = prompts_lib.build_batch(examples, pad_to=pad_to, side=cfg.pad_side)
    pixels = np.concatenate([ex["pixel_values"] for ex in examples])
    grids = np.concatenate([ex["video_grid_thw"] for ex in examples]).astype(np.int64)
    n = pixels.shape[0]
    capacity = shapes.get("patches") or patch_capacity or bucket(n, 64)
    if n > capacity:
        raise ValueError(f"batch has {n} patches, more than the capacity {capacity}")
    meta = families.vision_metadata(grids, vision, num_patches=capacity, bucketed=True,
                                    **shapes.get("segments", {}))
    batch = {
        "input_ids": text["input_ids"].astype(np.int32),
        "attention_mask": text["attention_mask"].astype(np.int32),
        "position_ids": text["position_ids"].astype(np.int32),
        "loss_mask": text["loss_mask"],
        "pixel_values": np.pad(pixels, ((0, capacity - n), (0, 0))),
        "video_grid_thw": grids,
        "vision_meta": meta,
        "num_image_features": np.int32(0),
    }
    batch["meta"] = [{**{k: ex[k] for k in META_KEYS}, "caption": ex.get("caption")}
                     for ex in examples]
    return batch


def jsonable(value: Any) -> Any:
    """A batch's `meta` value (or a parsed answer) as JSON: arrays and tuples become lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def model_inputs(batch: dict) -> dict:
    """The arrays `Qwen25VL.forward` reads (drops host-only metadata)."""
    keys = ("input_ids", "attention_mask", "position_ids", "pixel_values", "vision_meta",
            "num_image_features")
    return {k: batch[k] for k in keys}


@dataclasses.dataclass
class Loader:
    """A checkpointable batch iterator: `get_state()` / `set_state()` restore exactly the next
    batch (Grain iterator state), `skipped` counts dropped examples."""

    dataset: Any
    skip_counter: SkipCounter
    _it: Any = None

    def __iter__(self):
        if self._it is None:
            self._it = iter(self.dataset)
        return self

    def __next__(self) -> dict:
        if self._it is None:
            self._it = iter(self.dataset)
        return next(self._it)

    def get_state(self) -> dict:
        iter(self)
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        iter(self)
        self._it.set_state(state)

    @property
    def skipped(self) -> int:
        return self.skip_counter.count

    def close(self) -> None:
        """Stop the worker processes (Grain's multiprocess prefetch) now, not at exit."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()


def batch_shapes(batch: dict) -> dict:
    """The padded shapes of a collated batch, as `collate(shapes=...)` takes them: sequence
    length, patch count, and the vision metadata's segment tables (`(segments, length)` of
    the full-attention table and, for Qwen2.5-VL, of the window table)."""
    meta = batch["vision_meta"]
    segments = {"full_shape": meta["full_index"].shape}
    if "win_index" in meta:
        segments["window_shape"] = meta["win_index"].shape
    return {"seq": batch["input_ids"].shape[1], "patches": batch["pixel_values"].shape[0],
            "segments": segments}


def collate_alike(chunks: Sequence[Sequence[dict]], cfg: PipelineConfig, vision: VisionSpec,
                  patch_capacity: int | None = None) -> list[dict[str, Any]]:
    """Collate each chunk of examples (the micro-batches of one accumulated step) to the same
    shapes, the largest each chunk needs alone, so that they stack into one array per input
    and one compiled program scans over them."""
    batches = [collate(c, cfg, vision, patch_capacity) for c in chunks]
    each = [batch_shapes(b) for b in batches]
    if all(s == each[0] for s in each):
        return batches
    common = {
        "seq": max(s["seq"] for s in each), "patches": max(s["patches"] for s in each),
        "segments": {k: tuple(max(s["segments"][k][i] for s in each) for i in range(2))
                     for k in each[0]["segments"]},
    }
    return [collate(c, cfg, vision, patch_capacity, shapes=common) for c in chunks]


def batch_patch_capacity(cfg: PipelineConfig, vision: VisionSpec) -> int:
    """Patches of a batch whose every video fills the visual-token budget: the loader's
    static patch dimension (one compilation for every batch)."""
    return cfg.batch_size * vision.merge_unit * cfg.saa.max_visual_tokens


def make_loader(
    records: Sequence[dict],
    video_root: str,
    cfg: PipelineConfig,
    vision: VisionSpec,
    *,
    shard_index: int = 0,
    shard_count: int = 1,
    patch_capacity: int | None = None,
    require_usable: bool = False,
    collated: bool = True,
) -> Loader:
    """Grain pipeline: source -> (per-host shard) -> shuffle / repeat -> load in workers ->
    drop and count broken examples -> static-shape batches.

    `shard_index`/`shard_count` (e.g. `jax.process_index()`, `jax.process_count()`) give each
    host its own share of the records. `patch_capacity` fixes the patch dimension (default:
    `batch_size * 4 * saa.max_visual_tokens`, every example's worst case). `require_usable`
    (training streams): when every record of the shard fails in a row, raise `NoUsableData`
    instead of skipping forever; evaluation leaves it off and reports each failure.
    `collated=False` yields each batch as its list of examples (the caller collates, e.g.
    after choosing among several batches' examples; `batch_patch_capacity` keeps one shape).
    """
    ds = grain.MapDataset.source(GroundingSource(records))
    if shard_count > 1:
        ds = ds[shard_index::shard_count]
    n_records = len(ds)
    ds = ds.seed(cfg.seed)
    if cfg.shuffle:
        ds = ds.shuffle()
    if cfg.num_epochs != 1:
        ds = ds.repeat(cfg.num_epochs)
    ds = ds.map(LoadExample(video_root, cfg, vision))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=2 * cfg.batch_size))
    if cfg.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain workers read absl flags; we run outside absl.app
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
    counter = SkipCounter(give_up_after=n_records if require_usable else None)
    it = it.filter(counter)
    capacity = patch_capacity or batch_patch_capacity(cfg, vision)
    it = it.batch(cfg.batch_size, batch_fn=(
        (lambda exs: collate(exs, cfg, vision, patch_capacity=capacity)) if collated else list))
    return Loader(it, counter)
