"""The bank's data files: training chunks, their embeddings and a faiss index, and the split.

Layout inside a bank (recorded in ``manifest.data``)::

    index/chunks.jsonl            one training chunk a line: doc id, domain, label, expert, text,
                                  token ids (base tokenizer)
    index/embeddings.safetensors  {"embeddings": (n, dim) float32 unit rows, "experts": (n,) int64}
    index/chunks.faiss            faiss IndexFlatIP over the same rows (inner product = cosine)
    index/test_documents.jsonl    full text of the held-out documents, for evaluation
    split.json                    train/test document ids per domain, seed and test fraction,
                                  validation document ids, dropped near-duplicates

Test-time training retrieves its neighbours from here, in the embedding space of the router.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ttmm.atomic import atomic_file, atomic_write_json
from ttmm.build.corpus import Chunk, Document, Split, read_documents_jsonl, write_documents_jsonl

INDEX_DIR = "index"
CHUNKS_NAME = f"{INDEX_DIR}/chunks.jsonl"
EMBEDDINGS_NAME = f"{INDEX_DIR}/embeddings.safetensors"
FAISS_NAME = f"{INDEX_DIR}/chunks.faiss"
TEST_DOCUMENTS_NAME = f"{INDEX_DIR}/test_documents.jsonl"
SPLIT_NAME = "split.json"


def write_chunk_index(
    bank_dir: str | os.PathLike,
    chunks: Sequence[Chunk],
    embeddings: np.ndarray,
    assignments: np.ndarray,
) -> dict:
    """Write chunks, embeddings and the faiss index; return the manifest.data entries."""
    import faiss

    root = Path(bank_dir)
    (root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    path = root / CHUNKS_NAME
    with atomic_file(path) as staging, open(staging, "w", encoding="utf-8") as handle:
        for row, (chunk, expert) in enumerate(zip(chunks, assignments, strict=True)):
            record = {
                "row": row,
                "doc_id": chunk.doc_id,
                "domain": chunk.domain,
                "label": chunk.label,
                "expert": int(expert),
                "text": chunk.text,
                "token_ids": list(chunk.token_ids),
            }
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    index = ChunkIndex.from_arrays(
        [c.token_ids for c in chunks], embeddings, experts=np.asarray(assignments)
    )
    tensors = {
        "embeddings": torch.from_numpy(index.embeddings),
        "experts": torch.from_numpy(index.experts),
    }
    with atomic_file(root / EMBEDDINGS_NAME) as staging:
        save_file(tensors, staging)
    with atomic_file(root / FAISS_NAME) as staging:
        faiss.write_index(index.index, str(staging))
    return {
        "chunks": CHUNKS_NAME,
        "embeddings": EMBEDDINGS_NAME,
        "faiss_index": FAISS_NAME,
        "n_chunks": len(chunks),
        "index_metric": "inner_product",
    }


def write_split(
    bank_dir: str | os.PathLike,
    split: Split,
    seed: int,
    test_fraction: float,
    validation: Sequence[str] = (),
    near_duplicates: dict[str, str] | None = None,
) -> dict:
    """Write split.json and the held-out documents' full text; return manifest.data entries.

    ``validation``: ids of the training documents kept for validation losses;
    ``near_duplicates``: dropped held-out id -> the training id it duplicates."""
    root = Path(bank_dir)
    (root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_file(root / TEST_DOCUMENTS_NAME) as staging:
        write_documents_jsonl(split.test, staging)
    payload = {
        "seed": seed,
        "test_fraction": test_fraction,
        "domains": split.ids_by_domain(),
        "validation": sorted(validation),
        "near_duplicates": dict(sorted((near_duplicates or {}).items())),
    }
    atomic_write_json(root / SPLIT_NAME, payload, indent=1)
    return {"split": SPLIT_NAME, "test_documents": TEST_DOCUMENTS_NAME}


def _index_records(root: Path, names: Sequence[str]) -> tuple[list[dict], dict]:
    """The chunk records and the embeddings file's tensors of a bank's index; a clear error
    when one of ``names`` is missing."""
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"bank {root} has no chunk index ({', '.join(missing)} missing); "
            "rebuild it with `ttmm build` (imported banks carry no training chunks)"
        )
    with open(root / CHUNKS_NAME, encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    return records, load_file(root / EMBEDDINGS_NAME)


def read_chunks(bank_dir: str | os.PathLike) -> tuple[list[Chunk], np.ndarray, np.ndarray]:
    """A bank's training chunks, their unit embeddings (n, dim) and expert ids (n,), as
    :func:`write_chunk_index` wrote them."""
    records, tensors = _index_records(Path(bank_dir), (CHUNKS_NAME, EMBEDDINGS_NAME))
    chunks = [
        Chunk(r["doc_id"], r["domain"], tuple(r["token_ids"]), r["text"], r.get("label"))
        for r in records
    ]
    return chunks, tensors["embeddings"].numpy(), tensors["experts"].numpy()


def read_split(bank_dir: str | os.PathLike) -> dict:
    """A bank's ``split.json`` (see :func:`write_split`)."""
    return json.loads((Path(bank_dir) / SPLIT_NAME).read_text())


