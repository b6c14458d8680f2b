"""Paired differences between methods of two banks in one results folder.

The report compares the methods of one bank with each other; this compares across banks
scored on the same documents (e.g. TTMM-10 of the K = 4 bank against TTMM-10 of K = 16), with
the report's paired bootstrap (same draw, resamples and seed as ``config.json``):

    .venv/bin/python benchmarks/compare_banks.py k4:top10 k16:top10 k4:top10 k16:finetune
    .venv/bin/python benchmarks/compare_banks.py --also benchmarks/results/k256 \
        k256:top10 k16:top10

``--also DIR`` adds the banks and scored documents of another results folder (a bank scored
in a run of its own, as ``reproduce.py --only k256 --out DIR`` does) to the comparison.

Arguments come in pairs, ``A B``, each ``BANK:METHOD``; prints ppl(A) − ppl(B) per domain with
its 95% interval, the share of documents where A is better, and the documents compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ttmm.eval.intervals import draw, paired_difference, win_rate
from ttmm.eval.methods import METHODS

HERE = Path(__file__).resolve().parent


def records(results: dict, documents: list[dict], bank: str, method: str) -> dict[str, dict]:
    """The scored documents of ``method`` on ``bank``, by document id, as the report takes
    them: the latest record of each, on the documents of the method's subset."""
    try:
        info = results["banks"][bank]
        key = info["keys"][method]
        subset = METHODS[method].subset
    except KeyError:
        raise SystemExit(f"{bank}:{method} was not scored in this results folder") from None
    scored = set(info.get("subsets", {}).get(subset, info["documents"]))
    return {
        d["doc_id"]: d
        for d in documents
        if d["key"] == key and d["method"] == method and d["doc_id"] in scored
    }


def compare(
    a: dict[str, dict], b: dict[str, dict], order: list[str], domain: str, config: dict
) -> dict:
    """ppl(a) − ppl(b) on the documents of ``domain`` both scored, with its paired interval;
    ``order`` is the documents' order in the report (the draw depends on it)."""
    ids = [i for i in order if i in a and i in b and a[i]["domain"] == domain]
    if not ids:
        return {"domain": domain, "n_docs": 0}
    arrays = [[r[i][field] for i in ids] for r in (a, b) for field in ("nll", "tokens")]
    rows = draw(ids, config["bootstrap"], config["seed"])
    estimate = paired_difference(*arrays, rows)
    return {
        "domain": domain,
        "diff": estimate.value,
        "ci_low": estimate.ci_low,
        "ci_high": estimate.ci_high,
        "excludes_zero": estimate.excludes_zero,
        "win_rate": win_rate(*arrays),
        "n_docs": len(ids),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="BANK:METHOD BANK:METHOD ...")
    parser.add_argument("--results", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--also", type=Path, action="append", default=[], help="another results folder"
    )
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give the BANK:METHOD arguments in pairs: A B [A B ...]")
    results = json.loads((args.results / "results.json").read_text())
    config = json.loads((args.results / "config.json").read_text())
    documents = []
    for folder in (args.results, *args.also):
        lines = (folder / "documents.jsonl").read_text().splitlines()
        documents += [json.loads(line) for line in lines if line.strip()]
        if folder != args.results:
            other = json.loads((folder / "config.json").read_text())
            if (other["bootstrap"], other["seed"]) != (config["bootstrap"], config["seed"]):
                raise SystemExit(f"{folder} was scored with another bootstrap or seed")
            results["banks"].update(json.loads((folder / "results.json").read_text())["banks"])
    domains = sorted({d["domain"] for d in documents})
    for first, second in zip(args.pairs[::2], args.pairs[1::2]):
        picked, banks = [], []
        for arg in (first, second):
            bank, sep, method = arg.partition(":")
            if not sep:
                parser.error(f"{arg!r} is not BANK:METHOD")
            picked.append(records(results, documents, bank, method))
            banks.append(bank)
        order = results["banks"][banks[0]]["documents"]
        for domain in domains:
            c = compare(*picked, order, domain, config)
            if not c["n_docs"]:
                print(f"{first} − {second}, {domain}: no documents both scored")
                continue
            star = "*" if c["excludes_zero"] else ""
            print(
                f"{first} − {second}, {domain}: {c['diff']:+.3f} "
                f"[{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]{star} "
                f"better on {100 * c['win_rate']:.0f}% of {c['n_docs']} documents"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
