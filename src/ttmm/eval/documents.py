"""Which held-out documents an evaluation scores (design notes §7): a bank's held-out split,
taken per domain in a seeded order, with enough tokens after the routing prefix."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from ttmm.bank import Bank
from ttmm.build.chunks import read_test_documents
from ttmm.build.corpus import Document
from ttmm.eval.methods import EvalError


class Choice(Protocol):
    """What choosing documents reads of an evaluation's configuration (an ``EvalConfig``)."""

    docs: int | None
    prefix_tokens: int
    min_scored_tokens: int
    max_tokens: int
    seed: int


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


def document_order(doc_id: str, seed: int) -> str:
    """Sort key of the seeded document order: sha256(seed:doc_id), never the name order."""
    return hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()


def select_documents(docs: Sequence[Document], tokenizer, config: Choice) -> list[Document]:
    """Per domain, in the seeded order, the first ``config.docs`` documents with enough tokens
    after the prefix (the test documents); grouped by domain, each group in that order."""
    chosen = _eligible(docs, tokenizer, config, config.docs)
    return [doc for domain in sorted(chosen) for doc in chosen[domain]]


def validation_documents(
    docs: Sequence[Document], tokenizer, config: Choice, count: int
) -> list[Document]:
    """Per domain, the ``count`` eligible documents that follow the test documents in the same
    seeded order: never one of :func:`select_documents`' (what a baseline is tuned on)."""
    if config.docs is None:
        raise EvalError(
            "validation documents come after the test documents, but the evaluation scores "
            "every held-out document (docs=None); give it a number of documents"
        )
    if count < 1:
        raise EvalError(f"validation documents per domain must be >= 1, got {count}")
    chosen = _eligible(docs, tokenizer, config, config.docs + count)
    return [doc for domain in sorted(chosen) for doc in chosen[domain][config.docs :]]


def _eligible(docs, tokenizer, config: Choice, limit: int | None) -> dict[str, list[Document]]:
    """Per domain, the first ``limit`` documents in the seeded order with enough tokens."""
    need = config.prefix_tokens + config.min_scored_tokens
    chosen: dict[str, list[Document]] = {}
    for doc in sorted(docs, key=lambda d: document_order(d.id, config.seed)):
        picked = chosen.setdefault(doc.domain, [])
        if limit is not None and len(picked) >= limit:
            continue
        text = doc.text[: 8 * config.max_tokens]
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= need:
            picked.append(doc)
    return chosen


def subset(documents: Sequence[Document], size: int | None) -> list[Document]:
    """The first ``size`` documents of each domain (all with None), order kept."""
    seen: dict[str, int] = {}
    kept = []
    for doc in documents:
        seen[doc.domain] = seen.get(doc.domain, 0) + 1
        if size is None or seen[doc.domain] <= size:
            kept.append(doc)
    return kept
