"""Evaluation results as one JSON file and a markdown table shaped like the paper's Table 1.

``results.json`` (``schema_version`` 2) holds::

    schema_version   2
    created          ISO time (UTC)
    config           the EvalConfig of the run (methods, docs, ttt_docs, ..., bootstrap, ttt)
    environment      python, platform, cpu_count, torch_threads, packages {name: version}
    methods          {name: {kind, label, subset}}
    banks            {bank name: {path, num_experts, routing, base_model, device, dtype, build,
                      branch_from, content, keys, documents, subsets}}
    results          [{bank, domain, method, label, ppl, ci_low, ci_high, n_docs, n_tokens,
                       normalised_perplexity, normalised_ci_low, normalised_ci_high, nll,
                       mean_active_experts,
                       comparisons {base|finetune|ttt: {diff, ci_low, ci_high, rel_diff,
                                                        rel_ci_low, rel_ci_high, significant,
                                                        win_rate, n_docs}}}]
                                                      one row per bank × domain × method
    timing           [{bank, method, label, prompts, new_tokens, median_seconds, ratio_to_base,
                       median_adapt_seconds, adapt_ratio_to_base}]   one row per bank × method
    documents        [{key, method, doc_id, domain, nll, tokens, active_experts, experts,
                       seconds, ...}]                                per scored document
    timings          [{key, method, doc_id, domain, seconds, adapt_seconds, new_tokens}]

Perplexity is exp(Σ NLL / Σ scored tokens) over a domain's documents, with a 95% bootstrap
interval over documents (:mod:`.intervals`). A comparison ``diff`` is ppl − ppl_ref on the
documents both methods scored, with its paired interval (``rel_diff``: ppl / ppl_ref − 1, the
same as a share); ``win_rate`` is the share of those
documents where the method's NLL per token is lower. Normalised perplexity is
(ppl − ppl_TTT) / (ppl_base − ppl_TTT) on the documents all three scored: 1 is the base model,
0 is TTT (None without both). ``key`` says what a per-document number depends on
(:mod:`.keys`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections import defaultdict
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from ttmm.atomic import atomic_write_text
from ttmm.eval.intervals import (
    corpus_perplexity,
    draw,
    paired_difference,
    paired_relative_difference,
    perplexity_interval,
    quantiles,
    win_rate,
)
from ttmm.eval.methods import METHODS, REFERENCES

SCHEMA_VERSION = 2
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
    "ppl": (float,),
    "ci_low": (float,),
    "ci_high": (float,),
    "n_docs": (int,),
    "n_tokens": (int,),
    "normalised_perplexity": (float, type(None)),
    "normalised_ci_low": (float, type(None)),
    "normalised_ci_high": (float, type(None)),
    "nll": (float,),
    "mean_active_experts": (float,),
    "comparisons": (dict,),
}
COMPARISON_FIELDS: dict[str, tuple[type, ...]] = {
    "diff": (float,),
    "ci_low": (float,),
    "ci_high": (float,),
    "rel_diff": (float,),
    "rel_ci_low": (float,),
    "rel_ci_high": (float,),
    "significant": (bool,),
    "win_rate": (float,),
    "n_docs": (int,),
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


def _arrays(records: dict[str, dict], ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Aligned (NLL, scored tokens) arrays of the documents ``ids``."""
    nll = np.array([records[i]["nll"] for i in ids], dtype=np.float64)
    tokens = np.array([records[i]["tokens"] for i in ids], dtype=np.float64)
    return nll, tokens


