"""`python -m tempo_jax.plan`: will a training config fit, and how is it laid out?

    python -m tempo_jax.plan --config configs/tempo_r0.py:7b --mesh fsdp=64 --chip v5p [--json]

Answers, before anyone rents a pod slice: the parameter count (the released model's), the
per-device bytes of parameters, gradients, optimizer state, activations under the remat
policy, the GRPO reference model and the rollout KV cache, the peak against the chip's
memory, and, when it does not fit, the smallest mesh that does.

Two methods:

* `analytic` (always available, any chip; `analytic.py`): bytes derived from the abstract
  model (nothing is allocated), each tensor's shard computed from its logical axes with the
  same rules and the same divisibility fallback as `tempo_jax.sharding.logical_to_spec`, and
  activation formulas that follow the code paths of the trainer's steps
  (`tempo_jax.training.steps`, stated in each function's docstring). The optimizer phase
  counts what the factory's `apply` holds: parameters and optimizer state donated (one copy
  each, fp32 Adam moments), the gradients, the skip guard's temporaries.
* `aot:<topology>` (TPU chips, with `libtpu` installed - `pip install libtpu` or the `tpu`
  extra; `aot.py`): the very steps of `tempo_jax.training.steps.make_steps` (and the
  rollout's sampling program) are lowered and compiled ahead of time for the real TPU
  topology on this (CPU) machine, as MaxText's `train_compile.py` does, and
  `compiled.memory_analysis()` gives the compiler's own per-device numbers. Where that cannot
  run the planner says why, in one line, and reports the analytic count.

Every number is per device (one TPU chip or one GPU; v4 and v5p chips are one megacore
device each).

Modules: `chips` (chip specs, TPU slice topologies), `analytic` (the memory model and the
smallest-mesh search), `aot` (ahead-of-time compilation), `report` (the table and JSON),
`cli` (`run` and the command line).
"""

from tempo_jax.plan import aot
from tempo_jax.plan.analytic import (
    MARGIN,
    Local,
    TensorPlan,
    Workload,
    abstract_mesh,
    candidate_meshes,
    config_rules,
    model_config,
    optimizer_bytes_per_param,
    plan,
    rollout_memory,
    shard_shape,
    smallest_mesh,
    tensor_plans,
    train_activations,
    workload,
)
from tempo_jax.plan.aot import aot_plan, compile_phases, libtpu_available
from tempo_jax.plan.chips import CHIPS, MIB, Chip, GiB, chip_info, topology_name
from tempo_jax.plan.cli import main, parse_mesh, run
from tempo_jax.plan.report import format_plan, mesh_str

__all__ = [
    "CHIPS", "MARGIN", "MIB", "Chip", "GiB", "Local", "TensorPlan", "Workload",
    "abstract_mesh", "aot", "aot_plan", "candidate_meshes", "chip_info", "compile_phases",
    "config_rules", "format_plan", "libtpu_available", "main", "mesh_str", "model_config",
    "optimizer_bytes_per_param", "parse_mesh", "plan", "rollout_memory", "run",
    "shard_shape", "smallest_mesh", "tensor_plans", "topology_name", "train_activations",
    "workload",
]
