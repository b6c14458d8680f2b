"""Reproduce the paper's Table 1: banks with several K on the default corpora, every method of
the evaluation harness, table and plots in ``benchmarks/results/``.

    .venv/bin/python benchmarks/reproduce.py                 # about an hour on 2 CPU cores
    .venv/bin/python benchmarks/reproduce.py --experts 4 16  # fewer banks
    .venv/bin/python benchmarks/reproduce.py --full --device cuda  # to benchmarks/results-full/

Two presets. ``--small`` (the default) is sized for about an hour of a shared 2-core CPU
(training runs at 40-100 tokens per second there, design notes §5), not to match the paper
(K = 100, a 1B model, full corpora):

- corpora ``wiki@200`` (Wikipedia lead sections, about 100 tokens each) and ``stdlib@20``
  (CPython modules, at most 3 chunks of 256 tokens each), 20% of documents held out: about 16k
  training tokens of prose and 12k of code, every chunk training exactly one expert (rank 8,
  all linear layers, one epoch, one torch thread);
- K = 16 (with the fine-tuning baseline, same token budget), then 4, then 64: 64 experts see
  about 450 tokens each, too little to learn much, and the table shows it;
- evaluation on 20 held-out documents per domain (the code domain has 2), routed on 50
  tokens, scored on the rest (up to 512 tokens), TTT with 20 neighbours and one step each;
  cost timed on one prompt per domain, 100 new tokens, all banks and methods interleaved in
  one process.

``--full`` is the run for a GPU: all 10,033 Wikipedia lead sections and the whole standard
library (1.22M training tokens in 9,469 chunks, about 12k tokens per expert at K = 100),
K = 16, 64 and 100, 100 held-out documents per domain and 5 timed prompts per domain; the
same protocol otherwise. ``--device`` and ``--dtype`` place it
(default: a GPU in bfloat16 where there is one, else the CPU in float32).

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

from ttmm.assets import DEFAULT_BASE_MODEL

HERE = Path(__file__).resolve().parent


@dataclasses.dataclass(frozen=True)
class Preset:
    corpora: tuple[str, ...]
    experts: tuple[int, ...]
    docs: int
    timing_prompts: int


PRESETS = {
    "small": Preset(("wiki@200", "stdlib@20"), (16, 4, 64), docs=20, timing_prompts=1),
    "full": Preset(("wiki", "stdlib"), (16, 64, 100), docs=100, timing_prompts=5),
}


def build_config(preset: Preset, experts: int, with_finetune: bool, args):
    from ttmm.build.pipeline import BuildConfig
    from ttmm.build.train import LoraTrainConfig

    return BuildConfig(
        corpora=preset.corpora,
        experts=experts,
        test_fraction=0.2,
        window=256,
        max_chunks_per_document=3,
        with_finetune=with_finetune,
        base_model=args.base_model,
        device=args.device,
        dtype=args.dtype,
        train=LoraTrainConfig(
            num_threads=args.threads, epochs=args.epochs, batch_size=args.batch_size
        ),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--small",
        dest="preset",
        action="store_const",
        const="small",
        help="about an hour on 2 CPU cores (the default)",
    )
    size.add_argument(
        "--full",
        dest="preset",
        action="store_const",
        const="full",
        help="full corpora, K up to 100: for a GPU",
    )
    parser.add_argument("--experts", type=int, nargs="+", help="K of each bank (preset's)")
    parser.add_argument("--docs", type=int, help="held-out documents per domain (preset's)")
    parser.add_argument("--timing-prompts", type=int, help="timed prompts per domain (preset's)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens generated when timing")
    parser.add_argument("--epochs", type=int, default=1, help="passes over each expert's chunks")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per training step")
    parser.add_argument(
        "--base-model", default=DEFAULT_BASE_MODEL, help="base model alias, folder or hub id"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the 2-core machine is shared)"
    )
    parser.add_argument(
        "--banks", type=Path, default=None, help="where banks are built (default: TTMM_HOME)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: results, results-full)"
    )
    parser.set_defaults(preset="small")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    experts = args.experts or preset.experts
    docs = preset.docs if args.docs is None else args.docs
    timing_prompts = preset.timing_prompts if args.timing_prompts is None else args.timing_prompts
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from ttmm.assets import load_base_model, ttmm_home
    from ttmm.bank import Bank
    from ttmm.build.pipeline import run_build
    from ttmm.device import DeviceError, describe, dtype_name, resolve_device, resolve_dtype
    from ttmm.embed import Encoder
    from ttmm.eval.harness import EvalConfig, evaluate
    from ttmm.model import TTMM

    try:
        device = resolve_device(args.device)
        args.device, args.dtype = str(device), dtype_name(resolve_dtype(args.dtype, device))
    except DeviceError as err:
        parser.error(str(err))
    torch.set_num_threads(args.threads)
    # Banks of another preset, dtype or base model have another hash: keep them apart.
    banks_name = "reproduce" if args.preset == "small" else f"reproduce-{args.preset}"
    if args.dtype != "float32":
        banks_name += f"-{args.dtype}"
    if args.base_model != DEFAULT_BASE_MODEL:
        banks_name += f"-{Path(args.base_model).name}"
    banks_dir = args.banks or ttmm_home() / banks_name
    if args.out is None:
        args.out = HERE / ("results" if args.preset == "small" else f"results-{args.preset}")
    started = time.perf_counter()
    logging.info("preset %s on %s in %s", args.preset, describe(device), args.dtype)
    model, tokenizer = load_base_model(args.base_model, dtype=args.dtype, device=device)
    encoder = Encoder(device=device)
    config = EvalConfig(docs=docs, timing_prompts=timing_prompts, new_tokens=args.tokens)
    # Build and score one bank after the other (both resumable), then time all in one run.
    engines = {}
    for i, k in enumerate(experts):
        path = banks_dir / f"k{k:03d}"
        logging.info("bank K=%d -> %s", k, path)
        run_build(build_config(preset, k, i == 0, args), path, progress=True)
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
