"""Training data: annotation records (with PIR pairs), processed examples (cached mode), the
examples of each step (PIR pairs and contrast pairs drawn afresh), and the arrays the steps
take (answer targets, prompts without their answers)."""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tempo_jax import cli
from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data.pipeline import PipelineConfig, load_example, with_query
from tempo_jax.data.processor import vision_family
from tempo_jax.data.sources import (
    VideoIndex,
    load_charades_sta,
    load_jsonl,
    load_qvhighlights,
    skipped_summary,
)
from tempo_jax.data.sources import make_pir as make_pir_pairs
from tempo_jax.models.inputs import bucket

log = logging.getLogger("tempo_jax.train")


@dataclasses.dataclass
class Data:
    train: list[dict]
    val: list[dict]
    video_root: str
    train_examples: list[dict] | None = None  # processed, when cached
    val_examples: list[dict] | None = None
    # PIR drawn afresh every step (cached mode): `train` then holds the relevant records only
    pir_ratio: float = 0.0
    pir_compatible: Any = None


def _load_records(config, which: str):
    """The annotation records of `data.<which>` (bad lines skipped and logged); a missing
    file, or one without a usable line, is the user's error (one line naming the file)."""
    src, path = config.data.source, config.data[which]
    if src not in ("qvhighlights", "charades", "jsonl"):
        raise cli.UsageError(f"--config.data.source={src}: expected synthetic, qvhighlights, "
                             "charades or jsonl")
    if not path:
        raise cli.UsageError(f"--config.data.{which}: no annotation file given "
                             f"(data.source={src})")
    from etils import epath

    if not epath.Path(path).is_file():
        raise cli.UsageError(f"--config.data.{which}={path}: no such file")
    if src == "qvhighlights":
        records = load_qvhighlights(path, strict=False)
    elif src == "charades":
        records = load_charades_sta(path, config.data.charades_durations, strict=False)
    else:
        records = load_jsonl(path, strict=False)
    if not records:
        raise cli.UsageError(f"{path}: no usable example, every line was skipped: "
                             f"{records.skipped_summary()}")
    return records


def synthetic_spec(config, which: str):
    """The synthetic videos of `data.synthetic_<which>` (train or val: val has its own seed,
    so its videos are held out)."""
    from tempo_jax.data.synthetic import SyntheticSpec

    d = config.data
    # fields older configs lack fall back to SyntheticSpec's own defaults
    look = {f: d[k] for f, k in (("width", "synthetic_width"), ("height", "synthetic_height"),
                                 ("object_scale", "synthetic_object_scale"),
                                 ("tint", "synthetic_tint"),
                                 ("texture_contrast", "synthetic_texture_contrast"),
                                 ("whole_frame_single", "synthetic_whole_frame")) if k in d}
    colours = tuple(x.strip() for x in d.get("synthetic_colours", "").split(",") if x.strip())
    return SyntheticSpec(
        num=d[f"synthetic_{which}"], seed=config.seed + (10_000 if which == "val" else 0),
        min_duration=d.synthetic_min_duration, max_duration=d.synthetic_max_duration,
        max_events=d.synthetic_max_events, distractor_prob=d.synthetic_distractor_prob,
        min_event_fraction=d.synthetic_min_event, max_event_fraction=d.synthetic_max_event,
        colours=colours or None, **look)


