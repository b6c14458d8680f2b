"""Tuning the TTT baseline on validation documents (design notes §9, issue 23).

TTT-NN has three knobs that matter on a model this small: the learning rate, the number of
neighbours (one gradient step each: Hardt & Sun use 20, more is slower) and, when all weights
are trained, the optimiser (the LoRA is always trained by the project's one trainer, AdamW).
A baseline tuned on the documents it is scored on would be flattered, so the sweep scores
*validation* documents: per domain, the held-out documents that come after the evaluation's
test documents in the same seeded order (:func:`ttmm.eval.documents.validation_documents`),
never one of them.

A sweep runs in stages so that it costs what 2 CPU cores allow: each stage is a list of
candidates; :data:`LORA_GRID` and :data:`FULL_GRID` sweep the learning rate (and optimiser) at
20 neighbours, then :func:`widen` tries the best of those with 50. Every scored document is
appended to a JSONL file keyed like the evaluation's records, so a sweep resumes where it
stopped and a candidate scored once is never scored again. The choice is the candidate with the
lowest mean over domains of the log corpus perplexity (the geometric mean of the domains'
perplexities), among the candidates with every validation document scored.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from ttmm.atomic import atomic_write_json
from ttmm.build.corpus import Document
from ttmm.eval.documents import held_out_documents, select_documents, validation_documents
from ttmm.eval.harness import EvalConfig, MethodRunner, append_jsonl, read_jsonl
from ttmm.eval.intervals import corpus_perplexity
from ttmm.eval.methods import METHODS, EvalError
from ttmm.eval.ttt import TTTConfig

logger = logging.getLogger(__name__)

RECORDS_FILE = "ttt_sweep.jsonl"
RESULT_FILE = "ttt_sweep.json"


@dataclass(frozen=True)
class Candidate:
    """One TTT setting of the sweep."""

    weights: str
    """``lora`` or ``all``."""
    learning_rate: float
    neighbours: int = 20
    optimizer: str = "adam"
    """``all`` weights: ``adam`` or ``sgd``. A LoRA is trained by AdamW whatever this says."""

    def __post_init__(self) -> None:
        if self.weights not in ("lora", "all"):
            raise EvalError(f"a TTT candidate trains 'lora' or 'all' weights, not {self.weights!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise EvalError(
                f"a TTT candidate's optimiser is 'adam' or 'sgd', not {self.optimizer!r}"
            )
        if not (self.learning_rate > 0 and self.neighbours >= 1):
            raise EvalError(
                "a TTT candidate needs a learning rate > 0 and at least 1 neighbour, got "
                f"{self.learning_rate!r} and {self.neighbours!r}"
            )

    @property
    def method(self) -> str:
        """The evaluation method this candidate tunes (also its ``EvalConfig`` field)."""
        return "ttt_full" if self.weights == "all" else "ttt"

    def apply(self, config: TTTConfig) -> TTTConfig:
        """``config`` with this candidate's settings."""
        if self.weights == "all":
            return config.replace(
                weights="all",
                neighbours=self.neighbours,
                full_optimizer=self.optimizer,
                full_learning_rate=self.learning_rate,
            )
        train = replace(config.train, learning_rate=self.learning_rate)
        return config.replace(weights="lora", neighbours=self.neighbours, train=train)

    def to_dict(self) -> dict:
        return {
            "weights": self.weights,
            "learning_rate": self.learning_rate,
            "neighbours": self.neighbours,
            "optimizer": "adamw" if self.weights == "lora" else self.optimizer,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        optimizer = "adam" if data["optimizer"] == "adamw" else data["optimizer"]
        return cls(data["weights"], data["learning_rate"], data["neighbours"], optimizer)


LORA_GRID = tuple(Candidate("lora", lr) for lr in (1e-4, 3e-4, 1e-3, 5e-3))
"""LoRA at 20 neighbours: the learning rate around the recipe's 1e-3 (at 5e-3 the 20 steps
already overshoot on the default corpus's validation documents)."""
FULL_GRID = (
    Candidate("all", 2e-5, optimizer="adam"),
    Candidate("all", 1e-4, optimizer="adam"),
    Candidate("all", 1e-2, optimizer="sgd"),
)
"""All weights at 20 neighbours: Adam at Hardt & Sun's 2e-5 and 5x that; plain SGD."""


def widen(best: Candidate, neighbours: int = 50) -> Candidate:
    """The second stage: the best setting of the first with more neighbours."""
    return Candidate(best.weights, best.learning_rate, neighbours, best.optimizer)


@dataclass
class SweepRow:
    """A candidate's numbers on the validation documents."""

    candidate: Candidate
    perplexity: dict[str, float]
    """Corpus perplexity per domain."""
    documents: dict[str, int]
    """Validation documents scored per domain."""
    seconds: float
    """Median TTT adaptation seconds per document (retrieval and training)."""
    complete: bool
    """Every validation document scored (only complete rows can be chosen)."""

    @property
    def objective(self) -> float:
        """Mean over domains of the log perplexity: lower is better."""
        return sum(math.log(p) for p in self.perplexity.values()) / len(self.perplexity)

    def to_dict(self) -> dict:
        return {
            **self.candidate.to_dict(),
            "perplexity": self.perplexity,
            "documents": self.documents,
            "median_seconds": self.seconds,
            "complete": self.complete,
            "objective": self.objective if self.perplexity else None,
        }


class TTTSweep:
    """Scores candidates on validation documents with one engine; records in ``out``."""

    def __init__(
        self, runner: MethodRunner, validation: Sequence[Document], out: str | os.PathLike
    ):
        if not validation:
            raise EvalError(
                "the TTT sweep has no validation documents: the bank holds out too few "
                "documents beyond the evaluation's; lower --docs or build with a larger "
                "--test-fraction"
            )
        self.runner = runner
        self.validation = list(validation)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / RECORDS_FILE

    def _runner(self, candidate: Candidate) -> MethodRunner:
        """A runner whose ``ttt`` (or ``ttt_full``) setting is the candidate's."""
        return MethodRunner(self.runner.engine, _with_choice(self.runner.config, [candidate]))

    def records(self) -> list[dict]:
        return read_jsonl(self.path)

    def run(self, candidates: Iterable[Candidate], progress: bool = True) -> list[SweepRow]:
        """Score every candidate on every validation document (resuming), return their rows."""
        rows = []
        for candidate in candidates:
            runner = self._runner(candidate)
            key = runner.key(candidate.method)
            label = f"sweep {candidate.weights} lr={candidate.learning_rate:g} "
            label += f"nb={candidate.neighbours} {candidate.to_dict()['optimizer']}"
            self._score(runner, candidate.method, key, label, progress, candidate.to_dict())
            rows.append(self.row(candidate, key))
        return rows

    def base_perplexity(self, progress: bool = True) -> dict[str, float]:
        """The base model's corpus perplexity per domain on the validation documents: what
        the candidates' numbers read against."""
        key = self.runner.key("base")
        self._score(self.runner, "base", key, "sweep base", progress)
        return _perplexity(self._records(key))

    def _score(self, runner, method, key, label, progress, candidate=None) -> None:
        done = {r["doc_id"] for r in self._records(key)}
        todo = [d for d in self.validation if d.id not in done]
        for doc in tqdm(todo, desc=label, disable=not progress, unit="doc"):
            record = runner.score(METHODS[method], doc.text)
            append_jsonl(
                self.path,
                {"key": key, "method": method, "candidate": candidate, "doc_id": doc.id}
                | {"domain": doc.domain, "nll": record["nll"], "tokens": record["tokens"]}
                | {"ttt_seconds": record.get("ttt_seconds", 0.0)},
            )

    def _records(self, key: str) -> list[dict]:
        """This key's records of the validation documents."""
        ids = {d.id for d in self.validation}
        return [r for r in self.records() if r["key"] == key and r["doc_id"] in ids]

    def row(self, candidate: Candidate, key: str) -> SweepRow:
        mine = self._records(key)
        seconds = sorted(r["ttt_seconds"] for r in mine)
        return SweepRow(
            candidate,
            _perplexity(mine),
            {domain: len(rs) for domain, rs in sorted(_by_domain(mine).items())},
            seconds[len(seconds) // 2] if seconds else float("nan"),
            complete={r["doc_id"] for r in mine} == {d.id for d in self.validation},
        )


def _by_domain(records: Sequence[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["domain"], []).append(record)
    return grouped


def _perplexity(records: Sequence[dict]) -> dict[str, float]:
    """Corpus perplexity per domain of scored records."""
    return {
        domain: corpus_perplexity([r["nll"] for r in rs], [r["tokens"] for r in rs])
        for domain, rs in sorted(_by_domain(records).items())
    }


GRIDS = {"lora": LORA_GRID, "all": FULL_GRID}


def run_staged(
    sweeper: TTTSweep,
    kinds: Sequence[str] = ("lora", "all"),
    wide: int | None = 50,
    test_ids: Iterable[str] = (),
    progress: bool = True,
) -> tuple[list[SweepRow], dict]:
    """Per kind, its grid at 20 neighbours, then (``wide``) its best with ``wide`` neighbours;
    the summary is written after each stage, so an interrupted sweep shows what it has."""
    unknown = [k for k in kinds if k not in GRIDS]
    if unknown:
        raise EvalError(f"TTT sweep kinds {unknown} unknown; choose from {list(GRIDS)}")
    test_ids = list(test_ids)
    base = sweeper.base_perplexity(progress)
    rows: list[SweepRow] = []
    for kind in kinds:
        rows += sweeper.run(GRIDS[kind], progress)
        write_summary(sweeper.out, summary(rows, sweeper.validation, test_ids, base))
        if wide:
            rows += sweeper.run([widen(best(rows, kind).candidate, wide)], progress)
            write_summary(sweeper.out, summary(rows, sweeper.validation, test_ids, base))
    return rows, summary(rows, sweeper.validation, test_ids, base)


def tune(
    engine,
    config: EvalConfig,
    out: str | os.PathLike,
    validation_per_domain: int = 4,
    kinds: Sequence[str] = ("lora", "all"),
    wide: int | None = 50,
    progress: bool = True,
) -> tuple[EvalConfig, dict]:
    """Sweep TTT on ``engine``'s bank's validation documents (those after ``config``'s test
    documents); return ``config`` with the chosen settings and the sweep's summary."""
    runner = MethodRunner(engine, config)
    held_out = held_out_documents(engine.bank)
    test = select_documents(held_out, engine.tokenizer, config)
    validation = validation_documents(held_out, engine.tokenizer, config, validation_per_domain)
    logger.info("TTT sweep on %d validation documents", len(validation))
    sweeper = TTTSweep(runner, validation, out)
    rows, data = run_staged(sweeper, kinds, wide, [d.id for d in test], progress)
    return tuned_config(config, rows), data


def best(rows: Sequence[SweepRow], weights: str) -> SweepRow:
    """The complete row of ``weights`` with the lowest objective."""
    complete = [r for r in rows if r.candidate.weights == weights and r.complete]
    if not complete:
        raise EvalError(f"no {weights} candidate of the sweep scored every validation document")
    return min(complete, key=lambda r: r.objective)


def tuned_config(config: EvalConfig, rows: Sequence[SweepRow]) -> EvalConfig:
    """``config`` with the best LoRA setting as ``ttt`` and the best all-weights setting as
    ``ttt_full`` (a kind the sweep did not try keeps its setting)."""
    kinds = sorted({r.candidate.weights for r in rows})
    return _with_choice(config, [best(rows, kind).candidate for kind in kinds])


def _with_choice(config: EvalConfig, chosen: Iterable[Candidate]) -> EvalConfig:
    """``config`` with each candidate's setting in the field of the method it tunes."""
    return replace(config, **{c.method: c.apply(getattr(config, c.method)) for c in chosen})


def summary(
    rows: Sequence[SweepRow],
    validation: Sequence[Document],
    test_ids: Iterable[str],
    base: dict[str, float] | None = None,
) -> dict:
    """What results.json records of the sweep: every row, the choice per kind, the base
    model's perplexity on the same documents, and the validation documents (with the proof
    that none is a test document)."""
    test = set(test_ids)
    chosen = {}
    for weights in ("lora", "all"):
        if any(r.candidate.weights == weights and r.complete for r in rows):
            chosen[weights] = best(rows, weights).candidate.to_dict()
    return {
        "rows": [r.to_dict() for r in rows],
        "chosen": chosen,
        "base_perplexity": base,
        "objective": "mean over domains of log corpus perplexity on the validation documents",
        "validation_documents": [d.id for d in validation],
        "test_documents_among_them": sorted(test & {d.id for d in validation}),
    }


def write_summary(out: str | os.PathLike, data: dict) -> Path:
    path = Path(out) / RESULT_FILE
    atomic_write_json(path, data)
    return path


def read_summary(path: str | os.PathLike) -> dict:
    """A sweep's ``ttt_sweep.json``, with a clear error if it is not one."""
    try:
        data = json.loads(Path(path).read_text())
        data["chosen"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise EvalError(f"cannot read the TTT sweep's choice from {path}: {err}") from None
    return data


def with_summary(config: EvalConfig, data: dict) -> EvalConfig:
    """``config`` with the settings a sweep's summary chose."""
    return _with_choice(config, [Candidate.from_dict(c) for c in data["chosen"].values()])


def read_tuned(path: str | os.PathLike, config: EvalConfig) -> EvalConfig:
    """``config`` with the settings a sweep chose (its ``ttt_sweep.json``)."""
    return with_summary(config, read_summary(path))


__all__ = [
    "Candidate",
    "FULL_GRID",
    "LORA_GRID",
    "SweepRow",
    "TTTSweep",
    "GRIDS",
    "best",
    "run_staged",
    "read_summary",
    "read_tuned",
    "summary",
    "tune",
    "tuned_config",
    "widen",
    "with_summary",
    "write_summary",
]
