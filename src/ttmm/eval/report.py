"""Evaluation results as one JSON file, a markdown table shaped like the paper's Table 1, and plots.

``results.json`` (``schema_version`` 1) holds::

    schema_version   1
    created          ISO time (UTC)
    config           the EvalConfig of the run (methods, docs, prefix_tokens, ..., ttt)
    environment      python, platform, cpu_count, torch_threads, packages {name: version}
    methods          {name: {kind, label}}
    banks            {bank name: {path, num_experts, routing, base_model, device, dtype, build,
                      keys, documents}}
    results          [{bank, domain, method, label, perplexity, normalised_perplexity, nll,
                       tokens, documents, mean_active_experts}]            one row per bank ×
                                                                          domain × method
    timing           [{bank, method, label, prompts, new_tokens, median_seconds, ratio_to_base,
                       median_adapt_seconds, adapt_ratio_to_base}]         one row per bank ×
                                                                          method
    documents        [{key, method, doc_id, domain, nll, tokens, active_experts, experts,
                       seconds, ...}]                                      per scored document
    timings          [{key, method, doc_id, domain, seconds, adapt_seconds, new_tokens}]

Perplexity is exp(Σ NLL / Σ scored tokens) over a domain's documents; normalised perplexity is
(ppl − ppl_TTT) / (ppl_base − ppl_TTT): 1 is the base model, 0 is TTT (None without both).
``key`` says what a per-document number depends on (``base:…``, ``chunks:…`` or ``bank:…``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections import defaultdict
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ttmm.eval.methods import METHODS

SCHEMA_VERSION = 1
PACKAGES = (
    "ttmm",
    "torch",
    "transformers",
    "peft",
    "sentence-transformers",
    "faiss-cpu",
    "numpy",
    "scikit-learn",
)

# The top-level keys of results.json and the type of each value (tests check against it).
SCHEMA: dict[str, type] = {
    "schema_version": int,
    "created": str,
    "config": dict,
    "environment": dict,
    "methods": dict,
    "banks": dict,
    "results": list,
    "timing": list,
    "documents": list,
    "timings": list,
}
RESULT_FIELDS: dict[str, tuple[type, ...]] = {
    "bank": (str,),
    "domain": (str,),
    "method": (str,),
    "label": (str,),
    "perplexity": (float,),
    "normalised_perplexity": (float, type(None)),
    "nll": (float,),
    "tokens": (int,),
    "documents": (int,),
    "mean_active_experts": (float,),
}
TIMING_FIELDS: dict[str, tuple[type, ...]] = {
    "bank": (str,),
    "method": (str,),
    "label": (str,),
    "prompts": (int,),
    "new_tokens": (int,),
    "median_seconds": (float,),
    "ratio_to_base": (float, type(None)),
    "median_adapt_seconds": (float,),
    "adapt_ratio_to_base": (float, type(None)),
}


def environment() -> dict:
    import torch

    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": packages,
    }


def normalised(ppl: float, base: float | None, ttt: float | None) -> float | None:
    """(ppl − ppl_TTT) / (ppl_base − ppl_TTT); None without both references or when they tie."""
    if base is None or ttt is None or base == ttt:
        return None
    return (ppl - ttt) / (base - ttt)


def build_report(
    banks: dict[str, dict], config, documents: list[dict], timings: list[dict]
) -> dict:
    """Aggregate per-document and per-prompt records into the ``results.json`` object."""

    methods = list(config.methods)
    results, timing, used_docs, used_timings = [], [], [], []
    for name, info in banks.items():
        wanted = set(info["documents"])
        rows = {}
        for method in methods:
            key = info["keys"].get(method)
            records = [
                r
                for r in documents
                if r["key"] == key and r["method"] == method and r["doc_id"] in wanted
            ]
            used_docs.extend(r for r in records if r not in used_docs)
            by_domain = defaultdict(list)
            for r in records:
                by_domain[r["domain"]].append(r)
            for domain, recs in by_domain.items():
                nll = float(sum(r["nll"] for r in recs))
                tokens = int(sum(r["tokens"] for r in recs))
                rows[domain, method] = {
                    "bank": name,
                    "domain": domain,
                    "method": method,
                    "label": METHODS[method].label,
                    "perplexity": math.exp(nll / tokens) if tokens else float("nan"),
                    "normalised_perplexity": None,
                    "nll": nll,
                    "tokens": tokens,
                    "documents": len(recs),
                    "mean_active_experts": float(
                        statistics.mean(r["active_experts"] for r in recs)
                    ),
                }
        for (domain, _), row in rows.items():
            base, ttt = rows.get((domain, "base")), rows.get((domain, "ttt"))
            row["normalised_perplexity"] = normalised(
                row["perplexity"],
                base and base["perplexity"],
                ttt and ttt["perplexity"],
            )
        results.extend(rows.values())
        per_method = {}
        for method in methods:
            key = info["keys"].get(method)
            records = [t for t in timings if t["key"] == key and t["method"] == method]
            used_timings.extend(t for t in records if t not in used_timings)
            if records:
                per_method[method] = records
        base_seconds = _median([t["seconds"] for t in per_method.get("base", [])])
        for method, records in per_method.items():
            seconds = _median([t["seconds"] for t in records])
            adapt = _median([t["adapt_seconds"] for t in records])
            timing.append(
                {
                    "bank": name,
                    "method": method,
                    "label": METHODS[method].label,
                    "prompts": len(records),
                    "new_tokens": int(records[0]["new_tokens"]),
                    "median_seconds": seconds,
                    "ratio_to_base": seconds / base_seconds if base_seconds else None,
                    "median_adapt_seconds": adapt,
                    "adapt_ratio_to_base": adapt / base_seconds if base_seconds else None,
                }
            )
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config.to_dict(),
        "environment": environment(),
        "methods": {m: {"kind": METHODS[m].kind, "label": METHODS[m].label} for m in methods},
        "banks": banks,
        "results": results,
        "timing": timing,
        "documents": used_docs,
        "timings": used_timings,
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def validate(report: dict) -> None:
    """Raise ValueError naming the first key or field that does not match the schema."""
    for key, kind in SCHEMA.items():
        if not isinstance(report.get(key), kind):
            raise ValueError(f"results.json: {key!r} must be a {kind.__name__}")
    if report["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"results.json: schema_version {report['schema_version']} is not 1")
    for rows, spec in ((report["results"], RESULT_FIELDS), (report["timing"], TIMING_FIELDS)):
        for row in rows:
            for name, kinds in spec.items():
                if not isinstance(row.get(name), kinds):
                    raise ValueError(f"results.json: row field {name!r} has {row.get(name)!r}")


def markdown_table(report: dict) -> str:
    """Perplexity per method (rows) and bank × domain (columns), then test-time cost."""
    results = report["results"]
    banks = report["banks"]
    columns = sorted(
        {(r["bank"], r["domain"]) for r in results},
        key=lambda c: (banks[c[0]]["num_experts"], c[0], c[1]),
    )
    cell = {(r["bank"], r["domain"], r["method"]): r for r in results}
    names = [f"K={banks[b]['num_experts']} {d}" if len(banks) > 1 else d for b, d in columns]
    lines = [
        "Perplexity on held-out documents (normalised perplexity in brackets: 1 = base, 0 = TTT).",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for method, info in report["methods"].items():
        cells = []
        for bank, domain in columns:
            row = cell.get((bank, domain, method))
            if row is None:
                cells.append("–")
                continue
            norm = row["normalised_perplexity"]
            cells.append(
                f"{row['perplexity']:.3f}" + (f" ({norm:.2f})" if norm is not None else "")
            )
        lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    tokens = {(r["bank"], r["domain"]): (r["documents"], r["tokens"]) for r in results}
    lines.append(
        "| documents / scored tokens | "
        + " | ".join("{} / {}".format(*tokens[c]) for c in columns)
        + " |"
    )
    if report["timing"]:
        new_tokens = report["config"]["new_tokens"]
        lines += [
            "",
            f"Test-time cost: median seconds to generate {new_tokens} tokens from a "
            f"{report['config']['prefix_tokens']}-token prompt, everything included, "
            "and the adaptation part alone (routing, merging, restoring; retrieval and training).",
            "",
            "| bank | method | seconds | × base | adaptation s | adaptation × base | experts |",
            "|---|---|---|---|---|---|---|",
        ]
        active = defaultdict(list)
        for r in results:
            active[r["bank"], r["method"]].append(r["mean_active_experts"])
        for t in report["timing"]:
            ratio = "–" if t["ratio_to_base"] is None else f"{t['ratio_to_base']:.2f}"
            adapt = "–" if t["adapt_ratio_to_base"] is None else f"{t['adapt_ratio_to_base']:.3f}"
            experts = active.get((t["bank"], t["method"]))
            experts = f"{statistics.mean(experts):.1f}" if experts else "–"
            lines.append(
                f"| K={banks[t['bank']]['num_experts']} | {t['label']} | "
                f"{t['median_seconds']:.2f} | {ratio} | {t['median_adapt_seconds']:.3f} | {adapt} "
                f"| {experts} |"
            )
    return "\n".join(lines) + "\n"


def plot_tradeoff(report: dict, path: str | os.PathLike) -> None:
    """Normalised perplexity against test-time cost (× base, log scale), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    banks = sorted(report["banks"], key=lambda b: report["banks"][b]["num_experts"])
    cost = {(t["bank"], t["method"]): t["ratio_to_base"] for t in report["timing"]}
    fig, axes = plt.subplots(1, len(banks), figsize=(5.5 * len(banks), 4.8), squeeze=False)
    methods = list(report["methods"])
    colours = plt.get_cmap("tab10")
    markers = "osD^v<>px"
    domains = sorted({r["domain"] for r in report["results"]})
    for ax, bank in zip(axes[0], banks):
        for r in report["results"]:
            x = cost.get((bank, r["method"]))
            if r["bank"] != bank or x is None or r["normalised_perplexity"] is None:
                continue
            ax.scatter(
                x,
                r["normalised_perplexity"],
                color=colours(methods.index(r["method"]) % 10),
                marker=markers[domains.index(r["domain"]) % len(markers)],
                s=50,
            )
        ax.set_xscale("log")
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("test-time cost (× base model, log scale)")
        ax.set_ylabel("normalised perplexity (1 = base, 0 = TTT)")
        ax.set_title(f"K = {report['banks'][bank]['num_experts']}")
    handles = [
        plt.Line2D([], [], color=colours(i % 10), marker="o", ls="", label=info["label"])
        for i, info in enumerate(report["methods"].values())
    ] + [
        plt.Line2D([], [], color="black", marker=markers[i % len(markers)], ls="", label=d)
        for i, d in enumerate(domains)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_experts(report: dict, path: str | os.PathLike) -> None:
    """Perplexity against the number of experts K, one line per method, one panel per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({r["domain"] for r in report["results"]})
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        for method, info in report["methods"].items():
            points = sorted(
                (report["banks"][r["bank"]]["num_experts"], r["perplexity"])
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
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, table.md, tradeoff.png and (with several banks) experts.png."""
    out = Path(out_dir)
    validate(report)
    paths = {"json": out / "results.json", "table": out / "table.md"}
    paths["json"].write_text(json.dumps(report, indent=2, default=str))
    paths["table"].write_text(markdown_table(report))
    if report["timing"] and any(r["normalised_perplexity"] is not None for r in report["results"]):
        paths["tradeoff"] = out / "tradeoff.png"
        plot_tradeoff(report, paths["tradeoff"])
    if len({b["num_experts"] for b in report["banks"].values()}) > 1:
        paths["experts"] = out / "experts.png"
        plot_experts(report, paths["experts"])
    return paths
