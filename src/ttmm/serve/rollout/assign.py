"""Which arm serves a request: a sticky hash of the user's key against the candidate's share.

Each key hashes (with the rollout's salt) to a point u in [0, 1); the candidate serves it when
u < share / 100. A user therefore keeps one arm while the share stays, and a user on the
candidate stays on it when the share grows (the points below 5 % are below 25 % too), as in
KServe's and LiteLLM's weighted splits. A request with no key draws u anew. Over many users
u is uniform, so the share is also each request's probability of the candidate: the
propensity the canary's quality estimate weighs by (:mod:`sequential`).
"""

from __future__ import annotations

import hashlib
import random

_DRAW = random.SystemRandom()


def key_point(key: str, salt: str) -> float:
    """u in [0, 1) of ``key`` under ``salt`` (SHA-256, so independent of the process)."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_arm(key: str | None, share: float, salt: str) -> str:
    """``candidate`` or ``control`` for a request with sticky ``key`` (None: drawn anew)."""
    if share <= 0:
        return "control"
    if share >= 100:
        return "candidate"
    u = _DRAW.random() if key is None else key_point(key, salt)
    return "candidate" if u < share / 100.0 else "control"
