"""`python -m tempo_jax.export --checkpoint WORKDIR [--step N] --out HF_DIR`.

Turns any Orbax checkpoint of a training workdir (not only the final one that `train.run`
exports) into a Hugging Face directory that `transformers` loads as a stock
`Qwen2_5_VLForConditionalGeneration`: the weights in the released safetensors layout, the
SAA / ETA / prompt settings (`tempo_settings.json`, part of the model: see `tempo_jax.hf` for
the inputs they define), and the tokenizer and processor files.

Checkpoints hold the *trainable* parameters only; the frozen ones (the vision tower when
`model.freeze_vision`) are rebuilt exactly as training built them (the config's random init
with its seed, or `model.init_checkpoint`), since training never changes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections
from etils import epath
from flax import nnx

from tempo_jax import fileio
from tempo_jax import train as train_lib
from tempo_jax.data import processor as processor_lib
from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data import saa as saa_lib
from tempo_jax.models.qwen2_5_vl import Qwen25VL
from tempo_jax.models.qwen2_5_vl.params import save_pretrained

log = logging.getLogger("tempo_jax.export")

SETTINGS_FILE = train_lib.SETTINGS_FILE
# tokenizer / processor files of a released Qwen2.5-VL checkpoint, copied when present
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "chat_template.jsonl", "generation_config.json",
)


@contextlib.contextmanager
def _quiet_absl():
    """A read-only CheckpointManager warns three times that it is read-only: expected here."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The run's config, as `train.run` wrote it to `workdir/config.json`."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{workdir}: no config.json; not a tempo_jax.train workdir (expected "
            f"config.json and ckpt/ written by `python -m tempo_jax.train --workdir ...`)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _manager(workdir: Path):
    import orbax.checkpoint as ocp

    ckpt = workdir / "ckpt"
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{workdir}: no checkpoints (no {ckpt} directory)")
    with _quiet_absl():
        return ocp.CheckpointManager(ckpt, options=ocp.CheckpointManagerOptions(read_only=True))


def available_steps(workdir: str | Path) -> list[int]:
    """The (global) steps of the complete checkpoints in a workdir, ascending."""
    mngr = _manager(Path(workdir).absolute())
    try:
        return sorted(mngr.all_steps())
    finally:
        mngr.close()


def uncommitted_steps(workdir: str | Path) -> dict[int, str]:
    """Steps whose save started but never committed (Orbax's `<step>.orbax-checkpoint-tmp*`
    directories): never listed or restored, named here so that asking for one gets a clear
    answer rather than "no such step"."""
    out = {}
    for p in (Path(workdir) / "ckpt").glob("*.orbax-checkpoint-tmp*"):
        head = p.name.split(".", 1)[0]
        if head.isdigit():
            out[int(head)] = str(p)
    return out


def load_workdir(workdir: str | Path, step: int | None = None
                 ) -> tuple[ml_collections.ConfigDict, Qwen25VL]:
    """(config, model) of a training workdir at checkpoint `step` (default: the latest).

    Steps are the checkpoint manager's global steps (SFT steps, then SFT + GRPO steps when both
    stages ran), as listed under `workdir/ckpt`. Only `state.params` is read (a partial
    restore: no optimizer state in memory); the frozen parameters come from the config.
    """
    workdir = Path(workdir).absolute()  # Orbax wants absolute paths
    config = load_config(workdir)
    mngr = _manager(workdir)
    try:
        steps = sorted(mngr.all_steps())
        partial = uncommitted_steps(workdir).get(step) if step not in steps else None
        if partial:
            raise ValueError(
                f"{workdir}: the checkpoint at step {step} is incomplete ({partial}: its save "
                "never committed; the run was killed while saving, or is still saving); "
                f"committed steps: {', '.join(map(str, steps)) or 'none'}")
        if not steps:
            raise FileNotFoundError(f"{workdir}: no checkpoints under {workdir / 'ckpt'}")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"{workdir}: no checkpoint at step {step}; available steps: "
                             f"{', '.join(map(str, steps))}")
        meta = train_lib.checkpoint_meta(mngr, step)
        log.info("checkpoint %d of %s (%s step %s)", step, workdir, meta.get("stage"),
                 meta.get("step"))
        model = train_lib.build_model(config)
        graphdef, params, frozen = nnx.split(model, train_lib.trainable_filter(config), ...)
        restored = train_lib.restore_params(mngr, step, params)
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(params, restored)
    return config, nnx.merge(graphdef, params, frozen)


def preprocessor_config(config: ml_collections.ConfigDict, model: Qwen25VL) -> dict:
    """A Qwen2.5-VL `preprocessor_config.json` (the released layout) for an export without a
    source checkpoint: the per-frame pixel range of the SAA settings and the model's patch
    geometry. Stock processors do not apply SAA or ETA; `tempo_jax.hf.prepare_inputs` does."""
    saa = saa_lib.SAAConfig.from_dict(config.saa.to_dict())
    v = model.config.vision
    return {
        "min_pixels": saa.min_pixels,
        "max_pixels": saa.max_pixels,
        "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size,
        "merge_size": v.spatial_merge_size,
        "image_mean": list(processor_lib.CLIP_MEAN),
        "image_std": list(processor_lib.CLIP_STD),
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
    }


def write_tokenizer_files(config: ml_collections.ConfigDict, model: Qwen25VL | None,
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
    saved = prompts_lib.load_tokenizer(None).save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(config, model), indent=2) + "\n")
    return sorted({Path(f).name for f in saved} | {"preprocessor_config.json"})


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the Hugging Face directory of checkpoint `step` (default: latest) of `workdir`."""
    out = Path(out).absolute()
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").exists():
        raise ValueError(f"{out}: exists and is not a Hugging Face directory (no config.json); "
                         "it would be replaced: choose a new or empty --out")
    log.info("loading %s (step %s)", workdir, "latest" if step is None else step)
    config, model = load_workdir(workdir, step)
    # written aside, then moved into place: `out` is a whole export or the previous one
    with fileio.replace_dir(out) as stage:
        files = save_pretrained(model, stage)
        log.info("weights: %s", ", ".join(Path(f).name for f in files))
        (stage / SETTINGS_FILE).write_text(json.dumps(train_lib.settings_dict(config),
                                                      indent=2))
        log.info("settings: %s", SETTINGS_FILE)
        names = write_tokenizer_files(config, model, stage)
        log.info("tokenizer / processor: %s", ", ".join(names))
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(
        prog="python -m tempo_jax.export",
        description="Export a checkpoint of a training workdir as a Hugging Face directory.")
    ap.add_argument("--checkpoint", required=True,
                    help="training workdir (holds config.json and ckpt/)")
    ap.add_argument("--step", type=int, default=None,
                    help="checkpoint step (default: the latest)")
    ap.add_argument("--out", required=True, help="output Hugging Face directory")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = export(args.checkpoint, args.out, args.step)
    print(out)
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # a clear message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
