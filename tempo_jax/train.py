"""`python -m tempo_jax.train`: SFT, then PIR-GRPO, on a Qwen2.5-VL backbone.

With no flags it runs the `tiny` config on synthetic videos (the CPU demo) into `runs/demo`.
Pure jitted step functions of (trainable params, optimizer state, batch); Orbax checkpoints
(async) of params, optimizer, step, RNG and data position every `ckpt_every` steps; a restart
with the same `--workdir` resumes from the last one (SIGTERM saves before exiting). Every way
out (a stage's end, `run` returning, SIGTERM, an error) waits until the checkpoints already
started are committed. A non-finite loss or gradient skips the update and is logged; it never
reaches a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from tempo_jax import cli, fileio
from tempo_jax import sharding as shd
from tempo_jax.data import prompts as prompts_lib
from tempo_jax.data import saa as saa_lib
from tempo_jax.data.pipeline import (
    Loader,
    NoUsableData,
    PipelineConfig,
    batch_patch_capacity,
    collate,
    config_from_settings,
    load_example,
    make_loader,
    with_query,
)
from tempo_jax.data.sources import (
    VideoIndex,
    load_charades_sta,
    load_jsonl,
    load_qvhighlights,
    skipped_summary,
)
from tempo_jax.data.sources import make_pir as make_pir_pairs
from tempo_jax.evaluate import refusal_probabilities
from tempo_jax.generate import GenerateOutput, generate_global
from tempo_jax.metrics import grounding_metrics, refusal_diagnostics
from tempo_jax.models.attention import resolve_backend
from tempo_jax.models.qwen2_5_vl import Qwen25VL, RuntimeOptions, load_pretrained, preset
from tempo_jax.models.qwen2_5_vl.config import ModelConfig
from tempo_jax.models.qwen2_5_vl.params import save_pretrained
from tempo_jax.models.qwen2_5_vl.vision_meta import bucket
from tempo_jax.rl import rewards as rewards_lib

log = logging.getLogger("tempo_jax.train")

SETTINGS_FILE = "tempo_settings.json"  # SAA / ETA / prompt settings, saved beside every export
REPORT_KEYS = ("r1@0.5", "miou", "refusal_accuracy", "false_refusal_rate")


# ============================================================================ settings
def pipeline_config(config: ml_collections.ConfigDict, **kw) -> PipelineConfig:
    """The SAA / ETA / prompt part of the config: it is part of the model."""
    kw.setdefault("num_workers", config.data.num_workers)
    kw.setdefault("seed", config.seed)
    kw.setdefault("max_seq_len", config.data.max_seq_len or None)
    return config_from_settings(settings_dict(config), **kw)


def settings_dict(config: ml_collections.ConfigDict) -> dict:
    """Every SAA and prompt field, defaults resolved, so a later change of a default never
    changes what a saved model is fed."""
    saa = saa_lib.SAAConfig(**config.saa.to_dict())
    prompt = prompts_lib.PromptConfig(**config.prompt.to_dict())
    return {"saa": dataclasses.asdict(saa), "prompt": dataclasses.asdict(prompt)}


# ============================================================================ model
def build_model(config: ml_collections.ConfigDict, mesh=None, rules=shd.DEFAULT_RULES
                ) -> Qwen25VL:
    """The model; a checkpoint is read straight onto `mesh` (each tensor placed on its
    sharding as it is read, never the whole model on one device)."""
    dtype = jnp.dtype(config.model.dtype)
    opts = RuntimeOptions(dtype=dtype,
                          attention_backend=resolve_backend(config.model.attention_backend),
                          remat=config.model.remat)
    if config.model.init_checkpoint:
        return load_pretrained(config.model.init_checkpoint, dtype=dtype, options=opts,
                               mesh=mesh, rules=rules)
    return Qwen25VL(model_config(config), param_dtype=dtype, options=opts,
                    rngs=nnx.Rngs(config.seed))


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture `build_model` builds (the checkpoint's `config.json` when one is
    named), without building it: the planner sizes the same model."""
    if config.model.init_checkpoint:
        return ModelConfig.from_pretrained(config.model.init_checkpoint)
    cfg = preset(config.model.preset)
    if config.model.preset == "tiny" and config.model.get("tiny_overrides"):
        text = dataclasses.replace(cfg.text, **config.model.tiny_overrides)
        hd = text.head_dim  # keep Qwen's 2:3:3 split of the rotary bands over (t, h, w)
        text = dataclasses.replace(text, mrope_section=(hd // 8, 3 * hd // 16, 3 * hd // 16))
        vision = dataclasses.replace(cfg.vision, out_hidden_size=text.hidden_size,
                                     **config.model.get("tiny_vision_overrides", {}))
        cfg = cfg.replace(text=text, vision=vision)
    return cfg


def trainable_filter(config):
    if config.model.freeze_vision:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("visual")))
    return nnx.Param


# ============================================================================ data
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


def _load_all(records, video_root, pcfg, vision, desc) -> list[dict]:
    """Process every record once (cached mode), skipping and counting broken ones."""
    from tqdm import tqdm

    tok = prompts_lib.load_tokenizer(pcfg.tokenizer_path)
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


def answer_targets(loss_mask: np.ndarray, input_ids: np.ndarray):
    """Positions whose logits predict the answer tokens: [B, K] (K bucketed), the target ids
    and a validity mask. Only these positions go through the 150k-entry LM head."""
    rows = [np.flatnonzero(m) for m in loss_mask]
    k = bucket(max(1, max(len(r) for r in rows)), 8)
    pos = np.zeros((len(rows), k), np.int32)
    valid = np.zeros((len(rows), k), bool)
    for i, r in enumerate(rows):
        pos[i, :len(r)] = r
        valid[i, :len(r)] = True
    tgt = np.take_along_axis(input_ids, pos, axis=1).astype(np.int32)
    return np.maximum(pos - 1, 0), tgt, valid


# ============================================================================ steps
def _merge(graphdef, params, frozen):
    return nnx.merge(graphdef, params, frozen)


