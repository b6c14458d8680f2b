"""The PoC report's two figures, drawn from ``poc.json`` alone."""

from __future__ import annotations

import os

from ttmm.atomic import atomic_file
from ttmm.eval.plots import _pyplot


def plot_quality(poc: dict, path: str | os.PathLike) -> None:
    """Each method's perplexity relative to fine-tuning (%, paired 95 % interval), one panel
    per domain; left of the line is better than fine-tuning."""
    plt = _pyplot()
    domains = poc["quality"]["domains"]
    fig, axes = plt.subplots(
        1, len(domains), figsize=(5.5 * len(domains), 3.6), squeeze=False, sharey=True
    )
    for ax, (domain, d) in zip(axes[0], domains.items()):
        labels, values, lows, highs = [], [], [], []
        for r in d["methods"].values():
            c = r["comparisons"].get("finetune")
            if c is None:
                continue
            labels.append(f"{r['label']} ({c['n_docs']})")
            values.append(100 * c["rel_diff"])
            lows.append(100 * (c["rel_diff"] - c["rel_ci_low"]))
            highs.append(100 * (c["rel_ci_high"] - c["rel_diff"]))
        y = list(range(len(labels)))
        for yi, v, lo, hi in zip(y, values, lows, highs):
            shows = v - lo > 0 or v + hi < 0  # the interval excludes zero
            colour = "#2a7ab9" if shows else "#8a94a3"
            ax.errorbar([v], [yi], xerr=[[lo], [hi]], fmt="o", color=colour, capsize=3)
        ax.axvline(0, color="#b0443c", lw=1)
        ax.set_yticks(y, labels)
        ax.set_title(f"'{domain}'")
        ax.set_xlabel("perplexity vs fine-tuning (%)")
        ax.invert_yaxis()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_stages(poc: dict, path: str | os.PathLike) -> None:
    """Where the run's wall time went: one bar, a segment per stage, against the budget."""
    plt = _pyplot()
    stages = poc["run"]["stage_seconds"]
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 2.2))
    left = 0.0
    for i, (name, seconds) in enumerate(stages.items()):
        ax.barh([0], [seconds / 60], left=left, color=colours(i), label=name)
        left += seconds / 60
    ax.axvline(poc["plan"]["budget_seconds"] / 60, color="#b0443c", lw=2, label="budget")
    ax.set_yticks([])
    ax.set_xlabel("minutes")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=len(stages) + 1, fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
