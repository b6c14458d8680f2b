"""Reproduce the paper's Table 1 and Fig. 1 with intervals: banks on the default corpora, every
method of the evaluation harness, table and plots in ``benchmarks/results/``.

    .venv/bin/python benchmarks/reproduce.py                     # several hours on 2 CPU cores
    .venv/bin/python benchmarks/reproduce.py --only k16          # one bank of the table
    .venv/bin/python benchmarks/reproduce.py --bank A --bank B   # evaluate banks built elsewhere
    .venv/bin/python benchmarks/reproduce.py --full --device cuda  # to benchmarks/results-full/

The banks are the rows of :data:`BANKS` (K, total training-token budget, branched or not,
equal-compute fine-tuning continuation): edit that table, not the code. ``--small`` (the
default) builds, on ``wiki@2400`` and ``stdlib`` (every module, at most 2 chunks of 256
tokens each) with 15% of documents held out:

- ``k16``: K = 16 experts trained from the base model on a budget of 250k training tokens in
  all (the fine-tuning baseline gets the same 250k);
- ``k16-branched``: K = 16 experts branched from the fine-tuning adapter (Branch-Train-Merge's
  seed phase), 250k tokens, and the fine-tuning adapter continued for as many tokens as the
  experts took (the equal-compute control, method ``finetune_continued``), scored on the
  merges and both fine-tuning adapters;
- ``k4`` and ``k64``: K = 4 and 64 at the same 250k tokens, scored on the merges only;
- ``k256``: K = 256 on 125k tokens, without its own fine-tuning baseline, scored on the
  merges only (``--only k256 --out DIR``; compare it with the others by compare_banks.py).

The costly methods (ensembles, TTT on all weights, the hybrids) run on ``k16`` only; base and
TTT read no experts, so every bank of the corpus shares their records.

The fine-tuning job depends on the corpus, the budget and the recipe, not on K (its seed is
fixed): the first bank of a preset trains it into ``BANKS_DIR/adapters/`` and every other bank
with the same job hard-links it from there (``BuildConfig.adapter_store``). Banks built before
(when its seed followed K) keep theirs.

The evaluation (design notes §3 and §7) takes 60 held-out documents per domain in a seeded
order; TTT-NN and the hybrids TTMM->TTT run on the first 30 of them, all-weights TTT on the
first 10; every method is scored on those too, so comparisons are paired. Perplexities come
with 95% paired bootstrap intervals over documents (2000 resamples). Test-time cost is timed on
3 prompts per domain, 100 new tokens, every bank and method interleaved in one process.

``--full`` is the run for a GPU: all Wikipedia lead sections and the whole standard library,
K = 16, 64 and 100 (plain) and 100 (branched), 100 documents per domain (TTT on 50, all-weights
TTT on 20), 5 timed prompts per domain.

TTT, all-weights TTT and the hybrids run with the settings ``benchmarks/ttt_sweep.py`` chose on
validation documents (``results/ttt/ttt_sweep.json``; ``--ttt-sweep none`` for the defaults).

Everything is resumable: finished banks are reused, scored documents are not scored again
(records are keyed by every setting and by the content of the bank and the base weights, so a
changed setting or a rebuilt bank is rescored), and fully timed prompts are kept.
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
TTT_SWEEP = HERE / "results" / "ttt" / "ttt_sweep.json"
"""The committed sweep's choice: TTT, all-weights TTT and the hybrids run with it."""


@dataclasses.dataclass(frozen=True)
class BankSpec:
    """One bank to build: a row of :data:`BANKS`."""

    name: str
    """Folder name under the banks directory, and the bank's name in the results."""
    experts: int
    """K."""
    budget_tokens: int | None = None
    """Training tokens of all experts together (``ttmm build --budget``); None: one epoch."""
    branch_from: str | None = None
    """``finetune``: every expert starts from the fine-tuning adapter (``--branch-from``)."""
    continue_finetune: bool = False
    """Also continue the fine-tuning adapter for the experts' tokens (``--continue-finetune``)."""
    with_finetune: bool = True
    """Train the fine-tuning baseline (needed by the ``finetune`` method)."""
    methods: tuple[str, ...] | None = None
    """The methods scored on this bank (None: all the run's). The costly ones (TTT-NN on all
    weights, ensembles, hybrids) need only run on the main bank; base and TTT read no experts,
    so their records are shared by every bank of the same corpus anyway."""


