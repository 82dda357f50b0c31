"""The ablation of Tempo-R0's parts on the CPU demo: SAA, ETA's two halves and PIR.

    python scripts/ablate.py                      # every variant, runs/ablate/<variant>/
    python scripts/ablate.py --variants full,pir_off --set sft.steps=300
    python scripts/ablate.py --table-only         # rebuild the table from finished runs

Each variant is `python -m tempo_jax.train` on the tiny config with one part switched off,
the same seed, the same synthetic videos (train and held-out) and the same step counts, so
the only difference is the part. A finished variant (its `report.json`) is not rerun; a
killed one resumes from its last checkpoint. Writes `ablation.md`, `ablation.json` and
`ablation.png` (bars per metric) under the output directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

# name -> (what is switched off, config overrides)
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("nothing (the demo)", []),
    "saa_off": ("SAA: frames uniform in time, one resolution",
                ["--config.saa.enabled=False"]),
    "timestamps_off": ("ETA: no textual timestamps before the temporal patches",
                       ["--config.prompt.textual_timestamps=False"]),
    "aligned_off": ("ETA: M-RoPE temporal index uniform, not from real time",
                    ["--config.prompt.time_aligned_positions=False"]),
    "pir_off": ("PIR: no irrelevant pairs in SFT or GRPO (no contrast pairs)",
                ["--config.data.irrelevant_ratio=0.0", "--config.sft.contrast_share=0.0",
                 "--config.rl.irrelevant_prompts=0"]),
}
METRICS = ("r1@0.3", "r1@0.5", "r1@0.7", "miou", "refusal_accuracy", "refusal_accuracy_cross",
           "false_refusal_rate", "refusal_auc")


def run_variant(name: str, out: Path, extra: list[str], data: Path | None) -> dict:
    """Train and evaluate one variant (or read its finished report)."""
    wd = out / name
    report = wd / "report.json"
    if report.exists():
        print(f"[{name}] finished before: {report}", flush=True)
        return json.loads(report.read_text())
    wd.mkdir(parents=True, exist_ok=True)
    if data is not None and not (wd / "data").exists():
        (wd / "data").symlink_to(data.absolute(), target_is_directory=True)  # same videos
    cmd = [sys.executable, "-m", "tempo_jax.train", f"--workdir={wd}", *VARIANTS[name][1],
           *extra]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    with open(wd / "train.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    if code != 0 or not report.exists():
        raise SystemExit(f"[{name}] failed (exit {code}); see {wd / 'train.log'}")
    print(f"[{name}] done in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
    return json.loads(report.read_text())


def table(reports: dict[str, dict]) -> str:
    """Markdown: one row per variant and stage, the held-out metrics side by side."""
    head = ["variant", "switched off", "stage", *METRICS, "wall (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rep in reports.items():
        for stage in ("sft", "grpo"):
            m = rep.get(stage)
            if not m:
                continue
            vals = [f"{m[k]:.3f}" if k in m and m[k] == m[k] else "n/a" for k in METRICS]
            wall = f"{rep['wall_time_s'] / 60:.1f}" if stage == "grpo" else ""
            lines.append(f"| {name} | {VARIANTS[name][0]} | {stage} | " + " | ".join(vals)
                         + f" | {wall} |")
    return "\n".join(lines) + "\n"


def plot(reports: dict[str, dict], path: Path) -> None:
    """Grouped bars: one group per metric, one bar per variant (after PIR-GRPO)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [n for n in reports if reports[n].get("grpo")]
    fig, ax = plt.subplots(figsize=(13, 4))
    width = 0.8 / max(1, len(names))
    x = np.arange(len(METRICS))
    for i, n in enumerate(names):
        vals = [reports[n]["grpo"].get(k, float("nan")) for k in METRICS]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, vals, width, label=n)
    ax.set_xticks(x, [k.replace("refusal_accuracy", "refusal acc").replace("_", " ")
                      for k in METRICS], fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="held-out score", title="Ablation after PIR-GRPO "
           "(same seed, videos and steps; false refusal rate: lower is better)")
    ax.legend(fontsize=8, ncols=len(names))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ablate", help="one workdir per variant under it")
    ap.add_argument("--variants", default=",".join(VARIANTS),
                    help=f"comma-separated, from {', '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="a config override for every variant, e.g. sft.steps=300")
    ap.add_argument("--table-only", action="store_true", help="only rebuild the table")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    extra = [f"--config.{kv}" for kv in args.set]
    reports: dict[str, dict] = {}
    data = None
    for name in names:
        if args.table_only:
            rep = out / name / "report.json"
            if rep.exists():
                reports[name] = json.loads(rep.read_text())
            continue
        reports[name] = run_variant(name, out, extra, data)
        data = data or (out / name / "data").resolve()  # the first variant made the videos
    out.mkdir(parents=True, exist_ok=True)
    md = table(reports)
    (out / "ablation.md").write_text(md)
    (out / "ablation.json").write_text(json.dumps(
        {n: {"switched_off": VARIANTS[n][0], "overrides": VARIANTS[n][1] + extra,
             **{s: reports[n].get(s) for s in ("sft", "grpo")},
             "wall_time_s": reports[n].get("wall_time_s")} for n in reports}, indent=2))
    plot(reports, out / "ablation.png")
    print(md)
    return reports


if __name__ == "__main__":
    main()
