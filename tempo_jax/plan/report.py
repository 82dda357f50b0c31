"""The plan as text: the per-phase table of per-device bytes, the verdict, the smallest mesh
that fits, the notes; and as JSON."""

from __future__ import annotations

import numpy as np

from tempo_jax import sharding as shd
from tempo_jax.plan.chips import GiB

ROW_ORDER = ("parameters", "gradients", "optimizer state", "reference model",
             "rollout KV cache", "activations", "fsdp all-gather buffers",
             "update temporaries (skip guard)", "xla temporaries margin")


def format_plan(p: dict) -> str:
    """The readable table."""
    mesh = p["mesh"]
    lines = [
        f"tempo_jax plan: {p['config']} on {p['devices']} x {p['chip']} "
        f"(mesh {mesh_str(mesh)}), method {p['method']}",
        f"parameters: {p['param_count']:,} ({p['param_count'] - p['vision_param_count']:,} "
        f"text + {p['vision_param_count']:,} vision); trainable {p['trainable_param_count']:,}",
    ]
    w = p["workload"]
    batch = []
    if w["sft"]:
        batch.append(f"SFT {w['sft_rows']} x {w['seq']} tokens")
    if w["grpo"]:
        batch.append(f"GRPO {w['prompts']} prompts x G={w['generations']} = {w['rows']} rows x "
                     f"({w['seq']} + {w['new_tokens']}) tokens")
    lines.append(f"dtype {p['dtype']}, remat {p['remat']}, attention {p['attention_backend']}; "
                 + "; ".join(batch))
    names = list(p["phases"])
    width = 40
    head = "per device, GiB".ljust(width) + "".join(n.rjust(16) for n in names)
    lines += ["", head, "-" * len(head)]
    rows = [k for k in ROW_ORDER if any(k in ph for ph in p["phases"].values())]
    for ph in p["phases"].values():
        rows += [k for k in ph if k not in rows and k not in ("total", "compiled total")]
    rows.append("total")
    for r in rows:
        vals = []
        sub_keys: list[str] = []
        for n in names:
            v = p["phases"][n].get(r)
            if isinstance(v, dict):
                vals.append(sum(v.values()))
                sub_keys += [k for k in v if k not in sub_keys]
            else:
                vals.append(v)
        cells = "".join(("-" if v is None else fmt_gib(v)).rjust(16) for v in vals)
        if r == "total":
            lines.append("-" * len(head))
        lines.append(f"  {r}".ljust(width) + cells)
        for k in sub_keys:
            sub = [p["phases"][n].get(r, {}).get(k) if isinstance(p["phases"][n].get(r), dict)
                   else None for n in names]
            if not any(sub):
                continue  # e.g. a frozen vision tower needing nothing beyond the decoder
            lines.append(f"    {k}"[:width].ljust(width)
                         + "".join(("" if v is None else fmt_gib(v)).rjust(16) for v in sub))
    aot = p.get("aot") or {}
    if aot.get("phases"):
        def compiled(n):
            if n not in aot["phases"]:
                return "-"
            ph = aot["phases"][n]
            return (fmt_gib(ph["total"]) if ph.get("fits", True)
                    else f"OOM {fmt_gib(ph['total'])}")

        lines.append("  compiled (memory_analysis)".ljust(width)
                     + "".join(compiled(n).rjust(16) for n in names))
        lines.append("  compiled / analytic".ljust(width) + "".join(
            (f"{aot['phases'][n]['total'] / p['phases'][n]['total']:.2f}"
             if n in aot["phases"] and p["phases"][n].get("total") else "-").rjust(16)
            for n in names))
        lines.append("  compile seconds".ljust(width) + "".join(
            (f"{aot['compile_seconds'][n]:.1f}" if n in aot.get("compile_seconds", {})
             else "-").rjust(16) for n in names))
    for n, r in (p.get("compiler_refused") or {}).items():
        lines.append(f"the compiler refused {n}: {r['needed_for']} need "
                     f"{r['needed'] / GiB:.2f} GiB of {r['available'] / GiB:.2f} GiB")
    lines.append("")
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines.append(f"peak: {p['per_device_bytes'] / GiB:.2f} GiB ({p['peak_phase']}) of "
                 f"{p['hbm_bytes'] / GiB:.2f} GiB per {p['chip']} device -> {verdict} "
                 f"({100 * p['per_device_bytes'] / p['hbm_bytes']:.0f}%)")
    sm = p.get("smallest_mesh")
    if not p["fits"]:
        if sm:
            lines.append(f"smallest mesh that fits: {mesh_str(sm['mesh'])} ({sm['devices']} x "
                         f"{p['chip']}, peak {sm['per_device_bytes'] / GiB:.2f} GiB, "
                         f"{sm['peak_phase']}; analytic search, same batch sizes)")
        else:
            lines.append("no mesh of up to 8192 devices fits (analytic); reduce the batch, "
                         "sequence or use splash/cudnn attention")
    for n in p["notes"]:
        lines.append(f"note: {n}")
    lines.append(f"method: {p['method']}" + (f" ({p['method_note']})" if p.get("method_note")
                                             else ""))
    return "\n".join(lines)


def fmt_gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def mesh_str(mesh: dict[str, int]) -> str:
    """`{"fsdp": 64}` -> `"data=1,fsdp=64,tensor=1"`."""
    return ",".join(f"{a}={mesh.get(a, 1)}" for a in shd.MESH_AXES)


def jsonable(x):
    """The plan with numpy integers as ints (for json.dumps)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x

