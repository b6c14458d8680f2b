"""Tune TTT-NN on validation documents, then score the tuned TTT on the test documents.

    .venv/bin/python benchmarks/ttt_sweep.py --bank ~/.cache/ttmm/reproduce2/k16
    .venv/bin/python benchmarks/ttt_sweep.py --bank B --kinds lora --validation 4 --ttt-docs 15
    .venv/bin/python benchmarks/ttt_sweep.py --bank B --table-from benchmarks/results

The sweep (:mod:`ttmm.eval.ttt_sweep`) scores every candidate of ``LORA_GRID`` (LoRA, learning
rate, 20 neighbours) and ``FULL_GRID`` (all weights, Adam or SGD, 20 neighbours), then the best
of each kind with ``--wide`` neighbours, on ``--validation`` documents per domain that come after
the evaluation's test documents in the seeded order. The chosen settings go to
``OUT/ttt_sweep.json``; then base, the tuned TTT and the tuned all-weights TTT (and, on a bank
with experts, the hybrids with ``--hybrids``) are scored on the test documents and timed side by
side with the base model, into ``OUT/results.json`` (with the sweep under ``ttt_sweep``).

TTT reads only the bank's training chunks, so any bank built on the corpus of the main table
serves. ``--table-from DIR`` then rewrites DIR's table with the tuned TTT in place of the one it
was scored with (the other methods' records kept, every comparison paired on documents both
scored), into ``OUT/table/``; the hybrids are left out of it unless they were rescored here.

Resumable: scored documents (sweep and test) are appended to JSONL files and never redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bank", type=Path, required=True, help="a bank of the table's corpus")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "ttt")
    parser.add_argument("--validation", type=int, default=4, help="validation docs per domain")
    parser.add_argument("--kinds", default="lora,all", help="lora, all or both")
    parser.add_argument("--wide", type=int, default=50, help="neighbours of stage 2 (0: none)")
    parser.add_argument("--docs", type=int, default=60, help="test documents per domain")
    parser.add_argument("--ttt-docs", type=int, default=30, help="of those, scored by TTT")
    parser.add_argument("--ttt-full-docs", type=int, default=10, help="by all-weights TTT")
    parser.add_argument("--hybrids", action="store_true", help="also score TTMM-10 -> TTT")
    parser.add_argument("--timing-prompts", type=int, default=1, help="timed prompts a domain")
    parser.add_argument("--no-score", action="store_true", help="sweep only")
    parser.add_argument("--table-from", type=Path, help="results folder whose table to redo")
    parser.add_argument("--table-bank", default="k16", help="the bank of --table-from to redo")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser.parse_args(argv)


def print_sweep(data: dict) -> None:
    print("| weights | optimiser | lr | neighbours | " + " | ".join(_domains(data)) + " | s/doc |")
    print("|---|---|---|---|" + "---|" * (len(_domains(data)) + 1))
    for row in data["rows"]:
        ppl = " | ".join(f"{row['perplexity'].get(d, float('nan')):.3f}" for d in _domains(data))
        print(
            f"| {row['weights']} | {row['optimizer']} | {row['learning_rate']:g} | "
            f"{row['neighbours']} | {ppl} | {row['median_seconds']:.1f} |"
        )
    print("chosen:", json.dumps(data["chosen"]))


def _domains(data: dict) -> list[str]:
    return sorted({d for row in data["rows"] for d in row["perplexity"]})


def redo_table(results_dir: Path, bank: str, tuned: dict, out: Path) -> Path:
    """``results_dir``'s report with ``bank``'s TTT records replaced by the tuned run's."""
    from ttmm.eval.harness import DOCUMENTS_FILE, TIMINGS_FILE, EvalConfig, read_jsonl
    from ttmm.eval.report import build_report, write_report
    from ttmm.eval.ttt_sweep import with_summary

    old = json.loads((results_dir / "results.json").read_text())
    info = dict(old["banks"][bank])
    new_info = next(iter(tuned["banks"].values()))
    if info["documents"] != new_info["documents"]:
        raise SystemExit(
            f"the tuned run scored other test documents than {bank} of {results_dir}: "
            "TTT must run on a bank of the same corpus and split"
        )
    rescored = [m for m in ("ttt", "ttt_full", "hybrid5", "hybrid20") if m in new_info["keys"]]
    info["keys"] = {m: k for m, k in info["keys"].items() if not m.startswith("hybrid")}
    info["keys"] |= {m: new_info["keys"][m] for m in rescored}
    info["subsets"] = dict(info["subsets"]) | {
        s: new_info["subsets"][s] for s in ("ttt", "ttt_full")
    }
    methods = [m for m in old["config"]["methods"] if m in info["keys"]]
    config = EvalConfig(
        methods=tuple(methods),
        docs=old["config"]["docs"],
        ttt_docs=tuned["config"]["ttt_docs"],
        ttt_full_docs=tuned["config"]["ttt_full_docs"],
        seed=old["config"]["seed"],
        bootstrap=old["config"]["bootstrap"],
        timing_prompts=old["config"]["timing_prompts"],
        new_tokens=old["config"]["new_tokens"],
    )
    config = with_summary(config, tuned["ttt_sweep"])  # the settings the tuned run used
    documents = read_jsonl(results_dir / DOCUMENTS_FILE) + read_jsonl(out / DOCUMENTS_FILE)
    timings = [t for t in read_jsonl(results_dir / TIMINGS_FILE) if t["method"] not in rescored]
    report = build_report({bank: info}, config, documents, timings)
    report["ttt_sweep"] = tuned.get("ttt_sweep")
    report["note"] = (
        f"{bank} of {results_dir.name}/ with TTT (and all-weights TTT) tuned on validation "
        "documents; other methods' records and timings as committed there; TTT's timing is "
        "in the tuned run's results.json (timed beside base in one process)"
    )
    target = out / "table"
    target.mkdir(parents=True, exist_ok=True)
    write_report(report, target)
    return target


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    from ttmm.assets import load_base_model
    from ttmm.bank import Bank
    from ttmm.embed import Encoder
    from ttmm.eval.harness import EvalConfig, evaluate
    from ttmm.eval.ttt_sweep import tune
    from ttmm.model import TTMM

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bank = Bank.load(args.bank)
    model, tokenizer = load_base_model(bank.manifest.base_model.get("name"))
    engine = TTMM(model, tokenizer, Encoder(), bank)
    methods = ("base", "ttt", "ttt_full") + (("hybrid5", "hybrid20") if args.hybrids else ())
    config = EvalConfig(
        methods=methods,
        docs=args.docs,
        ttt_docs=args.ttt_docs,
        ttt_full_docs=args.ttt_full_docs,
        timing_prompts=args.timing_prompts,
    )
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    tuned, data = tune(engine, config, args.out, args.validation, kinds, args.wide or None)
    print_sweep(data)
    if args.no_score:
        return 0
    name = args.bank.name or str(args.bank)
    report = evaluate({name: engine}, args.out, tuned, extra={"ttt_sweep": data})
    logging.info("scored in %.0f s; see %s", time.perf_counter() - started, args.out)
    print((args.out / "table.md").read_text())
    if args.table_from:
        target = redo_table(args.table_from, args.table_bank, report, args.out)
        print((target / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