def sft_loss(params, frozen, graphdef, inputs, pred_pos, targets, valid):
    model = _merge(graphdef, params, frozen)
    logits = model.forward(inputs, logits_positions=pred_pos)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    n = jnp.maximum(valid.sum(), 1)
    loss = jnp.sum(nll * valid) / n
    acc = jnp.sum((jnp.argmax(logits, -1) == targets) * valid) / n
    return loss, {"loss": loss, "token_accuracy": acc}


def completion_logits(model: Qwen25VL, prompt_inputs, completions, comp_mask, start,
                      num_samples):
    """Logits at the completion positions only, for [B * G] rows that share B prompts: the
    prompts (and their videos) are embedded once, then broadcast to their G samples.

    Each row is reordered so that its valid prompt tokens come first, then its completion,
    then the prompt's padding. Positions are explicit (M-RoPE), so this is the same
    computation; but padding now only trails the row, where causal attention never lets a
    valid token see it, so the decoder runs with no padding mask at all: the fused kernels'
    (cuDNN, splash) fastest case. Completion tokens after EOS also only trail."""
    opts = model.options
    x = model.embed(prompt_inputs)  # [B, L, D], vision features scattered
    pmask = prompt_inputs["attention_mask"]
    ppos = prompt_inputs["position_ids"]
    t = completions.shape[1]
    rep = lambda a, axis=0: jnp.repeat(a, num_samples, axis=axis)  # noqa: E731
    xc = model.model.embed_tokens(completions).astype(opts.dtype)
    x = jnp.concatenate([rep(x), xc], axis=1)
    cpos = (start[:, None] + jnp.arange(t)[None, :])  # [B * G, T]
    pos = jnp.concatenate([rep(ppos, 1), jnp.broadcast_to(cpos[None], (3, *cpos.shape))], axis=2)
    valid = jnp.concatenate([rep(pmask).astype(bool), jnp.ones(completions.shape, bool)], 1)
    order = jnp.argsort(~valid, axis=1, stable=True)  # valid slots first, in their order
    x = jnp.take_along_axis(x, order[..., None], axis=1)
    pos = jnp.take_along_axis(pos, order[None], axis=2)
    h = model.model(x, pos, None, opts)
    # completion token j now sits at slot n + j (n: the row's prompt length) and is
    # predicted from slot n + j - 1
    n = rep(pmask.astype(jnp.int32).sum(axis=1))
    h = jnp.take_along_axis(h, (n[:, None] - 1 + jnp.arange(t)[None])[..., None], axis=1)
    return model.logits_from_hidden(h)


def grpo_objective(params, frozen, graphdef, prompt_inputs, completions, comp_mask, start,
                   old_logps, ref_logps, advantages, cfg, num_samples):
    from tempo_jax.rl import grpo as grpo_lib

    model = _merge(graphdef, params, frozen)
    logits = completion_logits(model, prompt_inputs, completions, comp_mask, start, num_samples)
    logps = grpo_lib.sequence_logps(logits, completions)
    loss, metrics = grpo_lib.grpo_loss(logps, old_logps, ref_logps, advantages, comp_mask, cfg)
    ent = grpo_lib.token_entropy(logits)
    metrics = dict(metrics)
    metrics["entropy"] = jnp.sum(ent * comp_mask) / jnp.maximum(comp_mask.sum(), 1)
    return loss, metrics


def finite(loss, grads) -> jax.Array:
    """True when the loss and every gradient are finite."""
    ok = jnp.isfinite(loss)
    for g in jax.tree.leaves(grads):
        ok &= jnp.all(jnp.isfinite(g))
    return ok


def apply_fn(tx: optax.GradientTransformation):
    """The jitted optimizer update `(params, opt_state, grads, loss) -> (params, opt_state,
    ok)`. It leaves both unchanged when the loss or a gradient is non-finite (`ok` False), and
    it takes over (donates) the parameters and optimizer state, so the update is made in place:
    one copy of the fp32 Adam moments in device memory, not two."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def apply(params, opt_state, grads, loss):
        ok = finite(loss, grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)

        def pick(new, old):
            return jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)

        return pick(new_params, params), pick(new_opt, opt_state), ok

    return apply


def make_optimizer(lr: float, warmup: int, steps: int, oc) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1),
                                                  end_value=lr * 0.1)
    tx = optax.chain(
        optax.clip_by_global_norm(oc.grad_clip),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay),
    )
    return fp32_state(tx) if oc.fp32_state else tx


def fp32_state(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Run `inner` in fp32 whatever the parameter dtype: both Adam moments (optax's `mu_dtype`
    covers only the first) and the update math; `optax.apply_updates` casts the update back
    to each parameter's dtype (bf16 parameters, fp32 optimizer state)."""

    def f32(tree):
        return jax.tree.map(lambda x: x.astype(jnp.float32)
                            if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return inner.init(f32(params))

    def update(updates, state, params=None):
        return inner.update(f32(updates), state, None if params is None else f32(params))

    return optax.GradientTransformation(init, update)


# ============================================================================ checkpoints
def checkpoint_meta(manager, step: int) -> dict:
    """The JSON metadata (stage, step, settings, data position) of checkpoint `step`."""
    import orbax.checkpoint as ocp

    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_params(manager, step: int, params: nnx.State) -> dict:
    """The trainable parameters of checkpoint `step`, shaped like `params`, as a pure dict
    (a partial restore: the optimizer state is not read)."""
    import orbax.checkpoint as ocp

    item = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.to_pure_dict(params))}
    got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return got["state"]["params"]


