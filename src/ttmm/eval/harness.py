"""The evaluation harness of design notes §3 and §7: every method on a bank's held-out documents.

Methods (registered by name in :data:`METHODS`): the base model; the fine-tuning adapter;
TTMM merging with the top 1, 3 and 10 experts and with the bank's default (threshold) rule;
TTMM ensembling of the top 3 and 10 experts; TTT-NN (LoRA, and all weights as ``ttt_full``);
the hybrids TTMM-10 -> TTT with 5 and 20 neighbours. Held-out documents are taken per domain
in a seeded order (sha256(seed:doc_id)); TTT and the hybrids score the first ``ttt_docs`` of
them, ``ttt_full`` the first ``ttt_full_docs``, every other method all ``docs``, so every
comparison is paired on documents both scored. Each document is routed (or retrieved on) by
its first P tokens, and only the tokens after them are scored. Test-time cost is the wall time
to generate a fixed number of new tokens from a P-token prompt, everything included, every
method timed in the same process, interleaved per prompt, so that ratios to the base model
are fair on a noisy machine.

Runs are resumable: every scored document is appended to ``documents.jsonl`` and skipped on a
rerun, as is every fully timed prompt in ``timings.jsonl``. Records are keyed by everything
that changes their numbers (:mod:`ttmm.eval.keys`): a rerun with other settings or after a
rebuild recomputes, and results that do not depend on the bank (the base model; TTT, which
depends only on the training chunks) are shared by banks built on the same corpus.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ttmm.atomic import atomic_write_json
from ttmm.bank import Bank
from ttmm.build.chunks import ChunkIndex
from ttmm.build.corpus import Document
from ttmm.device import describe, dtype_name, synchronize
from ttmm.eval.documents import held_out_documents, select_documents, subset
from ttmm.eval.ensemble import ensemble_generate, ensemble_score
from ttmm.eval.keys import bank_fingerprint, result_key
from ttmm.eval.methods import METHODS, SUBSETS, EvalError, MethodSpec
from ttmm.eval.report import build_report, write_report
from ttmm.eval.ttt import TestTimeTrainer, TTTConfig
from ttmm.generation import GREEDY, decode
from ttmm.merge import ExpertMerger
from ttmm.model import TTMM
from ttmm.routing import RoutingPlan

logger = logging.getLogger(__name__)

DOCUMENTS_FILE = "documents.jsonl"
TIMINGS_FILE = "timings.jsonl"


@dataclass(frozen=True)
class EvalConfig:
    """What an evaluation run measures; written into the result JSON."""

    methods: tuple[str, ...] = tuple(METHODS)
    """Method names, from :data:`METHODS`."""
    docs: int | None = 60
    """Held-out documents per domain (the first long enough in the seeded order); None = all."""
    ttt_docs: int | None = 30
    """TTT and the hybrids score the first this many of them (so every comparison with TTT is
    paired on these); None = all of ``docs``."""
    ttt_full_docs: int | None = 10
    """All-weights TTT (``ttt_full``) scores the first this many; None = all of ``docs``."""
    seed: int = 0
    """Seed of the document order (sha256(seed:doc_id)) and of the bootstrap draws."""
    bootstrap: int = 2000
    """Bootstrap resamples of the documents behind each 95% interval."""
    prefix_tokens: int = 50
    """P: tokens routed on (and retrieved on, for TTT), never scored."""
    min_scored_tokens: int = 16
    """Documents with fewer tokens after the prefix are skipped."""
    max_tokens: int = 512
    """Tokens of each document read (prefix included); the rest is cut."""
    timing_prompts: int = 3
    """Prompts per domain timed for test-time cost (median over them)."""
    new_tokens: int = 100
    """Tokens generated per timed prompt (end of sequence suppressed, so always this many)."""
    timed_methods: tuple[str, ...] | None = None
    """Of ``methods``, those timed for test-time cost; None = all. (TTT's adaptation time is
    also recorded per scored document, as ``ttt_seconds``, so a run may skip timing it.)"""
    ttt: TTTConfig = field(default_factory=TTTConfig)
    """The TTT baseline's retrieval and LoRA training (method ``ttt``; also the hybrids', with
    their own neighbours). :mod:`ttmm.eval.ttt_sweep` tunes it on validation documents."""
    ttt_full: TTTConfig = field(default_factory=lambda: TTTConfig(weights="all"))
    """All-weights TTT (method ``ttt_full``): its optimiser, learning rate and neighbours."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise EvalError(f"EvalConfig.methods: unknown {unknown}; choose from {list(METHODS)}")
        for name in ("prefix_tokens", "min_scored_tokens", "max_tokens", "new_tokens", "bootstrap"):
            if getattr(self, name) < 1:
                raise EvalError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("docs", "ttt_docs", "ttt_full_docs"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EvalError(f"EvalConfig.{name} must be >= 1 or None, got {value}")
        if self.timed_methods is not None and (
            extra := [m for m in self.timed_methods if m not in self.methods]
        ):
            raise EvalError(f"EvalConfig.timed_methods: {extra} are not among the methods")
        if self.timing_prompts < 0:
            raise EvalError(f"EvalConfig.timing_prompts must be >= 0, got {self.timing_prompts}")
        if self.max_tokens <= self.prefix_tokens + self.min_scored_tokens:
            raise EvalError("EvalConfig.max_tokens must exceed prefix_tokens + min_scored_tokens")
        if self.ttt.weights != "lora" or self.ttt_full.weights != "all":
            raise EvalError(
                "EvalConfig.ttt trains a LoRA (weights='lora') and EvalConfig.ttt_full all "
                f"weights (weights='all'); got {self.ttt.weights!r} and {self.ttt_full.weights!r}"
            )

    def subset_size(self, subset: str) -> int | None:
        """How many of a domain's documents a method of this subset scores (None = all)."""
        sizes = {"all": None, "ttt": self.ttt_docs, "ttt_full": self.ttt_full_docs}
        limits = [n for n in (self.docs, sizes[subset]) if n is not None]
        return min(limits) if limits else None

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        timed = None if self.timed_methods is None else list(self.timed_methods)
        return data | {
            "methods": list(self.methods),
            "ttt": self.ttt.to_dict(),
            "ttt_full": self.ttt_full.to_dict(),
            "timed_methods": timed,
        }


def available(bank: Bank, method: str) -> bool:
    """Whether the bank can run the method (fine-tuning needs the bank's baseline adapter, its
    continuation the continued adapter)."""
    spec = METHODS[method]
    if spec.kind != "finetune":
        return True
    name = "finetune_continued" if spec.continued else "finetune"
    return getattr(bank.manifest, name, None) is not None


class MethodRunner:
    """Scores and times every method on one engine (one bank), routed on P = prefix_tokens."""

    def __init__(self, engine: TTMM, config: EvalConfig):
        self.engine = copy.copy(engine)  # shares model, lock and merger; its own routing
        self.engine.routing = engine.routing_for(prefix_tokens=config.prefix_tokens)
        self.config = config
        self._finetune: dict[bool, ExpertMerger] = {}
        self._trainers: dict[str, TestTimeTrainer] = {}
        self._index: ChunkIndex | None = None

    def ttt_config(self, spec: MethodSpec) -> TTTConfig:
        """The TTT settings a TTT or hybrid method runs with: ``EvalConfig.ttt_full`` for
        all weights, else ``EvalConfig.ttt``, with the method's own neighbours if it has some."""
        ttt = self._ttt_setting(spec)
        return ttt.replace(neighbours=spec.neighbours or ttt.neighbours)

    def _ttt_setting(self, spec: MethodSpec) -> TTTConfig:
        """``EvalConfig.ttt_full`` for a method training all weights, else ``EvalConfig.ttt``."""
        return self.config.ttt_full if spec.weights == "all" else self.config.ttt

    def key(self, method: str) -> str:
        """The cache key of the method's numbers (see :mod:`ttmm.eval.keys`)."""
        spec = METHODS[method]
        settings = {
            "prefix_tokens": self.config.prefix_tokens,
            "max_tokens": self.config.max_tokens,
        }
        if spec.kind in ("ttt", "hybrid"):
            settings["ttt"] = self.ttt_config(spec).to_dict()
        return result_key(self.engine.bank, self.engine.model, spec, settings, self.engine.device)

    def finetune(self, spec: MethodSpec) -> ExpertMerger:
        """The merger of the fine-tuning adapter (or of its continuation) of a method."""
        if spec.continued not in self._finetune:
            bank = self.engine.bank
            adapter = (
                bank.finetune_adapter(continued=True) if spec.continued else bank.finetune_adapter()
            )
            if adapter is None:
                raise EvalError(
                    f"bank {bank.path} has no {spec.name} adapter; rebuild it with "
                    "--with-finetune (--continue-finetune) or leave it out of --methods"
                )
            self._finetune[spec.continued] = ExpertMerger(self.engine.model, [adapter])
        return self._finetune[spec.continued]

    def trainer(self, spec: MethodSpec) -> TestTimeTrainer:
        """The test-time trainer of a TTT or hybrid method (one per weights setting)."""
        config = self._ttt_setting(spec)
        if config.weights not in self._trainers:
            if self._index is None:
                try:
                    self._index = ChunkIndex.load(self.engine.bank.path)
                except FileNotFoundError as err:
                    raise EvalError(f"{err}; or leave {spec.name!r} out of --methods") from err
            self._trainers[config.weights] = TestTimeTrainer(self.engine, self._index, config)
        return self._trainers[config.weights]

    def plan(self, spec: MethodSpec, text: str) -> RoutingPlan:
        routing = self.engine.routing
        if spec.top_n is not None:
            routing = routing.replace(rule="top_n", max_active=spec.top_n)
        return self.engine.route([text], routing)[0]

    def score(self, spec: MethodSpec, text: str) -> dict:
        """One document's record: NLL, scored tokens, active experts, adaptation time."""
        P, limit = self.config.prefix_tokens, self.config.max_tokens
        started = time.perf_counter()
        extra: dict = {}
        plan = None
        if spec.kind in ("ttt", "hybrid"):
            plan = self.plan(spec, text) if spec.kind == "hybrid" else None
            neighbours = self.ttt_config(spec).neighbours
            ((score, adaptation),) = self.trainer(spec).score([text], P, limit, plan, neighbours)
            extra = {
                "neighbour_docs": adaptation.doc_ids,
                "neighbour_similarity": adaptation.similarities,
                "ttt_seconds": adaptation.seconds,
                "ttt_final_loss": adaptation.losses[-1],
            }
        elif spec.kind == "finetune":
            with self.engine.lock, self.finetune(spec).fold(RoutingPlan.explicit({0: 1.0})):
                (score,) = self.engine.score([text], P, limit, plans=[RoutingPlan.base()])
        elif spec.kind == "ensemble":
            (score,) = ensemble_score(self.engine, [text], [self.plan(spec, text)], P, limit)
        else:
            plan = RoutingPlan.base() if spec.kind == "base" else self.plan(spec, text)
            (score,) = self.engine.score([text], P, limit, plans=[plan])
        plan = plan or score.plan
        active = len(plan.expert_ids) if spec.kind in ("merge", "ensemble", "hybrid") else 1
        record = {
            "nll": score.nll,
            "tokens": score.n_tokens,
            "active_experts": active,
            "experts": [{"id": k, "weight": w} for k, w in zip(plan.expert_ids, plan.weights)],
            "seconds": time.perf_counter() - started,
        }
        return record | extra

    def time_generation(self, spec: MethodSpec, prompt: str) -> dict:
        """Seconds to generate ``new_tokens`` from ``prompt``, and the adaptation part of it."""
        n = self.config.new_tokens
        with _Stopwatch(self.engine.device) as clock:
            if spec.kind == "base":
                clock.decode(lambda: self._decode(prompt, n))
            elif spec.kind == "ensemble":
                plan = clock.adapt(lambda: self.plan(spec, prompt))
                clock.decode(lambda: ensemble_generate(self.engine, prompt, plan, n, stop=False))
            else:
                if spec.kind == "finetune":
                    context = self.finetune(spec).fold(RoutingPlan.explicit({0: 1.0}))
                elif spec.kind in ("ttt", "hybrid"):
                    start = None
                    if spec.kind == "hybrid":
                        start = clock.adapt(lambda: self.plan(spec, prompt))
                    neighbours = self.ttt_config(spec).neighbours
                    context = self.trainer(spec).adapted(prompt, start, neighbours)
                else:
                    plan = clock.adapt(lambda: self.plan(spec, prompt))
                    context = self.engine.merged([plan])
                with clock.adapting(context):
                    clock.decode(lambda: self._decode(prompt, n))
        return {"seconds": clock.total, "adapt_seconds": clock.adapt_seconds, "new_tokens": n}

    def _decode(self, prompt: str, n: int) -> None:
        """Greedy decoding of exactly ``n`` tokens with the model as it stands."""
        tokenizer = self.engine.tokenizer
        batch = tokenizer([prompt], return_tensors="pt").to(self.engine.device)
        with self.engine.lock:
            decode(self.engine.model, tokenizer, batch, n, GREEDY, min_new_tokens=n)


class _Stopwatch:
    """Splits a timed block into adaptation (routing, merging, restoring, TTT) and decoding.

    On a GPU it waits for queued work at every boundary, so each part is charged its own work.
    """

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> _Stopwatch:
        self.adapt_seconds = 0.0
        synchronize(self.device)
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.total = time.perf_counter() - self._started

    def adapt(self, step: Callable):
        synchronize(self.device)
        started = time.perf_counter()
        try:
            return step()
        finally:
            synchronize(self.device)
            self.adapt_seconds += time.perf_counter() - started

    def decode(self, step: Callable) -> None:
        step()

    @contextlib.contextmanager
    def adapting(self, context) -> Iterator[None]:
        """Enter and exit ``context`` (a merge) on the adaptation clock, its body off it."""
        self.adapt(context.__enter__)
        try:
            yield
        finally:
            self.adapt(lambda: context.__exit__(None, None, None))


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: rescored on this run
                logger.warning("%s: skipping a truncated line", path)
    return records


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def evaluate(
    engines: dict[str, TTMM],
    out_dir: str | os.PathLike,
    config: EvalConfig | None = None,
    progress: bool = True,
    methods: dict[str, Sequence[str]] | None = None,
    extra: dict | None = None,
) -> dict:
    """Score and time every method on every bank; write the JSON, table and plots; return it.

    ``engines`` maps a bank name to an engine (they may share one base model and encoder).
    ``methods`` optionally narrows ``config.methods`` for some banks (by bank name), e.g. to
    run the costly methods on one bank of several; the others run all of them. ``extra``
    adds top-level entries to results.json (e.g. ``ttt_sweep``: how TTT was tuned).
    """

    config = config or EvalConfig()
    narrowed = methods or {}
    unknown = sorted(set(narrowed) - set(engines))
    if unknown:
        raise EvalError(
            f"methods given for {unknown}, which are not among the banks {list(engines)}"
        )
    for name, chosen in narrowed.items():
        if extra := [m for m in chosen if m not in config.methods]:
            raise EvalError(
                f"bank {name}: methods {extra} are not in the run's methods {list(config.methods)}"
            )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.to_dict())
    runners = {name: MethodRunner(engine, config) for name, engine in engines.items()}
    documents = {
        name: select_documents(held_out_documents(e.bank), e.tokenizer, config)
        for name, e in engines.items()
    }
    keys = {  # computed before any merge is folded in: they hash the base weights
        name: {
            m: runner.key(m)
            for m in config.methods
            if m in narrowed.get(name, config.methods) and available(runner.engine.bank, m)
        }
        for name, runner in runners.items()
    }
    _score_all(runners, documents, keys, out / DOCUMENTS_FILE, config, progress)
    _time_all(runners, documents, keys, out / TIMINGS_FILE, config, progress)
    report = build_report(
        {name: _bank_info(runner, documents[name], keys[name]) for name, runner in runners.items()},
        config,
        read_jsonl(out / DOCUMENTS_FILE),
        read_jsonl(out / TIMINGS_FILE),
    )
    report |= extra or {}
    write_report(report, out)
    return report


