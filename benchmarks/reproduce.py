"""Reproduce the paper's Table 1 on this machine: banks with several K on the default corpora,
every method of the evaluation harness, table and plots in ``benchmarks/results/``.

    .venv/bin/python benchmarks/reproduce.py                 # about an hour on 2 CPU cores
    .venv/bin/python benchmarks/reproduce.py --experts 4 16  # fewer banks

Sizes (the defaults) are chosen to fit about an hour of a shared 2-core CPU (training runs at
40-100 tokens per second there, design notes §5), not to match the paper (K = 100, a 1B model,
full corpora):

- corpora ``wiki@200`` (Wikipedia lead sections, about 100 tokens each) and ``stdlib@20``
  (CPython modules, at most 3 chunks of 256 tokens each), 20% of documents held out: about 16k
  training tokens of prose and 12k of code, every chunk training exactly one expert (rank 8,
  all linear layers, one epoch, one torch thread);
- K = 16 (with the fine-tuning baseline, same token budget), then 4, then 64: 64 experts see
  about 450 tokens each, too little to learn much, and the table shows it;
- evaluation on 5 held-out documents per domain, routed on 50 tokens, scored on the rest (up
  to 512 tokens), TTT with 20 neighbours and one step each; cost timed on one prompt per
  domain, 100 new tokens, all banks and methods interleaved in one process.

Everything is resumable: finished banks are reused and scored documents are not scored again.
The fine-tuning baseline does not depend on K and is trained once, in the first bank.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = 1  # one torch thread: on a shared 2-core machine, two threads per process thrash
CORPORA = ("wiki@200", "stdlib@20")


def build_config(experts: int, with_finetune: bool):
    from ttmm.build import BuildConfig
    from ttmm.train import LoraTrainConfig

    return BuildConfig(
        corpora=CORPORA,
        experts=experts,
        test_fraction=0.2,
        window=256,
        max_chunks_per_document=3,
        with_finetune=with_finetune,
        train=LoraTrainConfig(num_threads=THREADS),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[16, 4, 64])
    parser.add_argument("--docs", type=int, default=5, help="held-out documents per domain")
    parser.add_argument("--timing-prompts", type=int, default=1, help="timed prompts per domain")
    parser.add_argument("--tokens", type=int, default=100, help="tokens generated when timing")
    parser.add_argument(
        "--banks", type=Path, default=None, help="where banks are built (default: TTMM_HOME)"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from ttmm.assets import load_base_model, ttmm_home
    from ttmm.bank import Bank
    from ttmm.build import run_build
    from ttmm.embed import Encoder
    from ttmm.evaluate import EvalConfig, evaluate
    from ttmm.model import TTMM

    torch.set_num_threads(THREADS)
    banks_dir = args.banks or ttmm_home() / "reproduce"
    started = time.perf_counter()
    model, tokenizer = load_base_model()
    encoder = Encoder()
    config = EvalConfig(docs=args.docs, timing_prompts=args.timing_prompts, new_tokens=args.tokens)
    # Build and score one bank after the other (both resumable), then time all in one run.
    engines = {}
    for i, k in enumerate(args.experts):
        path = banks_dir / f"k{k:03d}"
        logging.info("bank K=%d -> %s", k, path)
        run_build(build_config(k, with_finetune=i == 0), path, progress=True)
        engines[f"K={k}"] = engine = TTMM(model, tokenizer, encoder, Bank.load(path))
        evaluate({f"K={k}": engine}, args.out, dataclasses.replace(config, timing_prompts=0))
        logging.info("K=%d built and scored after %.0f s", k, time.perf_counter() - started)
    report = evaluate(engines, args.out, config)
    logging.info(
        "done in %.0f s with torch on %d threads; see %s",
        time.perf_counter() - started,
        torch.get_num_threads(),
        args.out / "table.md",
    )
    print((args.out / "table.md").read_text())
    return 0 if report["results"] else 1


if __name__ == "__main__":
    sys.exit(main())
