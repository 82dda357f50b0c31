"""`python -m tempo_jax.plan`: will a training config fit, and how is it laid out?

    python -m tempo_jax.plan --config configs/tempo_r0.py:7b --mesh fsdp=64 --chip v5p [--json]

Answers, before anyone rents a pod slice: the parameter count (the released model's), the
per-device bytes of parameters, gradients, optimizer state, activations under the remat
policy, the GRPO reference model and the rollout KV cache, the peak against the chip's
memory, and, when it does not fit, the smallest mesh that does.

Two methods:

* `analytic` (always available, any chip): bytes derived from the abstract model (nothing is
  allocated), each tensor's shard computed from its logical axes with the same rules and the
  same divisibility fallback as `tempo_jax.sharding.logical_to_spec`, and activation formulas
  that follow the code paths of `tempo_jax.train` (stated in each function's docstring).
* `aot:<topology>` (TPU chips, with `libtpu` installed - `pip install libtpu` or the `tpu`
  extra): the training steps of `tempo_jax.train` are lowered and compiled ahead of time for
  the real TPU topology on this (CPU) machine, as MaxText's `train_compile.py` does, and
  `compiled.memory_analysis()` gives the compiler's own per-device numbers. Where that cannot
  run the planner says why, in one line, and reports the analytic count.

Every number is per device (one TPU chip or one GPU; v4 and v5p chips are one megacore
device each).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import AbstractMesh

from tempo_jax import sharding as shd
from tempo_jax.cli import UsageError, apply_overrides, load_config
from tempo_jax.models.attention import resolve_backend
from tempo_jax.models.qwen2_5_vl.config import ModelConfig

try:  # the logical names the model constrains its residual stream to
    from tempo_jax.models.qwen2_5_vl.model import RESIDUAL
except ImportError:  # a model without activation constraints: batch-sharded, hidden whole
    RESIDUAL = ("batch", "seq", None)

GiB = 1024**3
MIB = 1024**2


# ============================================================================ chips
@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    platform: str  # "tpu" | "gpu"
    hbm_bytes: int  # memory of one device (chip)
    bf16_flops: float  # dense peak, for reference
    topology: str | None  # libtpu topology prefix for AOT compilation
    dims: int = 3  # torus dimensions of a slice (v5e: 2D)


# Public figures, per chip (one JAX device):
#   v5p  95 GiB HBM2e, 459 TFLOP/s bf16   https://cloud.google.com/tpu/docs/v5p
#   v4   32 GiB HBM2,  275 TFLOP/s bf16   https://cloud.google.com/tpu/docs/v4
#   v5e  16 GiB HBM2,  197 TFLOP/s bf16   https://cloud.google.com/tpu/docs/v5e
#   H100 SXM 80 GB HBM3, 989 TFLOP/s dense bf16  https://www.nvidia.com/en-us/data-center/h100/
#   H200 SXM 141 GB HBM3e, 989 TFLOP/s dense bf16 https://www.nvidia.com/en-us/data-center/h200/
# For the GPUs we take what the driver exposes (nvidia-smi: 81559 MiB and 143771 MiB), which
# is a little less than the marketing figure. JAX on GPU preallocates 75% of it unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (see the note the planner prints).
CHIPS: dict[str, Chip] = {
    "v5p": Chip("v5p", "tpu", 95 * GiB, 459e12, "v5"),
    "v4": Chip("v4", "tpu", 32 * GiB, 275e12, "v4"),
    "v5e": Chip("v5e", "tpu", 16 * GiB, 197e12, "v5e", dims=2),
    "h100": Chip("h100", "gpu", 81559 * MIB, 989e12, None),
    "h200": Chip("h200", "gpu", 143771 * MIB, 989e12, None),
}

# share of each phase's total added for XLA temporaries (fusion buffers, collective scratch,
# fragmentation) that no formula here names
MARGIN = 0.10

# xla_attention runs long queries in blocks of this many rows (tempo_jax.models.attention)
_ATTN_BLOCK = 128


def chip_info(name: str) -> Chip:
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; choose from {', '.join(CHIPS)}")
    return CHIPS[name]


# ============================================================================ mesh / config
def parse_mesh(text: str) -> dict[str, int]:
    """`"data=2,fsdp=32"` -> `{"data": 2, "fsdp": 32, "tensor": 1}` (missing axes are 1)."""
    out = dict.fromkeys(shd.MESH_AXES, 1)
    seen = set()
    if not text or not text.strip():
        raise ValueError("empty --mesh; expected e.g. fsdp=64 or data=2,fsdp=32,tensor=1")
    for part in text.split(","):
        part = part.strip()
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in out:
            raise ValueError(
                f"bad --mesh entry {part!r} in {text!r}: expected AXIS=SIZE with AXIS one of "
                f"{', '.join(shd.MESH_AXES)} (e.g. data=2,fsdp=32,tensor=1)")
        if name in seen:
            raise ValueError(f"bad --mesh {text!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"bad --mesh entry {part!r}: the size must be a positive integer")
        seen.add(name)
        out[name] = size
    return out


def mesh_str(mesh: dict[str, int]) -> str:
    return ",".join(f"{a}={mesh.get(a, 1)}" for a in shd.MESH_AXES)


def abstract_mesh(mesh: dict[str, int]) -> AbstractMesh:
    """A mesh of the given shape without devices: `logical_to_spec` only reads its shape."""
    return AbstractMesh(tuple(mesh.get(a, 1) for a in shd.MESH_AXES), shd.MESH_AXES)


def config_rules(config: ml_collections.ConfigDict) -> shd.Rules:
    """The logical-axis rules the trainer uses for this config (`config.mesh.rules` and
    `rule_overrides`)."""
    return shd.rules_from_config(config.mesh)


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture `tempo_jax.train.build_model` builds for this config."""
    from tempo_jax.train import model_config as train_model_config

    return train_model_config(config)


# ============================================================================ parameters
@dataclasses.dataclass(frozen=True)
class TensorPlan:
    path: tuple
    shape: tuple[int, ...]
    axes: tuple | None
    itemsize: int
    spec: Any  # PartitionSpec
    shard_shape: tuple[int, ...]
    trainable: bool

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def shard_size(self) -> int:
        return math.prod(self.shard_shape)

    @property
    def shard_bytes(self) -> int:
        return self.shard_size * self.itemsize


