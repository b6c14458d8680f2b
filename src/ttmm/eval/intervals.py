"""Paired bootstrap intervals over documents (design notes §7, "Intervals").

A domain's corpus perplexity is exp(Σ NLL / Σ scored tokens) over its documents. Its 95%
interval resamples the documents with replacement, recomputes that ratio per resample and takes
the 2.5% and 97.5% quantiles. Differences between two methods are *paired*: both are recomputed
on the same resample of the documents both scored, so document difficulty cancels out. The draw
depends only on the seed and the documents (their ids), so every method compared on the same
documents sees the same draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
"""Coverage of every interval."""


def draw(doc_ids: Sequence[str], resamples: int, seed: int) -> np.ndarray:
    """Resample matrix (resamples, n) of row indices into ``doc_ids``, drawn with replacement;
    the same ids and seed always give the same matrix."""
    key = hashlib.sha256(f"{seed}:{len(doc_ids)}:".encode() + "\x1f".join(doc_ids).encode())
    rng = np.random.default_rng(int.from_bytes(key.digest()[:8], "little"))
    return rng.integers(0, len(doc_ids), size=(resamples, len(doc_ids)))  # (B, n)


def corpus_perplexity(nll: np.ndarray, tokens: np.ndarray, rows: np.ndarray | None = None):
    """exp(Σ nll / Σ tokens): a float, or with ``rows`` (B, n) one value per resample (B,)."""
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    if rows is None:
        return float(np.exp(nll.sum() / tokens.sum()))
    return np.exp(nll[rows].sum(axis=1) / tokens[rows].sum(axis=1))  # (B,)


def quantiles(values: np.ndarray) -> tuple[float, float]:
    """The central ``LEVEL`` interval of bootstrap values (numpy's linear interpolation)."""
    low, high = np.quantile(values, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class Estimate:
    """A perplexity (or a difference of two) with its bootstrap interval."""

    value: float
    ci_low: float
    ci_high: float
    n_docs: int

    @property
    def excludes_zero(self) -> bool:
        return self.ci_low > 0 or self.ci_high < 0


def perplexity_interval(nll, tokens, rows: np.ndarray) -> Estimate:
    """Corpus perplexity of the documents and its interval over the resamples ``rows``."""
    value = corpus_perplexity(nll, tokens)
    return Estimate(value, *quantiles(corpus_perplexity(nll, tokens, rows)), n_docs=len(nll))


def paired_difference(nll_a, tokens_a, nll_b, tokens_b, rows: np.ndarray) -> Estimate:
    """ppl_a − ppl_b on the same documents (aligned arrays) and its paired interval."""
    value = corpus_perplexity(nll_a, tokens_a) - corpus_perplexity(nll_b, tokens_b)
    boot = corpus_perplexity(nll_a, tokens_a, rows) - corpus_perplexity(nll_b, tokens_b, rows)
    return Estimate(value, *quantiles(boot), n_docs=len(nll_a))


def paired_relative_difference(nll_a, tokens_a, nll_b, tokens_b, rows: np.ndarray) -> Estimate:
    """ppl_a / ppl_b − 1 on the same documents (−0.08: a's perplexity is 8 % lower) and its
    paired interval, each resample's ratio taken on that resample."""
    value = corpus_perplexity(nll_a, tokens_a) / corpus_perplexity(nll_b, tokens_b) - 1
    boot = corpus_perplexity(nll_a, tokens_a, rows) / corpus_perplexity(nll_b, tokens_b, rows) - 1
    return Estimate(value, *quantiles(boot), n_docs=len(nll_a))


def win_rate(nll_a, tokens_a, nll_b, tokens_b) -> float:
    """Share of documents where a's NLL per token is lower than b's (ties are no win)."""
    a = np.asarray(nll_a, np.float64) / np.asarray(tokens_a, np.float64)
    b = np.asarray(nll_b, np.float64) / np.asarray(tokens_b, np.float64)
    return float(np.mean(a < b))


__all__ = [
    "LEVEL",
    "paired_relative_difference",
    "Estimate",
    "corpus_perplexity",
    "draw",
    "paired_difference",
    "perplexity_interval",
    "quantiles",
    "win_rate",
]
