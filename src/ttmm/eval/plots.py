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


def _sweep_banks(report: dict) -> dict[str, int]:
    """K of each bank trained from the base model (branched banks differ in more than K)."""
    return {
        name: info["num_experts"]
        for name, info in report["banks"].items()
        if not info.get("branch_from")
    }


def experts_series(
    report: dict, against: str | None = None
) -> dict[str, dict[str, list[tuple[int, float, float, float]]]]:
    """Per domain, per method: (K, value, 95% interval low, high) over the banks that differ
    only in K, sorted by K. The value is the perplexity, or with ``against`` (e.g.
    ``"finetune"``) the paired difference to that method of the same bank.

    Banks branched from another adapter are left out (they differ in more than K), and so are
    methods with a value at a single K (ensembles, hybrids): they make no line.
    """
    banks = _sweep_banks(report)
    series: dict[str, dict[str, list]] = {}
    for r in report["results"]:
        if r["bank"] not in banks:
            continue
        if against is None:
            point = (banks[r["bank"]], r["ppl"], r["ci_low"], r["ci_high"])
        elif (c := r["comparisons"].get(against)) is not None:
            point = (banks[r["bank"]], c["diff"], c["ci_low"], c["ci_high"])
        else:
            continue
        series.setdefault(r["domain"], {}).setdefault(r["method"], []).append(point)
    return {
        domain: {
            m: sorted(points) for m, points in methods.items() if len({p[0] for p in points}) > 1
        }
        for domain, methods in sorted(series.items())
    }


def plot_experts(report: dict, path: str | os.PathLike) -> None:
    """How the merges change with the number of experts K (:func:`experts_series`): the
    paired difference to each bank's own fine-tuning with its 95% interval where every bank
    scored fine-tuning (0 = fine-tuning), else the perplexity; one line per method, one panel
    per domain; base and TTT, which do not depend on K, in grey."""
    plt = _pyplot()
    scored = {(r["bank"], r["method"]) for r in report["results"]}
    names = _sweep_banks(report)
    against = "finetune" if names and all((n, "finetune") in scored for n in names) else None
    series = experts_series(report, against)
    methods = list(report["methods"])
    colours = plt.get_cmap("tab20")
    references = {"base": "--", "ttt": ":"}
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 4.5), squeeze=False)
    for ax, (domain, lines) in zip(axes[0], series.items()):
        for method, points in lines.items():
            ks, value, low, high = zip(*points)
            label = report["methods"][method]["label"]
            if method in references:
                ax.plot(ks, value, color="grey", ls=references[method], lw=1, label=label)
                continue
            ax.errorbar(
                ks,
                value,
                yerr=[
                    [v - lo for v, lo in zip(value, low)],
                    [hi - v for v, hi in zip(value, high)],
                ],
                color=colours(methods.index(method) % 20),
                marker="o",
                capsize=3,
                elinewidth=0.8,
                label=label,
            )
        if against:
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({k for points in lines.values() for k, *_ in points}))
        ax.xaxis.set_major_formatter(lambda value, _: f"{value:g}")
        ax.set_xlabel("experts K (banks trained from the base model)")
        ax.set_ylabel(
            "perplexity − the bank's fine-tuning (paired 95% interval)"
            if against
            else "perplexity (95% interval)"
        )
        ax.set_title(domain)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


__all__ = ["experts_series", "plot_experts", "plot_tradeoff", "y_limits"]
