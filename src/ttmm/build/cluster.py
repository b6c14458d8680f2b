"""Bisecting k-means over chunk embeddings, centroids, expert labels, cluster quality (§2, 3-4).

Centroid c_k = normalize(mean of the unit embeddings e over cluster k). Each expert gets a human
label made of the top TF-IDF terms of its chunks.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


class ClusterError(ValueError):
    """Clustering cannot run on this input; the message says why and what to change."""


def cluster_embeddings(embeddings: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Cluster ids in [0, k) for each row, by bisecting k-means (largest-cluster strategy)."""
    from sklearn.cluster import BisectingKMeans

    n = embeddings.shape[0]
    if k < 1:
        raise ClusterError(f"the number of experts K must be at least 1, got {k}")
    if k > n:
        raise ClusterError(
            f"K={k} experts but only {n} training chunks; lower --experts or add documents"
        )
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    model = BisectingKMeans(
        n_clusters=k, random_state=seed, bisecting_strategy="largest_cluster", n_init=1
    )
    assignments = model.fit_predict(embeddings.astype(np.float64)).astype(np.int64)
    sizes = np.bincount(assignments, minlength=k)
    if (sizes == 0).any():
        raise ClusterError(
            f"clustering left {int((sizes == 0).sum())} of K={k} clusters empty (duplicate "
            "chunks?); lower --experts or add varied documents"
        )
    return assignments


def centroids(embeddings: np.ndarray, assignments: np.ndarray, k: int) -> np.ndarray:
    """c_k = normalize(mean of e over cluster k), shape (K, dim), float32."""
    dim = embeddings.shape[1]
    sums = np.zeros((k, dim), dtype=np.float64)  # (K, dim)
    np.add.at(sums, assignments, embeddings.astype(np.float64))
    norms = np.linalg.norm(sums, axis=1, keepdims=True)  # (K, 1); the mean's 1/n cancels
    if (norms == 0).any():
        raise ClusterError("a cluster's mean embedding is zero; its centroid has no direction")
    return (sums / norms).astype(np.float32)


def label_clusters(
    texts: Sequence[str], assignments: np.ndarray, k: int, n_terms: int = 4
) -> list[str]:
    """A label per cluster: the ``n_terms`` terms of highest mean TF-IDF over its chunks.

    TF-IDF is fitted on the chunks, keeping terms found in at least 2 chunks and at most half of
    them, so a label names what a cluster's chunks share, not a word one chunk happens to hold.
    """
    matrix, vocabulary = _tfidf(texts)
    labels = []
    for cluster in range(k):
        rows = matrix[np.flatnonzero(assignments == cluster)] if matrix is not None else None
        if rows is None or rows.shape[0] == 0:
            labels.append(f"cluster {cluster}")
            continue
        scores = np.asarray(rows.mean(axis=0)).ravel()  # (vocab,)
        top = [vocabulary[i] for i in np.argsort(-scores, kind="stable")[:n_terms] if scores[i] > 0]
        labels.append(", ".join(top) if top else f"cluster {cluster}")
    return labels


def _tfidf(texts: Sequence[str]):
    """(chunks × terms) TF-IDF and its vocabulary, pruning less for tiny corpora; None if empty."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    for min_df, max_df in ((2, 0.5), (1, 1.0)):
        vectorizer = TfidfVectorizer(
            stop_words="english",
            token_pattern=r"(?u)\b[A-Za-z][A-Za-z_]{2,}\b",
            sublinear_tf=True,
            min_df=min_df,
            max_df=max_df,
        )
        try:
            return vectorizer.fit_transform(texts), vectorizer.get_feature_names_out()
        except ValueError:  # no term survives pruning (or none at all)
            continue
    return None, None


def cluster_quality(assignments: np.ndarray, gold: Sequence[str | None]) -> dict | None:
    """Purity and adjusted mutual information of clusters against gold labels.

    Only items with a gold label count; None when no item has one. Purity = share of items in
    their cluster's majority class.
    """
    from sklearn.metrics import adjusted_mutual_info_score

    pairs = [(int(c), g) for c, g in zip(assignments, gold, strict=True) if g is not None]
    if not pairs:
        return None
    by_cluster: dict[int, Counter] = {}
    for cluster, label in pairs:
        by_cluster.setdefault(cluster, Counter())[label] += 1
    majority = sum(counts.most_common(1)[0][1] for counts in by_cluster.values())
    clusters, labels = zip(*pairs, strict=True)
    return {
        "purity": majority / len(pairs),
        "ami": float(adjusted_mutual_info_score(labels, clusters)),
        "n_items": len(pairs),
        "n_classes": len(set(labels)),
        "n_clusters": len(by_cluster),
    }


def nearest_centroid(embeddings: np.ndarray, centroid_rows: np.ndarray) -> np.ndarray:
    """argmax_k c_k · e for each unit row e (ties to the lower k), shape (n,) int64."""
    if embeddings.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.argmax(embeddings @ centroid_rows.T, axis=1).astype(np.int64)  # (n, K) -> (n,)
