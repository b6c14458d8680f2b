"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of either.

Every writer in ttmm goes through here. A file is written to a hidden staging name beside its
target, flushed and fsynced, then renamed over the target (``os.replace`` is atomic on POSIX
and Windows), and the folder is fsynced so the rename survives a power cut. A failure removes
the staging file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def staging_path(path: Path) -> Path:
    """The hidden name a write to ``path`` is staged under (unique per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


STAGING_NAMES = re.compile(r"^\..+(\.\d+\.tmp|\.tmp-.+|\.old-\d+)$")
"""Hidden names of the staging files and folders below (``.x.123.tmp``, ``.x.tmp-ab12``,
``.x.old-123``): what a write killed halfway leaves behind."""


def remove_staging(folder: str | os.PathLike) -> list[Path]:
    """Delete the staging files and folders of interrupted writes anywhere under ``folder``;
    the removed paths. Only for a folder no other process is writing to."""
    found = [p for p in Path(folder).rglob(".*") if STAGING_NAMES.match(p.name)]
    removed = []
    for path in sorted(found, key=lambda p: len(p.parts)):  # a folder before what is inside it
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    return removed


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open a folder; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a staging path to write; on success it replaces ``path``, on failure it is removed.

    For writers that want a path (safetensors' ``save_file``, faiss, numpy)::

        with atomic_file(out / "x.safetensors") as staging:
            save_file(tensors, staging)
    """
    path = Path(path)
    staging = staging_path(path)
    try:
        yield staging
        _fsync_file(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, payload: bytes) -> None:
    with atomic_file(path) as staging:
        staging.write_bytes(payload)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, default=str))


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a staging folder that becomes ``target`` only if the block succeeds.

    An existing ``target`` is replaced; with ``replace=False`` it is kept and the staging
    folder dropped (for caches that several processes may fill at once: the first one wins).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists() and not replace:
        shutil.rmtree(staging, ignore_errors=True)
        return
    for child in staging.rglob("*"):
        if child.is_file():
            _fsync_file(child)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
