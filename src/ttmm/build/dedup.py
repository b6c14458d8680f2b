"""Near-duplicate held-out documents across the train/test split (design §2, train time step 1).

A held-out document whose word shingles overlap a training document's by Jaccard similarity
J(S, T) = |S ∩ T| / |S ∪ T| at or above a threshold is dropped from the held-out set, so no
test text reaches the experts through a copy (a vendored module, a mirrored article). Candidates
come from datasketch's MinHash LSH (seeded permutations, so the result is deterministic); each
candidate is then confirmed on the exact shingle sets, so the LSH only saves comparisons and
never decides on its own.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from ttmm.build.corpus import Document

SHINGLE_WORDS = 5  # words per shingle: long enough that shared boilerplate alone is not a match
NUM_PERM = 128  # MinHash permutations
_WORD = re.compile(r"\w+")


def shingles(text: str, size: int = SHINGLE_WORDS) -> set[str]:
    """The set of ``size``-word shingles of ``text`` (lower-cased ``\\w+`` words)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


def jaccard(left: set[str], right: set[str]) -> float:
    """|S ∩ T| / |S ∪ T| (0 for two empty sets)."""
    union = len(left | right)
    return len(left & right) / union if union else 0.0


@dataclass(frozen=True)
class DedupResult:
    """The held-out documents kept, and what was dropped."""

    kept: list[Document]
    dropped: dict[str, str]  # held-out doc id -> id of the training document it duplicates

    def dropped_per_domain(self, documents: Sequence[Document]) -> dict[str, int]:
        domain = {d.id: d.domain for d in documents}
        return dict(sorted(Counter(domain[i] for i in self.dropped).items()))


def drop_near_duplicates(
    train: Sequence[Document], test: Sequence[Document], threshold: float, seed: int = 0
) -> DedupResult:
    """Drop every ``test`` document with Jaccard >= ``threshold`` to some ``train`` document."""
    from datasketch import MinHash, MinHashLSH

    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    if not train or not test:
        return DedupResult(kept=list(test), dropped={})
    train_sets = [shingles(d.text) for d in train]
    test_sets = [shingles(d.text) for d in test]

    def minhashes(sets: list[set[str]]) -> list:
        return MinHash.bulk(
            [
                [s.encode("utf-8", "surrogatepass") for s in sorted(shingle_set)]
                for shingle_set in sets
            ],
            num_perm=NUM_PERM,
            seed=seed,
        )

    # A lower LSH threshold than the confirmation's: LSH misses pairs near its own threshold.
    lsh = MinHashLSH(threshold=max(0.05, threshold * 0.8), num_perm=NUM_PERM)
    for i, signature in enumerate(minhashes(train_sets)):
        lsh.insert(i, signature)
    kept, dropped = [], {}
    for doc, doc_set, signature in zip(test, test_sets, minhashes(test_sets), strict=True):
        match = next(
            (
                j
                for j in sorted(lsh.query(signature))
                if jaccard(doc_set, train_sets[j]) >= threshold
            ),
            None,
        )
        if match is None:
            kept.append(doc)
        else:
            dropped[doc.id] = train[match].id
    return DedupResult(kept=kept, dropped=dropped)
