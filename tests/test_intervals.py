"""Paired bootstrap intervals, checked against a case computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ttmm.eval.intervals import (
    Estimate,
    corpus_perplexity,
    draw,
    paired_difference,
    perplexity_interval,
    win_rate,
)

# Three documents: NLL and scored tokens; per-token NLL 2, 2, 3 (method a) and 1, 2, 2 (b).
NLL_A, NLL_B, TOKENS = np.array([2.0, 4.0, 9.0]), np.array([1.0, 4.0, 6.0]), np.array([1, 2, 3])
ROWS = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2], [0, 1, 2]])  # four fixed resamples


def linear_quantile(sorted_values: list[float], q: float) -> float:
    """numpy's default quantile, written out: interpolate at position q (n − 1)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    return sorted_values[low] + (position - low) * (sorted_values[low + 1] - sorted_values[low])


def test_perplexity_interval_by_hand():
    estimate = perplexity_interval(NLL_A, TOKENS, ROWS)
    assert estimate.value == pytest.approx(math.exp(15 / 6))
    # per resample exp(Σ nll / Σ tokens): e², e², e³, e^2.5; sorted e², e², e^2.5, e³
    assert estimate.ci_low == pytest.approx(math.exp(2))  # position 0.075 between e² and e²
    assert estimate.ci_high == pytest.approx(  # position 2.925 between e^2.5 and e³
        math.exp(2.5) + 0.925 * (math.exp(3) - math.exp(2.5))
    )
    assert estimate.n_docs == 3


def test_paired_difference_by_hand():
    diff = paired_difference(NLL_A, TOKENS, NLL_B, TOKENS, ROWS)
    assert diff.value == pytest.approx(math.exp(15 / 6) - math.exp(11 / 6))
    e = math.exp
    by_row = [e(2) - e(1), 0.0, e(3) - e(2), e(2.5) - e(11 / 6)]
    ordered = [0.0, e(2) - e(1), e(2.5) - e(11 / 6), e(3) - e(2)]  # sorted by hand
    assert sorted(by_row) == ordered
    assert diff.ci_low == pytest.approx(0.075 * (e(2) - e(1)))
    assert diff.ci_high == pytest.approx(ordered[2] + 0.925 * (ordered[3] - ordered[2]))
    assert diff.ci_low == pytest.approx(linear_quantile(ordered, 0.025))
    assert diff.excludes_zero  # [0.35, 12.2]: the table marks it
    assert not Estimate(0.1, -0.2, 0.3, n_docs=3).excludes_zero
    assert win_rate(NLL_A, TOKENS, NLL_B, TOKENS) == 0.0  # a is never lower
    assert win_rate(NLL_B, TOKENS, NLL_A, TOKENS) == pytest.approx(2 / 3)  # a tie is no win


def test_draws_are_seeded_shared_and_vectorised():
    ids = [f"doc{i}" for i in range(7)]
    rows = draw(ids, 500, seed=0)
    assert rows.shape == (500, 7) and rows.min() >= 0 and rows.max() <= 6
    assert np.array_equal(rows, draw(ids, 500, seed=0))  # every method gets this same draw
    assert not np.array_equal(rows, draw(ids, 500, seed=1))
    assert not np.array_equal(rows, draw(ids[:-1] + ["other"], 500, seed=0)[:, :7])
    values = corpus_perplexity(np.arange(1.0, 8.0), np.full(7, 2.0), rows)
    assert values.shape == (500,)
    assert values[3] == pytest.approx(math.exp((rows[3] + 1).sum() / 14))
