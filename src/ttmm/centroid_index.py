"""Finding a prompt's experts among many centroids: one matrix product, or a faiss index.

Routing scores z_k = c_k · q against every centroid. The paper's rules (``sparse_softmax``,
``threshold``) need all K scores: p = softmax(z / β) is normalised over every expert, and at
large K the many small terms dominate that sum, so no index that returns only the nearest
centroids gives the same plans. They take one matrix product, (n, dim) @ (dim, K).

``top_n`` keeps the n largest p and renormalises over them, and there the normaliser cancels:
w_k = exp(z_k / β) / Σ_{j in top n} exp(z_j / β). Its plans need only the n nearest centroids,
which an exact inner-product index (``faiss.IndexFlatIP``) finds faster than the product and a
full sort once the bank is large enough (:data:`INDEX_MIN_EXPERTS`). The index gives the same
experts with weights equal to the product's up to float rounding of the scores (tested).
"""

from __future__ import annotations

import numpy as np
import torch

INDEX_MIN_EXPERTS = 20_000
"""Banks of at least this many experts route ``top_n`` through the faiss index. Measured once
on the 2-core machine while it was loaded (2026-12-05, random unit centroids, dim 384): the
product alone took 2.2 ms at K = 10,000 for one prompt against 4.9 ms for faiss' top 64, and
23 ms against 16 ms for 8 prompts; at K = 100,000, 35 against 49 ms (one prompt) and 143
against 84 ms (8 prompts). The crossover lies between 10,000 and 100,000 for batches; a clean
measurement is to come (``benchmarks/scale.py`` times the product and its top-k only)."""


class CentroidIndex:
    """A bank's (K, dim) unit centroids, searched by product or by a faiss index."""

    def __init__(self, centroids: torch.Tensor, index_min_experts: int = INDEX_MIN_EXPERTS):
        self.centroids = centroids
        self.index_min_experts = index_min_experts
        self._faiss = None

    @property
    def num_experts(self) -> int:
        return self.centroids.shape[0]

    @property
    def uses_index(self) -> bool:
        """Whether :meth:`nearest` searches the faiss index (else the product)."""
        return self.num_experts >= self.index_min_experts

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """z = C q for every expert: (n, K)."""
        return queries @ self.centroids.T

    def nearest(self, queries: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``m`` highest scores of each query, highest first, and their experts: two
        (n, m) tensors (scores float32, ids int64)."""
        m = min(m, self.num_experts)
        if not self.uses_index:
            return torch.topk(self.scores(queries), m, dim=1)
        scores, ids = self._index().search(np.ascontiguousarray(queries.numpy(), np.float32), m)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def _index(self):
        if self._faiss is None:
            import faiss

            index = faiss.IndexFlatIP(self.centroids.shape[1])
            index.add(np.ascontiguousarray(self.centroids.numpy(), np.float32))
            self._faiss = index
        return self._faiss
