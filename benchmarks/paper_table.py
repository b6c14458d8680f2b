"""This project's normalised perplexities next to the paper's Table 1.

    .venv/bin/python benchmarks/paper_table.py                      # the tuned-TTT k16 table
    .venv/bin/python benchmarks/paper_table.py --results R/results.json --bank k16

Normalised perplexity = (ppl - ppl_TTT) / (ppl_base - ppl_TTT): 1 is the base model, 0 is TTT
(design notes §3). The paper's numbers are its Table 1 (Bertolissi et al., "Local Mixtures of
Experts: Essentially Free Test-Time Training via Model Merging", 2025; K = 100, as quoted in the
design notes), normalised here the same way; ours come from a ``results.json`` of the
evaluation harness, each with its 95% paired bootstrap interval (on the documents base, TTT
and the method all scored). Prints a markdown table and writes it with a JSON next to the
results file (``paper_table.md``, ``paper_table.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

PAPER_PERPLEXITY = {  # Table 1 of the paper: perplexity per model and domain
    "Llama-3.2-1B wiki": {
        "base": 8.674, "finetune": 7.849, "top1": 7.669, "top10": 7.510,
        "ensemble10": 7.509, "ttt": 7.559,
    },
    "Llama-3.2-1B GitHub": {
        "base": 2.611, "finetune": 2.581, "top1": 2.552, "top10": 2.492,
        "ensemble10": 2.464, "ttt": 2.441,
    },
    "Qwen2.5-1.5B wiki": {
        "base": 8.570, "finetune": 7.702, "top1": 7.166, "top10": 7.080,
        "ensemble10": 7.061, "ttt": 7.231,
    },
    "Qwen2.5-1.5B GitHub": {
        "base": 2.335, "finetune": 2.317, "top1": 2.330, "top10": 2.287,
        "ensemble10": 2.257, "ttt": 2.177,
    },
}  # fmt: skip
ROWS = {
    "base": "base",
    "finetune": "fine-tuning",
    "top1": "TTMM, 1 expert",
    "top10": "TTMM, 10 experts, merged",
    "ensemble10": "TTMM, 10 experts, ensembled",
    "ttt": "TTT",
}
DOMAINS = {"wiki": "prose", "stdlib": "code"}


def normalised(ppl: float, base: float, ttt: float) -> float:
    return (ppl - ttt) / (base - ttt)


def paper_normalised() -> dict[str, dict[str, float]]:
    return {
        column: {m: normalised(v, values["base"], values["ttt"]) for m, v in values.items()}
        for column, values in PAPER_PERPLEXITY.items()
    }


def ours(report: dict, bank: str) -> dict[str, dict[str, dict]]:
    """Per domain and method: perplexity, normalised value and its interval, documents."""
    found: dict[str, dict[str, dict]] = {}
    for row in report["results"]:
        if row["bank"] == bank and row["method"] in ROWS:
            found.setdefault(row["domain"], {})[row["method"]] = {
                "ppl": row["ppl"],
                "normalised": row["normalised_perplexity"],
                "ci": [row["normalised_ci_low"], row["normalised_ci_high"]],
                "n_docs": row["n_docs"],
            }
    return found


def markdown(paper: dict, mine: dict) -> str:
    columns = list(paper)
    domains = [d for d in DOMAINS if d in mine]
    head = ["method", *[f"paper {c}" for c in columns], "paper mean"]
    head += [f"ours {d} ({DOMAINS[d]})" for d in domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, label in ROWS.items():
        values = [paper[c][method] for c in columns]
        cells = [label, *[f"{v:.2f}" for v in values], f"{sum(values) / len(values):.2f}"]
        for domain in domains:
            entry = mine[domain].get(method)
            if entry is None or entry["normalised"] is None:
                cells.append("–")
            elif method in ("base", "ttt"):
                cells.append(f"{entry['normalised']:.2f}")
            else:
                low, high = entry["ci"]
                cells.append(f"{entry['normalised']:.2f} [{low:.2f}, {high:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results", type=Path, default=HERE / "results" / "ttt" / "table" / "results.json"
    )
    parser.add_argument("--bank", default="k16")
    args = parser.parse_args(argv)
    report = json.loads(args.results.read_text())
    if args.bank not in report["banks"]:
        raise SystemExit(f"{args.results} has no bank {args.bank!r}: {sorted(report['banks'])}")
    paper, mine = paper_normalised(), ours(report, args.bank)
    table = markdown(paper, mine)
    print(table)
    out = args.results.parent
    (out / "paper_table.md").write_text(table)
    data = {"paper": paper, "paper_perplexity": PAPER_PERPLEXITY, "ours": mine}
    (out / "paper_table.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
