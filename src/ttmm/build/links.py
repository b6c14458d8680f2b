"""Hard links from a bank to its parent's files: how ``ttmm update`` keeps the experts it did
not retrain without copying them (their bytes, and so their checksums, stay the parent's)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ttmm.atomic import atomic_file

logger = logging.getLogger(__name__)


def link_folders(
    parent: Path, out: Path, folders: list[str], checksums: dict[str, str]
) -> dict[str, str]:
    """Hard-link the files of ``folders`` (relative to the banks) from ``parent`` into ``out``
    (a copy where links are refused); returns their known checksums by relative path."""
    known = {}
    copied = 0
    for name, checksum in checksums.items():
        if name.rsplit("/", 1)[0] not in folders:
            continue
        source, target = parent / name, out / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and os.path.samefile(source, target):
            known[name] = checksum
            continue
        with atomic_file(target) as staging:
            try:
                os.link(source, staging)
            except OSError:  # another file system, or one without hard links
                shutil.copy2(source, staging)
                copied += 1
        known[name] = checksum
    if copied:
        logger.warning("copied %d file(s): %s cannot hard-link to %s", copied, out, parent)
    return known
