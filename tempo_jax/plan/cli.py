"""`python -m tempo_jax.plan`: the command line, and `run` (the analytic plan, then, for TPU
chips, the compiled one)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import ml_collections

from tempo_jax import sharding as shd
from tempo_jax.cli import UsageError, apply_overrides, load_config
from tempo_jax.plan import aot
from tempo_jax.plan.analytic import plan, smallest_mesh
from tempo_jax.plan.chips import CHIPS, chip_info
from tempo_jax.plan.report import format_plan, jsonable


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


def run(config: ml_collections.ConfigDict, mesh: dict[str, int], chip: str,
        method: str = "auto", aot_timeout: float | None = None,
        phases: Sequence[str] | None = None) -> dict:
    """`analytic.plan`, then, for TPU chips and method auto/aot, the numbers of the steps
    compiled for the topology (`aot.aot_plan`) replace the analytic peak (the analytic
    breakdown stays alongside)."""
    p = plan(config, mesh, chip)
    if method == "analytic":
        p["method_note"] = "requested"
        return p
    if chip_info(chip).platform != "tpu":
        p["method_note"] = (f"AOT compilation needs a TPU target; for {chip} the count is "
                            "analytic")
        return p
    if aot.libtpu_available()[0]:
        print(f"compiling the training steps for {p['devices']} x {chip} ahead of time "
              "(--method analytic skips it)", file=sys.stderr)
    aot_out = aot.aot_plan(config, p["mesh"], chip, timeout=aot_timeout, phases=phases)
    if "error" in aot_out:
        p["method_note"] = f"AOT unavailable, analytic count used: {aot_out['error']}"
        if method == "aot":
            raise RuntimeError(p["method_note"])
        return p
    p["aot"] = aot_out
    p["method"] = f"aot:{aot_out['topology']}"
    # each compiled phase's figure replaces its analytic total; phases not compiled
    # (--phases) keep the count
    totals = {k: ph["total"] for k, ph in p["phases"].items()}
    for name, ph in aot_out["phases"].items():
        if name in p["phases"]:
            p["phases"][name]["compiled total"] = ph["total"]
        totals[name] = ph["total"]
    peak_phase = max(totals, key=totals.get)
    p["per_device_bytes"] = int(totals[peak_phase])
    p["peak_phase"] = peak_phase
    refused = [k for k, ph in aot_out["phases"].items() if not ph.get("fits", True)]
    # the compiler's verdict decides: a phase it refused does not fit, whatever the count
    p["fits"] = not refused and p["per_device_bytes"] <= p["hbm_bytes"]
    if refused:
        p["compiler_refused"] = {k: {x: aot_out["phases"][k][x] for x in
                                     ("needed", "available", "needed_for", "message")}
                                 for k in refused}
    if not p["fits"] and p["smallest_mesh"] is None:  # the compiler disagrees: search above
        p["smallest_mesh"] = smallest_mesh(config, p["mesh"], chip,
                                           min_devices=2 * p["devices"])
    p["method_note"] = ("per-device peak from compiled.memory_analysis() of the steps "
                        "compiled for the topology (XLA's peak_memory_in_bytes), plus resident "
                        "state they do not take as arguments; the breakdown is analytic"
                        + ("; the compiler refused " + ", ".join(refused) + " (out of memory)"
                           if refused else ""))
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
    parser.add_argument("--aot-timeout", type=float, default=None,
                        help="seconds allowed for the AOT compilation before falling back "
                             "(default: sized from the model, aot.default_timeout)")
    parser.add_argument("--phases", default=None,
                        help="AOT: compile only these phases (comma-separated, of "
                             + ", ".join(aot.PHASES) + "); the others keep the analytic count")
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
    phases = None
    if args.phases:
        phases = [x.strip() for x in args.phases.split(",") if x.strip()]
        unknown = [x for x in phases if x not in aot.PHASES]
        if unknown:
            parser.error(f"unknown --phases {', '.join(unknown)}; choose from "
                         + ", ".join(aot.PHASES))
    p = run(config, mesh, args.chip, args.method, args.aot_timeout, phases)
    print(format_plan(p))
    if args.json:
        print(json.dumps(jsonable(p)))
    return p