def _domain_rows(name: str, domain: str, by_method: dict, config) -> list[dict]:
    """One row per method of one (bank, domain): perplexity with its interval, normalised
    perplexity with its interval, and the paired comparisons with the references."""
    B, seed = config.bootstrap, config.seed
    rows = []
    for method, records in by_method.items():
        ids = list(records)
        nll, tokens = _arrays(records, ids)
        estimate = perplexity_interval(nll, tokens, draw(ids, B, seed))
        row = {
            "bank": name,
            "domain": domain,
            "method": method,
            "label": METHODS[method].label,
            "ppl": estimate.value,
            "ci_low": estimate.ci_low,
            "ci_high": estimate.ci_high,
            "n_docs": len(ids),
            "n_tokens": int(tokens.sum()),
            "nll": float(nll.sum()),
            "normalised_perplexity": None,
            "normalised_ci_low": None,
            "normalised_ci_high": None,
            "mean_active_experts": float(
                statistics.mean(r["active_experts"] for r in records.values())
            ),
            "comparisons": {},
        }
        for ref in REFERENCES:
            if ref == method or ref not in by_method:
                continue
            common = [i for i in ids if i in by_method[ref]]
            if not common:
                continue
            a, b = _arrays(records, common), _arrays(by_method[ref], common)
            resamples = draw(common, B, seed)
            diff = paired_difference(*a, *b, resamples)
            relative = paired_relative_difference(*a, *b, resamples)
            row["comparisons"][ref] = {
                "diff": diff.value,
                "ci_low": diff.ci_low,
                "ci_high": diff.ci_high,
                "rel_diff": relative.value,
                "rel_ci_low": relative.ci_low,
                "rel_ci_high": relative.ci_high,
                "significant": diff.excludes_zero and len(common) >= 2,  # 1 doc: no spread
                "win_rate": win_rate(*a, *b),
                "n_docs": len(common),
            }
        if "base" in by_method and "ttt" in by_method:
            common = [i for i in ids if i in by_method["base"] and i in by_method["ttt"]]
            if common:
                rows_ = draw(common, B, seed)
                m, b, t = (
                    _arrays(r, common) for r in (records, by_method["base"], by_method["ttt"])
                )
                value = normalised(
                    corpus_perplexity(*m), corpus_perplexity(*b), corpus_perplexity(*t)
                )
                if value is not None:
                    boot_t = corpus_perplexity(*t, rows_)
                    with np.errstate(divide="ignore", invalid="ignore"):
                        boot = (corpus_perplexity(*m, rows_) - boot_t) / (
                            corpus_perplexity(*b, rows_) - boot_t
                        )
                    low, high = (
                        quantiles(boot[np.isfinite(boot)])
                        if np.isfinite(boot).any()
                        else (value, value)
                    )
                    row |= {
                        "normalised_perplexity": value,
                        "normalised_ci_low": low,
                        "normalised_ci_high": high,
                        "normalised_n_docs": len(common),
                    }
        rows.append(row)
    return rows


def _latest(records: list[dict]) -> dict[tuple, dict]:
    """The last record of each (key, method, doc_id): a rescored line supersedes older ones."""
    return {(r["key"], r["method"], r["doc_id"]): r for r in records}


def build_report(
    banks: dict[str, dict], config, documents: list[dict], timings: list[dict]
) -> dict:
    """Aggregate per-document and per-prompt records into the ``results.json`` object.

    Each bank's info names its result key per method and the document ids of each subset
    (``subsets``: all, ttt, ttt_full); a method's numbers come from its subset only.
    """
    methods = list(config.methods)
    latest_docs, latest_timings = _latest(documents), _latest(timings)
    results, timing, used_docs, used_timings = [], [], {}, {}
    for name, info in banks.items():
        per_domain: dict[str, dict[str, dict[str, dict]]] = defaultdict(dict)
        for method in methods:
            key = info["keys"].get(method)
            subset_ids = info.get("subsets", {}).get(METHODS[method].subset, info["documents"])
            for doc_id in subset_ids:
                record = latest_docs.get((key, method, doc_id))
                if record is not None:
                    used_docs[key, method, doc_id] = record
                    per_domain[record["domain"]].setdefault(method, {})[doc_id] = record
        for domain in sorted(per_domain):
            results.extend(_domain_rows(name, domain, per_domain[domain], config))
        per_method = {}
        for method in methods:
            key = info["keys"].get(method)
            records = [
                t
                for t in latest_timings.values()
                if t["key"] == key
                and t["method"] == method
                and t["new_tokens"] == config.new_tokens
            ]
            for t in records:
                used_timings[key, method, t["doc_id"]] = t
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
        "methods": {
            m: {"kind": METHODS[m].kind, "label": METHODS[m].label, "subset": METHODS[m].subset}
            for m in methods
        },
        "banks": banks,
        "results": results,
        "timing": timing,
        "documents": list(used_docs.values()),
        "timings": list(used_timings.values()),
    }


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def validate(report: dict) -> None:
    """Raise ValueError naming the first key or field that does not match the schema."""
    for key, kind in SCHEMA.items():
        if not isinstance(report.get(key), kind):
            raise ValueError(f"results.json: {key!r} must be a {kind.__name__}")
    if report["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"results.json: schema_version {report['schema_version']} is not {SCHEMA_VERSION}"
        )
    for rows, spec in ((report["results"], RESULT_FIELDS), (report["timing"], TIMING_FIELDS)):
        for row in rows:
            for name, kinds in spec.items():
                if not isinstance(row.get(name), kinds):
                    raise ValueError(f"results.json: row field {name!r} has {row.get(name)!r}")
    for row in report["results"]:
        for ref, comparison in row["comparisons"].items():
            for name, kinds in COMPARISON_FIELDS.items():
                if not isinstance(comparison.get(name), kinds):
                    raise ValueError(
                        f"results.json: comparison with {ref!r}: field {name!r} has "
                        f"{comparison.get(name)!r}"
                    )


