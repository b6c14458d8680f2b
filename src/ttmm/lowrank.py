"""Low-rank execution of merges: forward hooks that add x A'ᵀ B'ᵀ to a linear layer's output,
the weights never written (the other way to run a merge is the fold, :mod:`ttmm.fold`).

One merge for the whole batch uses :func:`shared_hook`; a batch whose rows carry different
merges uses :func:`per_row_hook`, which reads the union of the rows' experts once per forward
(ΔW_i = B_U diag(S_i) A_U, see :func:`ttmm.factors.union_group`).
"""

from __future__ import annotations

import torch

from ttmm.factors import MergeError


def add_lowrank(output: torch.Tensor, z: torch.Tensor, B_t: torch.Tensor) -> torch.Tensor:
    """output + z B_t, in place when no gradient is recorded (one fused addmm).

    Factors in another dtype than the layer's output (``lora_dtype``) multiply in theirs and
    the product is added in the output's dtype.
    """
    if torch.is_grad_enabled():  # the sum stays in the output's dtype, as in the in-place path
        return output + (z @ B_t).to(output.dtype).reshape(output.shape)
    flat = output.view(-1, output.shape[-1])
    if B_t.dtype != output.dtype:
        flat.add_(z.reshape(-1, z.shape[-1]) @ B_t)
    else:
        flat.addmm_(z.reshape(-1, z.shape[-1]), B_t)
    return output


def shared_hook(A: torch.Tensor, B_t: torch.Tensor):
    """Forward hook adding x A'ᵀ B'ᵀ, the same merge for every row: A' (R, d_in) and
    B'ᵀ (R, d_out), one layer of a :class:`~ttmm.factors.GroupFactors`."""
    A_t = A.T  # (d_in, R) view

    def hook(module, inputs, output):
        return add_lowrank(output, inputs[0].to(A_t.dtype) @ A_t, B_t)

    return hook


def per_row_hook(A_U: torch.Tensor, B_U_t: torch.Tensor, S: torch.Tensor):
    """Forward hook giving row i of the batch its own merge ΔW_i = B_U diag(S_i) A_U.

    A_U (R_U, d_in) and B_Uᵀ (R_U, d_out) are the union of the rows' experts (one layer of
    :func:`ttmm.factors.union_group`), read once per forward whatever the batch size, instead
    of one A', B' pair per row (the merge formula with the weights moved between A and B).
    """
    A_t = A_U.T  # (d_in, R_U) view
    S = S.to(A_t.device, A_t.dtype)  # built on the CPU
    batch = S.shape[0]

    def hook(module, inputs, output):
        x = inputs[0]
        if x.shape[0] != batch:
            raise MergeError(
                f"low-rank merge was set up for a batch of {batch} rows but got {x.shape[0]}"
            )
        z = x.to(A_t.dtype).reshape(batch, -1, A_t.shape[0]) @ A_t  # (b, s, R_U)
        return add_lowrank(output, z.mul_(S), B_U_t)

    return hook