def prepare_data(config, workdir: Path) -> Data:
    """Records for training (with PIR pairs) and evaluation; synthetic videos are generated
    under the workdir when absent."""
    if config.data.source == "synthetic":
        from tempo_jax.data.synthetic import different_colours, generate

        root = workdir / "data"
        generate(root / "train", synthetic_spec(config, "train"))
        generate(root / "val", synthetic_spec(config, "val"))
        train = [r for r in load_jsonl(root / "train" / "annotations.jsonl") if r["relevant"]]
        val = list(load_jsonl(root / "val" / "annotations.jsonl"))
        for r in train:
            r["video"] = "train/" + r["video"]
        for r in val:
            r["video"] = "val/" + r["video"]
        video_root = str(root)
        compatible = different_colours  # a donor of the same colour would be a true match
    else:
        train, val = _load_records(config, "train"), _load_records(config, "val")
        video_root = config.data.video_root
        compatible = None
    val = val + cross_pairs(val, config.data.get("val_cross_pairs", 0), config.seed, compatible)
    if config.data.cache_examples and config.data.get("pir_resample", False):
        return Data(train=list(train), val=list(val), video_root=video_root,
                    pir_ratio=config.data.irrelevant_ratio, pir_compatible=compatible)
    train = make_pir_pairs(train, config.data.irrelevant_ratio, seed=config.seed,
                           compatible=compatible)
    return Data(train=list(train), val=list(val), video_root=video_root)


def cross_pairs(val: list[dict], per_video: int, seed: int, compatible=None) -> list[dict]:
    """`per_video` irrelevant pairs per held-out video: its video with the query of another
    held-out video (qid `<own>|pir:<donor>`). Unlike a generator's own refusal queries, the
    model never saw these queries with these videos: refusing them shows it checks the video
    against the query rather than recognising refusal queries."""
    relevant = [r for r in val if r.get("relevant", True)]
    if per_video <= 0 or len({r["video"] for r in relevant}) < 2:
        return []
    out = []
    for k in range(per_video):
        pairs = make_pir_pairs(relevant, 1.0, seed=seed + 7919 * (k + 1), compatible=compatible)
        out += [p for p in pairs if not p["relevant"]]
    return out


def load_all(records, video_root, pcfg, vision, desc) -> list[dict]:
    """Process every record once (cached mode), skipping and counting broken ones."""
    from tqdm import tqdm

    tok = prompts_lib.load_tokenizer(pcfg.tokenizer_path, family=vision_family(vision))
    videos = VideoIndex(video_root)
    out, skipped = [], []
    for r in tqdm(records, desc=desc, unit="video", file=sys.stdout, mininterval=2):
        try:
            out.append(load_example(r, videos, tok, pcfg, vision))
        except (ValueError, FileNotFoundError) as e:
            skipped.append(f"{r.get('qid')}: {' '.join(str(e).split())}")
            log.warning("skipping %s", skipped[-1])
    if skipped:
        log.warning("%s: skipped %d of %d examples", desc, len(skipped), len(records))
    if not out:
        raise cli.UsageError(f"{desc} under {video_root}: no example could be loaded, "
                             f"{skipped_summary(skipped)}")
    return out


def answer_targets(loss_mask: np.ndarray, input_ids: np.ndarray, k: int | None = None):
    """Positions whose logits predict the answer tokens: [B, K] (K bucketed, or `k`), the
    target ids and a validity mask. Only these positions go through the 150k-entry LM head."""
    rows = [np.flatnonzero(m) for m in loss_mask]
    k = k or bucket(max(1, max(len(r) for r in rows)), 8)
    pos = np.zeros((len(rows), k), np.int32)
    valid = np.zeros((len(rows), k), bool)
    for i, r in enumerate(rows):
        pos[i, :len(r)] = r
        valid[i, :len(r)] = True
    tgt = np.take_along_axis(input_ids, pos, axis=1).astype(np.int32)
    return np.maximum(pos - 1, 0), tgt, valid


