"""The factor algebra of a merge (design notes §2, step 3): each expert's factors laid out per
group of layers, and the merged factors A', B' a plan gives.

A merger groups the adapted linear layers of a model by weight shape (:mod:`ttmm.merge`). An
expert is held as :class:`ExpertFactors`: for every group it adapts, A (L, r, d_in) with its
scale s_k folded in and B transposed (L, r, d_out), one row per rank. A layer of the group the
expert does not adapt holds zeros, as do the rows past a layer's own rank (PEFT's
``rank_pattern``), so a group's layers always share one rank. The merge of a plan is then,
per group, one concatenation over the plan's experts:

    A' = [w_1 s_1 A_1; …; w_n s_n A_n],  B' = [B_1 … B_n],  so that  B'A' = Σ_k w_k s_k B_k A_k

(:func:`merge_group`), whether the experts come from memory or from disk through the merger's
cache; the fold (:mod:`ttmm.fold`) and the low-rank hooks (:mod:`ttmm.lowrank`) both start from
here. A batch whose rows carry different merges uses the union of their experts once, with a
row-by-row weight matrix (:func:`union_group`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class MergeError(ValueError):
    """Adapters that do not fit the model, or a plan that cannot be executed."""


@dataclass(eq=False)
class ExpertFactors:
    """One expert's factors, laid out per group of layers (see the module docstring)."""

    A: list[torch.Tensor | None]
    """Per group: (L, r, d_in), s_k folded in; None when the expert adapts no layer of it."""
    B_t: list[torch.Tensor | None]
    """Per group: (L, r, d_out), B transposed."""
    _bounds: dict[int, list[float]] = field(default_factory=dict, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (*self.A, *self.B_t) if t is not None)

    def rank(self, group: int) -> int:
        """r of this expert in ``group`` (0 where it adapts none of its layers)."""
        A = self.A[group]
        return 0 if A is None else A.shape[1]

    def update_bounds(self, group: int) -> list[float]:
        """Per layer of ``group``, max_i ||B[i, :]|| · max_j ||s A[:, j]|| (>= max |ΔW|)."""
        if group not in self._bounds:
            A, B_t = self.A[group], self.B_t[group]
            if A is None:
                self._bounds[group] = []
            else:
                rows = B_t.float().norm(dim=1).amax(dim=1)  # (L,): largest row of B
                cols = A.float().norm(dim=1).amax(dim=1)  # (L,): largest column of sA
                self._bounds[group] = (rows * cols).tolist()
        return self._bounds[group]


@dataclass(eq=False)
class GroupFactors:
    """A merge's factors for one group of layers: A' (L, R, d_in) and B'ᵀ (L, R, d_out)."""

    A: torch.Tensor
    B_t: torch.Tensor
    _B: torch.Tensor | None = field(default=None, repr=False)

    @property
    def B(self) -> torch.Tensor:
        """B' (L, d_out, R), contiguous (made once): faster in the fold's batched product
        than a transposed view."""
        if self._B is None:
            self._B = self.B_t.transpose(1, 2).contiguous()
        return self._B

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.A, self.B_t, self._B) if t is not None)


PlanFactors = dict[int, GroupFactors]
"""A plan's merged factors by group number, for the groups it adapts."""


def merge_group(
    experts: Sequence[ExpertFactors], weights: Sequence[float], group: int
) -> GroupFactors | None:
    """A' = [w_k s_k A_k] on rows and B'ᵀ = [B_kᵀ] of one group (None if no expert adapts
    it). The weights multiply into A' as it is written: one pass over the factors."""
    chosen = [(e, w) for e, w in zip(experts, weights) if e.A[group] is not None]
    if not chosen:
        return None
    first = chosen[0][0].A[group]
    rank = sum(e.rank(group) for e, _ in chosen)
    A = torch.empty((first.shape[0], rank, first.shape[2]), dtype=first.dtype, device=first.device)
    offset = 0
    for expert, weight in chosen:
        r = expert.rank(group)
        torch.mul(expert.A[group], weight, out=A[:, offset : offset + r])
        offset += r
    B_t = torch.cat([e.B_t[group] for e, _ in chosen], dim=1)
    return GroupFactors(A, B_t)


def union_group(
    experts: Sequence[ExpertFactors], row_weights: Sequence[dict[int, float]], group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The union U of the experts any batch row uses in one group, stacked once, and the
    weights S (b, 1, R_U): w_k of row i on expert k's rows, 0 elsewhere, so that row i's
    merge is ΔW_i = B_U diag(S_i) A_U.

    ``experts`` are the union's experts in id order and ``row_weights[i]`` maps positions in
    it to row i's weights. Returns (A_U (L, R_U, d_in), B_Uᵀ (L, R_U, d_out), S), or None if
    no expert of the union adapts the group.
    """
    members = [j for j, e in enumerate(experts) if e.A[group] is not None]
    if not members:
        return None
    spans, offset = {}, 0
    for j in members:
        spans[j] = (offset, offset + experts[j].rank(group))
        offset = spans[j][1]
    A = torch.cat([experts[j].A[group] for j in members], dim=1)
    B_t = torch.cat([experts[j].B_t[group] for j in members], dim=1)
    S = torch.zeros(len(row_weights), 1, offset)
    for i, weights in enumerate(row_weights):
        for j, w in weights.items():
            if j in spans:
                S[i, 0, slice(*spans[j])] = w
    return A, B_t, S
