"""Running an exported Tempo-R0 model with `transformers` (PyTorch).

Why this module exists: an export (`python -m tempo_jax.export`) is a stock
`Qwen2_5_VLForConditionalGeneration` (or, for a Qwen3-VL backbone,
`Qwen3VLForConditionalGeneration`), but its *inputs* are not stock. Under ETA every temporal
patch is its own vision segment preceded by its timestamp as text, frames are chosen by SAA,
and the M-RoPE positions come from the frames' real times. No transformers processor builds
that, and transformers 5.x recomputes (differently) the positions itself unless they are
passed. So:

    from transformers import Qwen2_5_VLForConditionalGeneration
    from tempo_jax import hf

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir).eval()
    settings = hf.load_settings(out_dir)
    inputs = hf.prepare_inputs("video.mp4", "the person opens the door", settings)
    print(hf.greedy_generate(model, inputs, max_new_tokens=64))  # "<answer>3.0 to 7.5</answer>"

`prepare_inputs` runs our own data pipeline (`tempo_jax.data.pipeline.load_example`), so the
prompt, the pixels and the positions are byte-identical to what our evaluator feeds the JAX
model; `greedy_generate` passes explicit positions at every step.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data.pipeline import PipelineConfig, config_from_settings, load_example
from tempo_jax.data.processor import QWEN2_5_VL, vision_family
from tempo_jax.data.sources import VideoIndex
from tempo_jax.models import families

__all__ = [
    "SETTINGS_FILE", "load_settings", "pipeline_config", "prepare_inputs", "greedy_ids",
    "greedy_generate",
]

SETTINGS_FILE = "tempo_settings.json"
# the vision geometry the pipeline needs (frames per temporal patch, merge, rotary time scale:
# Qwen2.5-VL only), with `family` (absent: Qwen2.5-VL, as exports before Qwen3-VL)
_VISION_KEYS = ("patch_size", "temporal_patch_size", "spatial_merge_size", "tokens_per_second")


def load_settings(hf_dir: str | Path) -> dict[str, Any]:
    """The SAA / ETA / prompt settings saved with an export (`tempo_settings.json`).

    They are part of the model: the same weights with other settings see other inputs. Also
    adds `vision` (the backbone family and patch geometry from the export's `config.json`,
    which the frame sizes, the prompt's token counts and positions depend on) and `hf_dir`
    (where `prepare_inputs` finds the tokenizer).
    """
    hf_dir = Path(hf_dir)
    path = hf_dir / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {hf_dir} is not a Tempo-R0 export (write one with "
            f"`python -m tempo_jax.export --checkpoint WORKDIR --out {hf_dir}`); without the "
            f"settings the model's SAA / ETA inputs cannot be rebuilt")
    settings = json.loads(path.read_text())
    if (hf_dir / "config.json").is_file():
        vision = families.config_from_pretrained(hf_dir).vision
        settings.setdefault("vision", {"family": vision_family(vision),
                                       **{k: getattr(vision, k) for k in _VISION_KEYS
                                          if hasattr(vision, k)}})
    settings.setdefault("hf_dir", str(hf_dir.absolute()))
    return settings


def pipeline_config(settings: dict[str, Any]) -> PipelineConfig:
    """The evaluator's pipeline settings (`training.setup.pipeline_config(...)`) for
    one prompt, from the saved settings (fields absent there keep their defaults, as in
    training)."""
    return config_from_settings(settings, batch_size=1, with_answer=False, pad_side="left",
                                shuffle=False, num_epochs=1)


def _family(settings: dict[str, Any]) -> str:
    return settings.get("vision", {}).get("family", QWEN2_5_VL)


def _vision_config(settings: dict[str, Any]):
    """The family's `VisionConfig` with the saved geometry (other fields: defaults, unused by
    the data pipeline)."""
    cls = families.submodule(_family(settings), "config").VisionConfig
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in settings.get("vision", {}).items()
                  if k in _VISION_KEYS and k in names})


def _tokenizer(settings: dict[str, Any]):
    hf_dir = settings.get("hf_dir")
    family = _family(settings)
    if hf_dir and (Path(hf_dir) / "tokenizer_config.json").is_file():
        return prompts_lib.load_tokenizer(str(hf_dir), family=family)
    return prompts_lib.load_tokenizer(None, family=family)


def prepare_inputs(
    video_path: str | Path,
    query: str,
    settings: dict[str, Any] | str | Path,
    *,
    tokenizer=None,
    return_tensors: str = "pt",
) -> dict[str, Any]:
    """Model inputs for one video and query, exactly as our evaluator builds them.

    Returns `input_ids` [1, L], `attention_mask` [1, L], `pixel_values_videos` [N, 3*2*p*p]
    (p the patch size: 1176 columns for Qwen2.5-VL, 1536 for Qwen3-VL), `video_grid_thw`
    [K, 3] (one `(1, h, w)` grid per temporal patch: ETA segments),
    `position_ids` [3, 1, L] (the ETA M-RoPE positions; pass them to the model, which would
    otherwise compute stock ones), and, for information only, `frame_times` [2K] (seconds of
    the frames SAA chose). torch tensors, or numpy with `return_tensors="np"`.

    `settings`: `load_settings(hf_dir)` (or the export directory itself). `tokenizer`: default
    the export's own, else the family's offline tokenizer the trainer uses.
    """
    if return_tensors not in ("pt", "np"):
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
    if not isinstance(settings, dict):
        settings = load_settings(settings)
    path = Path(video_path)
    if not path.is_file():
        raise FileNotFoundError(f"video {path} not found")
    tok = tokenizer if tokenizer is not None else _tokenizer(settings)
    vision = _vision_config(settings)
    exts = (path.suffix,) if path.suffix else (".mp4",)
    videos = VideoIndex(path.parent.absolute(), exts=exts, recursive=False)
    record = {"video": path.name, "query": query, "relevant": True, "windows": []}
    ex = load_example(record, videos, tok, pipeline_config(settings), vision)
    ids = np.asarray(ex["input_ids"], np.int64)[None]
    out = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "pixel_values_videos": np.asarray(ex["pixel_values"], np.float32),
        "video_grid_thw": np.asarray(ex["video_grid_thw"], np.int64),
        "position_ids": np.asarray(ex["position_ids"], np.int64)[:, None, :],
        "frame_times": np.asarray(ex["frame_times"], np.float64),
    }
    if return_tensors == "np":
        return out
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}


def greedy_ids(
    model,
    inputs: dict[str, Any],
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    *,
    use_cache: bool = True,
    return_logits: bool = False,
) -> list[int] | tuple[list[int], np.ndarray]:
    """Greedy token ids after the prompt (the stopping eos included, like our evaluator);
    with `return_logits`, also the fp32 logits [T, vocab] each token was chosen from.

    Each new token t sits at `max(prompt positions) + 1 + t` on all three rows, as in the
    original Qwen2.5-VL and our JAX decoder. Why a loop of our own: `model.generate` without
    `position_ids` computes stock M-RoPE positions (and `rope_deltas`) that ignore ETA; given
    `position_ids` (transformers 5.23) it continues at `last prompt position + 1`, which equals
    ours only because our prompts end in text, and that is version-dependent behaviour.
    `use_cache=False` recomputes the whole sequence each step (the slow reference); both give
    the same ids.
    """
    import torch

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids = torch.as_tensor(inputs["input_ids"]).long()
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"greedy_ids takes one prompt: input_ids [1, L], got {tuple(ids.shape)}")
    eos = set(prompts_lib.EOS_IDS if eos_token_id is None
              else np.atleast_1d(eos_token_id).tolist())
    dev = model.device
    ids = ids.to(dev)
    mask = torch.as_tensor(inputs.get("attention_mask", torch.ones_like(ids))).long().to(dev)
    pos = torch.as_tensor(inputs["position_ids"]).long().to(dev)
    if pos.shape != (3, *ids.shape):
        raise ValueError(f"position_ids must be [3, 1, L] = {(3, *ids.shape)}, "
                         f"got {tuple(pos.shape)}")
    vision = {}
    for name in ("pixel_values_videos", "pixel_values"):
        if inputs.get(name) is not None:
            vision[name] = torch.as_tensor(inputs[name]).to(dev)
    for name in ("video_grid_thw", "image_grid_thw"):
        if inputs.get(name) is not None:
            vision[name] = torch.as_tensor(inputs[name]).long().to(dev)
    start = int(pos[:, 0, mask[0].bool()].max()) + 1
    out: list[int] = []
    scores = []
    with torch.no_grad():
        res = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=use_cache,
                    logits_to_keep=1, **vision)
        for t in range(max_new_tokens):
            logits = res.logits[0, -1]
            tok = int(logits.argmax())
            out.append(tok)
            if return_logits:
                scores.append(logits.float().cpu().numpy())
            if tok in eos or t == max_new_tokens - 1:
                break
            new = torch.tensor([[tok]], device=dev)
            new_pos = torch.full((3, 1, 1), start + t, dtype=torch.long, device=dev)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            if use_cache:
                res = model(input_ids=new, attention_mask=mask, position_ids=new_pos,
                            past_key_values=res.past_key_values, use_cache=True)
            else:
                ids = torch.cat([ids, new], dim=1)
                pos = torch.cat([pos, new_pos], dim=2)
                res = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                            use_cache=False, logits_to_keep=1, **vision)
    return (out, np.stack(scores)) if return_logits else out


def greedy_generate(
    model,
    inputs: dict[str, Any],
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | tuple[int, ...] | None = None,
    *,
    tokenizer=None,
    use_cache: bool = True,
) -> str:
    """The greedy answer text (special tokens dropped, as our evaluator decodes it), e.g.
    `<answer>3 to 8</answer>`. `eos_token_id` defaults to `<|im_end|>` and `<|endoftext|>`;
    `tokenizer` to the one saved beside the model (else the offline tokenizer of the model's
    family, its config's `model_type`)."""
    ids = greedy_ids(model, inputs, max_new_tokens, eos_token_id, use_cache=use_cache)
    if tokenizer is None:
        src = getattr(model, "name_or_path", "") or ""
        has_tok = src and (Path(src) / "tokenizer_config.json").is_file()
        family = getattr(getattr(model, "config", None), "model_type", None)
        tokenizer = prompts_lib.load_tokenizer(
            src if has_tok else None,
            family=family if family in families.FAMILIES else QWEN2_5_VL)
    return tokenizer.decode(ids, skip_special_tokens=True)
