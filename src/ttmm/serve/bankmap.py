"""The bank's 2-D map for the web page: a PCA of the training chunks' embeddings (issue 14).

The router compares unit vectors of the encoder's space (design notes §2, z_k = c_k · q). A
PCA fitted on the training chunks' embeddings shows that space's two widest directions; the
centroids and each query are projected with the same fitted PCA, so a prompt lands among the
chunks it resembles. A bank without a chunk index (an imported one) fits the PCA on its
centroids alone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ttmm.bank import Bank
from ttmm.build.chunks import ChunkIndex

MAX_POINTS = 3000
"""Most chunks drawn on the map; a larger index is shown as a random sample of this size."""
PREVIEW_WORDS = 12
"""Words of a chunk shown when the mouse is over it."""


@dataclass(frozen=True)
class BankMap:
    """A fitted 2-D projection and the bank's points in it."""

    mean: np.ndarray  # (dim,)
    components: np.ndarray  # (2, dim), zero rows where the data has fewer directions
    explained: tuple[float, float]
    """Share of the fitted data's variance along each axis."""
    source: str
    """``"chunks"`` (fitted on the chunk embeddings) or ``"centroids"`` (no chunk index)."""
    n_chunks: int
    """Training chunks in the bank's index (0 without one); ``points`` may be a sample."""
    points: np.ndarray  # (m, 2) projected chunks
    point_experts: np.ndarray  # (m,) expert of each drawn chunk
    previews: list[str]
    centroids: np.ndarray  # (K, 2) projected centroids

    def project(self, vectors: np.ndarray) -> np.ndarray:
        """Map embeddings (n, dim) to the plane (n, 2) with the fitted PCA."""
        return (np.asarray(vectors, dtype=np.float64) - self.mean) @ self.components.T

    def to_json(self, decimals: int = 4) -> dict:
        return {
            "source": self.source,
            "n_chunks": self.n_chunks,
            "explained_variance": [round(v, decimals) for v in self.explained],
            "points": [
                [round(float(x), decimals), round(float(y), decimals), int(k), text]
                for (x, y), k, text in zip(self.points, self.point_experts, self.previews)
            ],
            "centroids": [
                [round(float(x), decimals), round(float(y), decimals)] for x, y in self.centroids
            ],
        }


def preview(text: str, words: int = PREVIEW_WORDS) -> str:
    """The first ``words`` words of a chunk, with an ellipsis when there are more."""
    parts = text.split()
    return " ".join(parts[:words]) + (" …" if len(parts) > words else "")


def fit_pca(data: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Mean (dim,), the top two principal axes (2, dim) and their variance shares.

    With fewer than two rows or directions the missing axes are zero (points collapse on a
    line or a dot instead of failing).
    """
    from sklearn.decomposition import PCA

    data = np.asarray(data, dtype=np.float64)  # (n, dim)
    n, dim = data.shape
    components = np.zeros((2, dim))
    explained = [0.0, 0.0]
    rank = min(2, n - 1, dim)
    if rank < 1:
        return data.mean(axis=0), components, (0.0, 0.0)
    pca = PCA(n_components=rank, svd_solver="full").fit(data)
    components[:rank] = pca.components_
    explained[:rank] = [float(v) for v in pca.explained_variance_ratio_]
    return pca.mean_, components, (explained[0], explained[1])


def build_map(bank: Bank, max_points: int = MAX_POINTS, seed: int = 0) -> BankMap:
    """Fit the map on the bank's chunk embeddings (or centroids) and project everything."""
    centroids = bank.centroids.numpy()  # (K, dim)
    try:
        index: ChunkIndex | None = ChunkIndex.load(bank.path)
    except FileNotFoundError:
        index = None
    if index is not None and len(index) >= 2:
        mean, components, explained = fit_pca(index.embeddings)
        rows = np.arange(len(index))
        if len(rows) > max_points:
            rows = np.sort(np.random.default_rng(seed).choice(rows, max_points, replace=False))
        vectors, experts = index.embeddings[rows], index.experts[rows]
        previews = [preview(index.texts[i]) for i in rows]
        source, n_chunks = "chunks", len(index)
    else:
        mean, components, explained = fit_pca(centroids)
        vectors, experts, previews = np.zeros((0, centroids.shape[1])), np.zeros(0, np.int64), []
        source, n_chunks = "centroids", 0 if index is None else len(index)
    fitted = BankMap(
        mean=mean,
        components=components,
        explained=explained,
        source=source,
        n_chunks=n_chunks,
        points=np.zeros((0, 2)),
        point_experts=np.asarray(experts, np.int64),
        previews=previews,
        centroids=np.zeros((0, 2)),
    )
    return replace(
        fitted, points=fitted.project(vectors).reshape(-1, 2), centroids=fitted.project(centroids)
    )