def _bank_info(runner: MethodRunner, documents: Sequence[Document], keys: dict) -> dict:
    """What the report needs of a bank: identity, result keys, and the documents scored."""
    bank = runner.engine.bank
    return {
        "path": str(bank.path),
        "num_experts": bank.num_experts,
        "routing": bank.routing.to_dict(),
        "base_model": bank.manifest.base_model.get("name"),
        "device": describe(runner.engine.device),
        "dtype": dtype_name(runner.engine.model.dtype),
        "build": bank.manifest.build,
        "branch_from": getattr(bank.manifest, "branch_from", None)
        or (bank.manifest.build or {}).get("branch_from"),
        "content": bank_fingerprint(bank),
        "keys": keys,
        "documents": [doc.id for doc in documents],
        "subsets": {
            name: [doc.id for doc in subset(documents, runner.config.subset_size(name))]
            for name in SUBSETS
        },
    }


def _score_all(runners, documents, keys, path: Path, config: EvalConfig, progress: bool) -> None:
    done = {(r["key"], r["method"], r["doc_id"]) for r in read_jsonl(path)}
    for name, runner in runners.items():
        for method in config.methods:
            if method not in keys[name]:
                logger.warning("bank %s has no adapter for %s: skipping it", name, method)
                continue
            spec, key = METHODS[method], keys[name][method]
            docs = subset(documents[name], config.subset_size(spec.subset))
            todo = [d for d in docs if (key, method, d.id) not in done]
            for doc in tqdm(todo, desc=f"{name} {method}", disable=not progress, unit="doc"):
                record = {"key": key, "method": method, "doc_id": doc.id, "domain": doc.domain}
                append_jsonl(path, record | runner.score(spec, doc.text))
                done.add((key, method, doc.id))