def micro_targets(batches: list[dict]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """`answer_targets` of each micro-batch of one step, all with the same K (the largest
    any needs), so that they stack."""
    k = max(answer_targets(b["loss_mask"], b["input_ids"])[0].shape[1] for b in batches)
    return [answer_targets(b["loss_mask"], b["input_ids"], k) for b in batches]


def as_step_args(micro: list[tuple]) -> tuple:
    """The step arguments of one micro-batch as they are, of several as one tuple per
    argument (what `steps.sft_grad` / `grpo_grad` accumulate over)."""
    return micro[0] if len(micro) == 1 else tuple(zip(*micro, strict=True))


def decode_start(batch) -> np.ndarray:
    from tempo_jax.models.positions import decode_start

    return decode_start(batch["position_ids"], batch["attention_mask"])


def prompt_examples(examples: list[dict]) -> list[dict]:
    """Drop the answer from processed SFT examples (rollout / evaluation prompts)."""
    out = []
    for ex in examples:
        # the answer is the tail of the sequence: everything up to the first answer token
        mask = ex["loss_mask"]
        first = int(np.argmax(mask)) if mask.any() else len(mask)
        new = dict(ex)
        new["input_ids"] = ex["input_ids"][:first]
        new["position_ids"] = ex["position_ids"][:, :first]
        new["loss_mask"] = np.zeros(first, bool)
        out.append(new)
    return out


def chunks(items: list, accum: int) -> list[list]:
    accum = max(1, min(accum, len(items)))
    size = math.ceil(len(items) / accum)
    return [items[i:i + size] for i in range(0, len(items), size)]


class PirSampler:
    """The examples of one step, a function of (seed, stage, step) only, so a resumed run
    sees exactly the batches an uninterrupted one would. With `data.pir_ratio` (PIR drawn
    afresh) it rebuilds examples with another video's query: only the text changes, so a
    pair costs a tokenization, not a decode, and a new pairing can be drawn every step (fixed
    pairs are learnt by heart on a small dataset instead of by looking at the video)."""

    def __init__(self, data: Data, tokenizer: Any, vision: Any):
        self.data, self.tokenizer, self.vision = data, tokenizer, vision
        self._records_by_qid: dict | None = None  # built once, on first use

    def pick(self, examples: list[dict], rng: np.random.Generator, batch_size: int,
             pcfg: PipelineConfig | None = None, *, contrast_share: float = 0.0,
             irrelevant: int = -1) -> list[dict]:
        """`batch_size` examples: `contrast_share` of the rows are contrast pairs (a video
        with its own query, then with another video's); of the other rows, exactly
        `irrelevant` become PIR pairs (-1: each with probability `data.pir_ratio`)."""
        data = self.data
        pir = data.pir_ratio > 0
        n_pairs = int(round(contrast_share * batch_size / 2)) if pir else 0
        n_plain = batch_size - 2 * n_pairs
        idx = rng.choice(len(examples), size=n_pairs + n_plain,
                         replace=len(examples) < n_pairs + n_plain)
        plain = [examples[i] for i in idx[n_pairs:]]
        if pir:
            if irrelevant >= 0:
                slots = rng.choice(n_plain, size=min(irrelevant, n_plain), replace=False)
            else:
                slots = np.flatnonzero(rng.random(n_plain) < data.pir_ratio)
            for j in slots:
                plain[j] = self.irrelevant(plain[j], examples, rng, pcfg)
        pairs = []
        for i in idx[:n_pairs]:
            pairs += [examples[i], self.irrelevant(examples[i], examples, rng, pcfg)]
        return pairs + plain

    def irrelevant(self, ex: dict, examples: list[dict], rng: np.random.Generator,
                   pcfg: PipelineConfig) -> dict:
        """`ex`'s processed video with the query of another video's example (a PIR pair),
        rebuilt the way `load_example` builds a prompt."""
        own = {"query": ex["query"], **self._record(ex["qid"])}
        for _ in range(1000):
            donor = examples[int(rng.integers(len(examples)))]
            if donor["video"] != ex["video"] and (
                    self.data.pir_compatible is None or self.data.pir_compatible(own, donor)):
                break
        else:
            raise ValueError(f"no compatible PIR donor for {ex['qid']!r}")
        pair = with_query(ex, donor["query"], self.tokenizer, pcfg, self.vision)
        return {**pair, "windows": [], "relevant": False,
                "qid": f"{ex['qid']}|pir:{donor['qid']}"}

    def _record(self, qid: str) -> dict:
        if self._records_by_qid is None:
            self._records_by_qid = {str(r["qid"]): r for r in self.data.train}
        return self._records_by_qid.get(str(qid), {})
