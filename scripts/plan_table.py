"""The README's table of per-device peaks: the real TPU compiler's (libtpu, compiled on this
CPU machine for the TPU topology) beside the planner's analytic count, per phase, with the
compile seconds.

    python scripts/plan_table.py                   # 3B, 7B, Qwen3-VL-8B x v5p-64, v5e-256, v4-64
    python scripts/plan_table.py --smallest 7b:v5p # + the smallest v5p mesh the compiler takes
    python scripts/plan_table.py --only 7b:v5p:64

Each entry is `python -m tempo_jax.plan --method aot --json` in its own process (the
planner's worker compiles the four phases: the SFT step, the rollout's sampling program, the
GRPO update and the optimizer apply; default configs). Writes `--out` (JSON) and prints the
markdown table; entries already in `--out` are kept (rerun with --fresh).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {"3b": "configs/tempo_r0.py:3b", "7b": "configs/tempo_r0.py:7b",
           "qwen3_vl_8b": "configs/tempo_r0.py:qwen3_vl_8b"}
SLICES = [("v5p", 64), ("v5e", 256), ("v4", 64)]
PHASES = ("sft step", "grpo rollout", "grpo update", "optimizer apply")
GiB = 2**30


def plan(config: str, chip: str, devices: int, phases: str | None = None) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "tempo_jax.plan", "--config", CONFIGS[config],
         "--mesh", f"fsdp={devices}", "--chip", chip, "--method", "aot", "--json"]
        + (["--phases", phases] if phases else []),
        capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode or not lines:
        tail = [x for x in out.stderr.splitlines() if x.strip()][-3:]
        return {"error": " | ".join(tail)[-600:], "wall_s": round(wall, 1)}
    p = json.loads(lines[-1])
    row = {"wall_s": round(wall, 1), "fits": p["fits"], "peak_phase": p["peak_phase"],
           "per_device_bytes": p["per_device_bytes"], "hbm_bytes": p["hbm_bytes"],
           "topology": p["aot"]["topology"], "compile_seconds": p["aot"]["compile_seconds"],
           "phases": {}}
    for name in PHASES:
        if name not in p["phases"] or name not in p["aot"]["phases"]:
            continue
        c = p["aot"]["phases"].get(name, {})
        row["phases"][name] = {"analytic": p["phases"][name]["total"],
                               "compiled": c.get("total"), "fits": c.get("fits", True),
                               "xla_peak": c.get("peak_memory_in_bytes"),
                               "arguments": c.get("argument_size_in_bytes"),
                               "temporaries": c.get("temp_size_in_bytes"),
                               "memory_analysis": c}
    return row


def reanalyze(results: dict) -> None:
    """The analytic column from this checkout's count (cheap; the compiled figures stay as
    measured), so that a change to the count shows against the compiler at once."""
    from tempo_jax.cli import load_config
    from tempo_jax.plan import plan as analytic_plan

    for key, r in results.items():
        if "error" in r:
            continue
        model, chip, n = key.split(":")
        p = analytic_plan(load_config(CONFIGS[model]), {"fsdp": int(n)}, chip, search=False)
        for name, ph in r["phases"].items():
            ph["analytic"] = p["phases"][name]["total"]


def table(results: dict) -> str:
    head = ("| model | slice | " + " | ".join(f"{n}: compiled / analytic GiB (s)" for n in PHASES)
            + " | peak | fits |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, r in results.items():
        model, chip, n = key.split(":")
        if "error" in r:
            lines.append(f"| {model} | {chip}-{n} | error: {r['error'][:120]} |")
            continue
        cells = []
        for name in PHASES:
            ph = r["phases"].get(name)
            if not ph:
                cells.append("-")
                continue
            comp = ("OOM " if not ph["fits"] else "") + f"{ph['compiled'] / GiB:.1f}"
            cells.append(f"{comp} / {ph['analytic'] / GiB:.1f} "
                         f"({r['compile_seconds'].get(name, 0):.0f})")
        lines.append(f"| {model} | {chip}-{n} | " + " | ".join(cells)
                     + f" | {r['per_device_bytes'] / GiB:.1f} of {r['hbm_bytes'] / GiB:.0f} "
                     f"({r['peak_phase']}) | {'yes' if r['fits'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=None, help="model:chip:devices[,...]")
    ap.add_argument("--smallest", default=None,
                    help="model:chip: also compile halving meshes below the table's until "
                         "the compiler refuses")
    ap.add_argument("--out", type=Path, default=Path("runs/plan_table.json"))
    ap.add_argument("--fresh", action="store_true")
    ap.add_argument("--phases", default=None,
                    help="recompile only these phases of the --only entries and replace them "
                         "in --out (the other phases and their seconds kept)")
    args = ap.parse_args()
    results = ({} if args.fresh or not args.out.exists()
               else json.loads(args.out.read_text()))
    todo = ([tuple(x.split(":")) for x in args.only.split(",")] if args.only
            else [(m, c, str(n)) for m in CONFIGS for c, n in SLICES])
    if args.smallest:
        model, chip = args.smallest.split(":")
        n = dict(SLICES)[chip]
        while n >= 4:
            n //= 2
            todo.append((model, chip, str(n)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for model, chip, n in todo:
        key = f"{model}:{chip}:{n}"
        if args.phases and key in results and "error" not in results[key]:
            new = plan(model, chip, int(n), args.phases)
            if "error" in new:
                print(f"{key}: {new['error']}", file=sys.stderr)
                continue
            old = results[key]
            old["phases"].update(new["phases"])
            old["compile_seconds"].update(new["compile_seconds"])
            old["per_device_bytes"] = max(ph["compiled"] for ph in old["phases"].values())
            old["peak_phase"] = max(old["phases"], key=lambda k: old["phases"][k]["compiled"])
            old["fits"] = (all(ph["fits"] for ph in old["phases"].values())
                           and old["per_device_bytes"] <= old["hbm_bytes"])
            args.out.write_text(json.dumps(results, indent=1))
            continue
        if key in results and "error" not in results[key]:
            continue
        print(f"{key} ...", file=sys.stderr, flush=True)
        results[key] = plan(model, chip, int(n))
        r = results[key]
        print(f"{key}: " + (r["error"] if "error" in r else
                            f"fits {r['fits']}, peak {r['per_device_bytes'] / GiB:.1f} GiB, "
                            f"compile {r['compile_seconds']}, wall {r['wall_s']} s"),
              file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(results, indent=1))
        if args.smallest and key.startswith(args.smallest) and "error" not in r \
                and not r["fits"]:
            break  # the compiler refused: the previous mesh is the smallest
    reanalyze(results)
    args.out.write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
