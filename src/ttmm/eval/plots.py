"""The evaluation's figures: the quality/cost trade-off (the paper's Fig. 1) and perplexity
against the number of experts K. Both read a ``results.json`` object (see :mod:`.report`)."""

from __future__ import annotations

import os

from ttmm.atomic import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_axis(ax) -> None:
    """Log x axis labelled 0.5, 1, 2, 5, 10, ... rather than 10^x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def y_limits(values: list[float], margin: float = 0.5) -> tuple[float, float]:
    """Vertical range of a normalised-perplexity panel: the point estimates and both reference
    lines (0 = TTT, 1 = base), widened by ``margin`` of that span on each side. Intervals are
    not used: where base and TTT are close, a ratio's interval can span tens of units and would
    flatten every point; bars beyond the range are cut at the axis."""
    low, high = min([0.0, *values]), max([1.0, *values])
    pad = margin * (high - low)
    return low - pad, high + pad


def plot_tradeoff(report: dict, path: str | os.PathLike) -> None:
    """Normalised perplexity (1 = base, 0 = TTT) with its 95% interval against test-time seconds
    to generate (median, everything included, log scale); one panel per domain, every method in
    every panel (one colour each), one marker per bank."""
    plt = _pyplot()
    seconds = {(t["bank"], t["method"]): t["median_seconds"] for t in report["timing"]}
    domains = sorted({r["domain"] for r in report["results"]})
    banks = sorted(report["banks"], key=lambda b: (report["banks"][b]["num_experts"], b))
    methods = list(report["methods"])
    colours = plt.get_cmap("tab20")
    markers = "osD^v<>px*h"
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        shown_values = []
        for r in report["results"]:
            x = seconds.get((r["bank"], r["method"]))
            y = r["normalised_perplexity"]
            if r["domain"] != domain or x is None or y is None:
                continue
            low, high = r["normalised_ci_low"], r["normalised_ci_high"]
            shown_values.append(y)
            ax.errorbar(
                x,
                y,
                yerr=[[max(y - low, 0.0)], [max(high - y, 0.0)]],
                color=colours(methods.index(r["method"]) % 20),
                marker=markers[banks.index(r["bank"]) % len(markers)],
                markersize=6,
                capsize=3,
                linestyle="",
            )
        _plain_log_axis(ax)
        ax.set_ylim(*y_limits(shown_values))
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("test-time seconds per prompt (median, log scale)")
        ax.set_ylabel("normalised perplexity (1 = base, 0 = TTT)")
        ax.set_title(f"{domain} (95% intervals, cut at the axis)")
    shown = {r["method"] for r in report["results"]}
    handles = [
        plt.Line2D([], [], color=colours(i % 20), marker="o", ls="", label=info["label"])
        for i, (method, info) in enumerate(report["methods"].items())
        if method in shown
    ]
    if len(banks) > 1:
        handles += [
            plt.Line2D([], [], color="black", marker=markers[i % len(markers)], ls="", label=b)
            for i, b in enumerate(banks)
        ]
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=7, frameon=False)
    rows = (len(handles) + 3) // 4
    fig.tight_layout(rect=(0, 0.04 * rows + 0.02, 1, 1))
    with atomic_file(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


def plot_experts(report: dict, path: str | os.PathLike) -> None:
    """Perplexity against the number of experts K, one line per method, one panel per domain."""
    plt = _pyplot()
    domains = sorted({r["domain"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for method, info in report["methods"].items():
            points = sorted(
                (report["banks"][r["bank"]]["num_experts"], r["ppl"])
                for r in report["results"]
                if r["domain"] == domain and r["method"] == method
            )
            if points:
                ax.plot(*zip(*points), marker="o", label=info["label"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experts K")
        ax.set_ylabel("perplexity")
        ax.set_title(domain)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


__all__ = ["plot_experts", "plot_tradeoff", "y_limits"]
