"""The evaluation harness of design notes §3: every method on a bank's held-out documents.

Methods (registered by name in :data:`METHODS`): the base model; the fine-tuning adapter;
TTMM merging with the top 1, 3 and 10 experts and with the bank's default (threshold) rule;
TTMM ensembling of the top 3 and 10 experts; and TTT-NN. Each held-out document is routed
(or, for TTT, retrieved on) by its first P = 50 tokens, and only the tokens after them are
scored. Test-time cost is the wall time to generate a fixed number of new tokens from a
P-token prompt, everything included, every method timed in the same process, interleaved per
prompt, so that ratios to the base model are fair on a noisy machine.

Runs are resumable: every scored document is appended to ``documents.jsonl`` and skipped on a
rerun; the timing phase is written to ``timings.jsonl`` only when complete. Results that do not
depend on the bank (the base model, and TTT, which depends only on the training chunks) are
keyed by what they depend on, so evaluating several banks built on the same corpus computes
them once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ttmm.bank import Bank
from ttmm.build.chunks import CHUNKS_NAME, EMBEDDINGS_NAME, ChunkIndex, read_test_documents
from ttmm.build.corpus import Document
from ttmm.device import describe, dtype_name, synchronize
from ttmm.eval.ensemble import ensemble_generate, ensemble_score
from ttmm.eval.methods import METHODS, EvalError, MethodSpec
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
    docs: int | None = 20
    """Held-out documents per domain (the first that are long enough); None = all."""
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
    ttt: TTTConfig = field(default_factory=TTTConfig)
    """The TTT baseline's retrieval and training."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise EvalError(f"EvalConfig.methods: unknown {unknown}; choose from {list(METHODS)}")
        for name in ("prefix_tokens", "min_scored_tokens", "max_tokens", "new_tokens"):
            if getattr(self, name) < 1:
                raise EvalError(f"EvalConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.docs is not None and self.docs < 1:
            raise EvalError(f"EvalConfig.docs must be >= 1 or None, got {self.docs}")
        if self.timing_prompts < 0:
            raise EvalError(f"EvalConfig.timing_prompts must be >= 0, got {self.timing_prompts}")
        if self.max_tokens <= self.prefix_tokens + self.min_scored_tokens:
            raise EvalError("EvalConfig.max_tokens must exceed prefix_tokens + min_scored_tokens")

    def to_dict(self) -> dict:
        return {
            "methods": list(self.methods),
            "docs": self.docs,
            "prefix_tokens": self.prefix_tokens,
            "min_scored_tokens": self.min_scored_tokens,
            "max_tokens": self.max_tokens,
            "timing_prompts": self.timing_prompts,
            "new_tokens": self.new_tokens,
            "ttt": self.ttt.to_dict(),
        }


def held_out_documents(bank: Bank) -> list[Document]:
    """The bank's held-out (test) documents, as its build recorded them."""
    name = bank.manifest.data.get("test_documents")
    path = Path(bank.path) / name if name else None
    if path is None or not path.is_file():
        raise EvalError(
            f"bank {bank.path} records no held-out documents (manifest data: "
            f"{sorted(bank.manifest.data)}); evaluate a bank made by `ttmm build`"
        )
    return read_test_documents(bank.path)


def select_documents(docs: Sequence[Document], tokenizer, config: EvalConfig) -> list[Document]:
    """Per domain, the first ``config.docs`` documents with enough tokens after the prefix."""
    need = config.prefix_tokens + config.min_scored_tokens
    chosen: dict[str, list[Document]] = {}
    for doc in docs:
        picked = chosen.setdefault(doc.domain, [])
        if config.docs is not None and len(picked) >= config.docs:
            continue
        if (
            len(tokenizer(doc.text[: 8 * config.max_tokens], add_special_tokens=False)["input_ids"])
            >= need
        ):
            picked.append(doc)
    return [doc for domain in sorted(chosen) for doc in chosen[domain]]


def chunk_fingerprint(bank: Bank) -> str:
    """Identity of the bank's training chunks (their documents, tokens and embeddings) and base
    model: TTT depends on nothing else of a bank, so banks of several K share its results."""
    from safetensors.numpy import load_file

    digest = hashlib.sha256(bank.manifest.base_model["fingerprint"].encode())
    root = Path(bank.path)
    if (root / CHUNKS_NAME).is_file():
        with open(root / CHUNKS_NAME, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    record = json.loads(line)  # its expert assignment depends on K: left out
                    digest.update(json.dumps([record["doc_id"], record["token_ids"]]).encode())
    if (root / EMBEDDINGS_NAME).is_file():
        digest.update(load_file(root / EMBEDDINGS_NAME)["embeddings"].tobytes())
    return digest.hexdigest()[:16]


def available(bank: Bank, method: str) -> bool:
    """Whether the bank can run the method (fine-tuning needs the bank's baseline adapter)."""
    return METHODS[method].kind != "finetune" or bank.manifest.finetune is not None


def result_key(
    bank: Bank,
    method: str,
    dtype: torch.dtype = torch.float32,
    device: torch.device = torch.device("cpu"),
) -> str:
    """What a method's numbers depend on: the base model, the training chunks, or the bank;
    and where it ran: the weights' dtype unless float32 and the device type unless the CPU are
    appended (so the keys of float32 CPU runs stay put, and a GPU run reuses no CPU timing)."""
    kind = METHODS[method].kind
    suffix = "" if dtype == torch.float32 else f"@{dtype_name(dtype)}"
    suffix += "" if device.type == "cpu" else f"@{device.type}"
    if kind == "base":
        return f"base:{bank.manifest.base_model['fingerprint']}{suffix}"
    if kind == "ttt":
        return f"chunks:{chunk_fingerprint(bank)}{suffix}"
    return f"bank:{Path(bank.path).resolve()}{suffix}"


class MethodRunner:
    """Scores and times every method on one engine (one bank)."""

    def __init__(self, engine: TTMM, config: EvalConfig):
        self.engine = engine
        self.config = config
        self._finetune: ExpertMerger | None = None
        self._ttt: TestTimeTrainer | None = None

    @property
    def finetune(self) -> ExpertMerger:
        if self._finetune is None:
            adapter = self.engine.bank.finetune_adapter()
            if adapter is None:
                raise EvalError(
                    f"bank {self.engine.bank.path} has no fine-tuning adapter; rebuild it with "
                    "--with-finetune or leave 'finetune' out of --methods"
                )
            self._finetune = ExpertMerger(self.engine.model, [adapter])
        return self._finetune

    @property
    def ttt(self) -> TestTimeTrainer:
        if self._ttt is None:
            try:
                index = ChunkIndex.load(self.engine.bank.path)
            except FileNotFoundError as err:
                raise EvalError(f"{err}; or leave 'ttt' out of --methods") from err
            self._ttt = TestTimeTrainer(self.engine, index, self.config.ttt)
        return self._ttt

    def plan(self, spec: MethodSpec, text: str) -> RoutingPlan:
        routing = self.engine.routing.replace(prefix_tokens=self.config.prefix_tokens)
        if spec.top_n is not None:
            routing = routing.replace(rule="top_n", max_active=spec.top_n)
        return self.engine.route([text], routing)[0]

    def score(self, spec: MethodSpec, text: str) -> dict:
        """One document's record: NLL, scored tokens, active experts, adaptation time."""
        P, limit = self.config.prefix_tokens, self.config.max_tokens
        started = time.perf_counter()
        extra: dict = {}
        if spec.kind == "ttt":
            ((score, adaptation),) = self.ttt.score([text], P, limit)
            extra = {
                "neighbour_docs": adaptation.doc_ids,
                "neighbour_similarity": adaptation.similarities,
                "ttt_seconds": adaptation.seconds,
                "ttt_final_loss": adaptation.losses[-1],
            }
            active = 1
        elif spec.kind == "finetune":
            with self.engine.lock, self.finetune.fold(RoutingPlan.explicit({0: 1.0})):
                (score,) = self.engine.score([text], P, limit, plans=[RoutingPlan.base()])
            active = 1
        elif spec.kind == "ensemble":
            (score,) = ensemble_score(self.engine, [text], [self.plan(spec, text)], P, limit)
            active = len(score.plan.expert_ids)
        else:
            plan = RoutingPlan.base() if spec.kind == "base" else self.plan(spec, text)
            (score,) = self.engine.score([text], P, limit, plans=[plan])
            active = len(plan.expert_ids)
        record = {
            "nll": score.nll,
            "tokens": score.n_tokens,
            "active_experts": active,
            "experts": [
                {"id": k, "weight": w} for k, w in zip(score.plan.expert_ids, score.plan.weights)
            ],
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
                    context = self.finetune.fold(RoutingPlan.explicit({0: 1.0}))
                elif spec.kind == "ttt":
                    adaptation = clock.adapt(lambda: self.ttt.adapt(prompt))
                    context = self.ttt.applied(adaptation)
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


def _read_jsonl(path: Path) -> list[dict]:
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


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def evaluate(
    engines: dict[str, TTMM],
    out_dir: str | os.PathLike,
    config: EvalConfig | None = None,
    progress: bool = True,
) -> dict:
    """Score and time every method on every bank; write the JSON, table and plots; return it.

    ``engines`` maps a bank name to an engine (they may share one base model and encoder).
    """

    config = config or EvalConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    runners = {name: MethodRunner(engine, config) for name, engine in engines.items()}
    documents = {
        name: select_documents(held_out_documents(e.bank), e.tokenizer, config)
        for name, e in engines.items()
    }
    _score_all(runners, documents, out / DOCUMENTS_FILE, config, progress)
    _time_all(runners, documents, out / TIMINGS_FILE, config, progress)
    report = build_report(
        {name: _bank_info(runner, documents[name]) for name, runner in runners.items()},
        config,
        _read_jsonl(out / DOCUMENTS_FILE),
        _read_jsonl(out / TIMINGS_FILE),
    )
    write_report(report, out)
    return report


def _bank_info(runner: MethodRunner, documents: Sequence[Document]) -> dict:
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
        "keys": {
            method: result_key(bank, method, runner.engine.model.dtype, runner.engine.device)
            for method in runner.config.methods
            if available(bank, method)
        },
        "documents": [doc.id for doc in documents],
    }


def _score_all(runners, documents, path: Path, config: EvalConfig, progress: bool) -> None:
    done = {(r["key"], r["method"], r["doc_id"]) for r in _read_jsonl(path)}
    for name, runner in runners.items():
        bank = runner.engine.bank
        for method in config.methods:
            if not available(bank, method):
                logger.warning("bank %s has no fine-tuning adapter: skipping %s", name, method)
                continue
            spec, key = (
                METHODS[method],
                result_key(bank, method, runner.engine.model.dtype, runner.engine.device),
            )
            todo = [d for d in documents[name] if (key, method, d.id) not in done]
            for doc in tqdm(todo, desc=f"{name} {method}", disable=not progress, unit="doc"):
                record = {"key": key, "method": method, "doc_id": doc.id, "domain": doc.domain}
                _append_jsonl(path, record | runner.score(spec, doc.text))
                done.add((key, method, doc.id))


def _time_all(runners, documents, path: Path, config: EvalConfig, progress: bool) -> None:
    """Time every (bank, method) on the same prompts, interleaved, in this one process."""
    if config.timing_prompts == 0:
        return
    prompts = []
    first = next(iter(runners.values())).engine
    for domain in sorted({d.domain for docs in documents.values() for d in docs}):
        docs = [d for d in next(iter(documents.values())) if d.domain == domain]
        for doc in docs[: config.timing_prompts]:
            prompts.append(
                (
                    doc,
                    first.query_texts(
                        [doc.text], first.routing.replace(prefix_tokens=config.prefix_tokens)
                    )[0],
                )
            )
    jobs = []  # (runner name, method, result key), shared keys timed once
    seen = set()
    for name, runner in runners.items():
        for method in config.methods:
            if not available(runner.engine.bank, method):
                continue
            key = result_key(
                runner.engine.bank, method, runner.engine.model.dtype, runner.engine.device
            )
            if (key, method) not in seen:
                seen.add((key, method))
                jobs.append((name, method, key))
    expected = {(key, method, doc.id) for _, method, key in jobs for doc, _ in prompts}
    have = {(r["key"], r["method"], r["doc_id"]) for r in _read_jsonl(path)}
    if expected <= have:
        return
    records = []
    runners_first = next(iter(runners.values()))
    runners_first._decode(prompts[0][1], 4)  # warm up caches before the first timed call
    bar = tqdm(total=len(prompts) * len(jobs), desc="timing", disable=not progress, unit="run")
    for doc, prompt in prompts:
        for name, method, key in jobs:
            timing = runners[name].time_generation(METHODS[method], prompt)
            records.append(
                {"key": key, "method": method, "doc_id": doc.id, "domain": doc.domain} | timing
            )
            bar.update()
    bar.close()
    path.unlink(missing_ok=True)
    for record in records:
        _append_jsonl(path, record)


__all__ = ["EvalConfig", "EvalError", "METHODS", "MethodSpec", "MethodRunner", "evaluate"]