def _time_all(runners, documents, keys, path: Path, config: EvalConfig, progress: bool) -> None:
    """Time every (bank, method) on the same prompts, interleaved per prompt, in this process.

    Each prompt's timings (all banks and methods) are appended together once all are taken,
    so an interrupted run redoes at most one prompt; methods compared are always timed side by
    side on the same prompt in the same process.
    """
    if config.timing_prompts == 0:
        return
    first_name = next(iter(runners))
    first = runners[first_name]
    prompts = []
    for doc in subset(documents[first_name], config.timing_prompts):
        prompts.append((doc, first.engine.query_texts([doc.text])[0]))  # the routing prefix
    jobs = []  # (runner name, method, result key), shared keys timed once
    seen = set()
    timed = config.timed_methods or config.methods
    for name in runners:
        for method, key in keys[name].items():
            if method in timed and (key, method) not in seen:
                seen.add((key, method))
                jobs.append((name, method, key))
    n = config.new_tokens
    have = {(r["key"], r["method"], r["doc_id"]) for r in read_jsonl(path) if r["new_tokens"] == n}
    todo = [(d, p) for d, p in prompts if any((k, m, d.id) not in have for _, m, k in jobs)]
    if not todo:
        return
    first._decode(todo[0][1], 4)  # warm up caches before the first timed call
    bar = tqdm(total=len(todo) * len(jobs), desc="timing", disable=not progress, unit="run")
    for doc, prompt in todo:
        records = []
        for name, method, key in jobs:
            timing = runners[name].time_generation(METHODS[method], prompt)
            records.append(
                {"key": key, "method": method, "doc_id": doc.id, "domain": doc.domain} | timing
            )
            bar.update()
        for record in records:
            append_jsonl(path, record)
    bar.close()


__all__ = [
    "EvalConfig",
    "EvalError",
    "METHODS",
    "MethodSpec",
    "MethodRunner",
    "evaluate",
    "select_documents",
]
