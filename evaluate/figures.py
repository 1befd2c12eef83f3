"""Every figure the project draws (matplotlib, headless Agg): ablation sweeps, training
curves, the paper's Fig. 5 analysis, and the demo's retrieval gallery. Each figure has
a title, axis labels and units, and is written as PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(sweep, rows: list[dict], path: Path) -> Path:
    """R@1 and MnR (text-to-video, mean ± std over seeds) of each variant of a sweep:
    bars for categorical sweeps, lines over ``Variant.x`` for numeric ones."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    seeds = rows[0]["seeds"] if rows else 0
    for ax, metric, label in ((axes[0], "R1", "R@1 (%) ↑"), (axes[1], "MnR", "mean rank ↓")):
        means = [r[metric] for r in rows]
        stds = [r[f"{metric}_std"] for r in rows]
        if sweep.x_label is None:
            # points, not bars: the axis is zoomed to the spread, and truncated bars would exaggerate it
            positions = np.arange(len(rows))
            ax.errorbar(positions, means, yerr=stds, fmt="o", ms=7, capsize=5)
            ax.set_xticks(positions, [r["variant"] for r in rows], rotation=20, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(rows) - 0.5)
            ax.set_xlabel("variant")
        else:
            xs = [r["x"] for r in rows]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4)
            ax.set_xticks(xs)
            ax.set_xlabel(sweep.x_label)
        ax.set_ylabel(f"text-to-video {label}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{sweep.title}\nleak-free test metrics, mean ± std over {seeds} seeds", fontsize=10)
    return _save(fig, path)


def plot_training_curves(run_dir: Path, path: Path | None = None) -> Path:
    """Loss terms, logit scale and learning rate against the optimisation step of one run
    (from its ``log.jsonl``), with validation R@1 where the run validated."""
    run_dir = Path(run_dir)
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "lr" in r and "total" in r]
    vals = [r for r in records if r.get("event") == "val"]
    terms = [k for k in ("ce", "s", "sup", "total") if any(k in r for r in steps)]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    x = [r["step"] for r in steps]
    for term in terms:
        axes[0].plot(x, [r.get(term, np.nan) for r in steps], label=term, lw=1)
    axes[0].set(xlabel="optimiser step", ylabel="loss (nats)", title="loss terms")
    axes[0].legend()
    axes[1].plot(x, [r["logit_scale"] for r in steps], color="tab:purple")
    axes[1].set(xlabel="optimiser step", ylabel="exp(logit scale)", title="logit scale (temperature⁻¹)")
    axes[2].plot(x, [r["lr"] for r in steps], color="tab:green")
    axes[2].set(xlabel="optimiser step", ylabel="learning rate", title="learning rate")
    if vals:
        twin = axes[0].twinx()
        twin.plot([v["step"] for v in vals], [v["t2v"]["R1"] for v in vals], "k--o", ms=3, label="val R@1")
        twin.set_ylabel("validation t2v R@1 (%)")
        twin.legend(loc="upper center")
    for ax in axes:
        ax.grid(alpha=0.3)
    config = json.loads((run_dir / "config.json").read_text())
    fig.suptitle(f"{run_dir}: {config['head']['head']} head", fontsize=10)
    return _save(fig, path or run_dir / "training-curves.png")
