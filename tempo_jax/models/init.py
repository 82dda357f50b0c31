"""Random initialisation for models trained from scratch (the tiny demo models).

Qwen's `initializer_range` (every weight N(0, 0.02)) was chosen for 2048-5120-wide models. At
the demo's width 128 it leaves the residual stream tiny against RMSNorm's unit scale and the
attention logits near zero, so a from-scratch model sits in long plateaus (the demo's
colour comparison took 2,400 text-only steps to learn 2 of 6 colours; std 1/sqrt(width)
learns all 6 in 300-450, `scripts/probe_comparison.py`). The schemes (`model.init_scale`):

- `hf`: the model's own construction (std 0.02 everywhere), what transformers does;
- `width`: every matrix N(0, 1/fan_in): a linear kernel's fan-in is its input width (the
  patch embedding's, the flattened patch), an embedding's its width;
- `width_residual`: `width`, and the projections that write into a residual stream
  (attention output, MLP down projection; decoder and vision tower) also scaled by
  1/sqrt(2 x that stack's depth), GPT-2's rule.

Norm scales and biases keep their construction values (ones, zeros). A checkpoint's weights
replace all of this: loading a pretrained model never calls it. Each parameter's draw is
keyed by its unrolled path (`model.layers.3.mlp.down_proj.kernel`), so a scanned and an
unrolled model of the same seed get the same weights.
"""

from __future__ import annotations

import math
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from tempo_jax.models.stack import is_stacked, stack_name, unstacked_path

INIT_SCALES = ("hf", "width", "width_residual")
# the last module names of the projections that write into a residual stream
_RESIDUAL_OUT = {"o_proj", "down_proj", "proj", "linear_fc2"}


def check_init_scale(scheme: str) -> None:
    if scheme not in INIT_SCALES:
        raise ValueError(f"model.init_scale must be one of {INIT_SCALES}, got {scheme!r}")


def _std(path: tuple, shape: tuple, scheme: str, depths: dict[str, int]) -> float | None:
    """The standard deviation of the parameter at (unrolled) `path`, None to keep it."""
    name = path[-1]
    if name == "embedding":
        return shape[-1] ** -0.5
    if name != "kernel":
        return None
    std = math.prod(shape[:-1]) ** -0.5
    stack = stack_name(path)
    if scheme == "width_residual" and stack is not None and path[-2] in _RESIDUAL_OUT:
        std /= math.sqrt(2 * depths[stack])
    return std


def reinitialize(model: nnx.Module, scheme: str, seed: int) -> nnx.Module:
    """Redraw `model`'s matrices by `scheme` (see the module docstring), in place; returns
    the model. `hf` leaves it as built."""
    check_init_scale(scheme)
    if scheme == "hf":
        return model
    cfg = model.config
    depths = {"layers": cfg.text.num_hidden_layers, "blocks": cfg.vision.depth}
    key = jax.random.key(seed)
    updates = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        stacked = is_stacked(path, var.get_metadata().get("axes"))
        parts = ([unstacked_path(path, i) for i in range(value.shape[0])] if stacked
                 else [path])
        shape = value.shape[1:] if stacked else value.shape
        if _std(parts[0], shape, scheme, depths) is None:  # norms and biases: as built
            continue
        draws = []
        for p in parts:
            k = jax.random.fold_in(key, zlib.crc32(".".join(map(str, p)).encode()))
            draws.append((_std(p, shape, scheme, depths)
                          * jax.random.normal(k, shape, jnp.float32)).astype(value.dtype))
        updates.append((path, var.replace(value=jnp.stack(draws) if stacked else draws[0])))
    nnx.update(model, nnx.from_flat_state(updates))
    return model

