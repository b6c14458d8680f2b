"""Hard links from a bank to its parent's files: how ``ttmm update`` keeps the experts it did
not retrain without copying them (their bytes, and so their checksums, stay the parent's)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ttmm.atomic import atomic_file

logger = logging.getLogger(__name__)


def link_files(source: Path, target: Path, names: list[str]) -> None:
    """Hard-link each file ``source/name`` to ``target/name``, atomically (a copy where the
    file system refuses links); a link already in place is kept."""
    copied = 0
    for name in names:
        origin, link = source / name, target / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.exists() and os.path.samefile(origin, link):
            continue
        with atomic_file(link) as staging:
            try:
                os.link(origin, staging)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(origin, staging)
                copied += 1
    if copied:
        logger.warning("copied %d file(s): %s cannot hard-link to %s", copied, target, source)


def link_folders(
    parent: Path, out: Path, folders: list[str], checksums: dict[str, str]
) -> dict[str, str]:
    """Hard-link the files of ``folders`` (relative to the banks) from ``parent`` into ``out``;
    returns their checksums (from ``checksums``, the parent's) by relative path."""
    known = {n: s for n, s in checksums.items() if n.rsplit("/", 1)[0] in folders}
    link_files(parent, out, list(known))
    return known


def link_tree(source: Path, target: Path) -> None:
    """Hard-link every file of the folder ``source`` into ``target``, the training record
    last, so that an interrupted link never leaves a folder that looks complete."""
    names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    names.sort(key=lambda name: name == "training.json")
    link_files(source, target, names)
