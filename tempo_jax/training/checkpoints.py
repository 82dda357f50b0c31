"""Checkpoints: one Orbax manager per workdir (async saves of the trainable parameters,
optimizer state, RNG and data position, with the stage, step and settings as JSON metadata),
the stage -> global step numbering, restores, the reference model, and reading a workdir's
model back (export, evaluation).

A save cut short leaves `<step>.orbax-checkpoint-tmp`: never listed or restored, and removed
when the next run opens the manager. A committed checkpoint that cannot be read back (a
truncated or deleted array file, corrupt metadata) is moved to `ckpt.damaged/` once an older
one is found that reads (`Trainer.resume`), never restored from and never silently skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from tempo_jax.cli import UsageError
from tempo_jax.distributed import is_main, sync
from tempo_jax.training import setup

log = logging.getLogger("tempo_jax.train")


def checkpoint_meta(manager, step: int) -> dict:
    """The JSON metadata (stage, step, settings, data position) of checkpoint `step`."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(manager, step: int, params: nnx.State) -> dict:
    """The trainable parameters of checkpoint `step`, shaped like `params`, as a pure dict
    (a partial restore: the optimizer state is not read)."""
    import orbax.checkpoint as ocp

    item = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))}
    with _layout_checked(manager, step, item["params"]):
        got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)))
    return got["state"]["params"]


class LayoutMismatch(UsageError):
    """A checkpoint saved with the other `model.scan_layers` than the model restoring it."""


def _layout(params: dict) -> str | None:
    """'scanned' (stacked decoder layers) or 'unrolled', from a pure parameter dict."""
    layers = params.get("model", {}).get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, dict) or not layers:
        return None
    return "unrolled" if all(isinstance(k, int) or str(k).isdigit() for k in layers) \
        else "scanned"


def saved_layout(directory: Path, step: int) -> str | None:
    """The decoder layers' layout of checkpoint `step` ('scanned' / 'unrolled'), read from
    Orbax's tree metadata; None when it cannot tell."""
    import ast

    try:
        keys = json.loads((Path(directory) / str(step) / "state" / "_METADATA").read_text())[
            "tree_metadata"]
    except (OSError, ValueError, KeyError):
        return None
    for k in keys:
        try:
            parts = ast.literal_eval(k)
        except (ValueError, SyntaxError):
            continue
        if tuple(parts[:3]) == ("params", "model", "layers") and len(parts) > 3:
            return "unrolled" if str(parts[3]).isdigit() else "scanned"
    return None


@contextlib.contextmanager
def _layout_checked(manager, step: int, params: dict):
    """A restore that fails because the checkpoint's decoder layout is not the model's says
    so (and which switch to flip) instead of Orbax's tree mismatch."""
    try:
        yield
    except Exception as e:
        saved, mine = saved_layout(manager.directory, step), _layout(params)
        if saved and mine and saved != mine:
            raise LayoutMismatch(
                f"checkpoint {step} under {manager.directory} has {saved} decoder layers "
                f"(model.scan_layers={saved == 'scanned'}) and this model {mine} ones: rerun "
                f"with --config.model.scan_layers={saved == 'scanned'} (to change the layout, "
                "export to Hugging Face format and start from it: both layouts load it)") from e
        raise


class DamagedCheckpoint(Exception):
    """A committed checkpoint that cannot be read back."""

    def __init__(self, step: int, cause: BaseException):
        self.step, self.cause = step, cause
        first = " ".join(str(cause).split())[:300]
        super().__init__(f"checkpoint {step} cannot be read ({type(cause).__name__}: {first})")


