"""Routing by a faiss index (issue 21): ``top_n`` plans from the nearest centroids alone equal
the plans of the full product; the paper's rules keep the product."""

from __future__ import annotations

import pytest
import torch

from ttmm.centroid_index import CentroidIndex
from ttmm.routing import RoutingConfig, RoutingError, route, route_nearest


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    rows = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(rows, dim=1)


def test_the_index_finds_the_products_nearest_centroids_and_plans():
    centroids, queries = unit_rows(3000, 384, 0), unit_rows(16, 384, 1)
    product = CentroidIndex(centroids)
    index = CentroidIndex(centroids, index_min_experts=0, index_max_queries=16)
    assert not product.uses_index(1) and index.uses_index(16) and not index.uses_index(17)
    assert CentroidIndex(centroids, index_min_experts=0).uses_index(2)
    assert not CentroidIndex(centroids, index_min_experts=0).uses_index(3)
    config = RoutingConfig(rule="top_n", max_active=5, beta=0.02)
    by_product = [route(z, config) for z in product.scores(queries)]
    scores, ids = index.nearest(queries, config.max_active)
    assert ids.shape == (16, 5) and bool((scores[:, :-1] >= scores[:, 1:]).all())
    by_index = [route_nearest(i, z, config) for i, z in zip(ids, scores)]
    for want, got in zip(by_product, by_index):
        assert got.expert_ids == want.expert_ids
        torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(got.similarities, want.similarities, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(product.nearest(queries, 5)[1], ids, rtol=0, atol=0)


def test_the_threshold_rules_refuse_the_nearest_experts_alone():
    with pytest.raises(RoutingError, match="needs every expert's score"):
        route_nearest(torch.tensor([0, 1]), torch.tensor([0.5, 0.4]), RoutingConfig())
    nan = route_nearest(torch.tensor([7, 9]), torch.tensor([float("nan"), 0.3]),
                        RoutingConfig(rule="top_n"))  # fmt: skip
    assert nan.expert_ids == (9,) and nan.fallback == "nearest"


def test_an_engine_over_a_large_bank_routes_top_n_by_the_index(tiny_engine):
    texts = ["the history of the empire", "def quicksort(items): return items", "a recipe"]
    routing = RoutingConfig(rule="top_n", max_active=2)
    by_product = tiny_engine.route(texts, routing)
    index = tiny_engine.index
    tiny_engine.index = CentroidIndex(index.centroids, 0, len(texts))  # as if K were 10,000
    try:
        by_index = tiny_engine.route(texts, routing)
        assert tiny_engine.index._faiss is not None  # the index answered
    finally:
        tiny_engine.index = index
    assert [p.expert_ids for p in by_index] == [p.expert_ids for p in by_product]
    for want, got in zip(by_product, by_index):
        torch.testing.assert_close(got.weights, want.weights, rtol=1e-5, atol=1e-7)
    paper = tiny_engine.route(texts)  # sparse_softmax: every score, the product
    assert all(p.rule == "sparse_softmax" for p in paper)