def extend_split(
    bank_dir: str | os.PathLike,
    parent: dict,
    parent_test: Sequence[Document],
    split: Split,
    validation: Sequence[str] = (),
    near_duplicates: dict[str, str] | None = None,
) -> dict:
    """Write the split of a bank grown from ``parent`` (its ``split.json`` payload and held-out
    documents) by the documents of ``split``: the parent's ids and held-out documents first,
    the new ones after. Returns manifest.data entries."""
    root = Path(bank_dir)
    (root / INDEX_DIR).mkdir(parents=True, exist_ok=True)
    with atomic_file(root / TEST_DOCUMENTS_NAME) as staging:
        write_documents_jsonl([*parent_test, *split.test], staging)
    domains = {
        d: {part: list(ids) for part, ids in v.items()} for d, v in parent["domains"].items()
    }
    for domain, parts in split.ids_by_domain().items():
        into = domains.setdefault(domain, {"train": [], "test": []})
        for part, ids in parts.items():
            into[part].extend(ids)
    payload = {
        **parent,
        "domains": domains,
        "validation": sorted({*parent.get("validation", []), *validation}),
        "near_duplicates": dict(
            sorted({**parent.get("near_duplicates", {}), **(near_duplicates or {})}.items())
        ),
    }
    atomic_write_json(root / SPLIT_NAME, payload, indent=1)
    return {"split": SPLIT_NAME, "test_documents": TEST_DOCUMENTS_NAME}


@dataclass
class ChunkIndex:
    """Training chunks with their embeddings, expert ids and a faiss inner-product index.

    Rows are aligned: row i of ``embeddings`` embeds ``texts[i]``, whose base-model tokens are
    ``token_ids[i]``, cut from document ``doc_ids[i]`` and trained into expert ``experts[i]``.
    """

    token_ids: list[list[int]]
    doc_ids: list[str]
    texts: list[str]
    domains: list[str]
    experts: np.ndarray  # (n,) int64
    embeddings: np.ndarray  # (n, dim) float32 unit rows
    index: object  # faiss.IndexFlatIP over ``embeddings``

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def from_arrays(
        cls,
        token_ids: Sequence[Sequence[int]],
        embeddings: np.ndarray,
        doc_ids: Sequence[str] | None = None,
        texts: Sequence[str] | None = None,
        domains: Sequence[str] | None = None,
        experts: np.ndarray | None = None,
    ) -> ChunkIndex:
        """An in-memory index (the faiss index is built here)."""
        import faiss

        n = len(token_ids)
        vectors = np.ascontiguousarray(embeddings, dtype=np.float32)  # (n, dim)
        if vectors.ndim != 2 or vectors.shape[0] != n:
            raise ValueError(f"embeddings of shape {vectors.shape} do not match {n} chunks")
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(
            token_ids=[list(ids) for ids in token_ids],
            doc_ids=list(doc_ids) if doc_ids is not None else [str(i) for i in range(n)],
            texts=list(texts) if texts is not None else [""] * n,
            domains=list(domains) if domains is not None else [""] * n,
            experts=np.asarray(experts if experts is not None else np.full(n, -1), np.int64),
            embeddings=vectors,
            index=index,
        )

    @classmethod
    def load(cls, bank_dir: str | os.PathLike) -> ChunkIndex:
        """Read a bank's chunk index (written by ``ttmm build``)."""
        import faiss

        root = Path(bank_dir)
        records, tensors = _index_records(root, (CHUNKS_NAME, EMBEDDINGS_NAME, FAISS_NAME))
        return cls(
            token_ids=[r["token_ids"] for r in records],
            doc_ids=[r["doc_id"] for r in records],
            texts=[r["text"] for r in records],
            domains=[r["domain"] for r in records],
            experts=tensors["experts"].numpy(),
            embeddings=tensors["embeddings"].numpy(),
            index=faiss.read_index(str(root / FAISS_NAME)),
        )

    def search(self, query: np.ndarray, k: int) -> tuple[list[int], list[float]]:
        """Rows and cosine similarities of the ``k`` chunks nearest one query, nearest first."""
        q = np.ascontiguousarray(np.asarray(query, dtype=np.float32).reshape(1, -1))  # (1, dim)
        scores, rows = self.index.search(q, min(k, len(self)))
        keep = rows[0] >= 0
        return [int(r) for r in rows[0][keep]], [float(s) for s in scores[0][keep]]


def read_test_documents(bank_dir: str | os.PathLike) -> list[Document]:
    """The held-out documents of a bank's split, full text."""
    return read_documents_jsonl(Path(bank_dir) / TEST_DOCUMENTS_NAME)
