"""``preferences.png``: an ORPO or DPO run's curves, loss parts and rewards, train and held out."""

from __future__ import annotations

from pathlib import Path

from slmforge.runs import MetricsLog

PANELS = [("loss", ["loss", "nll", "or_loss"]), ("reward margin", ["reward_margin"]),
          ("reward accuracy", ["reward_accuracy"]), ("log-probs", ["chosen_logps", "rejected_logps"])]


def plot_preferences(metrics: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = MetricsLog(metrics).read()
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            rows = [r for r in records if key in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1, label=key)
            val = [r for r in records if f"val_{key}" in r]
            if val:
                ax.plot([r["step"] for r in val], [r[f"val_{key}"] for r in val], "o-", ms=3, label=f"held out {key}")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
