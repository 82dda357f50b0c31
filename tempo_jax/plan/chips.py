"""The chips the planner knows: memory and dense bf16 peak of one device, and the libtpu
topology of a TPU slice (what ahead-of-time compilation targets)."""

from __future__ import annotations

import dataclasses
import math

GiB = 1024**3
MIB = 1024**2


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


def chip_info(name: str) -> Chip:
    if name not in CHIPS:
        raise ValueError(f"unknown chip {name!r}; choose from {', '.join(CHIPS)}")
    return CHIPS[name]


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
