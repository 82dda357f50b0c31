"""The analytic memory model: per-device bytes of every phase of training, from the abstract
model (nothing is allocated).

Each tensor's shard is computed from its logical axes with the same rules and the same
divisibility fallback as `tempo_jax.sharding.logical_to_spec`; the activation formulas follow
the code paths of the trainer's steps (`tempo_jax.training.steps`, stated in each function's
docstring); the optimizer phase counts what the factory's donating `apply` holds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh

from tempo_jax import sharding as shd
from tempo_jax.models.attention import resolve_backend
from tempo_jax.models.qwen2_5_vl.config import ModelConfig
from tempo_jax.models.qwen2_5_vl.model import RESIDUAL
from tempo_jax.plan.chips import MIB, chip_info
from tempo_jax.training.optimizer import make_optimizer
from tempo_jax.training.setup import model_config

# share of each phase's total added for XLA temporaries (fusion buffers, collective scratch,
# fragmentation) that no formula here names
MARGIN = 0.10

# xla_attention runs long queries in blocks of this many rows (tempo_jax.models.attention)
_ATTN_BLOCK = 128


def abstract_mesh(mesh: dict[str, int]) -> AbstractMesh:
    """A mesh of the given shape without devices: `logical_to_spec` only reads its shape."""
    return AbstractMesh(tuple(mesh.get(a, 1) for a in shd.MESH_AXES), shd.MESH_AXES)


def config_rules(config: ml_collections.ConfigDict) -> shd.Rules:
    """The logical-axis rules the trainer uses for this config (`config.mesh.rules` and
    `rule_overrides`)."""
    return shd.rules_from_config(config.mesh)



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
def _abstract_params(mcfg: ModelConfig, dtype_name: str, scan_layers: bool = False) -> tuple:
    """(path, shape, logical axes, itemsize) of every parameter, from `nnx.eval_shape`, in
    the layout the trainer builds (stacked decoder layers when `scan_layers`)."""
    from flax import nnx

    from tempo_jax.models.families import abstract_model
    from tempo_jax.models.layers import RuntimeOptions

    dtype = jnp.dtype(dtype_name)
    model = abstract_model(mcfg, dtype, RuntimeOptions(dtype=dtype, scan_layers=scan_layers))
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
                 freeze_vision: bool = True, rules: shd.Rules = shd.DEFAULT_RULES,
                 scan_layers: bool = False) -> list[TensorPlan]:
    """Every parameter with its PartitionSpec and local shard on `mesh`, through
    `tempo_jax.sharding.logical_to_spec` itself (a dimension the mesh axes do not divide stays
    replicated), so the plan and a real `shard_model` agree by construction."""
    amesh = abstract_mesh(mesh)
    out = []
    for path, shape, axes, itemsize in _abstract_params(mcfg, jnp.dtype(dtype).name,
                                                        scan_layers):
        spec = shd.logical_to_spec(axes, rules, amesh, shape)
        trainable = not (freeze_vision and "visual" in path)
        out.append(TensorPlan(path, shape, axes, itemsize, spec, shard_shape(spec, shape, mesh),
                              trainable))
    return out


def optimizer_bytes_per_param(config: ml_collections.ConfigDict, dtype: str) -> int:
    """Bytes of optimizer state per trainable element, probed from the trainer's own optimizer
    (`tempo_jax.training.optimizer.make_optimizer` of `config.optim`): with `optim.fp32_state`
    both Adam moments are fp32 (4 + 4) whatever the parameter dtype, otherwise they follow it."""
    return _opt_bytes(bool(config.optim.fp32_state), jnp.dtype(dtype).name)


@functools.lru_cache(maxsize=16)
def _opt_bytes(fp32_state: bool, dtype: str) -> int:
    oc = ml_collections.ConfigDict({"grad_clip": 1.0, "b1": 0.9, "b2": 0.95,
                                    "weight_decay": 0.01, "fp32_state": fp32_state})
    tx = make_optimizer(1e-5, 1, 10, oc)
    probe = {"w": jax.ShapeDtypeStruct((3,), jnp.dtype(dtype))}
    state = jax.eval_shape(tx.init, probe)
    return sum(leaf.dtype.itemsize for leaf in jax.tree.leaves(state) if leaf.shape == (3,))


# ============================================================================ workload
@dataclasses.dataclass(frozen=True)
class Workload:
    """Batch shapes of each stage, as the trainer (`tempo_jax.training`) builds them."""

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

    @property
    def update_prompts(self) -> int:
        """Prompts of one micro-batch of the GRPO update (rl.batch_size / accum_steps)."""
        return max(1, self.prompts // self.accum)

    @property
    def update_rows(self) -> int:
        return self.update_prompts * self.generations


def workload(config: ml_collections.ConfigDict, mcfg: ModelConfig) -> Workload:
    stages = [s.strip() for s in config.stages.split(",") if s.strip()]
    accum = max(1, int(config.optim.get("accum_steps", 1)))
    seq = int(config.data.max_seq_len or 0)
    estimated = seq == 0
    if estimated:  # bucketed per batch: the visual tokens plus a few hundred text tokens
        from tempo_jax.models.inputs import bucket

        seq = bucket(config.saa.max_visual_tokens + 256, 64)
    v = mcfg.vision
    from tempo_jax.data.processor import patch_spec
    from tempo_jax.data.saa import SAAConfig

    # the per-frame pixel ceiling in the tower's own units (SAA's are 28-px tokens)
    max_px = SAAConfig.from_dict(config.saa.to_dict()).pixel_bounds(patch_spec(v).factor)[1]
    per_frame = max_px // (v.patch_size**2)
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

    def videos(self, n: int) -> float:
        """Videos' worth of patches on one device when `n` videos' patches are split over
        the batch axes (the vision towers constrain their patches so, whether or not the
        rows divide: `models.layers.PATCHES`)."""
        return n / max(1, math.prod(self.mesh.get(a, 1) for a in ("data", "fsdp")))

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


def vision_forward(loc: Local, videos: float, w: Workload, trainable: bool) -> dict[str, int]:
    """The vision tower over `videos` videos of `visual_tokens` merged tokens each
    (x merge_unit patches), either family (Qwen3-VL's tower attends within a frame in every
    block, as Qwen2.5-VL's full-attention blocks do). Frozen (the 3B/7B recipe): forward
    only, nothing saved, so its cost is the input pixels (fp32) plus one block's working
    set: 7 x hidden (norms, qkv, attention out, proj) + 3 x mlp per patch, and one 128-query
    block of fp32 scores over the full-attention segment (a temporal patch: up to
    max_pixels / patch^2 patches).
    Trainable (no remat in the tower): every block's intermediates and scores are kept."""
    v = loc.cfg.vision
    n = math.ceil(videos * w.visual_tokens * v.merge_unit)
    c = loc.dtype_bytes
    heads = loc.dim("heads", v.num_heads)
    dv = v.hidden_size
    f = loc.dim("mlp", v.intermediate_size)
    block = n * c * (4 * dv + 3 * dv * heads // v.num_heads + 3 * f)
    pixels = n * v.patch_dim * 4
    # Qwen3-VL: the DeepStack features of the listed layers, kept for the decoder
    deep = int(len(getattr(v, "deepstack_visual_indexes", ())) * videos * w.visual_tokens
            * v.out_hidden_size * c)
    residual = 2 * n * dv * c + deep
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
    vis = vision_forward(loc, loc.videos(prompts), w, vision_trainable)
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
    vis = vision_forward(loc, loc.videos(w.prompts), w, False)
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
        if p.axes and p.axes[0] == "layers":  # stacked (scanned): one layer gathered per step
            key = p.path[:2]
            layers[key] = layers.get(key, 0) + extra // p.shape[0]
        elif "layers" in p.path or "blocks" in p.path:
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



def plan(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str, *,
         rules: shd.Rules | None = None, search: bool = True) -> dict:
    """The analytic memory plan of `config` on `mesh` (axis -> size) of `chip` devices.

    Per device and per phase of training: SFT step, GRPO rollout, GRPO update and the
    optimizer apply (`tempo_jax.training.steps`' `apply`, which donates the parameters and
    the optimizer state: one copy of each, updated in place). Each phase's total gets
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
    plans = tensor_plans(mcfg, mesh, dtype=dtype, freeze_vision=freeze, rules=rules,
                         scan_layers=bool(config.model.get("scan_layers", False)))
    w = workload(config, mcfg)
    loc = Local(mesh, rules, mcfg, c)

    n_params = sum(p.size for p in plans)
    n_trainable = sum(p.size for p in plans if p.trainable)
    n_vision = sum(p.size for p in plans if "visual" in p.path)
    params_b = sum(p.shard_bytes for p in plans)
    train_elems = sum(p.shard_size for p in plans if p.trainable)
    train_b = sum(p.shard_bytes for p in plans if p.trainable)
    # an accumulated gradient step (tempo_jax.training.steps: a scan over the micro-batches)
    # keeps the running sum beside each micro-batch's gradients
    grads_b = train_b * (2 if w.accum > 1 else 1)
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
        act = train_activations(loc, w, rows=w.update_rows, length=w.seq + w.new_tokens,
                                logits_len=w.new_tokens, prompts=w.update_prompts, remat=remat,
                                backend=backend, vision_trainable=not freeze)
        phases["grpo update"] = {**static, "gradients": grads_b, "activations": act,
                                 "fsdp all-gather buffers": gather_b}
    # The update: the factory's `apply` (tempo_jax.training.steps.apply_fn) donates the
    # parameters and the optimizer state, so it holds ONE copy of each (updated in place),
    # the gradients it reads (sum and mean of an accumulated SFT step) and, in GRPO, the
    # resident reference copy. Its skip guard (`where(ok, new, old)` on the parameters and
    # the moments) needs the old values until the whole update is computed, so the new
    # moments live beside the old: we count one optimizer state of temporaries. That is what
    # XLA:CPU allocates for fp32 moments (temp_size_in_bytes: 8 bytes per trainable element
    # with the guard, 4 without it; 1.25x the state with bf16 moments), checked against the
    # compiled `apply` in tests/test_plan.py; a compiler that fuses the update with the
    # select in place needs less. The global-norm clip and the finiteness check reduce to
    # scalars. XLA:TPU does fuse it: the apply compiled for v5p holds no temporaries at all
    # (libtpu 0.0.42, scripts/plan_table.py), so for TPU chips none are counted.
    update_tmp = 0 if chip_spec.platform == "tpu" else opt_b
    phases["optimizer apply"] = {
        "parameters": params_b, "gradients": grads_b, "optimizer state": opt_b,
        "reference model": ref_b, "update temporaries (skip guard)": update_tmp}
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
                     ("GRPO update micro-batch rows", w.update_rows if w.grpo else 0)):
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
    if opt_per < 8:
        notes.append(f"optimizer: optim.fp32_state is off, the Adam moments are {dtype} "
                     f"({opt_per} bytes per trainable parameter)")

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
        "workload": {**dataclasses.asdict(w), "rows": w.rows, "update_rows": w.update_rows},
        "bytes": {
            "parameters": params_b, "gradients": grads_b, "optimizer state": opt_b,
            "reference model": ref_b,
            "rollout KV cache": phases.get("grpo rollout", {}).get("rollout KV cache", 0),
            "fsdp all-gather buffers": gather_b,
            "update temporaries (skip guard)": update_tmp,
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


