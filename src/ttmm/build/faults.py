"""Fault injection for the fault tests: kill the build at a named moment, like a power cut.

This exists only so that ``tests/test_build_faults.py`` can SIGKILL a build at an exact moment
instead of sleeping and hoping. ``TTMM_FAULT_AT=<moment>[:<n>]`` kills the process (SIGKILL,
no cleanup, no ``finally``) the ``n``-th time (default 1) it reaches that moment. Unset, every
call is one comparison. The variable is read once, when this module is first imported.

Moments (where :func:`checkpoint` is called):

- ``embed``: the embed stage, with the chunks embedded and nothing written to the bank yet;
- ``update_written``: an update (:mod:`ttmm.build.update`) with the untouched experts linked
  and the index and centroids written, before any training;
- ``train_step``: after an optimiser step of an adapter's training (counted over the process);
- ``adapter_saved``: between adapters, after one is saved with its training record;
- ``write_manifest``: inside the manifest's atomic write, after the staging file is written
  and before it is renamed to ``manifest.json`` (caught with an audit hook on ``os.replace``,
  so the core's writer needs no hook of its own).
"""

from __future__ import annotations

import os
import signal
import sys

FAULT_ENV = "TTMM_FAULT_AT"

RENAMES = {"write_manifest": "manifest.json"}
"""Moments caught as the rename onto a file of this name (the last step of an atomic write)."""


def _parse(value: str | None) -> tuple[str, int] | None:
    if not value:
        return None
    name, _, count = value.partition(":")
    try:
        n = int(count) if count else 1
    except ValueError as err:
        raise ValueError(f"{FAULT_ENV}={value!r}: expected <moment>[:<n>], n a number") from err
    return name, max(n, 1)


_TARGET = _parse(os.environ.get(FAULT_ENV))
_seen = 0


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def checkpoint(name: str) -> None:
    """Kill this process here if ``TTMM_FAULT_AT`` names this moment and count (else nothing)."""
    global _seen
    if _TARGET is None or _TARGET[0] != name:
        return
    _seen += 1
    if _seen == _TARGET[1]:
        _kill()


def _rename_hook(event: str, args: tuple) -> None:
    # os.rename and os.replace both raise the "os.rename" audit event before they act.
    if event == "os.rename" and os.path.basename(os.fspath(args[1])) == RENAMES[_TARGET[0]]:
        checkpoint(_TARGET[0])


if _TARGET is not None and _TARGET[0] in RENAMES:
    sys.addaudithook(_rename_hook)
