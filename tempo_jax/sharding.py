"""Meshes, the logical-axis rules table, activation constraints and per-row arrays on a mesh
(a collated batch as global arrays is `data.batching.global_batch`).

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
    ("layers", None),  # a scanned decoder's stacked layers: never sharded (each step one)
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
    ("layers", None),  # a scanned decoder's stacked layers: never sharded (each step one)
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


def _variable_spec(v, rules: Rules, mesh) -> PartitionSpec:
    """The PartitionSpec of one state leaf: a Variable by its `axes` metadata, anything else
    replicated."""
    axes = v.get_metadata().get("axes") if isinstance(v, nnx.Variable) else None
    shape = v.get_value().shape if isinstance(v, nnx.Variable) else v.shape
    return logical_to_spec(axes, rules, mesh, shape)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedSharding for every variable of an nnx State (from its `axes` metadata)."""
    return jax.tree.map(lambda v: NamedSharding(mesh, _variable_spec(v, rules, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


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


def active_mesh():
    """The context mesh of the trace (`use_mesh`), or None when there is none or it has a
    single device (nothing to lay out)."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.shape.values()) == 1 else mesh


def current_rules() -> Rules:
    """The rules of the active `use_mesh` (the defaults outside one)."""
    return _RULES.get()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names (e.g. ('batch', 'seq', 'embed')) under the
    active `use_mesh`; a no-op without a mesh. Axes that do not divide a dimension are left
    replicated, as for parameters."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(axes, _RULES.get(), mesh, x.shape)
    return jax.lax.with_sharding_constraint(x, spec)


def constrain_like(tree, state: nnx.State):
    """`tree` (e.g. gradients) laid out as the variables of `state` are by their `axes`
    metadata, under the active `use_mesh` (a no-op without one): a jitted step's outputs
    then have the parameters' shardings whatever XLA's propagation would have chosen."""
    mesh = active_mesh()
    if mesh is None:
        return tree
    rules = _RULES.get()
    specs = jax.tree.map(lambda v: _variable_spec(v, rules, mesh), state,
                         is_leaf=lambda x: isinstance(x, nnx.Variable))
    return jax.lax.with_sharding_constraint(tree, specs)


# ---------------------------------------------------------------------------- batches
BATCH_AXES = {"input_ids": ("batch", "seq"), "attention_mask": ("batch", "seq"),
              "position_ids": (None, "batch", "seq")}


def owned_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int) -> dict[int, np.ndarray]:
    """For every process: the global indices along `axis` that its devices hold, in order
    (the order in which `make_array_from_process_local_data` lays out its local data)."""
    owned: dict[int, set[tuple[int, int]]] = {}
    for dev, idx in sharding.devices_indices_map(shape).items():
        start, stop, _ = idx[axis].indices(shape[axis])
        owned.setdefault(dev.process_index, set()).add((start, stop))
    return {p: np.concatenate([np.arange(a, b) for a, b in sorted(r)])
            for p, r in owned.items()}


def shard_rows(a, mesh: Mesh | None, rules: Rules = DEFAULT_RULES, *, pad_axis: int | None = None,
               fill=0):
    """A per-row host array [B_local, ...] (e.g. the answer positions of a batch) as a global
    array sharded like the batch rows of `data.batching.global_batch`. With several
    processes, `pad_axis` is first padded (with `fill`, at the end) to the longest host's
    size."""
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
    order: where this process's local data went in `data.batching.global_batch` /
    `shard_rows`. A host array (no mesh) is all local."""
    n = a.shape[0]
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
        return np.arange(n)
    rows: set[int] = set()
    for sh in a.addressable_shards:
        rows.update(range(*sh.index[0].indices(n)))
    return np.asarray(sorted(rows), np.int64)
