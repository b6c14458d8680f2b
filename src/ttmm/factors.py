"""The factor algebra of a merge (design notes §2, step 3): which rows of the stacked
experts a plan picks, with which scale, and the merged factors A', B' they give.

Every layer's experts are stacked on rows, one row per rank: ``A_all`` (Σ_all r, d_in) and
``B_t_all`` (Σ_all r, d_out), B transposed. A plan's merge is then a row gather and one
product; :func:`merged_factors` is the only place the merge formula is written. The fold
(:mod:`ttmm.fold`) and the low-rank hooks (:mod:`ttmm.lowrank`) both start from here.
"""

from __future__ import annotations

import torch

from ttmm.routing import RoutingPlan


class MergeError(ValueError):
    """Adapters that do not fit the model, or a plan that cannot be executed."""


def merged_factors(
    A_stack: torch.Tensor, B_t_stack: torch.Tensor, rows: torch.Tensor, row_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A' = [w_k s_k A_k] on rows, B' = [B_k] on columns, so that B'A' = Σ w_k s_k B_k A_k.

    The stacks hold every expert's factors with one row per rank, so picking experts is a
    contiguous row gather: ``A_stack`` (…, Σ_all r, d_in) and ``B_t_stack`` (…, Σ_all r, d_out),
    i.e. B transposed, with optional leading layer dimensions. ``rows`` picks the chosen
    experts' rows (Σr,) and ``row_scale`` (Σr,) is w_k s_k on each of expert k's rows. Returns
    A' (…, Σr, d_in) and B' (…, d_out, Σr), the latter a transposed view of a contiguous
    (…, Σr, d_out) tensor.
    """
    A = gather_rows(A_stack, rows) * row_scale.unsqueeze(-1)  # (…, Σr, d_in)
    B_t = gather_rows(B_t_stack, rows)  # (…, Σr, d_out)
    return A, B_t.transpose(-1, -2)


def gather_rows(stack: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``stack[..., rows, :]``, without a copy when ``rows`` is every row in order.

    ``rows`` stays on the CPU (the check costs no device sync); it moves to the stack's device
    only for the gather.
    """
    rows = rows.cpu()
    if len(rows) == stack.shape[-2] and bool((rows == torch.arange(len(rows))).all()):
        return stack
    return stack.index_select(stack.ndim - 2, rows.to(stack.device))


def row_selection(
    spans: dict[int, tuple[int, int]], scales: dict[int, float], plan: RoutingPlan
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows of the plan's experts in stacked factors, and w_k s_k for each row (None if
    no expert of the plan is among ``spans``)."""
    chosen = [(k, w) for k, w in zip(plan.expert_ids, plan.weights) if k in spans]
    if not chosen:
        return None
    rows = torch.cat([torch.arange(*spans[k]) for k, _ in chosen])
    row_scale = torch.cat(
        [torch.full((spans[k][1] - spans[k][0],), w * scales[k]) for k, w in chosen]
    )
    return rows, row_scale


def union_selection(
    selections: list[tuple[torch.Tensor, torch.Tensor] | None],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The rows U of all experts any batch row uses, and S (b, 1, |U|): w_k s_k on row i's
    experts' rows and 0 elsewhere, so that row i's merge is ΔW_i = B_U diag(S_i) A_U.

    None if no row adapts the layout.
    """
    chosen = [sel for sel in selections if sel is not None]
    if not chosen:
        return None
    union = torch.unique(torch.cat([rows for rows, _ in chosen]))  # sorted rows of U
    S = torch.zeros(len(selections), 1, len(union))  # (b, 1, R_U)
    for i, sel in enumerate(selections):
        if sel is not None:
            rows, row_scale = sel
            S[i, 0, torch.searchsorted(union, rows)] = row_scale
    return union, S