@functools.lru_cache(maxsize=8)
def _abstract_params(mcfg: ModelConfig, dtype_name: str) -> tuple:
    """(path, shape, logical axes, itemsize) of every parameter, from `nnx.eval_shape`."""
    from flax import nnx

    from tempo_jax.models.qwen2_5_vl.params import abstract_model

    model = abstract_model(mcfg, jnp.dtype(dtype_name))
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        axes = var.get_metadata().get("axes")
        out.append((tuple(path), tuple(value.shape), None if axes is None else tuple(axes),
                    jnp.dtype(value.dtype).itemsize))
    return tuple(out)


def shard_shape(spec, shape: Sequence[int], mesh: dict[str, int]) -> tuple[int, ...]:
    """The local block of `shape` under `spec` (specs from `logical_to_spec` with a shape
    always divide evenly)."""
    out = []
    for i, dim in enumerate(shape):
        entry = spec[i] if i < len(spec) else None
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        div = math.prod(mesh.get(n, 1) for n in names)
        if dim % div:
            raise ValueError(f"dimension {dim} of {tuple(shape)} does not divide by {div}")
        out.append(dim // div)
    return tuple(out)


def tensor_plans(mcfg: ModelConfig, mesh: dict[str, int], *, dtype: str = "bfloat16",
                 freeze_vision: bool = True,
                 rules: shd.Rules = shd.DEFAULT_RULES) -> list[TensorPlan]:
    """Every parameter with its PartitionSpec and local shard on `mesh`, through
    `tempo_jax.sharding.logical_to_spec` itself (a dimension the mesh axes do not divide stays
    replicated), so the plan and a real `shard_model` agree by construction."""
    amesh = abstract_mesh(mesh)
    out = []
    for path, shape, axes, itemsize in _abstract_params(mcfg, jnp.dtype(dtype).name):
        spec = shd.logical_to_spec(axes, rules, amesh, shape)
        trainable = not (freeze_vision and "visual" in path)
        out.append(TensorPlan(path, shape, axes, itemsize, spec, shard_shape(spec, shape, mesh),
                              trainable))
    return out


def optimizer_bytes_per_param(config: ml_collections.ConfigDict, dtype: str) -> int:
    """Bytes of optimizer state per trainable element, probed from the optimizer
    `tempo_jax.train` builds: with `optim.fp32_state` both Adam moments are fp32 (4 + 4),
    otherwise they follow the parameter dtype."""
    return _opt_bytes(bool(config.optim.fp32_state), jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=16)
def _opt_bytes(fp32_state: bool, dtype: str) -> int:
    from tempo_jax.train import make_optimizer

    oc = ml_collections.ConfigDict({"grad_clip": 1.0, "b1": 0.9, "b2": 0.95,
                                    "weight_decay": 0.01, "fp32_state": fp32_state})
    tx = make_optimizer(1e-5, 1, 10, oc)
    probe = {"w": jax.ShapeDtypeStruct((3,), jnp.dtype(dtype))}
    state = jax.eval_shape(tx.init, probe)
    return sum(leaf.dtype.itemsize for leaf in jax.tree.leaves(state) if leaf.shape == (3,))


# ============================================================================ workload
@dataclasses.dataclass(frozen=True)
class Workload:
    """Batch shapes of each stage, as `tempo_jax.train` builds them."""

    sft: bool
    grpo: bool
    sft_rows: int  # micro-batch (sft.batch_size / accum_steps)
    seq: int  # padded text length (data.max_seq_len)
    seq_estimated: bool  # max_seq_len 0: bucketed per batch, estimated here
    answer_len: int  # SFT logits positions (answer tokens, bounded by eval_max_new_tokens)
    prompts: int  # rl.batch_size
    generations: int
    new_tokens: int
    reference: bool  # rl.beta > 0 keeps a frozen copy of the trainable parameters
    visual_tokens: int  # merged visual tokens per video (SAA budget)
    frame_patches: int  # most patches in one temporal patch (full-attention segment)
    accum: int

    @property
    def rows(self) -> int:
        return self.prompts * self.generations


def workload(config: ml_collections.ConfigDict, mcfg: ModelConfig) -> Workload:
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    accum = max(1, int(config.optim.get("accum_steps", 1)))
    seq = int(config.data.max_seq_len or 0)
    estimated = seq == 0
    if estimated:  # bucketed per batch: the visual tokens plus a few hundred text tokens
        from tempo_jax.models.qwen2_5_vl.vision_meta import bucket

        seq = bucket(config.saa.max_visual_tokens + 256, 64)
    v = mcfg.vision
    per_frame = config.saa.max_pixels // (v.patch_size**2)
    visual = int(config.saa.max_visual_tokens)
    return Workload(
        sft="sft" in stages, grpo="grpo" in stages,
        sft_rows=max(1, config.sft.batch_size // accum), seq=seq, seq_estimated=estimated,
        answer_len=int(config.get("eval_max_new_tokens", 64)),
        prompts=int(config.rl.batch_size), generations=int(config.rl.num_generations),
        new_tokens=int(config.rl.max_new_tokens),
        reference="grpo" in stages and float(config.rl.beta) > 0,
        visual_tokens=visual, frame_patches=min(per_frame, visual * v.merge_unit), accum=accum,
    )


# ============================================================================ activations
@dataclasses.dataclass(frozen=True)
class Local:
    """Per-device model dimensions after tensor parallelism (heads, mlp, vocab split over
    `tensor` when divisible) and the batch divisor (data x fsdp when it divides)."""

    mesh: dict
    rules: shd.Rules
    cfg: ModelConfig
    dtype_bytes: int

    def _local(self, axes, shape) -> tuple[int, ...]:
        spec = shd.logical_to_spec(axes, self.rules, abstract_mesh(self.mesh), shape)
        return shard_shape(spec, shape, self.mesh)

    def rows(self, n: int) -> int:
        """Rows of a batch of `n` on one device: split over (data, fsdp) when divisible,
        replicated otherwise (what logical_to_spec does with a 'batch' axis)."""
        return self._local(("batch",), (n,))[0]

    def dim(self, name: str, n: int) -> int:
        return self._local((name,), (n,))[0]

    def residual(self, rows: int, length: int) -> tuple[int, int]:
        """(rows, hidden) of the residual stream [rows, L, hidden] on one device, sharded as
        the model constrains it (`RESIDUAL` names): when the batch does not divide, the
        hidden dimension may take the fsdp axis instead."""
        b, _, d = self._local(RESIDUAL, (rows, length, self.cfg.text.hidden_size))
        return b, d


def _xla_causal_pairs(length: int) -> int:
    """Query-key pairs xla_attention computes causally: each 128-row block reads keys up to
    its last row."""
    return sum(_ATTN_BLOCK * min(length, st + _ATTN_BLOCK) if st + _ATTN_BLOCK <= length
               else (length - st) * length for st in range(0, length, _ATTN_BLOCK))


def text_layer_forward(loc: Local, rows: int, length: int) -> int:
    """Intermediates of one decoder layer's forward for `rows` x `length` tokens, compute
    dtype: 3 x hidden (two RMSNorm outputs, o_proj out; laid out like the residual stream) +
    q and attention output (heads x head_dim each) + k, v (kv_heads x head_dim) + 3 x mlp
    (gate, up, their product), the last four over the batch's local rows."""
    t = loc.cfg.text
    hd = t.head_dim
    b = loc.rows(rows)
    b_res, d_res = loc.residual(rows, length)
    h = loc.dim("heads", t.num_attention_heads)
    hkv = loc.dim("kv_heads", t.num_key_value_heads)
    f = loc.dim("mlp", t.intermediate_size)
    per_token = 2 * h * hd + 2 * hkv * hd + 3 * f
    return (b * per_token + b_res * 3 * d_res) * length * loc.dtype_bytes


def attention_scores(loc: Local, b: int, length: int, backend: str, backward: bool) -> int:
    """Score memory of one decoder layer's causal attention.

    xla backend, for a backward: every block's fp32 softmax output and its bf16 copy stay
    alive for the layer's backward: b x heads x causal pairs x (4 + 2) bytes (quadratic in
    the sequence). Forward only: one 128-row block of fp32 logits and probabilities at a time.
    splash / cudnn (flash kernels): only the per-row softmax statistics, b x heads x L x 8.
    """
    t = loc.cfg.text
    h = loc.dim("heads", t.num_attention_heads)
    if backend == "xla":
        if backward:
            return b * h * _xla_causal_pairs(length) * 6
        return b * h * min(_ATTN_BLOCK, length) * length * 6
    return b * h * length * 8


def vision_forward(loc: Local, videos: int, w: Workload, trainable: bool) -> dict[str, int]:
    """The vision tower over `videos` videos of `visual_tokens` merged tokens each
    (x merge_unit patches). Frozen (the 3B/7B recipe): forward only, nothing saved, so its
    cost is the input pixels (fp32) plus one block's working set: 7 x hidden (norms, qkv,
    attention out, proj) + 3 x mlp per patch, and one 128-query block of fp32 scores over
    the full-attention segment (a temporal patch: up to max_pixels / patch^2 patches).
    Trainable (no remat in the tower): every block's intermediates and scores are kept."""
    v = loc.cfg.vision
    n = videos * w.visual_tokens * v.merge_unit
    c = loc.dtype_bytes
    heads = loc.dim("heads", v.num_heads)
    dv = v.hidden_size
    f = loc.dim("mlp", v.intermediate_size)
    block = n * c * (4 * dv + 3 * dv * heads // v.num_heads + 3 * f)
    pixels = n * v.patch_dim * 4
    residual = 2 * n * dv * c
    if not trainable:
        scores = n * heads * min(_ATTN_BLOCK, w.frame_patches) * 6
        return {"pixels": pixels, "tower": residual + block + scores}
    seg = w.frame_patches
    scores = n * heads * seg * 6
    return {"pixels": pixels, "tower": residual + v.depth * (block + scores) + block}


def train_activations(loc: Local, w: Workload, *, rows: int, length: int, logits_len: int,
                      prompts: int, remat: str, backend: str, vision_trainable: bool,
                      logit_copies: int = 3) -> dict[str, int]:
    """Activation bytes of one forward + backward (the text decoder differentiated).

    remat "full" (3B/7B): each layer keeps only its input, b x L x hidden (compute dtype),
    and one layer at a time is recomputed for its backward: its forward intermediates plus
    cotangents of the same size (2 x `text_layer_forward`) plus its attention scores.
    "dots": each layer also keeps its projection outputs (q, k, v, o, gate, up, down).
    "none": each layer keeps all its intermediates and scores.
    Plus: the rotary tables (cos, sin fp32), the final norm output and its cotangent, fp32
    logits at the predicted positions only ([b, positions, vocab] x `logit_copies` live
    arrays: logits, log-softmax, cotangent), and the vision tower, which runs first.
    """
    t = loc.cfg.text
    c = loc.dtype_bytes
    b = loc.rows(rows)
    hd = t.head_dim
    b_res, d_res = loc.residual(rows, length)
    layer_in = b_res * length * d_res * c
    fwd = text_layer_forward(loc, rows, length)
    scores = attention_scores(loc, b, length, backend, backward=True)
    if remat == "none":
        saved = t.num_hidden_layers * (layer_in + fwd + scores)
        working = fwd
    else:
        per_layer = layer_in
        if remat == "dots":
            h = loc.dim("heads", t.num_attention_heads)
            hkv = loc.dim("kv_heads", t.num_key_value_heads)
            f = loc.dim("mlp", t.intermediate_size)
            per_layer += b * length * c * (2 * t.hidden_size + h * hd + 2 * hkv * hd + 2 * f)
        saved = t.num_hidden_layers * per_layer
        working = 2 * fwd + scores
    vocab = loc.dim("vocab", t.vocab_size)
    logits = logit_copies * b * logits_len * vocab * 4
    tables = 2 * b * length * hd * 4 + 2 * layer_in
    vis = vision_forward(loc, loc.rows(prompts), w, vision_trainable)
    decoder = saved + working + logits
    return {
        "saved layer inputs" if remat != "none" else "saved layer activations": saved,
        "one layer recomputed + its backward": working,
        "logits (fp32, predicted positions)": logits,
        "rotary tables, final norm": tables,
        # the tower runs (and frees its working set) before the decoder: only what it needs
        # beyond the decoder's own peak adds to the step's
        "vision tower, beyond the decoder's": max(0, vis["tower"] - decoder),
        "vision pixels": vis["pixels"],
    }


def rollout_memory(loc: Local, w: Workload, backend: str,
                   vision_trainable: bool) -> dict[str, int]:
    """GRPO sampling (`tempo_jax.generate`), forward only.

    KV cache: rows (prompts x G, split over data x fsdp) x (prompt + max_new_tokens) slots x
    layers x 2 (K, V) x kv_heads x head_dim, compute dtype. The prefill runs once per prompt
    and keeps every layer's K, V of the prompt ([prompts, L, kv_heads, head_dim]) until they
    are broadcast into the cache; one prefill layer's forward is live at a time.
    """
    t = loc.cfg.text
    c = loc.dtype_bytes
    rows = loc.rows(w.rows)
    bp = loc.rows(w.prompts)
    hkv = loc.dim("kv_heads", t.num_key_value_heads)
    kv_token = t.num_hidden_layers * 2 * hkv * t.head_dim * c
    cache = rows * (w.seq + w.new_tokens) * kv_token
    prefill_kv = bp * w.seq * kv_token
    layer = text_layer_forward(loc, w.prompts, w.seq) + attention_scores(
        loc, bp, w.seq, backend, backward=False)
    b_res, d_res = loc.residual(w.prompts, w.seq)
    embeds = b_res * w.seq * d_res * c * 2 + 2 * bp * w.seq * t.head_dim * 4
    vocab = loc.dim("vocab", t.vocab_size)
    logits = 3 * rows * vocab * 4
    vis = vision_forward(loc, bp, w, False)
    return {
        "rollout KV cache": cache,
        "prefill K/V of the prompts": prefill_kv,
        "prefill layer + embeddings": max(layer, vis["tower"]) + embeds + logits,
        "vision pixels": vis["pixels"],
    }


# ============================================================================ the plan
def _gather_buffer(plans: list[TensorPlan], mesh: dict[str, int]) -> int:
    """FSDP: a layer's weights are all-gathered (over data/fsdp, still split over tensor)
    just before use, and the next layer's gather overlaps: 2 x the largest layer, or the
    largest single tensor outside the layers (the 150k-row embedding / LM head), gathered,
    whichever is more. Bytes beyond the local shards."""
    if mesh.get("fsdp", 1) * mesh.get("data", 1) == 1:
        return 0
    tp = mesh.get("tensor", 1)
    layers: dict[tuple, int] = {}
    single = 0
    for p in plans:
        divs = []
        for i, _ in enumerate(p.shape):
            entry = p.spec[i] if i < len(p.spec) else None
            names = () if entry is None else (entry,) if isinstance(entry, str) else entry
            divs.append(tp if "tensor" in names else 1)
        gathered = math.prod(d // k for d, k in zip(p.shape, divs, strict=True)) * p.itemsize
        extra = gathered - p.shard_bytes
        if "layers" in p.path or "blocks" in p.path:
            key = p.path[:3]
            layers[key] = layers.get(key, 0) + extra
        else:
            single = max(single, extra)
    return max(2 * max(layers.values(), default=0), single)


def _kept_whole(p: TensorPlan, mesh: dict[str, int], rules: shd.Rules) -> bool:
    """True when a rule maps one of the tensor's dimensions to a mesh axis of size > 1 but
    the dimension stays whole (not divisible, or the axis is taken by an earlier dimension)."""
    table = dict(rules)
    for i, name in enumerate(p.axes or ()):
        target = table.get(name) if name is not None else None
        names = () if target is None else (target,) if isinstance(target, str) else target
        if any(mesh.get(n, 1) > 1 for n in names) and p.spec[i] is None:
            return True
    return False


def _fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def plan(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str, *,
         rules: shd.Rules | None = None, search: bool = True) -> dict:
    """The analytic memory plan of `config` on `mesh` (axis -> size) of `chip` devices.

    Per device and per phase of training: SFT step, GRPO rollout, GRPO update and the
    optimizer apply (its own jitted function in `tempo_jax.train`, without donation, so the
    new parameters and optimizer state coexist with the old). Each phase's total gets
    `MARGIN` on top for XLA temporaries; the peak phase decides `fits`. When it does not fit
    and `search` is true, `smallest_mesh` is the smallest mesh (same data axis, fsdp and then
    tensor in powers of two) that does. `rules`: the config's (`config_rules`) by default.
    """
    chip_spec = chip_info(chip)
    rules = config_rules(config) if rules is None else rules
    unknown = set(mesh) - set(shd.MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are "
                         f"{', '.join(shd.MESH_AXES)}")
    mesh = {a: int(mesh.get(a, 1)) for a in shd.MESH_AXES}
    mcfg = model_config(config)
    dtype = jnp.dtype(config.model.dtype).name
    c = jnp.dtype(dtype).itemsize
    freeze = bool(config.model.freeze_vision)
    remat = config.model.remat
    backend = resolve_backend(config.model.attention_backend, chip_spec.platform)
    plans = tensor_plans(mcfg, mesh, dtype=dtype, freeze_vision=freeze, rules=rules)
    w = workload(config, mcfg)
    loc = Local(mesh, rules, mcfg, c)

    n_params = sum(p.size for p in plans)
    n_trainable = sum(p.size for p in plans if p.trainable)
    n_vision = sum(p.size for p in plans if "visual" in p.path)
    params_b = sum(p.shard_bytes for p in plans)
    train_elems = sum(p.shard_size for p in plans if p.trainable)
    train_b = sum(p.shard_bytes for p in plans if p.trainable)
    grads_b = train_b * (2 if w.accum > 1 else 1)  # accumulation keeps a running sum
    opt_per = optimizer_bytes_per_param(config, dtype)
    opt_b = train_elems * opt_per
    ref_b = train_b if w.reference else 0
    gather_b = _gather_buffer(plans, mesh)
    replicated = [p for p in plans if _kept_whole(p, mesh, rules)]

    static = {"parameters": params_b, "optimizer state": opt_b, "reference model": ref_b}
    phases: dict[str, dict[str, Any]] = {}
    if w.sft:
        act = train_activations(loc, w, rows=w.sft_rows, length=w.seq, logits_len=w.answer_len,
                                prompts=w.sft_rows, remat=remat, backend=backend,
                                vision_trainable=not freeze)
        phases["sft step"] = {"parameters": params_b, "gradients": grads_b,
                              "optimizer state": opt_b, "activations": act,
                              "fsdp all-gather buffers": gather_b}
    if w.grpo:
        roll = rollout_memory(loc, w, backend, not freeze)
        kv = roll.pop("rollout KV cache")
        phases["grpo rollout"] = {**static, "rollout KV cache": kv, "activations": roll,
                                  "fsdp all-gather buffers": gather_b}
        act = train_activations(loc, w, rows=w.rows, length=w.seq + w.new_tokens,
                                logits_len=w.new_tokens, prompts=w.prompts, remat=remat,
                                backend=backend, vision_trainable=not freeze)
        phases["grpo update"] = {**static, "gradients": train_b, "activations": act,
                                 "fsdp all-gather buffers": gather_b}
    phases["optimizer apply"] = {
        "parameters": params_b + train_b, "gradients": train_b, "optimizer state": 2 * opt_b,
        "reference model": ref_b}
    for ph in phases.values():
        sub = sum(sum(v.values()) if isinstance(v, dict) else v for v in ph.values())
        ph["xla temporaries margin"] = int(MARGIN * sub)
        ph["total"] = sub + ph["xla temporaries margin"]
    peak_phase = max(phases, key=lambda k: phases[k]["total"])
    peak = phases[peak_phase]["total"]
    fits = peak <= chip_spec.hbm_bytes

    notes = []
    batch_div = mesh["data"] * mesh["fsdp"]
    for label, n in (("sft micro-batch", w.sft_rows if w.sft else 0),
                     ("rl.batch_size (prompts)", w.prompts if w.grpo else 0),
                     ("GRPO rows (prompts x G)", w.rows if w.grpo else 0)):
        if n and batch_div > 1 and n % batch_div:
            notes.append(f"{label} {n} is not divisible by data x fsdp = {batch_div}: those "
                         "rows are not split over the devices")
    if backend == "xla" and remat != "none":
        notes.append("attention_backend 'xla' keeps [rows, heads, L, L]-sized scores for a "
                     "layer's backward; splash (TPU) / cudnn (GPU) need O(L)")
    if w.seq_estimated:
        notes.append(f"data.max_seq_len is 0 (bucketed per batch): sequence estimated at "
                     f"{w.seq} tokens")
    if chip_spec.platform == "gpu":
        notes.append("JAX preallocates 75% of GPU memory: run with "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 for the capacity assumed here")
    if replicated:
        rb = sum(p.shard_bytes for p in replicated)
        notes.append(f"{len(replicated)} parameter tensors ({rb / MIB:.1f} MiB per device) stay "
                     "replicated: their sharded dimension does not divide by the mesh axis")
    if opt_per == 6:
        notes.append("optimizer: optax adamw keeps mu in fp32 (optim.fp32_state) but nu in the "
                     "bf16 parameter dtype")

    out = {
        "config": config.get("size", ""),
        "chip": chip,
        "mesh": mesh,
        "devices": math.prod(mesh.values()),
        "param_count": n_params,
        "vision_param_count": n_vision,
        "trainable_param_count": n_trainable,
        "dtype": dtype,
        "remat": remat,
        "attention_backend": backend,
        "workload": {**dataclasses.asdict(w), "rows": w.rows},
        "bytes": {
            "parameters": params_b, "gradients": grads_b, "optimizer state": opt_b,
            "reference model": ref_b,
            "rollout KV cache": phases.get("grpo rollout", {}).get("rollout KV cache", 0),
            "fsdp all-gather buffers": gather_b,
        },
        "phases": phases,
        "peak_phase": peak_phase,
        "per_device_bytes": int(peak),
        "hbm_bytes": chip_spec.hbm_bytes,
        "fits": bool(fits),
        "method": "analytic",
        "notes": notes,
        "smallest_mesh": None,
    }
    if not fits and search:
        out["smallest_mesh"] = smallest_mesh(config, mesh, chip, rules=rules)
    return out


def candidate_meshes(mesh: dict[str, int], max_devices: int = 8192) -> list[dict[str, int]]:
    """Meshes in order of device count: the given data axis, fsdp in powers of two, then
    tensor (1, 2, 4, 8) at each count."""
    data = mesh.get("data", 1)
    out = []
    n = 1
    while data * n <= max_devices:
        for tensor in (1, 2, 4, 8):
            if tensor <= n and n % tensor == 0:
                out.append({"data": data, "fsdp": n // tensor, "tensor": tensor})
        n *= 2
    return out


def smallest_mesh(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str, *,
                  rules: shd.Rules | None = None, min_devices: int = 1) -> dict | None:
    """The first mesh of `candidate_meshes` (of at least `min_devices`) on which the analytic
    plan fits, with its peak, or None when none up to 8192 devices does."""
    for cand in candidate_meshes(mesh):
        if math.prod(cand.values()) < min_devices:
            continue
        p = plan(config, cand, chip, rules=rules, search=False)
        if p["fits"]:
            return {"mesh": cand, "devices": p["devices"], "per_device_bytes":
                    p["per_device_bytes"], "peak_phase": p["peak_phase"]}
    return None


# ============================================================================ AOT (TPU)
def topology_name(chip: Chip, devices: int) -> tuple[str, tuple[int, ...], tuple[bool, ...]]:
    """libtpu topology of a slice of `devices` chips, in the shapes Cloud TPU slices have
    (MaxText's accelerator table): 3D tori for v4/v5p (4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4,
    ..., wrap-around from 64 chips), 2D for v5e. Returns (name, chips per host, wrap)."""
    if devices < 1 or devices & (devices - 1):
        raise ValueError(f"AOT needs a power-of-two slice, got {devices} chips")
    if chip.dims == 2:
        dims = [1, 1]
        k = 0
        while math.prod(dims) < devices:
            dims[k % 2] *= 2
            k += 1
        dims.sort()
        name = f"{chip.topology}:{dims[0]}x{dims[1]}"
        host = (min(2, dims[0]), min(2, dims[1]), 1)
        return name, host, (False, False, False)
    dims = [2, 2, 1]
    if devices < 4:
        dims = [2, 2, 1]  # the smallest slice; the mesh uses its first chips
    else:
        order = [2, 1, 0]
        k = 0
        while math.prod(dims) < devices:
            if dims[2] < dims[1]:
                dims[2] *= 2
            else:
                dims[order[k % 3]] *= 2
                k += 1
            dims = sorted(dims)
    wrap = (True, True, True) if math.prod(dims) >= 64 else (False, False, False)
    return f"{chip.topology}:{'x'.join(map(str, dims))}", (2, 2, 1), wrap


def libtpu_available() -> tuple[bool, str]:
    if importlib.util.find_spec("libtpu") is None:
        return False, "libtpu is not installed (pip install libtpu, or tempo_jax[tpu])"
    return True, ""


def aot_plan(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str, *,
             timeout: float = 1800, phases: Sequence[str] | None = None) -> dict:
    """Compile the training steps for the real TPU topology in a subprocess (libtpu prints
    to the terminal and a compiler abort must not take the planner down) and return
    `{"topology", "phases": {phase: memory_analysis numbers}}`, or `{"error": reason}`."""
    chip_spec = chip_info(chip)
    if chip_spec.platform != "tpu":
        return {"error": f"AOT compilation here targets TPUs; {chip} is a GPU"}
    ok, why = libtpu_available()
    if not ok:
        return {"error": why}
    devices = math.prod(mesh.values())
    try:
        topo = topology_name(chip_spec, devices)
    except ValueError as e:
        return {"error": str(e)}
    job = json.dumps({"config": config.to_dict(), "mesh": mesh, "chip": chip,
                      "topology": topo, "phases": list(phases or [])})
    env = dict(os.environ)
    env.setdefault("TPU_SKIP_MDS_QUERY", "1")
    env["JAX_PLATFORMS"] = "cpu"  # the TPU client is compile-only, made by the topology
    try:
        proc = subprocess.run([sys.executable, "-c", _WORKER], input=job,
                              capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"AOT compilation did not finish in {timeout:.0f}s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"AOT compilation failed ({tail[:300]})"}
    return json.loads(lines[-1])


_WORKER = "from tempo_jax.plan import _aot_worker; _aot_worker()"


def _video_grid(visual_tokens: int, merge: int) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of exactly `visual_tokens` merged tokens: square frames of up
    to 32 x 32 patches, as many temporal patches as the budget takes."""
    for side in range(32, 0, -merge):
        per_t = (side // merge) ** 2
        if side % merge == 0 and visual_tokens % per_t == 0:
            return visual_tokens // per_t, side, side
    return visual_tokens, merge, merge


def _aot_inputs(config, mcfg: ModelConfig, rows: int, length: int, mesh, rules) -> dict:
    """Abstract (shape, dtype, sharding) model inputs of `rows` examples of `length` tokens,
    one video each at the SAA budget, laid out as `sharding.global_batch` places a batch on
    one host: token arrays split over the batch axes, the vision arrays replicated (split
    like the batch where the sharding module has no `global_batch`)."""
    from jax.sharding import NamedSharding

    from tempo_jax.models.qwen2_5_vl.vision_meta import vision_metadata

    v = mcfg.vision
    grid = _video_grid(int(config.saa.max_visual_tokens), v.spatial_merge_size)
    meta = vision_metadata(np.asarray([grid] * rows), v)
    n = rows * math.prod(grid)

    def sds(shape, dtype, axes):
        spec = shd.logical_to_spec(axes, rules, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    replicate_vision = hasattr(shd, "global_batch")

    def batch_axes(ndim):
        if replicate_vision:
            return (None,) * ndim
        return ("batch",) + (None,) * (ndim - 1)

    return {
        "input_ids": sds((rows, length), jnp.int32, ("batch", "seq")),
        "attention_mask": sds((rows, length), jnp.int32, ("batch", "seq")),
        "position_ids": sds((3, rows, length), jnp.int32, (None, "batch", "seq")),
        "pixel_values": sds((n, v.patch_dim), jnp.float32, batch_axes(2)),
        "vision_meta": {k: sds(a.shape, a.dtype, batch_axes(a.ndim)) for k, a in meta.items()},
        "num_image_features": sds((), jnp.int32, ()),
    }


def _aot_worker() -> None:
    """Subprocess body of `aot_plan`: read the job (JSON on stdin), compile the SFT step,
    the GRPO rollout and update and the optimizer apply of `tempo_jax.train` for the TPU
    topology, print `memory_analysis()` per phase as one JSON line."""
    import time

    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tempo_jax import train
    from tempo_jax.generate import _generate
    from tempo_jax.models.qwen2_5_vl.model import RuntimeOptions
    from tempo_jax.models.qwen2_5_vl.params import abstract_model
    from tempo_jax.rl import grpo as grpo_lib

    job = json.loads(sys.stdin.read())
    config = ml_collections.ConfigDict(job["config"])
    sizes = job["mesh"]
    name, host, wrap = job["topology"]
    chip = chip_info(job["chip"])
    topo = topologies.get_topology_desc(
        platform="tpu", topology_name=name,
        chip_config_name="default" if chip.dims == 2 else "megacore",
        chips_per_host_bounds=tuple(host), num_slices=1, wrap=tuple(wrap))
    n_dev = math.prod(sizes[a] for a in shd.MESH_AXES)
    devices = np.asarray(topo.devices[:n_dev], dtype=object)
    mesh = Mesh(devices.reshape([sizes[a] for a in shd.MESH_AXES]), shd.MESH_AXES)
    rules = config_rules(config)

    mcfg = model_config(config)
    phases_wanted = job.get("phases") or ["sft step", "grpo rollout", "grpo update",
                                          "optimizer apply"]
    dtype = jnp.dtype(config.model.dtype)
    opts = RuntimeOptions(dtype=dtype,
                          attention_backend=resolve_backend(config.model.attention_backend, "tpu"),
                          remat=config.model.remat)
    model = abstract_model(mcfg, dtype, opts)

    def placed(state):
        leaves, tdef = jax.tree.flatten(state)
        shards = jax.tree.leaves(shd.state_shardings(state, mesh, rules))
        return jax.tree.unflatten(tdef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                         for x, s in zip(leaves, shards, strict=True)])

    graphdef, params, frozen = nnx.split(model, train.trainable_filter(config), ...)
    params, frozen = placed(params), placed(frozen)
    w = workload(config, mcfg)

    def sds(shape, dt, axes):
        spec = shd.logical_to_spec(axes, rules, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    def stats(compiled) -> dict:
        m = compiled.memory_analysis()
        out = {k: int(getattr(m, k)) for k in (
            "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")}
        out["peak"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                       - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
                       + out["generated_code_size_in_bytes"])
        return out

    plans = tensor_plans(mcfg, sizes, dtype=dtype.name,
                         freeze_vision=bool(config.model.freeze_vision), rules=rules)
    train_b = sum(p.shard_bytes for p in plans if p.trainable)
    frozen_b = sum(p.shard_bytes for p in plans if not p.trainable)
    opt_b = sum(p.shard_size for p in plans if p.trainable) * optimizer_bytes_per_param(
        config, dtype.name)
    ref_b = train_b if w.reference else 0
    phases: dict[str, dict] = {}
    timings = {}

    use_mesh = getattr(shd, "use_mesh", None)
    context = use_mesh(mesh, rules) if use_mesh else contextlib.nullcontext()
    with context:  # the trainer traces its steps inside use_mesh: constraints apply

        def record(phase, compiled, resident):
            s = stats(compiled)
            s["resident_not_in_arguments"] = resident
            s["total"] = s["peak"] + resident
            phases[phase] = s

        if w.sft and "sft step" in phases_wanted:
            t0 = time.perf_counter()
            rows = w.sft_rows
            inputs = _aot_inputs(config, mcfg, rows, w.seq, mesh, rules)
            k = w.answer_len
            grad_fn = jax.jit(jax.value_and_grad(train.sft_loss, has_aux=True), static_argnums=(2,))
            compiled = grad_fn.lower(
                params, frozen, graphdef, inputs, sds((rows, k), jnp.int32, ("batch", None)),
                sds((rows, k), jnp.int32, ("batch", None)),
                sds((rows, k), jnp.bool_, ("batch", None))).compile()
            record("sft step", compiled, opt_b)
            timings["sft step"] = round(time.perf_counter() - t0, 1)
        if w.grpo and ("grpo rollout" in phases_wanted or "grpo update" in phases_wanted):
            inputs = _aot_inputs(config, mcfg, w.prompts, w.seq, mesh, rules)
        if w.grpo and "grpo rollout" in phases_wanted:
            t0 = time.perf_counter()
            full_graphdef, full_state = nnx.split(model)
            full_state = placed(full_state)
            compiled = _generate.lower(
                full_graphdef, full_state, inputs, sds((w.prompts,), jnp.int32, ("batch",)),
                jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P())),
                max_new_tokens=w.new_tokens, num_samples=w.generations,
                temperature=float(config.rl.temperature), top_k=0, top_p=float(config.rl.top_p),
                eos_ids=(mcfg.eos_token_id, mcfg.bos_token_id), pad_id=mcfg.bos_token_id).compile()
            record("grpo rollout", compiled, opt_b + ref_b)
            timings["grpo rollout"] = round(time.perf_counter() - t0, 1)
        if w.grpo and "grpo update" in phases_wanted:
            t0 = time.perf_counter()
            r, t = w.rows, w.new_tokens
            gcfg = grpo_lib.GRPOConfig(
                num_generations=w.generations, eps_low=config.rl.eps_low,
                eps_high=config.rl.eps_high, beta=config.rl.beta,
                scale_rewards=config.rl.scale_rewards, loss_agg=config.rl.loss_agg,
                num_iterations=config.rl.num_iterations)
            grad_fn = jax.jit(jax.value_and_grad(train.grpo_objective, has_aux=True),
                              static_argnums=(2, 10, 11))
            ref = sds((r, t), jnp.float32, ("batch", None)) if w.reference else None
            compiled = grad_fn.lower(
                params, frozen, graphdef, inputs, sds((r, t), jnp.int32, ("batch", None)),
                sds((r, t), jnp.bool_, ("batch", None)), sds((r,), jnp.int32, ("batch",)),
                sds((r, t), jnp.float32, ("batch", None)), ref, sds((r,), jnp.float32, ("batch",)),
                gcfg, w.generations).compile()
            record("grpo update", compiled, opt_b + ref_b)
            timings["grpo update"] = round(time.perf_counter() - t0, 1)

        if "optimizer apply" not in phases_wanted:
            print(json.dumps({"topology": name, "phases": phases, "compile_seconds": timings}))
            return
        t0 = time.perf_counter()
        tx = train.make_optimizer(1e-5, 1, 10, config.optim)
        opt_state = jax.eval_shape(tx.init, params)

        def like_params(tree):
            # the moments are trees like the parameters: give them the parameters' shardings
            p_def, p_leaves = jax.tree.structure(params), jax.tree.leaves(params)
            rep = NamedSharding(mesh, P())

            def fix(sub):
                if isinstance(sub, jax.ShapeDtypeStruct):
                    return jax.ShapeDtypeStruct(sub.shape, sub.dtype, sharding=rep)
                return jax.tree.unflatten(p_def, [
                    jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=q.sharding)
                    for x, q in zip(jax.tree.leaves(sub), p_leaves, strict=True)])

            return jax.tree.map(fix, tree, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
                                or jax.tree.structure(x) == p_def)

        opt_state = like_params(opt_state)

        @jax.jit
        def apply(params, opt_state, grads):
            import optax

            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        compiled = apply.lower(params, opt_state, params).compile()
        record("optimizer apply", compiled, frozen_b + ref_b)
        timings["optimizer apply"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({"topology": name, "phases": phases, "compile_seconds": timings}))


# ============================================================================ output
ROW_ORDER = ("parameters", "gradients", "optimizer state", "reference model",
             "rollout KV cache", "activations", "fsdp all-gather buffers",
             "xla temporaries margin")


def format_plan(p: dict) -> str:
    """The readable table."""
    mesh = p["mesh"]
    lines = [
        f"tempo_jax plan: {p['config']} on {p['devices']} x {p['chip']} "
        f"(mesh {mesh_str(mesh)}), method {p['method']}",
        f"parameters: {p['param_count']:,} ({p['param_count'] - p['vision_param_count']:,} "
        f"text + {p['vision_param_count']:,} vision); trainable {p['trainable_param_count']:,}",
    ]
    w = p["workload"]
    batch = []
    if w["sft"]:
        batch.append(f"SFT {w['sft_rows']} x {w['seq']} tokens")
    if w["grpo"]:
        batch.append(f"GRPO {w['prompts']} prompts x G={w['generations']} = {w['rows']} rows x "
                     f"({w['seq']} + {w['new_tokens']}) tokens")
    lines.append(f"dtype {p['dtype']}, remat {p['remat']}, attention {p['attention_backend']}; "
                 + "; ".join(batch))
    names = list(p["phases"])
    width = 40
    head = "per device, GiB".ljust(width) + "".join(n.rjust(16) for n in names)
    lines += ["", head, "-" * len(head)]
    rows = [k for k in ROW_ORDER if any(k in ph for ph in p["phases"].values())]
    for ph in p["phases"].values():
        rows += [k for k in ph if k not in rows and k not in ("total", "compiled total")]
    rows.append("total")
    for r in rows:
        vals = []
        sub_keys: list[str] = []
        for n in names:
            v = p["phases"][n].get(r)
            if isinstance(v, dict):
                vals.append(sum(v.values()))
                sub_keys += [k for k in v if k not in sub_keys]
            else:
                vals.append(v)
        cells = "".join(("-" if v is None else _fmt_gib(v)).rjust(16) for v in vals)
        if r == "total":
            lines.append("-" * len(head))
        lines.append(f"  {r}".ljust(width) + cells)
        for k in sub_keys:
            sub = [p["phases"][n].get(r, {}).get(k) if isinstance(p["phases"][n].get(r), dict)
                   else None for n in names]
            if not any(sub):
                continue  # e.g. a frozen vision tower needing nothing beyond the decoder
            lines.append(f"    {k}"[:width].ljust(width)
                         + "".join(("" if v is None else _fmt_gib(v)).rjust(16) for v in sub))
    aot = p.get("aot") or {}
    if aot.get("phases"):
        lines.append("  compiled (memory_analysis)".ljust(width) + "".join(
            (_fmt_gib(aot["phases"][n]["total"]) if n in aot["phases"] else "-").rjust(16)
            for n in names))
    lines.append("")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"peak: {p['per_device_bytes'] / GiB:.2f} GiB ({p['peak_phase']}) of "
                 f"{p['hbm_bytes'] / GiB:.2f} GiB per {p['chip']} device -> {verdict} "
                 f"({100 * p['per_device_bytes'] / p['hbm_bytes']:.0f}%)")
    sm = p.get("smallest_mesh")
    if not p["fits"]:
        if sm:
            lines.append(f"smallest mesh that fits: {mesh_str(sm['mesh'])} ({sm['devices']} x "
                         f"{p['chip']}, peak {sm['per_device_bytes'] / GiB:.2f} GiB, "
                         f"{sm['peak_phase']}; analytic search, same batch sizes)")
        else:
            lines.append("no mesh of up to 8192 devices fits (analytic); reduce the batch, "
                         "sequence or use splash/cudnn attention")
    for n in p["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"method: {p['method']}" + (f" ({p['method_note']})" if p.get("method_note")
                                             else ""))
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str,
        method: str = "auto", aot_timeout: float = 1800) -> dict:
    """`plan`, then, for TPU chips and method auto/aot, the compiled numbers replace the
    analytic peak (the analytic breakdown stays alongside)."""
    p = plan(config, mesh, chip)
    if method == "analytic":
        p["method_note"] = "requested"
        return p
    if chip_info(chip).platform != "tpu":
        p["method_note"] = (f"AOT compilation needs a TPU target; for {chip} the count is "
                            "analytic")
        return p
    if libtpu_available()[0]:
        print(f"compiling the training steps for {p['devices']} x {chip} ahead of time (can "
              f"take many minutes for 3B/7B; --method analytic skips it)", file=sys.stderr)
    aot = aot_plan(config, p["mesh"], chip, timeout=aot_timeout)
    if "error" in aot:
        p["method_note"] = f"AOT unavailable, analytic count used: {aot['error']}"
        if method == "aot":
            raise RuntimeError(p["method_note"])
        return p
    p["aot"] = aot
    p["method"] = f"aot:{aot['topology']}"
    for name, ph in aot["phases"].items():
        if name in p["phases"]:
            p["phases"][name]["compiled total"] = ph["total"]
    peak_phase = max(aot["phases"], key=lambda k: aot["phases"][k]["total"])
    p["per_device_bytes"] = int(aot["phases"][peak_phase]["total"])
    p["peak_phase"] = peak_phase
    p["fits"] = p["per_device_bytes"] <= p["hbm_bytes"]
    if not p["fits"] and p["smallest_mesh"] is None:  # the compiler disagrees: search above
        p["smallest_mesh"] = smallest_mesh(config, p["mesh"], chip,
                                           min_devices=2 * p["devices"])
    p["method_note"] = ("per-device peak from compiled.memory_analysis() of the steps "
                        "compiled for the topology, plus resident state they do not take as "
                        "arguments; the breakdown is analytic")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the plan (the tests call it)."""
    parser = argparse.ArgumentParser(
        prog="python -m tempo_jax.plan",
        description="Ahead-of-time memory plan of a tempo_jax training config on a mesh.")
    parser.add_argument("--config", default="configs/tempo_r0.py:7b",
                        help="config file and argument, e.g. configs/tempo_r0.py:7b; "
                             "--config.a.b=value overrides fields")
    parser.add_argument("--mesh", required=True, help="e.g. fsdp=64 or data=2,fsdp=32,tensor=1")
    parser.add_argument("--chip", required=True, choices=sorted(CHIPS))
    parser.add_argument("--method", default="auto", choices=("auto", "analytic", "aot"),
                        help="auto: AOT-compile for TPU chips when libtpu can run, else "
                             "analytic")
    parser.add_argument("--aot-timeout", type=float, default=1800,
                        help="seconds allowed for the AOT compilation before falling back")
    parser.add_argument("--json", action="store_true",
                        help="print the plan as one JSON object on the last line")
    args, rest = parser.parse_known_args(argv)
    try:
        mesh = parse_mesh(args.mesh)
    except ValueError as e:
        parser.error(str(e))
    try:
        config = load_config(args.config)
        apply_overrides(config, rest)
    except UsageError as e:
        parser.error(str(e))
    p = run(config, mesh, args.chip, args.method, args.aot_timeout)
    print(format_plan(p))
    if args.json:
        print(json.dumps(_jsonable(p)))
    return p


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


if __name__ == "__main__":
    main()
