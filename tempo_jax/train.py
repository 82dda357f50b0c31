"""`python -m tempo_jax.train`: SFT, then PIR-GRPO, on a Qwen2.5-VL backbone.

With no flags it runs the `tiny` config on synthetic videos (the CPU demo) into `runs/demo`.
The command line only: the training itself is `tempo_jax.training` (set-up, the one step
factory, checkpoints, logging, the loop both stages share, the SFT and GRPO stages,
evaluation, export and report). Orbax checkpoints (async) every `ckpt_every` steps; a restart
with the same `--workdir` resumes from the last one (SIGTERM saves before exiting).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from tempo_jax import cli, fileio
from tempo_jax.data.pipeline import NoUsableData
from tempo_jax.training.trainer import REPORT_KEYS, NoSpace, NothingToResume, run

__all__ = ["REPORT_KEYS", "main", "run"]


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m tempo_jax.train [--config FILE:ARG] [--workdir DIR] [--config.a.b=V ...]`.

    A mistake in the arguments or the data (an unknown config size or field, a value of the
    wrong type, an annotation file with no usable line), a workdir another trainer is
    writing, a full disk, or a workdir none of whose checkpoints reads back is one `error:`
    line and exit status 2; SIGTERM exits 0 once its checkpoint is committed."""
    import argparse

    from absl import flags

    from tempo_jax import distributed

    ap = argparse.ArgumentParser(
        prog="python -m tempo_jax.train",
        description="SFT then PIR-GRPO; any config field can be overridden with "
                    "--config.SECTION.FIELD=VALUE (e.g. --config.rl.beta=0).")
    ap.add_argument("--config", default=cli.DEFAULT_CONFIG,
                    help="config file and argument (default: the tiny CPU demo, %(default)s)")
    ap.add_argument("--workdir", default="runs/demo", help="checkpoints, logs, plots, report")
    ap.add_argument("--multihost", action="store_true",
                    help="call jax.distributed.initialize() (auto-detected from "
                         "JAX_COORDINATOR_ADDRESS, SLURM and TPU pod variables otherwise)")
    args, rest = ap.parse_known_args(argv)
    config = cli.load_config(args.config)
    cli.apply_overrides(config, rest)
    flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
    cli.setup_logging(logging.INFO)
    distributed.initialize(force=args.multihost)
    report = run(config, args.workdir)
    print(json.dumps(report))  # preempted: exit 0 after the committed checkpoint
    return report


if __name__ == "__main__":
    cli.run_main(main, user_errors=(NoUsableData, NothingToResume, NoSpace, fileio.Busy))
