"""Ahead-of-time compilation of the trainer's steps, and the compiler's own memory figures.

The steps are the ones training runs, from `tempo_jax.training.steps.make_steps`: its
`sft_grad` and `grpo_grad`, and its `apply`, which donates the parameters and the optimizer
state (fp32 Adam moments with `optim.fp32_state`) and skips non-finite updates. The rollout
is `tempo_jax.generate`'s jitted sampling program. Each is lowered with abstract, sharded
arguments (nothing is allocated) and compiled; `compiled.memory_analysis()` gives the
per-device bytes.

`aot_plan` does it for a real TPU topology on this (CPU) machine, as MaxText's
`train_compile.py` does: in a subprocess (libtpu prints to the terminal, and a compiler abort
must not take the planner down) that needs `libtpu` (`pip install libtpu`, or the `tpu`
extra). `compile_phases` is the same compilation for any mesh of real devices (the tests use
it on this machine's CPU, to check the analytic count against the compiler's).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from tempo_jax import sharding as shd
from tempo_jax.models.attention import resolve_backend
from tempo_jax.models.qwen2_5_vl.config import ModelConfig
from tempo_jax.plan.analytic import config_rules, workload
from tempo_jax.plan.chips import chip_info, topology_name
from tempo_jax.training import setup
from tempo_jax.training.optimizer import make_optimizer
from tempo_jax.training.steps import make_steps

PHASES = ("sft step", "grpo rollout", "grpo update", "optimizer apply")

# seconds: all four phases of the slowest default config in README's table on 2 CPU cores
# (Qwen3-VL-8B on v4-64: 677 s compiling, beside the test suite; 7B on v5p-64 alone: 349 s)
TIMEOUT_BASIS = 700

# the subprocess of `aot_plan`
WORKER = "from tempo_jax.plan.aot import worker; worker()"


def libtpu_available() -> tuple[bool, str]:
    """(True, "") when libtpu can be imported, else (False, why)."""
    if importlib.util.find_spec("libtpu") is None:
        return False, "libtpu is not installed (pip install libtpu, or tempo_jax[tpu])"
    return True, ""


def default_timeout(config: ml_collections.ConfigDict) -> float:
    """Seconds to allow the four phases' compilation: measured on 2 CPU cores (libtpu
    0.0.42, scanned decoder, README's table) the slowest full-size config took TIMEOUT_BASIS
    seconds for all phases; allow 3x that, scaled by depth for an unrolled decoder."""
    layers = int(setup.model_config(config).text.num_hidden_layers)
    scale = 1.0 if config.model.get("scan_layers", False) else max(1.0, layers / 4)
    return 3 * TIMEOUT_BASIS * scale


def aot_plan(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str, *,
             timeout: float | None = None, phases: Sequence[str] | None = None) -> dict:
    """Compile the training steps for the real TPU topology in a subprocess and return
    `{"topology", "phases": {phase: memory_analysis numbers}, "compile_seconds"}`, or
    `{"error": reason}`. A phase the compiler finds too large for the chip is a result
    (`fits: False` with the bytes it needed and had), not an error. Progress per phase goes
    to stderr."""
    timeout = default_timeout(config) if timeout is None else timeout
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
    # libtpu takes a lock file per host: without this a second planner (or a test beside a
    # run) stops at "TPU in use"; the compile-only client never touches a chip
    env.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    env["JAX_PLATFORMS"] = "cpu"  # the TPU client is compile-only, made by the topology
    proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    out_lines: list[str] = []
    err_lines: list[str] = []

    def read_out():
        out_lines.extend(proc.stdout)

    def relay():  # the worker's progress lines to our stderr, the rest kept for errors
        for line in proc.stderr:
            if line.startswith("[plan]"):
                print(line, end="", file=sys.stderr, flush=True)
            err_lines.append(line)
            del err_lines[:-200]

    readers = [threading.Thread(target=f, daemon=True) for f in (read_out, relay)]
    for r in readers:
        r.start()
    proc.stdin.write(job)
    proc.stdin.close()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"error": f"AOT compilation did not finish in {timeout:.0f}s (--aot-timeout)"}
    for r in readers:
        r.join(timeout=10)
    lines = [x for x in out_lines if x.startswith("{")]
    if proc.returncode or not lines:
        tail = [x.strip() for x in err_lines if x.strip() and not x.startswith("[plan]")]
        why = next((x for x in reversed(tail) if "Error" in x), tail[-1] if tail else
                   "no output")
        return {"error": f"AOT compilation failed ({why[:300]})"}
    return json.loads(lines[-1])


def video_grid(visual_tokens: int, merge: int) -> tuple[int, int, int]:
    """A (t, h, w) patch grid of exactly `visual_tokens` merged tokens: square frames of up
    to 32 x 32 patches, as many temporal patches as the budget takes."""
    for side in range(32, 0, -merge):
        per_t = (side // merge) ** 2
        if side % merge == 0 and visual_tokens % per_t == 0:
            return visual_tokens // per_t, side, side
    return visual_tokens, merge, merge


def abstract_inputs(config: ml_collections.ConfigDict, mcfg: ModelConfig, rows: int,
                    length: int, mesh: Mesh, rules: shd.Rules) -> dict:
    """Abstract (shape, dtype, sharding) model inputs of `rows` examples of `length` tokens,
    one video each at the SAA budget, laid out as `tempo_jax.data.batching.global_batch`
    places a batch: token arrays split over the batch axes; the pixels replicated when the
    mesh is one host's, and on a mesh of several hosts (a pod slice's topology) each host's
    block of pixels side by side, split over all the devices (`_multihost_batch`)."""
    from tempo_jax.models.families import vision_metadata

    v = mcfg.vision
    grid = video_grid(int(config.saa.max_visual_tokens), v.spatial_merge_size)
    meta = vision_metadata(np.asarray([grid] * rows), v)
    n = rows * math.prod(grid)

    def sds(shape, dtype, axes):
        spec = shd.logical_to_spec(axes, rules, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    rep = NamedSharding(mesh, P())
    hosts = len({d.process_index for d in mesh.devices.flat})
    if hosts > 1 and rows % hosts == 0:
        local_devs = mesh.devices.size // hosts
        per_host = -(-(rows // hosts) * math.prod(grid) // local_devs) * local_devs
        pixels = jax.ShapeDtypeStruct((per_host * hosts, v.patch_dim), jnp.float32,
                                      sharding=NamedSharding(mesh, P(shd.MESH_AXES)))
    else:
        pixels = jax.ShapeDtypeStruct((n, v.patch_dim), jnp.float32, sharding=rep)
    return {
        "input_ids": sds((rows, length), jnp.int32, ("batch", "seq")),
        "attention_mask": sds((rows, length), jnp.int32, ("batch", "seq")),
        "position_ids": sds((3, rows, length), jnp.int32, (None, "batch", "seq")),
        "pixel_values": pixels,
        "vision_meta": {k: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep)
                        for k, a in meta.items()},
        "num_image_features": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    }


def memory_stats(compiled) -> dict:
    """`compiled.memory_analysis()` as a dict (bytes per device), with `peak`: arguments +
    outputs - the outputs aliased to (donated) arguments + temporaries + generated code (or
    XLA's `peak_memory_in_bytes` less the aliases, when larger)."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, k, 0) or 0) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
        "temp_size_in_bytes", "generated_code_size_in_bytes", "host_temp_size_in_bytes",
        "host_argument_size_in_bytes", "host_output_size_in_bytes",
        "peak_memory_in_bytes")}
    # the sum of the parts (what XLA:TPU's out-of-memory check adds up: arguments, outputs
    # not aliased to donated arguments, temporaries); XLA's own `peak_memory_in_bytes` is
    # reported beside it but is not used as is: for a donating program it counts the
    # aliased outputs beside the arguments they reuse (the tiny apply: 134.8 MiB against
    # 86.9), and where it is below the sum it is the heap simulator's estimate of overlap,
    # which the check does not grant. Where a backend reports no temporaries but a peak,
    # the peak less the aliases.
    parts = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
             - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
             + out["generated_code_size_in_bytes"])
    out["peak"] = max(parts, out["peak_memory_in_bytes"] - out["alias_size_in_bytes"])
    return out


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_SIZE = r"([\d.]+)\s*([KMGT]?)i?B?"
# XLA:TPU's out-of-memory messages (libtpu 0.0.42): "Ran out of memory on HBM, the total
# memory required for HLO temporaries (90.48G) exceeds available HBM (15.75G)", and the
# older "Used 120.5G of 95.74G hbm. Exceeded hbm capacity by 24.8G."
_OOM = (re.compile(r"required for (?P<what>[^(]+?) \(" + _SIZE + r"\) exceeds available "
                   r"(?:HBM|hbm)[^(]*\(" + _SIZE + r"\)"),
        re.compile(r"(?P<what>)Used " + _SIZE + r" of " + _SIZE + r" hbm"))


