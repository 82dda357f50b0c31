"""Stacks of identical layers, unrolled or scanned: the decoder's layers and the vision
towers' blocks.

`scan=True` stores a stack's layers stacked (`[num_layers, ...]` parameters with a leading
`layers` logical axis, never sharded, as MaxText's `scan_layers`) and runs them with
`jax.lax.scan`: XLA compiles one layer instead of `num_layers` copies, so compile time no
longer grows with depth. The stacked layers are built from the same per-layer
initialisations as the unrolled ones, so a model has the same parameters either way, and
checkpoints name each layer as the unrolled model does (`model.layers.{i}.*`,
`visual.blocks.{i}.*`: `is_stacked`, `unstacked_path`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tempo_jax.models.layers import remat_policy

LAYERS_AXIS = "layers"  # the logical name of a stacked parameter's leading axis
# the attribute names of the stacks a model may scan: the decoder's and the vision towers'
STACK_NAMES = ("layers", "blocks")


def stack_layers(layers: Sequence[nnx.Module]) -> nnx.Module:
    """One module whose parameters are the layers' stacked on a new leading axis (named
    `layers` in each parameter's logical axes)."""
    graphdef, _ = nnx.split(layers[0])
    states = [nnx.state(layer) for layer in layers]
    stacked = nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))
    for _, node in nnx.iter_graph(stacked):
        if isinstance(node, nnx.Variable):
            axes = node.get_metadata().get("axes")
            rest = axes or (None,) * (len(node.get_value().shape) - 1)
            node.set_metadata(axes=(LAYERS_AXIS, *rest))
    return stacked


def make_stack(layers: Sequence[nnx.Module], scan: bool) -> nnx.Module:
    """The layers as a model stores them: stacked when scanned, else an `nnx.List`."""
    return stack_layers(layers) if scan else nnx.List(list(layers))


def _stack_index(path: tuple) -> int | None:
    return next((k for k, p in enumerate(path) if p in STACK_NAMES), None)


def stack_name(path: tuple) -> str | None:
    """The stack (`layers` or `blocks`) a parameter path lies in, None outside any."""
    k = _stack_index(path)
    return None if k is None else path[k]


def is_stacked(path: tuple, axes: tuple | None) -> bool:
    """Whether the parameter at `path` (with logical `axes`) is a stacked layer parameter
    (`('model', 'layers', 'self_attn', ...)` or `('visual', 'blocks', 'attn', ...)`, first
    axis `layers`)."""
    return bool(axes) and axes[0] == LAYERS_AXIS and _stack_index(path) is not None


def unstacked_path(path: tuple, i: int) -> tuple:
    """The unrolled path of layer `i` of a stacked parameter: ('model', 'layers', 'mlp', ...)
    -> ('model', 'layers', i, 'mlp', ...)."""
    k = _stack_index(path)
    return (*path[:k + 1], i, *path[k + 1:])


def scan_layers(layers: nnx.Module, body: Callable, carry: Any, remat: str,
                with_outputs: bool = True):
    """`body(layer, carry, i) -> (carry, out)` over the stacked `layers` (i traced), the
    rematerialisation policy around each step; returns (carry, stacked outs)."""
    graphdef, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]

    def step(c, xs):
        st, i = xs
        c, out = body(nnx.merge(graphdef, st), c, i)
        return c, (out if with_outputs else None)

    policy = remat_policy(remat)
    if policy is not None:
        step = jax.checkpoint(step, policy=policy, prevent_cse=False)
    return jax.lax.scan(step, carry, (state, jnp.arange(n, dtype=jnp.int32)))


def run_stack(layers: nnx.Module, body: Callable, carry: Any, scan: bool) -> Any:
    """`carry` through `body(layer, carry, i) -> carry` for every layer: scanned (i traced)
    or unrolled (i a Python int). No rematerialisation (the vision towers run without)."""
    if scan:
        return scan_layers(layers, lambda lyr, c, i: (body(lyr, c, i), None), carry, "none",
                           with_outputs=False)[0]
    for i, layer in enumerate(layers):
        carry = body(layer, carry, i)
    return carry
