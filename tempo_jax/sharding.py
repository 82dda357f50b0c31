"""Meshes, the logical-axis rules table, activation constraints and global batches.

Every parameter carries logical axis names (`('embed', 'mlp')`); one rules table maps them to
mesh axes. The same model then runs on a TPU slice, a GPU node or 8 fake CPU devices by
changing the mesh and the rules, never the model code. The main activations are constrained
by logical name too (`constrain`), with the rules of the active `use_mesh` context.

The mesh has three axes (data, fsdp, tensor). Each can span several slices / nodes: its size
is ICI size x DCN size (`make_mesh(..., dcn_data=2)`), the DCN part outermost, so the
collectives of fsdp and tensor stay inside a slice (TPU ICI) or a node (GPU NVLink).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tempo_jax.data import prompts as prompts_lib

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None for replicated).
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("patch", None),
    ("norm", None),
)

# TPU pods: fully sharded data parallel over the slice's ICI (fsdp), the slices (DCN) as
# data-parallel replicas; tensor parallelism only for very wide models (mesh.tensor > 1).
TPU_RULES: Rules = DEFAULT_RULES

# GPU clusters: tensor parallelism inside a node over NVLink (mesh.tensor = GPUs per node),
# fsdp / data across nodes (InfiniBand). Qwen's few KV heads (2-8) rarely divide a node's 8
# GPUs: the KV projections stay replicated over `tensor` (they are small), never split unevenly.
GPU_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", None),
    ("mlp", "tensor"),
    ("patch", None),
    ("norm", None),
)

RULE_SETS: dict[str, Rules] = {"default": DEFAULT_RULES, "tpu": TPU_RULES, "gpu": GPU_RULES}

log = logging.getLogger(__name__)


def get_rules(name: str | Rules = "default", overrides: Mapping[str, object] | None = None
              ) -> Rules:
    """A rules table: a preset name ("default" | "tpu" | "gpu") or explicit (name, axes) pairs,
    with `overrides` {logical name: mesh axis | "a,b" | (a, b) | "" or None (replicated)}."""
    if isinstance(name, str):
        if name not in RULE_SETS:
            raise ValueError(f"unknown sharding rules {name!r}; one of {sorted(RULE_SETS)}")
        rules = dict(RULE_SETS[name])
    else:
        rules = dict(name)
    for key, value in (overrides or {}).items():
        if isinstance(value, str):
            parts = tuple(a.strip() for a in value.split(",") if a.strip())
            value = None if not parts else parts[0] if len(parts) == 1 else parts
        elif value is not None:
            value = tuple(value)
        for axis in (value,) if isinstance(value, str) else (value or ()):
            if axis not in MESH_AXES:
                raise ValueError(f"rule {key}={value!r}: {axis!r} is not a mesh axis {MESH_AXES}")
        rules[key] = value
    return tuple(rules.items())


def rules_from_config(mesh_cfg) -> Rules:
    """`config.mesh.rules` (a preset name or (name, axes) pairs) + `config.mesh.rule_overrides`."""
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d=None: d
    overrides = get("rule_overrides", None)
    if isinstance(overrides, str):  # "kv_heads=;batch=data+fsdp"
        pairs = [kv.split("=", 1) for kv in overrides.split(";") if kv.strip()]
        if any(len(kv) != 2 for kv in pairs):
            raise ValueError(f"rule_overrides {overrides!r}: expected 'name=axis+axis;...'")
        overrides = {k.strip(): v.replace("+", ",") for k, v in pairs}
    elif overrides is not None and hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    return get_rules(get("rules", "default") or "default", overrides)


def _resolve(sizes: list[int], n: int, what: str) -> list[int]:
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} {what} do not divide into axes of product {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} {what}, "
            f"have {n}"
        )
    return sizes


def make_mesh(
    data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence[jax.Device] | None = None,
    *, dcn_data: int = 1, dcn_fsdp: int = 1, dcn_tensor: int = 1,
) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 to take the remaining devices.

    `data`, `fsdp`, `tensor` are the sizes inside one slice / node (ICI, NVLink); `dcn_*` the
    number of slices / nodes along each axis (data-center network), so the mesh axis `data`
    has size `dcn_data * data`. With several slices of TPU devices (`slice_index`) the mesh
    comes from `mesh_utils.create_hybrid_device_mesh` (one slice per DCN group); otherwise
    the devices (ordered by process, i.e. by host) are split into `dcn_*` groups, outermost.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = [dcn_data, dcn_fsdp, dcn_tensor]
    if min(dcn) < 1:
        raise ValueError(f"dcn sizes must be >= 1, got {dcn}")
    n_slices = math.prod(dcn)
    if len(devices) % n_slices:
        raise ValueError(f"{len(devices)} devices do not split into {n_slices} slices / nodes")
    per_slice = len(devices) // n_slices
    ici = _resolve([data, fsdp, tensor], per_slice, "devices per slice" if n_slices > 1
                   else "devices")
    total = [i * d for i, d in zip(ici, dcn, strict=True)]
    slices = {getattr(d, "slice_index", None) for d in devices}
    if n_slices > 1 and None not in slices and len(slices) == n_slices:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    elif n_slices > 1:
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
        arr = np.asarray(devices, dtype=object).reshape(*dcn, *ici)
        arr = arr.transpose(0, 3, 1, 4, 2, 5).reshape(total)
    elif devices[0].platform == "tpu" and len(devices) == len(jax.devices()):
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(ici, devices)  # ICI-topology-aware order
    else:
        arr = np.asarray(devices, dtype=object).reshape(total)
    return Mesh(arr, MESH_AXES)


def mesh_from_config(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    get = mesh_cfg.get if hasattr(mesh_cfg, "get") else lambda k, d=None: d
    return make_mesh(mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, devices,
                     dcn_data=get("dcn_data", 1), dcn_fsdp=get("dcn_fsdp", 1),
                     dcn_tensor=get("dcn_tensor", 1))


def logical_to_spec(
    axes: Sequence[str | None] | None,
    rules: Rules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Translate logical axis names into a PartitionSpec.

    With `mesh` and `shape`, a dimension that the mesh axes do not divide evenly stays
    replicated (tiny test models on 8 devices), and a mesh axis is used at most once.
    """
    if axes is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        names = tuple(n for n in names if n not in used)
        if mesh is not None:
            names = tuple(n for n in names if mesh.shape.get(n, 1) > 1)
            if shape is not None and names:
                size = math.prod(mesh.shape[n] for n in names)
                if shape[i] % size:
                    names = ()
        used.update(names)
        out.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*out)