# ============================================================================ trainer
class Trainer:
    """Holds the model split into (graphdef, trainable params, frozen params), the optimizer,
    the checkpoint manager and the logs of one workdir."""

    def __init__(self, config, workdir: Path):
        import orbax.checkpoint as ocp

        self.config = config
        workdir = Path(workdir).absolute()
        self.workdir = workdir
        self.mesh = None
        self.rules = shd.rules_from_config(config.mesh)
        if jax.device_count() > 1:
            self.mesh = shd.mesh_from_config(config.mesh)
        self.model = build_model(config, self.mesh, self.rules)
        if self.mesh is not None and not config.model.init_checkpoint:
            shd.shard_model(self.model, self.mesh, self.rules)
        self.graphdef, self.params, self.frozen = nnx.split(
            self.model, trainable_filter(config), ...)
        self.tokenizer = prompts_lib.load_tokenizer(None)
        # a save cut short leaves `<step>.orbax-checkpoint-tmp`: never listed or restored,
        # removed when the next run opens the manager
        self.ckpt = ocp.CheckpointManager(
            workdir / "ckpt",
            options=ocp.CheckpointManagerOptions(max_to_keep=config.ckpt_keep,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True),
        )
        self.is_main = jax.process_index() == 0  # only process 0 writes logs and exports
        self.metrics_file = (open(workdir / "metrics.jsonl", "a")  # noqa: SIM115
                             if self.is_main else None)
        self.tb = None
        if self.is_main:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(workdir / "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX missing: no TensorBoard event files")
        self.stop_requested = False
        self._records_by_qid: dict | None = None  # PIR resampling's record lookup, built once
        self._closed = False
        self._sigterm_before = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.stop_requested = True

    def close(self) -> None:
        """Wait until every checkpoint in flight is committed, then close the checkpoint
        manager, `metrics.jsonl` and the TensorBoard writer (its events are written by a
        background thread) and give SIGTERM back. Idempotent; `run` calls it on every way
        out, and a Trainer used directly should be closed (or used as a context manager)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.ckpt.close()  # waits for the async commits first
        finally:
            if self.metrics_file is not None:
                self.metrics_file.close()
            if self.tb is not None:
                self.tb.close()
            signal.signal(signal.SIGTERM, self._sigterm_before)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _committing(self, stage: str, loader: Loader | None = None):
        """A stage's loop runs inside: however it ends, the checkpoints it started are
        committed before control leaves it (the last one included), and its loader's workers
        are stopped. An error is logged and re-raised after the commit."""
        try:
            yield
        except BaseException as e:
            log.error("%s stopped by %s: %s; committing the checkpoints already saved",
                      stage, type(e).__name__, e)
            try:
                self.ckpt.wait_until_finished()
            except Exception:  # the original error is the one to raise
                log.exception("a checkpoint in flight failed to commit")
            raise
        else:
            self.ckpt.wait_until_finished()
        finally:
            if loader is not None:
                loader.close()

    # ---- logging
    def log_metrics(self, stage: str, step: int, metrics: dict) -> None:
        row = {"stage": stage, "step": step}
        row.update({k: float(v) for k, v in metrics.items()})
        if self.metrics_file is None:
            return
        self.metrics_file.write(json.dumps(row) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{stage}/{k}", float(v), step)

    # ---- checkpoints
    def save(self, stage: str, step: int, opt_state, rng, extra: dict | None = None):
        import orbax.checkpoint as ocp

        state = {"params": self.params.to_pure_dict(), "opt_state": opt_state, "rng": rng}
        # the SAA / ETA / prompt settings travel with every checkpoint: they are part of it
        meta = {"stage": stage, "step": step, "settings": settings_dict(self.config),
                **(extra or {})}
        gstep = self._global_step(stage, step)
        self.ckpt.save(gstep, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def _checkpoint_step(self, stage: str, step: int, total: int, opt_state, rng,
                         loader: Loader | None) -> bool:
        """After `step` of a stage: save every `ckpt_every` steps, at the stage's last step
        and on SIGTERM. True when SIGTERM asks the loop to stop (its checkpoint saved; the
        loop's `_committing` waits for the commit)."""
        stop = self.stop_requested  # read once: SIGTERM may land between two reads
        if (step + 1) % self.config.ckpt_every == 0 or step + 1 == total or stop:
            self.save(stage, step + 1, opt_state, rng, _data_state(loader))
        if stop:
            log.warning("stopped at %s step %d: checkpoint saved", stage, step + 1)
        return stop

    def stage_end(self, stage: str) -> int:
        """The global step at which `stage` ends (its checkpoint's number)."""
        total = self.config.sft.steps if stage == "sft" else self.config.rl.steps
        return self._global_step(stage, total)

    def _global_step(self, stage, step):
        offset = 0
        for s in self.config.stages.split(","):
            if s == stage:
                return offset + step
            offset += self.config[("sft" if s == "sft" else "rl")].steps
        raise ValueError(f"unknown stage {stage!r}")

    def latest(self):
        """(checkpoint step, its metadata) of the latest checkpoint, or None."""
        latest = self.ckpt.latest_step()
        if latest is None:
            return None
        return latest, self._meta(latest)

    def restore_into(self, latest, opt_state, rng):
        import orbax.checkpoint as ocp

        abstract = {"params": self.params.to_pure_dict(), "opt_state": opt_state, "rng": rng}
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract)
        got = self.ckpt.restore(latest, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))))
        got = got["state"]
        nnx.replace_by_pure_dict(self.params, got["params"])
        return got["opt_state"], got["rng"]

    # ---- stages
    def run(self, data: Data, after_stage=None) -> dict:
        """Run the configured stages in order, resuming from the latest checkpoint;
        `after_stage(stage)` is called when a stage completes in this process. Returns
        `{"preempted": bool}`: True when SIGTERM stopped the run (its checkpoint committed)."""
        stages = [s.strip() for s in self.config.stages.split(",") if s.strip()]
        for s in stages:
            if s not in ("sft", "grpo"):
                raise ValueError(f"unknown stage {s!r} (sft, grpo)")
        resume = self.latest()
        start_stage, start_step, latest = None, 0, None
        if resume is not None:
            latest, meta = resume
            start_stage, start_step = meta["stage"], meta["step"]
            log.info("resuming from checkpoint %d (%s step %d)", latest, start_stage, start_step)
            # params carry over between stages: load them even when the stage is complete
            nnx.replace_by_pure_dict(self.params, self._restore_params(latest))
        for stage in stages:
            if start_stage is not None and stages.index(stage) < stages.index(start_stage):
                continue  # finished before the restart
            total = self.config.sft.steps if stage == "sft" else self.config.rl.steps
            step0 = start_step if stage == start_stage else 0
            ckpt = latest if stage == start_stage and step0 < total else None
            if step0 < total:
                out = (self.run_sft if stage == "sft" else self.run_grpo)(data, step0, ckpt)
                if out.get("preempted"):
                    return {"preempted": True}
            if after_stage is not None:
                after_stage(stage)
            if self.stop_requested:  # SIGTERM during the evaluation: the stage is saved
                log.warning("SIGTERM after the %s stage: stopping before the next one", stage)
                return {"preempted": True}
        return {"preempted": False}

    def _restore_params(self, step):
        return restore_params(self.ckpt, step, self.params)

    # ---- data: cached examples (small datasets) or the streaming Grain loader
    def _stream(self, records: list[dict], video_root: str, pcfg: PipelineConfig,
                resume_ckpt=None, stage: str = "", require_usable: bool = True,
                collated: bool = True) -> Loader:
        """The Grain loader of a stage, each host reading its own share; restored to the
        position saved in the checkpoint being resumed, so no example is seen twice or
        skipped across a restart. A training stream none of whose examples loads raises
        `NoUsableData` (evaluation reports failures instead: `require_usable=False`)."""
        loader = make_loader(records, video_root, pcfg, self.model.config.vision,
                             shard_index=jax.process_index(), shard_count=jax.process_count(),
                             require_usable=require_usable, collated=collated)
        if resume_ckpt is not None:
            state = self._meta(resume_ckpt).get("data_state")
            if state is None:
                log.warning("checkpoint %d has no data position; the %s stream restarts",
                            resume_ckpt, stage)
            else:
                loader.set_state(state)
        return loader

    def _meta(self, step: int) -> dict:
        return checkpoint_meta(self.ckpt, step)

    def _pick(self, examples, rng, batch_size, data: Data | None = None,
              pcfg: PipelineConfig | None = None, *, contrast_share: float = 0.0,
              irrelevant: int = -1) -> list[dict]:
        """The examples of one step: a function of (seed, stage, step) only, so a resumed run
        sees exactly the batches an uninterrupted one would. With `data.pir_ratio` (PIR drawn
        afresh): `contrast_share` of the rows are contrast pairs (a video with its own query,
        then with another video's); of the other rows, exactly `irrelevant` become PIR pairs
        (-1: each with probability `data.pir_ratio`)."""
        pir = data is not None and data.pir_ratio > 0
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
                plain[j] = self._irrelevant(plain[j], examples, rng, data, pcfg)
        pairs = []
        for i in idx[:n_pairs]:
            pairs += [examples[i], self._irrelevant(examples[i], examples, rng, data, pcfg)]
        return pairs + plain

    def _irrelevant(self, ex: dict, examples: list[dict], rng, data: Data,
                    pcfg: PipelineConfig) -> dict:
        """`ex`'s processed video with the query of another video's example (a PIR pair),
        rebuilt the way `load_example` builds a prompt: only the text changes, so the pair
        costs a tokenization, not a decode, and a new pairing can be drawn every step (fixed
        pairs are learnt by heart on a small dataset instead of by looking at the video)."""
        own = {"query": ex["query"], **self._record(data, ex["qid"])}
        for _ in range(1000):
            donor = examples[int(rng.integers(len(examples)))]
            if donor["video"] != ex["video"] and (
                    data.pir_compatible is None or data.pir_compatible(own, donor)):
                break
        else:
            raise ValueError(f"no compatible PIR donor for {ex['qid']!r}")
        pair = with_query(ex, donor["query"], self.tokenizer, pcfg, self.model.config.vision)
        return {**pair, "windows": [], "relevant": False,
                "qid": f"{ex['qid']}|pir:{donor['qid']}"}

    def _record(self, data: Data, qid: str) -> dict:
        if self._records_by_qid is None:
            self._records_by_qid = {str(r["qid"]): r for r in data.train}
        return self._records_by_qid.get(str(qid), {})

    def _examples(self, data: Data, which: str, pcfg) -> list[dict]:
        attr = f"{which}_examples"
        if getattr(data, attr) is None:
            recs = data.train if which == "train" else data.val
            setattr(data, attr, _load_all(recs, data.video_root, pcfg, self.model.config.vision,
                                          f"loading {which} videos"))
        return getattr(data, attr)

    def run_sft(self, data: Data, step0: int, resume_ckpt) -> dict:
        from tqdm import tqdm

        c = self.config
        pcfg = pipeline_config(c, batch_size=c.sft.batch_size)
        accum = max(1, c.optim.accum_steps)
        loader = None
        contrast = c.sft.get("contrast_share", 0.0)
        if not 0.0 <= contrast <= 1.0:
            raise cli.UsageError(f"--config.sft.contrast_share={contrast}: expected 0 to 1")
        if contrast > 0 and not (c.data.cache_examples and data.pir_ratio > 0):
            log.warning("sft.contrast_share=%s is ignored: contrast pairs are drawn with PIR "
                        "pairs afresh (data.cache_examples, data.pir_resample, "
                        "data.irrelevant_ratio > 0); this run trains on fixed PIR pairs",
                        contrast)
        if c.data.cache_examples:
            examples = self._examples(data, "train", pcfg)
        else:
            if c.sft.batch_size % accum:
                raise ValueError(f"sft.batch_size {c.sft.batch_size} is not a multiple of "
                                 f"optim.accum_steps {accum}")
            loader = self._stream(data.train, data.video_root, dataclasses.replace(
                pcfg, batch_size=c.sft.batch_size // accum), resume_ckpt, "sft")
        tx = make_optimizer(c.sft.learning_rate, c.sft.warmup_steps, c.sft.steps, c.optim)
        opt_state = tx.init(self.params)
        rng = jax.random.PRNGKey(c.seed)
        if resume_ckpt is not None:
            opt_state, rng = self.restore_into(resume_ckpt, opt_state, rng)
        grad_fn = jax.jit(jax.value_and_grad(sft_loss, has_aux=True), static_argnums=(2,))
        apply = apply_fn(tx)

        skipped = 0
        t_last = time.perf_counter()
        bar = tqdm(range(step0, c.sft.steps), desc="SFT", initial=step0, total=c.sft.steps,
                   file=sys.stdout, mininterval=2)
        with self._committing("SFT", loader), bar:
            for step in bar:
                if loader is not None:
                    micro = [next(loader) for _ in range(accum)]
                else:
                    picked = self._pick(examples, np.random.default_rng([c.seed, 1, step]),
                                        c.sft.batch_size, data, pcfg, contrast_share=contrast)
                    micro = [collate(chunk, pcfg, self.model.config.vision)
                             for chunk in _chunks(picked, accum)]
                grads_sum, metrics, tokens = None, None, 0
                for batch in micro:  # gradient accumulation: each micro-batch is its own batch
                    targets = [shd.shard_rows(a, self.mesh, self.rules, pad_axis=1) for a in
                               answer_targets(batch["loss_mask"], batch["input_ids"])]
                    inputs = shd.global_batch(batch, self.mesh, self.rules,
                                              model_config=self.model.config)
                    with shd.use_mesh(self.mesh, self.rules):
                        (loss, m), g = grad_fn(self.params, self.frozen, self.graphdef, inputs,
                                               *targets)
                    grads_sum = g if grads_sum is None else jax.tree.map(jnp.add, grads_sum, g)
                    metrics = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
                    tokens += int(batch["attention_mask"].sum())
                n = len(micro)
                grads = jax.tree.map(lambda g, n=n: g / n, grads_sum)
                metrics = {k: v / n for k, v in metrics.items()}
                self.params, opt_state, ok = apply(self.params, opt_state, grads,
                                                   metrics["loss"])
                if not bool(ok):
                    skipped += 1
                    log.warning("SFT step %d: non-finite loss or gradient, update skipped", step)
                metrics["skipped_updates"] = skipped
                if loader is not None:
                    metrics["skipped_examples"] = loader.skipped
                if (step + 1) % c.log_every == 0 or step + 1 == c.sft.steps:
                    now = time.perf_counter()
                    metrics["step_time"] = (now - t_last) / c.log_every
                    metrics["tokens_per_s"] = tokens / metrics["step_time"]
                    t_last = now
                    self.log_metrics("sft", step + 1, metrics)
                    bar.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                    acc=f"{float(metrics['token_accuracy']):.2f}")
                if self._checkpoint_step("sft", step, c.sft.steps, opt_state, rng, loader):
                    return {"skipped_updates": skipped, "preempted": True}
        return {"skipped_updates": skipped, "preempted": False}

    def run_grpo(self, data: Data, step0: int, resume_ckpt) -> dict:
        from tqdm import tqdm

        from tempo_jax.rl import grpo as grpo_lib

        c, rc = self.config, self.config.rl
        pcfg = pipeline_config(c, batch_size=rc.batch_size, with_answer=False, pad_side="left")
        vision = self.model.config.vision
        capacity = batch_patch_capacity(pcfg, vision)  # one shape for every rollout batch
        loader = None
        irrelevant = rc.get("irrelevant_prompts", -1)
        if c.data.cache_examples:
            examples = _prompt_examples(self._examples(data, "train", pipeline_config(
                c, batch_size=rc.batch_size)))
        else:
            if irrelevant >= 0:
                log.warning("rl.irrelevant_prompts=%d is ignored: a streamed batch holds the "
                            "fixed PIR pairs the shuffle brings (cached examples with "
                            "data.pir_resample draw an exact number)", irrelevant)
            loader = self._stream(data.train, data.video_root,
                                  dataclasses.replace(pcfg, seed=c.seed + 1), resume_ckpt,
                                  "grpo", collated=False)
        gcfg = grpo_lib.GRPOConfig(
            num_generations=rc.num_generations, eps_low=rc.eps_low, eps_high=rc.eps_high,
            beta=rc.beta, scale_rewards=rc.scale_rewards, loss_agg=rc.loss_agg,
            num_iterations=rc.num_iterations,
        )
        tx = make_optimizer(rc.learning_rate, rc.warmup_steps, rc.steps, c.optim)
        opt_state = tx.init(self.params)
        rng = jax.random.PRNGKey(c.seed + 1)
        ref_params = jax.tree.map(jnp.copy, self.params) if rc.beta > 0 else None
        if resume_ckpt is not None:
            opt_state, rng = self.restore_into(resume_ckpt, opt_state, rng)
            if rc.beta > 0:
                ref_params = self._restore_reference()
        G = rc.num_generations
        names = tuple(n.strip() for n in rc.rewards.split(","))
        fmt_kw = {"thinking": c.prompt.thinking}
        rounds = 1 + (max(0, rc.get("max_refills", 0)) if rc.get("filter_groups") else 0)

        grad_fn = jax.jit(jax.value_and_grad(grpo_objective, has_aux=True),
                          static_argnums=(2, 10, 11))

        @functools.partial(jax.jit, static_argnums=(2, 7))
        def ref_logps_fn(ref, frozen, graphdef, prompt_inputs, completions, comp_mask, start, g):
            from tempo_jax.rl import grpo as grpo_lib

            model = _merge(graphdef, ref, frozen)
            logits = completion_logits(model, prompt_inputs, completions, comp_mask, start, g)
            return grpo_lib.sequence_logps(logits, completions)

        def one_round(step: int, k: int, model) -> dict:
            """Roll out one batch of prompts (round k of this step) and score it."""
            if loader is not None:
                exs = next(loader)
            else:  # round 0 draws what a run without refills draws
                seed = [c.seed, 2, step] + ([k] if k else [])
                exs = self._pick(examples, np.random.default_rng(seed), rc.batch_size, data,
                                 pcfg, irrelevant=irrelevant)
            batch = collate(exs, pcfg, vision, patch_capacity=capacity)
            key = jax.random.fold_in(rng, step)
            out, _ = rollout(model, batch, self.mesh, self.rules, num_samples=G,
                             max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                             top_p=rc.top_p, rng=jax.random.fold_in(key, k) if k else key)
            texts = [self.tokenizer.decode(t[:n], skip_special_tokens=True)
                     for t, n in zip(out.tokens, out.lengths, strict=True)]
            meta = [m for m in batch["meta"] for _ in range(G)]
            total, parts = rewards_lib.total_reward(
                [m["query"] for m in meta], texts, names=names, iou_type=rc.iou_type,
                windows=[m["windows"] for m in meta], relevant=[m["relevant"] for m in meta],
                duration=[m["duration"] for m in meta], **fmt_kw)
            total = np.asarray(total, np.float64)
            informative = (grpo_lib.informative_groups(total, G) if rounds > 1
                           else np.ones(len(exs), bool))
            return {"examples": exs, "out": out, "total": total, "parts": parts,
                    "informative": informative, "relevant": [m["relevant"] for m in meta],
                    "refused": [rewards_lib.parse_answer(t) == "refuse" for t in texts]}

        apply = apply_fn(tx)
        skipped = 0
        t_last = time.perf_counter()
        bar = tqdm(range(step0, rc.steps), desc="PIR-GRPO", initial=step0, total=rc.steps,
                   file=sys.stdout, mininterval=2)
        with self._committing("PIR-GRPO", loader), bar:
            for step in bar:
                model = _merge(self.graphdef, self.params, self.frozen)
                done: list[dict] = []
                for k in range(rounds):
                    done.append(one_round(step, k, model))
                    n_good = sum(int(d["informative"].sum()) for d in done)
                    # every host decides alike (the rollouts are collective on several hosts)
                    if all_rows(np.array([n_good >= rc.batch_size])).all():
                        break
                picks, valid = grpo_lib.fill_groups([d["informative"] for d in done],
                                                    rc.batch_size)
                # the update batch: the picked groups' prompts, completions and rewards
                batch = collate([done[k]["examples"][j] for k, j in picks], pcfg, vision,
                                patch_capacity=capacity)
                inputs = shd.global_batch(batch, self.mesh, self.rules,
                                          model_config=self.model.config, pad_side="left")

                def rows_of(get, picks=picks, done=done):
                    return np.concatenate([get(done[k])[j * G:(j + 1) * G] for k, j in picks])

                tokens = rows_of(lambda d: d["out"].tokens)
                logprobs = rows_of(lambda d: d["out"].logprobs)
                lengths = rows_of(lambda d: d["out"].lengths)
                total = rows_of(lambda d: d["total"])
                adv = grpo_lib.group_advantages(jnp.asarray(total, jnp.float32), G,
                                                scale_rewards=rc.scale_rewards)
                t_len = tokens.shape[1]
                # padding groups (no informative group left) are masked out of the loss
                comp_mask = ((np.arange(t_len)[None, :] < lengths[:, None])
                             & np.repeat(valid, G)[:, None])
                start = np.repeat(_decode_start(batch), G)
                # the update step: prompts and completions sharded over the batch (data, fsdp)
                rows = functools.partial(shd.shard_rows, mesh=self.mesh, rules=self.rules)
                completions, cm, st, old = (rows(a) for a in (tokens, comp_mask, start,
                                                              logprobs))
                adv = rows(np.asarray(adv))
                ref = None
                if ref_params is not None:
                    with shd.use_mesh(self.mesh, self.rules):
                        ref = ref_logps_fn(ref_params, self.frozen, self.graphdef, inputs,
                                           completions, cm, st, G)
                for _ in range(rc.num_iterations):
                    with shd.use_mesh(self.mesh, self.rules):
                        (loss, m), grads = grad_fn(self.params, self.frozen, self.graphdef, inputs,
                                                   completions, cm, st, old, ref, adv, gcfg, G)
                    self.params, opt_state, ok = apply(self.params, opt_state, grads, loss)
                    if not bool(ok):
                        skipped += 1
                        log.warning("GRPO step %d: non-finite loss or gradient, update skipped",
                                    step)
                # the logged figures: every rollout of the step (all rounds), every host's rows
                def cat(key, done=done):
                    return all_rows(np.concatenate([d[key] for d in done]))

                refused, relevant, all_total = cat("refused"), cat("relevant"), cat("total")
                informative = cat("informative")
                r_lengths = all_rows(np.concatenate([d["out"].lengths for d in done]))
                metrics = {k: float(v) for k, v in m.items()}
                metrics.update(
                    loss=float(loss), reward=float(np.mean(all_total)),
                    **{f"reward_{n}": float(np.mean(all_rows(np.concatenate(
                        [np.asarray(d["parts"][n]) for d in done])))) for n in done[0]["parts"]},
                    response_length=float(r_lengths.mean()),
                    refusal_accuracy=_frac(refused[~relevant]),
                    false_refusal_rate=_frac(refused[relevant]),
                    skipped_updates=skipped,
                    dropped_groups=float(1.0 - informative.mean()),
                    rollout_rounds=len(done),
                    update_fill=float(all_rows(valid).mean()),
                )
                if loader is not None:
                    metrics["skipped_examples"] = loader.skipped
                now = time.perf_counter()
                metrics["step_time"] = now - t_last
                metrics["tokens_per_s"] = float(r_lengths.sum()) / metrics["step_time"]
                t_last = now
                self.log_metrics("grpo", step + 1, metrics)
                bar.set_postfix(reward=f"{metrics['reward']:.2f}",
                                kl=f"{metrics.get('kl', 0.0):.3f}")
                if self._checkpoint_step("grpo", step, rc.steps, opt_state, rng, loader):
                    return {"skipped_updates": skipped, "preempted": True}
        return {"skipped_updates": skipped, "preempted": False}

    def _restore_reference(self):
        """The frozen reference is the policy at the start of GRPO: the checkpoint saved at the
        end of SFT (or the current policy when GRPO runs alone)."""
        sft_end = self._global_step("grpo", 0)
        ref = jax.tree.map(jnp.copy, self.params)
        if sft_end in self.ckpt.all_steps():
            nnx.replace_by_pure_dict(ref, self._restore_params(sft_end))
        else:
            log.warning("no SFT checkpoint for the reference model; using the current policy")
        return ref

    # ---- evaluation
    def evaluate(self, data: Data, n: int | None = None) -> tuple[dict, list[dict]]:
        c = self.config
        pcfg = pipeline_config(c, batch_size=8, with_answer=False, pad_side="left")
        if c.data.cache_examples:
            examples = _prompt_examples(self._examples(data, "val", pipeline_config(c)))[:n]
            batches = (collate(examples[i:i + 8], pcfg, self.model.config.vision)
                       for i in range(0, len(examples), 8))
        else:
            batches = self._stream(data.val[:n], data.video_root, dataclasses.replace(
                pcfg, shuffle=False, num_epochs=1), require_usable=False)
        from tempo_jax.evaluate import answer_rows

        model = _merge(self.graphdef, self.params, self.frozen)
        rows = [row for batch_rows in answer_rows(model, batches, self.tokenizer,
                                                  c.eval_max_new_tokens) for row in batch_rows]
        metrics = grounding_metrics([r["answer"] for r in rows], [r["windows"] for r in rows],
                                    [r["relevant"] for r in rows],
                                    [r["duration"] for r in rows])
        # PIR diagnostics: P(none) teacher-forced after "<answer", its AUC between relevant
        # and irrelevant pairs (can the model tell them apart, whatever its threshold?) and
        # refusals of the held-out cross pairs alone (queries never seen with that video)
        tf = pipeline_config(c, batch_size=8)
        if c.data.cache_examples:
            full = self._examples(data, "val", pipeline_config(c))[:n]
            tf_batches = (collate(full[i:i + 8], tf, self.model.config.vision)
                          for i in range(0, len(full), 8))
        else:
            tf_batches = self._stream(data.val[:n], data.video_root, dataclasses.replace(
                tf, shuffle=False, num_epochs=1), require_usable=False)
        p_none = refusal_probabilities(model, tf_batches, self.tokenizer, tf.prompt)
        for r in rows:
            r["p_none"] = p_none.get(str(r["qid"]))
        metrics.update(refusal_diagnostics(rows, caption_think=bool(
            c.prompt.thinking and c.prompt.get("caption_think", False))))
        return metrics, rows

    def export(self, path: Path) -> None:
        """HF export; on several hosts every process takes part (tensors are gathered one at
        a time) and process 0 writes."""
        model = _merge(self.graphdef, self.params, self.frozen)
        with fileio.replace_dir(path, write=self.is_main) as stage:  # all or nothing
            save_pretrained(model, stage)
            if self.is_main:
                (stage / SETTINGS_FILE).write_text(json.dumps(settings_dict(self.config),
                                                              indent=2))


# ============================================================================ helpers
def rollout(model: Qwen25VL, batch: dict, mesh, rules, *, num_samples: int,
            max_new_tokens: int, temperature: float, top_p: float, rng):
    """PIR-GRPO's sampling step: `num_samples` completions of each prompt of this process's
    left-padded `batch`. Returns this process's rows (prompt-major, host arrays) and the
    batch's model inputs as global arrays (what the update step takes). On several hosts
    every process runs the same sharded program on the global batch."""
    inputs = shd.global_batch(batch, mesh, rules, model_config=model.config, pad_side="left")
    start = shd.shard_rows(_decode_start(batch).astype(np.int32), mesh, rules)
    with shd.use_mesh(mesh, rules):
        out = generate_global(
            model, inputs, start, max_new_tokens=max_new_tokens, temperature=temperature,
            top_p=top_p, num_samples=num_samples, eos_token_id=list(prompts_lib.EOS_IDS),
            rng=rng, pad_token_id=prompts_lib.ENDOFTEXT_ID)
    mine = (shd.process_rows(start)[:, None] * num_samples + np.arange(num_samples)).ravel()
    return GenerateOutput(out.tokens[mine], out.logprobs[mine], out.lengths[mine]), inputs


def all_rows(x) -> np.ndarray:
    """Per-row host values of every process, concatenated (this process's alone on one)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _data_state(loader: Loader | None) -> dict | None:
    return None if loader is None else {"data_state": loader.get_state()}


def _frac(xs) -> float:
    return float(np.mean(xs)) if len(xs) else float("nan")


def _decode_start(batch) -> np.ndarray:
    from tempo_jax.models.qwen2_5_vl.positions import decode_start

    return decode_start(batch["position_ids"], batch["attention_mask"])


def _prompt_examples(examples: list[dict]) -> list[dict]:
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


def _chunks(items: list, accum: int) -> list[list]:
    accum = max(1, min(accum, len(items)))
    size = math.ceil(len(items) / accum)
    return [items[i:i + size] for i in range(0, len(items), size)]


def baseline_constant_window(train: list[dict], val_rows: list[dict]) -> dict:
    """What a model that ignores the video scores: the single window that maximises mean IoU
    on the training windows, answered for every validation query (never refusing)."""
    wins = [(r["windows"][0], r["duration"]) for r in train if r.get("relevant", True)
            and r.get("windows")]
    grid = np.arange(0, 1.0001, 0.05)
    best, best_score = (0.0, 1.0), -1.0
    for s in grid:
        for e in grid[grid > s]:
            score = np.mean([rewards_lib.temporal_iou((s * d, e * d), w) for w, d in wins])
            if score > best_score:
                best, best_score = (s, e), score
    answers = [f"<answer>{best[0] * r['duration']:.1f} to {best[1] * r['duration']:.1f}</answer>"
               for r in val_rows]
    m = grounding_metrics(answers, [r["windows"] for r in val_rows],
                          [r["relevant"] for r in val_rows], [r["duration"] for r in val_rows])
    m["window_fraction"] = list(best)
    return m


def plot_curves(workdir: Path) -> Path | None:
    """SFT loss; PIR-GRPO reward; refusals of irrelevant rollouts, false refusals of relevant
    ones and the share of groups dynamic sampling dropped (moving averages), from
    metrics.jsonl, with each stage's held-out evaluation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "grpo"]
    evals = {r["stage"][5:]: r for r in rows if r["stage"].startswith("eval_")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))

    def smooth(key):
        vals = np.asarray([r.get(key, np.nan) for r in rl], np.float64)
        k = min(5, len(vals))
        ok = np.isfinite(vals)  # a step without irrelevant prompts has no refusal rate
        num = np.convolve(np.where(ok, vals, 0.0), np.ones(k), mode="valid")
        den = np.convolve(ok.astype(float), np.ones(k), mode="valid")
        return [r["step"] for r in rl][k - 1:], np.where(den > 0, num / np.maximum(den, 1), np.nan)

    if sft:
        axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
        axes[0].set(title="SFT answer loss", xlabel="step", ylabel="cross-entropy",
                    yscale="log")
    if rl:
        for key, label in (("reward", "total"), ("reward_format", "format"),
                           ("reward_accuracy", "accuracy")):
            if key in rl[0]:
                axes[1].plot(*smooth(key), label=label)
        axes[1].set(title="PIR-GRPO reward (moving average)", xlabel="step", ylabel="reward")
        axes[1].legend()
        for key, label in (("refusal_accuracy", "irrelevant rollouts refused"),
                           ("false_refusal_rate", "relevant rollouts refused"),
                           ("dropped_groups", "groups dropped (equal rewards)")):
            if key in rl[0]:
                axes[2].plot(*smooth(key), label=label)
    # held-out evaluations on the GRPO axis: after SFT at its start, after GRPO at its end
    last = rl[-1]["step"] if rl else 0
    for stage, marker, x in (("sft", "s", 0), ("grpo", "o", last)):
        ev = evals.get(stage)
        if ev is not None:
            for key, colour in (("refusal_accuracy", "C0"), ("false_refusal_rate", "C1")):
                axes[2].plot([x], [ev[key]], marker, color=colour, mfc="none", ms=8,
                             label=f"{key.replace('_', ' ')} after {stage} (held-out)")
    axes[2].set(title="PIR: refusals (moving average)", xlabel="PIR-GRPO step", ylabel="share",
                ylim=(-0.03, 1.03))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = workdir / "reward_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timeline(rows: list[dict], out: Path, n: int = 16) -> Path:
    """Predicted vs true windows for the first `n` validation queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[:n]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        y = len(rows) - i
        ax.plot([0, r["duration"]], [y, y], color="0.85", lw=6, solid_capstyle="butt")
        for w in r["windows"]:
            ax.plot(w, [y + 0.12, y + 0.12], color="tab:green", lw=5, solid_capstyle="butt")
        p = r["parsed"]
        if isinstance(p, list):  # drawn clipped to the video; the raw answer is in predictions
            p_draw = [min(max(v, 0.0), r["duration"]) for v in p]
            ax.plot(p_draw, [y - 0.12, y - 0.12], color="tab:blue", lw=5, solid_capstyle="butt")
        label = r["query"][:38] + ("" if r["relevant"] else " [irrelevant]")
        mark = " (refused)" if p == "refuse" else " (unreadable)" if p is None else ""
        ax.text(-0.3, y, label + mark, ha="right", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.set_title("true (green) vs predicted (blue) windows")
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


# ============================================================================ entry point
def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train (resuming when the workdir has checkpoints), export, evaluate and report.

    Returns the report, or `{"preempted": True, ...}` when SIGTERM stopped training (the
    checkpoint it saved is committed: rerun with the same workdir to resume). Whatever way it
    returns or raises, every checkpoint it started is committed and every file it wrote
    (metrics, TensorBoard events, evaluations, export, report) is complete on disk."""
    workdir = Path(workdir).absolute()  # Orbax wants absolute paths
    main = jax.process_index() == 0  # only process 0 writes logs, plots, report, export
    workdir.mkdir(parents=True, exist_ok=True)
    if main:
        fileio.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))
    t0 = time.perf_counter()
    data = prepare_data(config, workdir)
    with Trainer(config, workdir) as trainer:
        report: dict[str, Any] = {"baseline": baseline_constant_window(data.train, data.val)}
        rows_by_stage: dict[str, list] = {}

        def after_stage(stage: str) -> None:
            path = workdir / f"eval_{stage}.json"
            if path.exists():  # evaluated before a restart
                report[stage] = json.loads(path.read_text())
                return
            metrics, rows = trainer.evaluate(data)
            report[stage] = metrics
            rows_by_stage[stage] = rows
            # beside the training curves (metrics.jsonl, TensorBoard), at the stage's last step
            trainer.log_metrics(f"eval_{stage}", trainer.stage_end(stage),
                                {k: v for k, v in metrics.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool)})
            if main:
                fileio.write_text(path, json.dumps(metrics, indent=2))
            log.info("%s: %s", stage, {k: report[stage].get(k) for k in (*REPORT_KEYS,
                                                                          "refusal_auc")})

        if trainer.run(data, after_stage)["preempted"]:
            step = trainer.ckpt.latest_step()
            log.warning("preempted: checkpoint %s committed; rerun with --workdir %s to resume",
                        step, workdir)
            return {"preempted": True, "checkpoint": step}
        last = [s.strip() for s in config.stages.split(",")][-1]
        rows = rows_by_stage.get(last) or trainer.evaluate(data)[1]
        trainer.export(workdir / "hf")  # every process: it gathers one tensor at a time
    if main:
        plot_curves(workdir)
        plot_timeline(rows, workdir / "timeline.png")
        fileio.write_text(workdir / "predictions.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))
    report["wall_time_s"] = round(time.perf_counter() - t0, 1)
    if main:
        fileio.write_text(workdir / "report.json", json.dumps(report, indent=2))
    return report


def main(argv: Sequence[str] | None = None) -> dict:
    """`python -m tempo_jax.train [--config FILE:ARG] [--workdir DIR] [--config.a.b=V ...]`.

    A mistake in the arguments or the data (an unknown config size or field, a value of the
    wrong type, an annotation file with no usable line) is one `error:` line and exit
    status 2; SIGTERM exits 0 once its checkpoint is committed."""
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    distributed.initialize(force=args.multihost)
    report = run(config, args.workdir)
    print(json.dumps(report))  # preempted: exit 0 after the committed checkpoint
    return report


if __name__ == "__main__":
    cli.run_main(main, user_errors=(NoUsableData,))
