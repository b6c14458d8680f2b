"""Bisecting k-means, centroids, TF-IDF labels and cluster quality on small known data."""

from __future__ import annotations

import numpy as np
import pytest

from ttmm.build.cluster import (
    ClusterError,
    centroids,
    cluster_embeddings,
    cluster_quality,
    label_clusters,
)


def _blobs(per_group: int = 20, groups: int = 3, dim: int = 16, seed: int = 0):
    """Unit vectors scattered tightly around ``groups`` orthogonal directions."""
    rng = np.random.default_rng(seed)
    rows, gold = [], []
    for g in range(groups):
        centre = np.zeros(dim)
        centre[g] = 1.0
        points = centre + 0.05 * rng.standard_normal((per_group, dim))
        rows.append(points / np.linalg.norm(points, axis=1, keepdims=True))
        gold += [f"group{g}"] * per_group
    return np.concatenate(rows).astype(np.float32), gold


def test_bisecting_kmeans_recovers_separated_groups_deterministically():
    vectors, gold = _blobs()
    assignments = cluster_embeddings(vectors, 3, seed=0)
    assert assignments.shape == (60,) and set(assignments) == {0, 1, 2}
    np.testing.assert_array_equal(assignments, cluster_embeddings(vectors, 3, seed=0))
    quality = cluster_quality(assignments, gold)
    assert quality["purity"] == 1.0 and quality["ami"] == pytest.approx(1.0)


def test_centroids_are_normalised_cluster_means():
    vectors, _ = _blobs()
    assignments = cluster_embeddings(vectors, 3, seed=0)
    cents = centroids(vectors, assignments, 3)
    assert cents.shape == (3, 16) and cents.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cents, axis=1), 1.0, atol=1e-6)
    for k in range(3):
        mean = vectors[assignments == k].mean(axis=0)
        np.testing.assert_allclose(cents[k], mean / np.linalg.norm(mean), atol=1e-6)


def test_one_cluster_and_bad_k():
    vectors, _ = _blobs(per_group=3)
    assert (cluster_embeddings(vectors, 1) == 0).all()
    with pytest.raises(ClusterError, match="K=10 experts but only 9 training chunks"):
        cluster_embeddings(vectors, 10)
    with pytest.raises(ClusterError, match="at least 1"):
        cluster_embeddings(vectors, 0)


def test_labels_are_distinguishing_tfidf_terms():
    texts = [
        "the cat chased the kitten; cats purr",
        "a kitten and a cat sleep",
        "def parse(self): return tokens from the lexer",
        "the lexer yields tokens to the parser",
    ]
    labels = label_clusters(texts, np.array([0, 0, 1, 1]), 2, n_terms=2)
    assert set(labels[0].split(", ")) <= {"cat", "kitten", "cats", "purr", "chased", "sleep"}
    assert "kitten" in labels[0] or "cat" in labels[0]
    assert "lexer" in labels[1] or "tokens" in labels[1]
    assert "the" not in labels[0].split(", ")  # stop words never label a cluster


def test_quality_counts_only_labelled_items():
    assignments = np.array([0, 0, 0, 1, 1, 1])
    gold = ["a", "a", "b", "b", "b", None]
    quality = cluster_quality(assignments, gold)
    assert quality["purity"] == pytest.approx(4 / 5)
    assert quality["n_items"] == 5 and quality["n_classes"] == 2
    assert cluster_quality(assignments, [None] * 6) is None