@dataclasses.dataclass(frozen=True)
class Preset:
    corpora: tuple[str, ...]
    test_fraction: float
    max_chunks_per_document: int
    banks: tuple[BankSpec, ...]
    docs: int
    ttt_docs: int
    ttt_full_docs: int
    timing_prompts: int


MERGES = ("base", "finetune", "top1", "top3", "top10", "ttmm", "ttt")
"""What a bank of another K is compared on: the merges, against base, fine-tuning and TTT."""

BANKS = {
    "small": (
        BankSpec("k16", 16, budget_tokens=250_000),
        BankSpec(
            "k16-branched",
            16,
            budget_tokens=250_000,
            branch_from="finetune",
            continue_finetune=True,
            methods=(*MERGES, "finetune_continued"),
        ),
        BankSpec("k4", 4, budget_tokens=250_000, methods=MERGES),
        BankSpec("k64", 64, budget_tokens=250_000, methods=MERGES),
        # the K sweep past 64 (issue 21) on half the budget, as 2 CPU cores allow in an hour:
        # about 500 tokens an expert; compared with the others by compare_banks.py
        BankSpec(
            "k256",
            256,
            budget_tokens=125_000,
            with_finetune=False,
            methods=("base", "top1", "top3", "top10", "ttmm"),
        ),
    ),
    "full": (
        BankSpec("k16", 16),
        BankSpec("k64", 64),
        BankSpec("k100", 100),
        BankSpec("k100-branched", 100, branch_from="finetune", continue_finetune=True),
    ),
}

PRESETS = {
    # prose and code in about equal measure (~240k and ~320k tokens of chunks), so that the
    # 250k-token budget trains prose experts too; 2,400 wiki leads and the 731 stdlib modules
    # hold out about 360 and 110 documents (after near-duplicates), of which 60 are scored
    "small": Preset(("wiki@2400", "stdlib"), 0.15, 2, BANKS["small"], 60, 30, 10, 3),
    "full": Preset(("wiki", "stdlib"), 0.1, 3, BANKS["full"], 100, 50, 20, 5),
}

# BankSpec fields that are BuildConfig fields of the same name, and their "not asked" value:
# only the ones asked for are passed, so the table also runs on a ttmm without those options.
BUILD_OPTIONS = {"budget_tokens": None, "branch_from": None, "continue_finetune": False}