def named_sharding(
    mesh: Mesh,
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    rules: Rules = DEFAULT_RULES,
) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh, shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedSharding for every variable of an nnx State (from its `axes` metadata)."""

    def one(v):
        axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
        shape = v.get_value().shape if isinstance(v, nnx.Variable) else v.shape
        return named_sharding(mesh, axes, shape, rules)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place every parameter of `model` on its sharding (in place) and return it."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh, rules)
    if jax.process_count() == 1:
        state = jax.device_put(state, shardings)
    else:  # every host holds the same values (same seed / file): each places its own shards
        def place(v, s):
            a = np.asarray(jax.device_get(v.get_value()))
            return v.replace(value=jax.make_array_from_callback(a.shape, s, lambda i: a[i]))

        state = jax.tree.map(place, state, shardings,
                             is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------------------- activations
_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("tempo_rules",
                                                               default=DEFAULT_RULES)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
    """Make `mesh` the context mesh (`jax.set_mesh`) and `rules` the rules of `constrain`;
    jitted functions traced inside constrain their activations. `None`: a no-op context."""
    token = _RULES.set(rules)
    try:
        if mesh is None:
            yield
        else:
            with jax.set_mesh(mesh):
                yield
    finally:
        _RULES.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names (e.g. ('batch', 'seq', 'embed')) under the
    active `use_mesh`; a no-op without a mesh. Axes that do not divide a dimension are left
    replicated, as for parameters."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return x
    spec = logical_to_spec(axes, _RULES.get(), mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


# ---------------------------------------------------------------------------- batches
BATCH_AXES = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq"),
              "position_ids": (None, "batch", "seq")}


def _owned(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> dict[int, np.ndarray]:
    """For every process: the global indices along `axis` that its devices hold, in order
    (the order in which `make_array_from_process_local_data` lays out its local data)."""
    owned: dict[int, set[tuple[int, int]]] = {}
    for dev, idx in sharding.devices_indices_map(shape).items():
        start, stop, _ = idx[axis].indices(shape[axis])
        owned.setdefault(dev.process_index, set()).add((start, stop))
    return {p: np.concatenate([np.arange(a, b) for a, b in sorted(r)])
            for p, r in owned.items()}


def global_batch(batch: dict, mesh: Mesh | None, rules: Rules = DEFAULT_RULES, *,
                 model_config=None, pad_side: str = "right") -> dict:
    """The model inputs of a collated batch (`pipeline.collate`) as arrays on `mesh`: token
    arrays sharded over the batch (rules' 'batch' -> ('data', 'fsdp')), vision arrays
    replicated. Without a mesh: `pipeline.model_inputs(batch)` unchanged (host arrays).

    With several processes each host passes its own rows (its share of the data, read by its
    own loader) and gets the same global batch: the rows are assembled with
    `jax.make_array_from_process_local_data` (padded to the longest host's length first); the
    pixels stay on the host that read them (the global `pixel_values` is the hosts' blocks
    side by side) and the vision metadata is rebuilt for the global row order (needs
    `model_config`), its patch permutation pointing into those blocks. Only small integer
    tables (sizes, grids, video-token counts) cross hosts.
    """
    from tempo_jax.data.pipeline import model_inputs

    inputs = model_inputs(batch)
    if mesh is None:
        return inputs
    if jax.process_count() == 1:
        out = dict(inputs)
        for k, axes in BATCH_AXES.items():
            a = np.asarray(inputs[k])
            out[k] = jax.device_put(a, named_sharding(mesh, axes, a.shape, rules))
        rep = NamedSharding(mesh, PartitionSpec())
        for k in ("pixel_values", "vision_meta", "num_image_features"):
            out[k] = jax.device_put(inputs[k], rep)
        return out
    if model_config is None:
        raise ValueError("global_batch on several processes needs model_config")
    return _multihost_batch(batch, mesh, rules, model_config, pad_side)


def _multihost_batch(batch, mesh, rules, cfg, pad_side):
    from jax.experimental import multihost_utils

    from tempo_jax.models.qwen2_5_vl.vision_meta import bucket, vision_metadata

    nproc = jax.process_count()
    unit = cfg.vision.merge_unit
    ids = np.asarray(batch["input_ids"])
    b_local = ids.shape[0]
    grids = np.asarray(batch["video_grid_thw"], np.int64).reshape(-1, 3)
    n_patch = int(np.prod(grids, axis=1).sum())
    vid_rows = (ids == cfg.video_token_id).sum(1).astype(np.int64) * unit  # patches per row
    if int(vid_rows.sum()) != n_patch or (ids == cfg.image_token_id).any():
        raise ValueError("multi-host batches support videos only, one grid list per row")
    sizes = np.asarray(multihost_utils.process_allgather(
        np.asarray([b_local, ids.shape[1], n_patch, len(grids)], np.int64))).reshape(nproc, 4)
    if len(set(sizes[:, 0].tolist())) != 1:
        raise ValueError(f"hosts have different local batch sizes {sizes[:, 0].tolist()}")
    length, g_max = int(sizes[:, 1].max()), int(sizes[:, 3].max())
    g_pad = np.zeros((g_max, 3), np.int64)
    g_pad[:len(grids)] = grids
    tables = np.concatenate([g_pad.reshape(-1), vid_rows])
    tables = np.asarray(multihost_utils.process_allgather(tables)).reshape(nproc, -1)

    def repad(a, axis, fill):
        widths = [(0, 0)] * a.ndim
        extra = length - a.shape[axis]
        widths[axis] = (extra, 0) if pad_side == "left" else (0, extra)
        return np.pad(a, widths, constant_values=fill) if extra else a

    local = {"input_ids": repad(ids, 1, prompts_lib.ENDOFTEXT_ID),
             "attention_mask": repad(np.asarray(batch["attention_mask"]), 1, 0),
             "position_ids": repad(np.asarray(batch["position_ids"]), 2, 1)}
    out = {}
    for k, axes in BATCH_AXES.items():
        a = local[k]
        b_ax = axes.index("batch")
        gshape = list(a.shape)
        gshape[b_ax] = b_local * nproc
        sharding = named_sharding(mesh, axes, gshape, rules)
        out[k] = jax.make_array_from_process_local_data(sharding, a, tuple(gshape))
        if k == "input_ids":
            row_of = _owned(sharding, tuple(gshape), b_ax)  # process -> its global rows
    # the pixels: every host's block, padded to a common size, side by side on the mesh
    local_devs = mesh.devices.size // nproc
    per_host = -(-max(int(sizes[:, 2].max()), 1) // local_devs) * local_devs
    pix_shape = (per_host * nproc, np.asarray(batch["pixel_values"]).shape[1])
    pix_sharding = NamedSharding(mesh, PartitionSpec(MESH_AXES))
    block = np.zeros((per_host, pix_shape[1]), np.asarray(batch["pixel_values"]).dtype)
    block[:n_patch] = np.asarray(batch["pixel_values"])[:n_patch]
    out["pixel_values"] = jax.make_array_from_process_local_data(pix_sharding, block, pix_shape)
    pix_of = _owned(pix_sharding, pix_shape, 0)  # process -> global index of its local patches
    # the global grid list and where each of its patches lives, in global row order
    row_grids: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    for p in range(nproc):
        g_all = tables[p, :3 * g_max].reshape(g_max, 3)[:int(sizes[p, 3])]
        rows_p = tables[p, 3 * g_max:]
        gi, start = 0, 0
        for j in range(b_local):
            need, got = int(rows_p[j]), []
            while need > 0:
                n = int(np.prod(g_all[gi]))
                got.append((g_all[gi], pix_of[p][start:start + n]))
                gi, start, need = gi + 1, start + n, need - n
            if need:
                raise ValueError("video tokens and grids disagree in a row")
            row_grids[(p, j)] = got
    order = sorted((int(r), p, j) for p in range(nproc) for j, r in enumerate(row_of[p]))
    g_list = [g for _, p, j in order for g, _ in row_grids[(p, j)]]
    src = [s for _, p, j in order for _, s in row_grids[(p, j)]]
    n_total = int(sizes[:, 2].sum())
    capacity = bucket(max(n_total, 1), 64)
    meta = vision_metadata(np.asarray(g_list), cfg.vision, num_patches=capacity, bucketed=True)
    # padding patches sit in segments of their own and never reach the text: any source will do
    src = np.concatenate([*src, np.zeros(capacity - n_total, np.int64)])
    meta["patch_perm"] = src[meta["patch_perm"]].astype(np.int32)
    rep = NamedSharding(mesh, PartitionSpec())

    def replicated(v):
        v = np.asarray(v)
        return jax.make_array_from_callback(v.shape, rep, lambda i, v=v: v[i])

    out["vision_meta"] = {k: replicated(v) for k, v in meta.items()}
    out["num_image_features"] = replicated(np.int32(0))
    return out


def shard_rows(a, mesh: Mesh | None, rules: Rules = DEFAULT_RULES, *, pad_axis: int | None = None,
               fill=0):
    """A per-row host array [B_local, ...] (e.g. the answer positions of a batch) as a global
    array sharded like the batch rows of `global_batch`. With several processes, `pad_axis` is
    first padded (with `fill`, at the end) to the longest host's size."""
    a = np.asarray(a)
    if mesh is None:
        return a
    nproc = jax.process_count()
    if nproc > 1 and pad_axis is not None:
        from jax.experimental import multihost_utils

        longest = int(np.asarray(multihost_utils.process_allgather(
            np.asarray(a.shape[pad_axis], np.int64))).max())
        widths = [(0, 0)] * a.ndim
        widths[pad_axis] = (0, longest - a.shape[pad_axis])
        a = np.pad(a, widths, constant_values=fill)
    gshape = (a.shape[0] * nproc, *a.shape[1:])
    sharding = named_sharding(mesh, ("batch",) + (None,) * (a.ndim - 1), gshape, rules)
    if nproc == 1:
        return jax.device_put(a, sharding)
    return jax.make_array_from_process_local_data(sharding, a, gshape)


def process_rows(a) -> np.ndarray:
    """The rows (first-axis indices) of global array `a` held on this process's devices, in
    order: where this process's local data went in `global_batch` / `shard_rows`. A host
    array (no mesh) is all local."""
    n = a.shape[0]
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.arange(n)
    rows: set[int] = set()
    for sh in a.addressable_shards:
        rows.update(range(*sh.index[0].indices(n)))
    return np.asarray(sorted(rows), np.int64)
