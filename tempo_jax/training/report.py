"""What a run reports beside its metrics: the best constant window (what ignoring the video
scores), the training curves and the timeline of predicted vs true windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tempo_jax.grounding.answers import temporal_iou
from tempo_jax.grounding.metrics import grounding_metrics


def baseline_constant_window(train: list[dict], val_rows: list[dict]) -> dict:
    """What a model that ignores the video scores: the single window that maximises mean IoU
    on the training windows, answered for every validation query (never refusing)."""
    wins = [(r["windows"][0], r["duration"]) for r in train if r.get("relevant", True)
            and r.get("windows")]
    grid = np.arange(0, 1.0001, 0.05)
    best, best_score = (0.0, 1.0), -1.0
    for s in grid:
        for e in grid[grid > s]:
            score = np.mean([temporal_iou((s * d, e * d), w) for w, d in wins])
            if score > best_score:
                best, best_score = (s, e), score
    answers = [f"<answer>{best[0] * r['duration']:.1f} to {best[1] * r['duration']:.1f}</answer>"
               for r in val_rows]
    m = grounding_metrics(answers, [r["windows"] for r in val_rows],
                          [r["relevant"] for r in val_rows], [r["duration"] for r in val_rows])
    m["window_fraction"] = list(best)
    return m


def plot_curves(workdir: Path) -> Path | None:
    """SFT loss; PIR-GRPO reward; refusals of irrelevant rollouts, false refusals of relevant
    ones and the share of groups dynamic sampling dropped (moving averages), from
    metrics.jsonl, with each stage's held-out evaluation marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines() if x]
    sft = [r for r in rows if r["stage"] == "sft"]
    rl = [r for r in rows if r["stage"] == "grpo"]
    evals = {r["stage"][5:]: r for r in rows if r["stage"].startswith("eval_")}
    fig, axes = plt.subplots(1, 3, figsize=(16, 3.8))

    def smooth(key):
        vals = np.asarray([r.get(key, np.nan) for r in rl], np.float64)
        k = min(5, len(vals))
        ok = np.isfinite(vals)  # a step without irrelevant prompts has no refusal rate
        num = np.convolve(np.where(ok, vals, 0.0), np.ones(k), mode="valid")
        den = np.convolve(ok.astype(float), np.ones(k), mode="valid")
        return [r["step"] for r in rl][k - 1:], np.where(den > 0, num / np.maximum(den, 1), np.nan)

    if sft:
        axes[0].plot([r["step"] for r in sft], [r["loss"] for r in sft])
        axes[0].set(title="SFT answer loss", xlabel="step", ylabel="cross-entropy",
                    yscale="log")
    if rl:
        for key, label in (("reward", "total"), ("reward_format", "format"),
                           ("reward_accuracy", "accuracy")):
            if key in rl[0]:
                axes[1].plot(*smooth(key), label=label)
        axes[1].set(title="PIR-GRPO reward (moving average)", xlabel="step", ylabel="reward")
        axes[1].legend()
        for key, label in (("refusal_accuracy", "irrelevant rollouts refused"),
                           ("false_refusal_rate", "relevant rollouts refused"),
                           ("dropped_groups", "groups dropped (equal rewards)")):
            if key in rl[0]:
                axes[2].plot(*smooth(key), label=label)
    # held-out evaluations on the GRPO axis: after SFT at its start, after GRPO at its end
    last = rl[-1]["step"] if rl else 0
    for stage, marker, x in (("sft", "s", 0), ("grpo", "o", last)):
        ev = evals.get(stage)
        if ev is not None:
            for key, colour in (("refusal_accuracy", "C0"), ("false_refusal_rate", "C1")):
                axes[2].plot([x], [ev[key]], marker, color=colour, mfc="none", ms=8,
                             label=f"{key.replace('_', ' ')} after {stage} (held-out)")
    axes[2].set(title="PIR: refusals (moving average)", xlabel="PIR-GRPO step", ylabel="share",
                ylim=(-0.03, 1.03))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    out = workdir / "reward_curve.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_timeline(rows: list[dict], out: Path, n: int = 16) -> Path:
    """Predicted vs true windows for the first `n` validation queries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[:n]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(rows) + 1.2))
    for i, r in enumerate(rows):
        y = len(rows) - i
        ax.plot([0, r["duration"]], [y, y], color="0.85", lw=6, solid_capstyle="butt")
        for w in r["windows"]:
            ax.plot(w, [y + 0.12, y + 0.12], color="tab:green", lw=5, solid_capstyle="butt")
        p = r["parsed"]
        if isinstance(p, list):  # drawn clipped to the video; the raw answer is in predictions
            p_draw = [min(max(v, 0.0), r["duration"]) for v in p]
            ax.plot(p_draw, [y - 0.12, y - 0.12], color="tab:blue", lw=5, solid_capstyle="butt")
        label = r["query"][:38] + ("" if r["relevant"] else " [irrelevant]")
        mark = " (refused)" if p == "refuse" else " (unreadable)" if p is None else ""
        ax.text(-0.3, y, label + mark, ha="right", va="center", fontsize=7)
    ax.set_yticks([])
    ax.set_xlabel("seconds")
    ax.set_title("true (green) vs predicted (blue) windows")
    ax.set_xlim(left=0)
    fig.tight_layout()
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out