def build_config(preset: Preset, spec: BankSpec, args, adapter_store: Path | None = None):
    from ttmm.build.pipeline import BuildConfig
    from ttmm.build.train import LoraTrainConfig

    options = {
        name: getattr(spec, name)
        for name, unset in BUILD_OPTIONS.items()
        if getattr(spec, name) != unset
    }
    missing = [name for name in options if name not in BuildConfig.__dataclass_fields__]
    if missing:
        raise SystemExit(
            f"bank {spec.name}: this ttmm's BuildConfig has no {', '.join(missing)}; install "
            "a ttmm with those build options or edit BANKS in benchmarks/reproduce.py"
        )
    return BuildConfig(
        corpora=preset.corpora,
        experts=spec.experts,
        test_fraction=preset.test_fraction,
        window=256,
        max_chunks_per_document=preset.max_chunks_per_document,
        with_finetune=spec.with_finetune,
        base_model=args.base_model,
        device=args.device,
        dtype=args.dtype,
        train=LoraTrainConfig(
            num_threads=args.build_threads, epochs=args.epochs, batch_size=args.batch_size
        ),
        adapter_store=str(adapter_store) if adapter_store else None,
        **options,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    for name, text in (("small", "2 CPU cores, several hours (default)"), ("full", "a GPU")):
        size.add_argument(f"--{name}", dest="preset", action="store_const", const=name, help=text)
    parser.add_argument("--only", nargs="+", help="names of the preset's banks to build")
    parser.add_argument(
        "--bank",
        type=Path,
        action="append",
        help="evaluate this built bank instead of building the preset's (repeatable)",
    )
    parser.add_argument("--docs", type=int, help="held-out documents per domain")
    parser.add_argument("--ttt-docs", type=int, help="of those, scored by TTT and hybrids")
    parser.add_argument("--ttt-full-docs", type=int, help="of those, scored by ttt_full")
    parser.add_argument("--timing-prompts", type=int, help="timed prompts per domain")
    parser.add_argument("--methods", help="comma-separated methods (default: all)")
    parser.add_argument("--tokens", type=int, default=100, help="tokens generated when timing")
    parser.add_argument(
        "--ttt-sweep",
        default=str(TTT_SWEEP),
        help="TTT (and hybrid) settings chosen by benchmarks/ttt_sweep.py on validation "
        "documents (its ttt_sweep.json); 'none': TTTConfig's defaults",
    )
    parser.add_argument("--epochs", type=int, default=1, help="passes over each expert's chunks")
    parser.add_argument("--batch-size", type=int, default=1, help="chunks per training step")
    parser.add_argument(
        "--base-model", default=DEFAULT_BASE_MODEL, help="base model alias, folder or hub id"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads for scoring and timing (1: the 2-core machine is shared)",
    )
    parser.add_argument(
        "--build-threads",
        type=int,
        default=1,
        help="torch threads for training (default 1, as the committed run); not part of a "
        "bank's identity: a build started with one count resumes with another",
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
    known = [spec.name for spec in preset.banks]
    unknown = sorted(set(args.only or ()) - set(known))
    if unknown:
        parser.error(f"--only {unknown}: the {args.preset} preset has banks {known}")
    return args


def narrowed(specs: dict[str, BankSpec], methods: tuple[str, ...]) -> dict[str, list[str]]:
    """Each bank's own methods (those of the run it lists), for banks that narrow them."""
    return {
        name: [m for m in methods if m in spec.methods]
        for name, spec in specs.items()
        if spec.methods is not None
    }


def eval_config(preset: Preset, args):
    from ttmm.eval.harness import METHODS, EvalConfig

    def pick(value, default):
        return default if value is None else value

    methods = tuple(m.strip() for m in args.methods.split(",")) if args.methods else None
    config = EvalConfig(
        methods=methods or tuple(METHODS),
        docs=pick(args.docs, preset.docs),
        ttt_docs=pick(args.ttt_docs, preset.ttt_docs),
        ttt_full_docs=pick(args.ttt_full_docs, preset.ttt_full_docs),
        timing_prompts=pick(args.timing_prompts, preset.timing_prompts),
        new_tokens=args.tokens,
    )
    if args.ttt_sweep.lower() == "none":
        return config
    from ttmm.eval.ttt_sweep import read_tuned

    return read_tuned(args.ttt_sweep, config)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch

    from ttmm.assets import load_base_model, ttmm_home
    from ttmm.bank import Bank
    from ttmm.build.pipeline import run_build
    from ttmm.device import DeviceError, describe, dtype_name, resolve_device, resolve_dtype
    from ttmm.embed import Encoder
    from ttmm.eval.harness import evaluate
    from ttmm.model import TTMM

    try:
        device = resolve_device(args.device)
        args.device, args.dtype = str(device), dtype_name(resolve_dtype(args.dtype, device))
        config = eval_config(preset, args)
    except (DeviceError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    torch.set_num_threads(args.threads)
    # Banks of another preset, dtype or base model have another hash: keep them apart.
    banks_name = "reproduce2" if args.preset == "small" else f"reproduce2-{args.preset}"
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
    if args.bank:  # evaluate banks built elsewhere
        paths = {path.name if path.name else str(path): path for path in args.bank}
    else:
        paths = {}
        specs = [s for s in preset.banks if not args.only or s.name in args.only]
        for spec in specs:  # build each bank (resumable), then score it while the next builds
            path = paths[spec.name] = banks_dir / spec.name
            logging.info("bank %s (K=%d) -> %s", spec.name, spec.experts, path)
            # one fine-tuning job per corpus and budget, shared through the store by every K
            store = banks_dir / "adapters"
            run_build(build_config(preset, spec, args, store), path, progress=True)
            engine = TTMM(model, tokenizer, encoder, Bank.load(path))
            scoring = dataclasses.replace(config, timing_prompts=0)
            evaluate(
                {spec.name: engine},
                args.out,
                scoring,
                methods=narrowed({spec.name: spec}, config.methods),
            )
            logging.info(
                "%s built and scored after %.0f s", spec.name, time.perf_counter() - started
            )
    engines = {name: TTMM(model, tokenizer, encoder, Bank.load(p)) for name, p in paths.items()}
    specs = {spec.name: spec for spec in preset.banks if spec.name in engines}
    # everything scored: times all, interleaved
    report = evaluate(engines, args.out, config, methods=narrowed(specs, config.methods))
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
