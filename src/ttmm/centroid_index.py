"""Finding a prompt's experts among many centroids: one matrix product, or a faiss index.

Routing scores z_k = c_k · q against every centroid. The paper's rules (``sparse_softmax``,
``threshold``) need all K scores: p = softmax(z / β) is normalised over every expert, and at
large K the many small terms dominate that sum, so no index that returns only the nearest
centroids gives the same plans. They take one matrix product, (n, dim) @ (dim, K).

``top_n`` keeps the n largest p and renormalises over them, and there the normaliser cancels:
w_k = exp(z_k / β) / Σ_{j in top n} exp(z_j / β). Its plans need only the n nearest centroids,
which an exact inner-product index (``faiss.IndexFlatIP``) finds faster than the product and
``torch.topk`` for one or two queries at a time in a large bank (:data:`INDEX_MIN_EXPERTS`,
:data:`INDEX_MAX_QUERIES`); for batches the product is faster at every K measured. The index
gives the same experts with weights equal to the product's up to float rounding of the scores
(tested).
"""

from __future__ import annotations

import numpy as np
import torch

INDEX_MIN_EXPERTS = 10_000
"""Banks of at least this many experts route ``top_n`` through the faiss index (for batches of
at most :data:`INDEX_MAX_QUERIES` queries). ``benchmarks/route_index.py`` on the 2-core machine
(2026-12-05, one thread, random unit centroids of dim 384, top 10, medians of 20, both methods
interleaved while two other jobs ran): faiss / product for one query 0.65 at K = 10,000 (1.7
against 2.7 ms), 0.73 at 20,000, 0.70 at 100,000 (15.6 against 22.3 ms); at K = 1,000 and
5,000, 0.81 and 0.79 but under 0.3 ms saved (README: the table)."""

INDEX_MAX_QUERIES = 2
"""The most queries one search sends to the index. The same run: two queries 0.64-0.70 from
K = 5,000 to 100,000, four 0.84-1.05, eight 1.39-1.80, 32 2.8-3.2: faiss' flat search scans
query by query where the product is one matrix multiplication for the batch."""


class CentroidIndex:
    """A bank's (K, dim) unit centroids, searched by product or by a faiss index."""

    def __init__(
        self,
        centroids: torch.Tensor,
        index_min_experts: int = INDEX_MIN_EXPERTS,
        index_max_queries: int = INDEX_MAX_QUERIES,
    ):
        self.centroids = centroids
        self.index_min_experts = index_min_experts
        self.index_max_queries = index_max_queries
        self._faiss = None

    @property
    def num_experts(self) -> int:
        return self.centroids.shape[0]

    def uses_index(self, queries: int = 1) -> bool:
        """Whether :meth:`nearest` searches the faiss index for this many queries (else the
        product)."""
        return self.num_experts >= self.index_min_experts and queries <= self.index_max_queries

    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """z = C q for every expert: (n, K)."""
        return queries @ self.centroids.T

    def nearest(self, queries: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``m`` highest scores of each query, highest first, and their experts: two
        (n, m) tensors (scores float32, ids int64)."""
        m = min(m, self.num_experts)
        if not self.uses_index(queries.shape[0]):
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
