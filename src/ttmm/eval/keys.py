"""What a cached evaluation number depends on, as a key (design notes §3; resumable runs).

Every per-document record and every timing is stored under a key that changes whenever anything
that changes the number changes:

- the method and its settings (:class:`~ttmm.eval.methods.MethodSpec`), the routed prefix P,
  the tokens read per document, the TTT settings (for TTT and the hybrids), the weights' dtype
  and the device type;
- what the method reads: the base model's weights (the manifest's architecture fingerprint and
  a hash of the bytes of the loaded state dict); for methods that use the bank, its content
  (manifest, centroids and every adapter file's bytes); for TTT and the hybrids, the training
  chunks (documents, tokens, embeddings: not the expert assignment, so banks of several K on the
  same corpus share TTT's numbers).

So a rerun with another ``--prefix-tokens``, or after a rebuild at the same path, recomputes;
a rerun of the same settings on the same bank reuses. Files are hashed once per process and
looked up again by path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from pathlib import Path

import torch

from ttmm.bank import CENTROIDS_NAME, MANIFEST_NAME, Bank
from ttmm.build.chunks import CHUNKS_NAME, EMBEDDINGS_NAME
from ttmm.device import dtype_name
from ttmm.eval.methods import MethodSpec

_FILE_HASHES: dict[tuple[str, int, int], str] = {}
_CHUNK_HASHES: dict[tuple, str] = {}
_WEIGHT_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _stat_key(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def file_hash(path: Path) -> str:
    """sha256 of a file's bytes, computed once per (path, size, mtime)."""
    key = _stat_key(path)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]


def bank_fingerprint(bank: Bank) -> str:
    """Content hash of a bank: manifest, centroids and the bytes of every adapter file."""
    root = Path(bank.path)
    folders = [info.path for info in bank.manifest.experts]
    if bank.manifest.finetune is not None:
        folders.append(bank.manifest.finetune.path)
    files = [root / MANIFEST_NAME, root / CENTROIDS_NAME]
    for folder in folders:
        files += sorted(p for p in (root / folder).rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        if path.is_file():
            digest.update(f"{path.relative_to(root)}:{file_hash(path)};".encode())
    return digest.hexdigest()[:16]


def chunk_fingerprint(bank: Bank) -> str:
    """Identity of the bank's training chunks (their documents, tokens and embeddings) and base
    model architecture: TTT depends on nothing else of a bank, so banks of several K share it."""
    from safetensors.numpy import load_file

    root = Path(bank.path)
    paths = [root / CHUNKS_NAME, root / EMBEDDINGS_NAME]
    key = tuple(_stat_key(p) for p in paths if p.is_file())
    if key not in _CHUNK_HASHES:
        digest = hashlib.sha256(bank.manifest.base_model["fingerprint"].encode())
        if paths[0].is_file():
            with open(paths[0], encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        record = json.loads(line)  # its expert assignment depends on K: left out
                        digest.update(json.dumps([record["doc_id"], record["token_ids"]]).encode())
        if paths[1].is_file():
            digest.update(load_file(paths[1])["embeddings"].tobytes())
        _CHUNK_HASHES[key] = digest.hexdigest()[:16]
    return _CHUNK_HASHES[key]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the bytes of every tensor of the model's state dict, computed once per model
    object and process (call it while no merge is folded in)."""
    if model in _WEIGHT_HASHES:
        return _WEIGHT_HASHES[model]
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(flat.numpy().tobytes())
    _WEIGHT_HASHES[model] = digest.hexdigest()[:16]
    return _WEIGHT_HASHES[model]


def result_key(
    bank: Bank, model: torch.nn.Module, spec: MethodSpec, settings: dict, device: torch.device
) -> str:
    """The cache key of one method's numbers on one bank. ``settings`` are the evaluation
    settings that change a number (prefix, max tokens and, for TTT and the hybrids, TTT's)."""
    kind = spec.kind
    reads = {"base_model": bank.manifest.base_model["fingerprint"]}
    reads["weights"] = weights_fingerprint(model)
    if kind not in ("base", "ttt"):
        reads["bank"] = bank_fingerprint(bank)
    if kind in ("ttt", "hybrid"):
        reads["chunks"] = chunk_fingerprint(bank)
    what = {
        "method": spec.to_dict(),
        "settings": settings,
        "reads": reads,
        "dtype": dtype_name(next(model.parameters()).dtype),
        "device": device.type,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]
    prefix = {"base": "base", "ttt": "chunks"}.get(kind, "bank")
    return f"{prefix}:{digest}"


def clear_caches() -> None:
    """Forget every hash computed in this process (tests; a process that rebuilds weights)."""
    _FILE_HASHES.clear()
    _CHUNK_HASHES.clear()
    _WEIGHT_HASHES.clear()


__all__ = [
    "bank_fingerprint",
    "chunk_fingerprint",
    "clear_caches",
    "file_hash",
    "result_key",
    "weights_fingerprint",
]