class Checkpoints:
    """The checkpoint manager of one workdir, numbered by global step: the stages of
    `config.stages` one after another (SFT steps, then SFT + GRPO steps).

    The last `ckpt_keep` checkpoints are kept, and the one that ends SFT when GRPO follows:
    it is GRPO's frozen reference, which a resume in the middle of GRPO must read again."""

    def __init__(self, directory: Path, config: ml_collections.ConfigDict):
        import orbax.checkpoint as ocp
        from orbax.checkpoint import checkpoint_managers as policies

        self.config = config
        self.directory = Path(directory).absolute()
        keep: list = [policies.LatestN(n=config.ckpt_keep)]
        if "grpo" in self.stages()[1:] and "sft" in self.stages():
            keep.append(policies.CustomSteps(steps=[self.global_step("grpo", 0)]))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=policies.AnyPreservationPolicy(keep),
                enable_async_checkpointing=True, cleanup_tmp_directories=True),
        )

    def stages(self) -> list[str]:
        return [s.strip() for s in self.config.stages.split(",") if s.strip()]

    def stage_steps(self, stage: str) -> int:
        return self.config.sft.steps if stage == "sft" else self.config.rl.steps

    def global_step(self, stage: str, step: int) -> int:
        offset = 0
        for s in self.stages():
            if s == stage:
                return offset + step
            offset += self.stage_steps(s)
        raise ValueError(f"unknown stage {stage!r}")

    def stage_end(self, stage: str) -> int:
        """The global step at which `stage` ends (its checkpoint's number)."""
        return self.global_step(stage, self.stage_steps(stage))

    def save(self, stage: str, step: int, params: nnx.State, opt_state, rng,
             extra: dict | None = None) -> None:
        """Start an async save of `stage` step `step`; `close` / `committing` wait for it."""
        import orbax.checkpoint as ocp

        state = {"params": params.to_pure_dict(), "opt_state": opt_state, "rng": rng}
        # the SAA / ETA / prompt settings travel with every checkpoint: they are part of it
        meta = {"stage": stage, "step": step, "settings": setup.settings_dict(self.config),
                **(extra or {})}
        self.manager.save(self.global_step(stage, step), args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict:
        return checkpoint_meta(self.manager, step)

    def restore_params(self, step: int, params: nnx.State) -> dict:
        return restore_params(self.manager, step, params)

    def read(self, step: int, params: nnx.State, opt_state, rng) -> tuple[dict, Any, Any]:
        """Checkpoint `step` read whole: (parameters as a pure dict, opt_state, rng), shaped
        and placed like the arguments (any optimizer state of the same tree). Nothing is
        changed, so a read that fails half-way leaves the caller's state as it was."""
        import orbax.checkpoint as ocp

        abstract = {"params": params.to_pure_dict(), "opt_state": opt_state, "rng": rng}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        with _layout_checked(self.manager, step, abstract["params"]):
            got = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
        got = got["state"]
        return got["params"], got["opt_state"], got["rng"]

    def restore_into(self, step: int, params: nnx.State, opt_state, rng):
        """Load checkpoint `step`'s parameters into `params`; returns its (opt_state, rng)."""
        got, opt_state, rng = self.read(step, params, opt_state, rng)
        nnx.replace_by_pure_dict(params, got)
        return opt_state, rng

    def quarantine(self, step: int, why: str) -> Path:
        """Move the damaged checkpoint `step` out of the manager's sight, into
        `ckpt.damaged/<step>-<time>` beside `ckpt/` (kept for inspection, never deleted)."""
        dest = self.directory.with_name(self.directory.name + ".damaged") / (
            f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        if is_main():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(dest))
            (dest.parent / f"{dest.name}.why.txt").write_text(why + "\n")
        sync("tempo_jax.quarantine")
        self.manager.reload()
        return dest

    def reference(self, params: nnx.State) -> nnx.State:
        """GRPO's frozen reference: the policy at the start of GRPO, i.e. the checkpoint saved
        at the end of SFT (or a copy of `params` when GRPO runs alone)."""
        sft_end = self.global_step("grpo", 0)
        ref = jax.tree.map(jnp.copy, params)
        if sft_end in self.manager.all_steps():
            nnx.replace_by_pure_dict(ref, self.restore_params(sft_end, params))
        else:
            log.warning("no SFT checkpoint for the reference model; using the current policy")
        return ref

    @contextlib.contextmanager
    def committing(self, stage: str, loader=None):
        """A stage's loop runs inside: however it ends, the checkpoints it started are
        committed before control leaves it (the last one included), and its loader's workers
        are stopped. An error is logged and re-raised after the commit."""
        try:
            yield
        except BaseException as e:
            log.error("%s stopped by %s: %s; committing the checkpoints already saved",
                      stage, type(e).__name__, e)
            try:
                self.manager.wait_until_finished()
            except Exception:  # the original error is the one to raise
                log.exception("a checkpoint in flight failed to commit")
            raise
        else:
            self.manager.wait_until_finished()
        finally:
            if loader is not None:
                loader.close()

    def close(self) -> None:
        """Wait for the saves in flight to commit, then close the manager."""
        self.manager.close()


# ============================================================================ reading a workdir
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
                 ) -> tuple[ml_collections.ConfigDict, nnx.Module]:
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
        meta = checkpoint_meta(mngr, step)
        log.info("checkpoint %d of %s (%s step %s)", step, workdir, meta.get("stage"),
                 meta.get("step"))
        model = setup.build_model(config)
        graphdef, params, frozen = nnx.split(model, setup.trainable_filter(config), ...)
        restored = restore_params(mngr, step, params)
    finally:
        mngr.close()
    nnx.replace_by_pure_dict(params, restored)
    return config, nnx.merge(graphdef, params, frozen)