def _columns(report: dict) -> list[tuple[str, str]]:
    banks = report["banks"]
    return sorted(
        {(r["bank"], r["domain"]) for r in report["results"]},
        key=lambda c: (banks[c[0]]["num_experts"], c[0], c[1]),
    )


def _column_name(report: dict, bank: str, domain: str) -> str:
    return f"{bank} {domain}" if len(report["banks"]) > 1 else domain


def _difference_cell(comparison: dict | None) -> str:
    """``−0.123 [−0.201, −0.050]* 62% (30)``, bold when the interval excludes zero."""
    if comparison is None:
        return "–"
    text = f"{comparison['diff']:+.3f} [{comparison['ci_low']:+.3f}, {comparison['ci_high']:+.3f}]"
    if comparison["significant"]:
        text = f"**{text}**\\*"
    return f"{text} {comparison['win_rate']:.0%} ({comparison['n_docs']})"


def markdown_table(report: dict) -> str:
    """Perplexity with 95% intervals per method (rows) and bank × domain (columns), the paired
    differences to base, fine-tuning and TTT, then test-time cost."""
    results = report["results"]
    banks = report["banks"]
    columns = _columns(report)
    cell = {(r["bank"], r["domain"], r["method"]): r for r in results}
    names = [_column_name(report, b, d) for b, d in columns]
    resamples = report["config"].get("bootstrap")
    lines = [
        "Perplexity on held-out documents, 95% paired bootstrap interval over documents "
        f"({resamples} resamples) in brackets, then documents scored; normalised perplexity "
        "(1 = base, 0 = TTT, on the documents all three scored) in parentheses.",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(columns),
    ]
    shown = {r["method"] for r in results}  # methods no bank could run are left out
    methods = {m: info for m, info in report["methods"].items() if m in shown}
    for method, info in methods.items():
        cells = []
        for bank, domain in columns:
            row = cell.get((bank, domain, method))
            if row is None:
                cells.append("–")
                continue
            norm = row["normalised_perplexity"]
            cells.append(
                f"{row['ppl']:.3f} [{row['ci_low']:.3f}, {row['ci_high']:.3f}] n={row['n_docs']}"
                + (f" ({norm:.2f})" if norm is not None else "")
            )
        lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
    for ref in REFERENCES:
        if ref not in methods:
            continue
        lines += [
            "",
            f"Difference to {report['methods'][ref]['label']}: ppl − ppl_ref on the documents "
            "both scored [95% paired interval], share of documents where the method's NLL per "
            "token is lower, (documents). Bold with * = the interval excludes zero.",
            "",
            "| method | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for method, info in methods.items():
            if method == ref:
                continue
            cells = [
                _difference_cell(
                    (cell.get((bank, domain, method)) or {}).get("comparisons", {}).get(ref)
                )
                for bank, domain in columns
            ]
            lines.append(f"| {info['label']} | " + " | ".join(cells) + " |")
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
                f"| {t['bank']} (K={banks[t['bank']]['num_experts']}) | {t['label']} | "
                f"{t['median_seconds']:.2f} | {ratio} | {t['median_adapt_seconds']:.3f} | {adapt} "
                f"| {experts} |"
            )
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """results.json, table.md, tradeoff.png and (with several banks) experts.png, each written
    atomically."""
    from ttmm.eval.plots import experts_series, plot_experts, plot_tradeoff

    out = Path(out_dir)
    validate(report)
    paths = {"json": out / "results.json", "table": out / "table.md"}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, default=str))
    atomic_write_text(paths["table"], markdown_table(report))
    if report["timing"] and any(r["normalised_perplexity"] is not None for r in report["results"]):
        paths["tradeoff"] = out / "tradeoff.png"
        plot_tradeoff(report, paths["tradeoff"])
    if any(experts_series(report).values()):  # banks that differ only in K make lines
        paths["experts"] = out / "experts.png"
        plot_experts(report, paths["experts"])
    return paths