def out_of_memory(error: BaseException) -> dict | None:
    """The compiler's "does not fit" as figures: `{"fits": False, "needed", "available",
    "needed_for", "message"}` (bytes, per device, as the compiler states them; binary units),
    or None when `error` is not an out-of-memory verdict."""
    msg = str(error)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
        return None
    for pattern in _OOM:
        m = pattern.search(msg)
        if m:
            a, ua, b, ub = m.group(2), m.group(3), m.group(4), m.group(5)
            return {"fits": False, "needed": int(float(a) * _UNITS[ua.upper()]),
                    "available": int(float(b) * _UNITS[ub.upper()]),
                    "needed_for": m.group("what").strip() or "the program",
                    "message": msg.strip().splitlines()[0][:500]}
    return {"fits": False, "needed": 0, "available": 0, "needed_for": "unknown",
            "message": msg.strip().splitlines()[0][:500]}


def local_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of sharded ShapeDtypeStructs."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def compile_phases(config: ml_collections.ConfigDict, mesh: Mesh,
                   rules: shd.Rules | None = None, *, platform: str = "tpu",
                   phases: Sequence[str] | None = None) -> dict:
    """Lower and compile the trainer's steps for `mesh` (any devices: a TPU topology's, or
    this machine's) and return `{"phases": {phase: memory_stats + resident + total},
    "compile_seconds": {phase: s}}`. `platform` picks the attention backend `auto` resolves
    to. `resident`: what the phase keeps in memory without taking it as an argument (the
    optimizer state during the gradient steps, the frozen tower and the reference copy
    during the update); `total` = `peak` + `resident`."""
    from flax import nnx

    from tempo_jax.generate import sampling_program  # the rollout's jitted sampling program
    from tempo_jax.models.families import abstract_model
    from tempo_jax.models.layers import RuntimeOptions
    from tempo_jax.rl import grpo as grpo_lib
    from tempo_jax.training.grpo import rollout_sampling

    rules = config_rules(config) if rules is None else rules
    wanted = list(phases or PHASES)
    mcfg = setup.model_config(config)
    dtype = jnp.dtype(config.model.dtype)
    opts = RuntimeOptions(dtype=dtype,
                          attention_backend=resolve_backend(config.model.attention_backend,
                                                            platform),
                          remat=config.model.remat,
                          scan_layers=config.model.get("scan_layers", False))
    model = abstract_model(mcfg, dtype, opts)

    def placed(state):
        leaves, tdef = jax.tree.flatten(state)
        shards = jax.tree.leaves(shd.state_shardings(state, mesh, rules))
        return jax.tree.unflatten(tdef, [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
                                         for x, s in zip(leaves, shards, strict=True)])

    def sds(shape, dt, axes):
        spec = shd.logical_to_spec(axes, rules, mesh, shape)
        return jax.ShapeDtypeStruct(shape, dt, sharding=NamedSharding(mesh, spec))

    graphdef, params, frozen = nnx.split(model, setup.trainable_filter(config), ...)
    params, frozen = placed(params), placed(frozen)
    w = workload(config, mcfg)
    steps = make_steps(make_optimizer(1e-5, 1, 10, config.optim))
    opt_state = _like_params(jax.eval_shape(steps.tx.init, params), params, mesh)
    train_b, frozen_b, opt_b = local_bytes(params), local_bytes(frozen), local_bytes(opt_state)
    ref_b = train_b if w.reference else 0
    phases_out: dict[str, dict] = {}
    timings: dict[str, float] = {}

    def progress(phase):
        print(f"[plan] compiling {phase} ({len(mesh.devices.flat)} x "
              f"{mesh.devices.flat[0].device_kind})...", file=sys.stderr, flush=True)

    def record(phase, lowered, resident, t0):
        try:
            s = memory_stats(lowered.compile())
        except Exception as e:  # the compiler's "does not fit" is a verdict, not a failure
            verdict = out_of_memory(e)
            if verdict is None:
                raise
            s = {**verdict, "resident_not_in_arguments": resident}
            s["total"] = s["needed"] + resident
        else:
            s["resident_not_in_arguments"] = resident
            s["total"] = s["peak"] + resident
        phases_out[phase] = s
        timings[phase] = round(time.perf_counter() - t0, 1)
        print(f"[plan] {phase}: {timings[phase]:.1f} s, peak "
              f"{s['total'] / 2**30:.2f} GiB per device"
              + ("" if s.get("fits", True) else " (the compiler: does not fit)"),
              file=sys.stderr, flush=True)

    with shd.use_mesh(mesh, rules):  # the trainer traces its steps inside use_mesh
        def micro(*args):
            """The step's arguments as the trainer passes them: with accumulation, tuples
            of `w.accum` micro-batches (scanned inside the one program)."""
            return args if w.accum == 1 else tuple((a,) * w.accum for a in args)

        if w.sft and "sft step" in wanted:
            t0 = time.perf_counter()
            progress("sft step")
            rows, k = w.sft_rows, w.answer_len
            inputs = abstract_inputs(config, mcfg, rows, w.seq, mesh, rules)
            lowered = steps.sft_grad.lower(params, frozen, graphdef, *micro(
                inputs, sds((rows, k), jnp.int32, ("batch", None)),
                sds((rows, k), jnp.int32, ("batch", None)),
                sds((rows, k), jnp.bool_, ("batch", None))))
            record("sft step", lowered, opt_b, t0)
        if w.grpo and "grpo rollout" in wanted:
            t0 = time.perf_counter()
            progress("grpo rollout")
            inputs = abstract_inputs(config, mcfg, w.prompts, w.seq, mesh, rules)
            full_graphdef, full_state = nnx.split(model)
            lowered = sampling_program.lower(
                full_graphdef, placed(full_state), inputs,
                sds((w.prompts,), jnp.int32, ("batch",)),
                jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=NamedSharding(mesh, P())),
                sampling=rollout_sampling(config.rl))  # the trainer's own settings
            record("grpo rollout", lowered, opt_b + ref_b, t0)
        if w.grpo and "grpo update" in wanted:
            t0 = time.perf_counter()
            progress("grpo update")
            r, t = w.update_rows, w.new_tokens
            inputs = abstract_inputs(config, mcfg, w.update_prompts, w.seq, mesh, rules)
            gcfg = grpo_lib.GRPOConfig(
                num_generations=w.generations, eps_low=config.rl.eps_low,
                eps_high=config.rl.eps_high, beta=config.rl.beta,
                scale_rewards=config.rl.scale_rewards, loss_agg=config.rl.loss_agg,
                num_iterations=config.rl.num_iterations)
            ref = sds((r, t), jnp.float32, ("batch", None)) if w.reference else None
            lowered = steps.grpo_grad.lower(params, frozen, graphdef, *micro(
                inputs, sds((r, t), jnp.int32, ("batch", None)),
                sds((r, t), jnp.bool_, ("batch", None)), sds((r,), jnp.int32, ("batch",)),
                sds((r, t), jnp.float32, ("batch", None)), ref,
                sds((r,), jnp.float32, ("batch",))), gcfg, w.generations)
            record("grpo update", lowered, opt_b + ref_b, t0)
        if "optimizer apply" in wanted:
            t0 = time.perf_counter()
            progress("optimizer apply")
            # the gradients have the parameters' shapes, dtypes and shardings
            loss = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
            lowered = steps.apply.lower(params, opt_state, params, loss)
            record("optimizer apply", lowered, frozen_b + ref_b, t0)
    return {"phases": phases_out, "compile_seconds": timings}


def _like_params(opt_state, params, mesh: Mesh):
    """The optimizer state's abstract leaves with shardings: each moment tree like the
    parameters (as `tx.init` of sharded parameters makes it), scalars replicated."""
    p_def, p_leaves = jax.tree.structure(params), jax.tree.leaves(params)
    rep = NamedSharding(mesh, P())

    def fix(sub):
        if isinstance(sub, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(sub.shape, sub.dtype, sharding=rep)
        return jax.tree.unflatten(p_def, [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=q.sharding)
            for x, q in zip(jax.tree.leaves(sub), p_leaves, strict=True)])

    return jax.tree.map(fix, opt_state, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct)
                        or jax.tree.structure(x) == p_def)


def worker() -> None:
    """Subprocess body of `aot_plan`: read the job (JSON on stdin), compile the phases for
    the TPU topology (`compile_phases`), print the result as one JSON line."""
    from jax.experimental import topologies

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
    out = compile_phases(config, mesh, platform=chip.platform, phases=job.get("phases"))
    print(json.dumps({"topology": name, **out}))
