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
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tempo_jax import cli
from tempo_jax.training.checkpoints import (  # noqa: F401  (the workdir readers, re-exported)
    available_steps,
    load_config,
    load_workdir,
    uncommitted_steps,
)
from tempo_jax.training.hf_export import (  # noqa: F401
    TOKENIZER_FILES,
    check_out_dir,
    preprocessor_config,
    save_hf,
    write_tokenizer_files,
)
from tempo_jax.training.setup import SETTINGS_FILE  # noqa: F401

log = logging.getLogger("tempo_jax.export")


def export(workdir: str | Path, out: str | Path, step: int | None = None) -> Path:
    """Write the Hugging Face directory of checkpoint `step` (default: latest) of `workdir`:
    what the trainer writes to `workdir/hf` after its last stage, for any checkpoint."""
    out = check_out_dir(out)  # before the (slow) load
    log.info("loading %s (step %s)", workdir, "latest" if step is None else step)
    config, model = load_workdir(workdir, step)
    return save_hf(config, model, out)


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
    cli.setup_logging(logging.INFO)
    out = export(args.checkpoint, args.out, args.step)
    print(out)
    return out


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:  # a clear message, not a traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
