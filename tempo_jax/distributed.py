"""Multi-host start-up: `jax.distributed.initialize()` when the job spans several hosts.

Called at the start of `tempo_jax.train.main` (before any other JAX call). A run is
multi-host when

* `--multihost` is given (or `TEMPO_MULTIHOST=1`): plain `jax.distributed.initialize()`,
  which finds the coordinator itself on TPU pods, SLURM and Open MPI jobs;
* `JAX_COORDINATOR_ADDRESS` (+ `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`) are set: passed on
  explicitly (any cluster, and the localhost tests);
* SLURM launched more than one task (`SLURM_NTASKS` > 1 with `SLURM_PROCID`);
* a TPU VM of a multi-host pod slice (`TPU_WORKER_HOSTNAMES` lists several workers, or
  `MEGASCALE_COORDINATOR_ADDRESS` for multi-slice).

Otherwise nothing happens and the run stays single-process.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_initialized = False


def detect(env: Mapping[str, str] | None = None) -> str | None:
    """Which launcher started this process on several hosts, or None (single host)."""
    env = os.environ if env is None else env
    if env.get("TEMPO_MULTIHOST", "").lower() in ("1", "true", "yes"):
        return "forced"
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return "env"
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and (
            "SLURM_PROCID" in env):
        return "slurm"
    workers = [w for w in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if w.strip()]
    if len(workers) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "mpi"
    return None


def init_kwargs(kind: str, env: Mapping[str, str] | None = None) -> dict:
    """Arguments of `jax.distributed.initialize` for a launcher (empty: auto-detected)."""
    env = os.environ if env is None else env
    if kind == "env":
        kw: dict = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"]}
        if "JAX_NUM_PROCESSES" in env:
            kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kw["process_id"] = int(env["JAX_PROCESS_ID"])
        if env.get("JAX_LOCAL_DEVICE_IDS"):
            kw["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
        return kw
    return {}  # SLURM, TPU pods, Open MPI: JAX's own cluster detection


def initialize(force: bool = False, env: Mapping[str, str] | None = None) -> bool:
    """Start `jax.distributed` when launched on several hosts (or `force`); True if it did.

    On CPU (the localhost tests, CPU clusters) cross-process collectives go through gloo.
    Idempotent.
    """
    global _initialized
    if _initialized:
        return True
    kind = "forced" if force else detect(env)
    if kind is None:
        return False
    import jax

    env = os.environ if env is None else env
    platforms = env.get("JAX_PLATFORMS", "") or ""
    if platforms.split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = init_kwargs(kind, env)
    log.info("jax.distributed.initialize(%s) [%s]",
             ", ".join(f"{k}={v}" for k, v in kw.items()), kind)
    jax.distributed.initialize(**kw)
    _initialized = True
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_main() -> bool:
    """True on the process that writes logs, reports and exports (process 0)."""
    import jax

    return jax.process_index() == 0


def all_rows(x) -> np.ndarray:
    """Per-row host values of every process, concatenated in process order (this process's
    alone on one)."""
    import jax

    x = np.asarray(x)
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def all_gather_json(obj: Any) -> list[Any]:
    """`obj` (anything JSON can hold) of every process, in process order: how host-side
    results (answer rows, per-query probabilities) reach process 0's report."""
    import jax

    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    blocks = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [json.loads(bytes(b[:int(n)]).decode()) for b, n in zip(blocks, sizes.ravel(),
                                                                     strict=True)]


def agree_with_main(flag: bool) -> bool:
    """Process 0's `flag` on every process: a decision that leads into collective work (e.g.
    whether a file on a shared filesystem exists) must be taken alike everywhere."""
    import jax

    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag, np.bool_)))


def sync(name: str) -> None:
    """A barrier across processes (nothing on one): what process 0 did to a shared
    filesystem before it (a move, a removal) is done for everyone after it."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
