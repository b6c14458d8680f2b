"""A bank's files and their checksums: every file but the manifest is recorded in it by
sha256 (:func:`file_checksums`) and checked against it (:func:`check_files`)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"


def _bank_files(bank_dir: Path) -> list[Path]:
    """The bank's files: all but the manifest, hidden files and anything in hidden folders
    (build state, staging files of an interrupted write)."""
    return sorted(
        p
        for p in bank_dir.rglob("*")
        if p.is_file()
        and p.name != MANIFEST_NAME
        and not any(part.startswith(".") for part in p.relative_to(bank_dir).parts)
    )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(
    bank_dir: str | os.PathLike, known: dict[str, str] | None = None
) -> dict[str, str]:
    """``{relative path: sha256}`` of every file of the bank (see :func:`_bank_files`), taking
    those in ``known`` as given."""
    root = Path(bank_dir)
    known = known or {}
    checksums = {}
    for path in _bank_files(root):
        name = path.relative_to(root).as_posix()
        checksums[name] = known.get(name) or sha256_file(path)
    return checksums


@dataclass(frozen=True)
class FileCheck:
    """One file of a bank against its recorded checksum."""

    path: str
    status: str
    """``ok``, ``changed`` (different bytes) or ``missing``."""
    expected: str
    actual: str | None = None


def check_files(
    bank_dir: str | os.PathLike, files: dict[str, str], paths: Iterable[str] | None = None
) -> list[FileCheck]:
    """Every file of ``files`` (a manifest's ``{path: sha256}``; or those of ``paths``),
    checked against its sha256."""
    root = Path(bank_dir)
    checks = []
    chosen = files if paths is None else {p: files[p] for p in paths}
    for rel, expected in sorted(chosen.items()):
        path = root / rel
        if not path.is_file():
            checks.append(FileCheck(rel, "missing", expected))
            continue
        actual = sha256_file(path)
        checks.append(FileCheck(rel, "ok" if actual == expected else "changed", expected, actual))
    return checks
