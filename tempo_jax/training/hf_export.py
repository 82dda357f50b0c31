"""The Hugging Face directory of a model: weights in the released safetensors layout, the
SAA / ETA / prompt settings (`tempo_settings.json`, part of the model: see `tempo_jax.hf`),
and the tokenizer and processor files. The one export path: the trainer's `hf/` and
`python -m tempo_jax.export` both write through `save_hf`."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections
from etils import epath
from flax import nnx

from tempo_jax import fileio
from tempo_jax.data import processor as processor_lib
from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data import saa as saa_lib
from tempo_jax.distributed import is_main
from tempo_jax.models import families
from tempo_jax.training.setup import SETTINGS_FILE, settings_dict

log = logging.getLogger("tempo_jax.train")

# tokenizer / processor files of a released Qwen2.5-VL checkpoint, copied when present
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "chat_template.jsonl", "generation_config.json",
)


# the released checkpoints' processor classes, per family
PROCESSOR_CLASSES = {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}


def preprocessor_config(config: ml_collections.ConfigDict, model: nnx.Module) -> dict:
    """A `preprocessor_config.json` of the model's family (the released layout) for an export
    without a source checkpoint: the per-frame pixel range of the SAA settings and the model's
    patch geometry and normalisation. Stock processors do not apply SAA or ETA;
    `tempo_jax.hf.prepare_inputs` does."""
    saa = saa_lib.SAAConfig.from_dict(config.saa.to_dict())
    v = model.config.vision
    spec = processor_lib.patch_spec(v)
    min_px, max_px = saa.pixel_bounds(spec.factor)
    return {
        "min_pixels": min_px,
        "max_pixels": max_px,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
        "image_mean": list(spec.mean),
        "image_std": list(spec.std),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": PROCESSOR_CLASSES[families.family_of(model)],
    }


def write_tokenizer_files(config: ml_collections.ConfigDict, model: nnx.Module | None,
                          out: Path) -> list[str]:
    """Tokenizer and processor files: copied from `model.init_checkpoint` when set (whichever
    of `TOKENIZER_FILES` it has), else the offline Qwen2.5 tokenizer the trainer used plus a
    `preprocessor_config.json` from the settings. Returns the file names written."""
    out = Path(out)
    src = config.model.get("init_checkpoint") or ""
    written = []
    if src:
        src_path = epath.Path(src)
        for name in TOKENIZER_FILES:
            f = src_path / name
            if f.exists():
                (out / name).write_bytes(f.read_bytes())
                written.append(name)
        if "tokenizer.json" not in written and "vocab.json" not in written:
            raise FileNotFoundError(f"{src}: model.init_checkpoint has no tokenizer files "
                                    f"(tokenizer.json or vocab.json + merges.txt)")
        return written
    family = families.family_of(model)
    saved = prompts_lib.load_tokenizer(None, family=family).save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(config, model), indent=2) + "\n")
    return sorted({Path(f).name for f in saved} | {"preprocessor_config.json"})


def check_out_dir(out: str | Path) -> Path:
    """`out` as an absolute path, if writing an export there replaces nothing but an earlier
    export (a directory with other files is the user's, not ours to replace)."""
    out = Path(out).absolute()
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ValueError(f"{out}: exists and is not a Hugging Face directory (no config.json); "
                         "it would be replaced: choose a new or empty directory")
    return out


def save_hf(config: ml_collections.ConfigDict, model: nnx.Module, out: str | Path) -> Path:
    """Write `model` (trained with `config`) as a Hugging Face directory at `out`, all or
    nothing (written aside, then moved into place: `out` is a whole export or the previous
    one). On several hosts every process calls it (tensors are gathered one at a time) and
    process 0 writes."""
    out = check_out_dir(out)
    main = is_main()
    with fileio.replace_dir(out, write=main) as stage:
        files = families.save_pretrained(model, stage)
        if main:
            log.info("weights: %s", ", ".join(Path(f).name for f in files))
            (stage / SETTINGS_FILE).write_text(json.dumps(settings_dict(config), indent=2))
            names = write_tokenizer_files(config, model, stage)
            log.info("settings: %s; tokenizer / processor: %s", SETTINGS_FILE, ", ".join(names))
    return out
