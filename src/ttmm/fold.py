"""Where a fold writes the merged weights, and the batched product that writes them (issue 11).

:meth:`ttmm.merge.ExpertMerger.fold` computes W' = W + B'A' for every adapted weight into an
output tensor and swaps that output into the parameter (``weight.data = output``). The original
tensor is set aside, never written, and swapped back on exit: the restore is bitwise exact and
free. The memory policy says where the outputs come from:

- ``buffer``: one weight-sized buffer per adapted weight, allocated at the merger's first fold
  and kept. A fold then writes memory that is already mapped. At rest the merger holds one copy
  of the adapted weights, as the paper's reference code does (it keeps a copy of the originals
  to restore from).
- ``swap``: fresh outputs at every fold, freed on exit, so nothing is kept at rest. On a CPU each
  fold pays for new pages: the allocator returns large blocks to the kernel on free, and the
  kernel maps and zeroes them again at the next fold.

``auto`` (:func:`default_memory`) chooses ``buffer`` on a CPU when the adapted weights take at
most :data:`BUFFER_MAX_RAM_FRACTION` of the machine's memory, and ``swap`` otherwise. It also
chooses ``swap`` on accelerators: their caching allocators hand the same blocks back at every
fold, so a fresh output costs what a kept one does, and accelerator memory is better spent on
the KV cache and larger batches.

Buffers belong to one merger: two mergers over one model never share an output.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

MEMORY_POLICIES = ("auto", "buffer", "swap")

BUFFER_MAX_RAM_FRACTION = 0.25
"""``auto`` keeps buffers on a CPU only while the adapted weights take at most this fraction of
physical memory: the buffers double them, and the rest of the machine needs room too."""


def physical_memory_bytes() -> int | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_memory(adapted_bytes: int, device: torch.device, ram_bytes: int | None = None) -> str:
    """The ``auto`` memory policy for adapted weights of ``adapted_bytes`` on ``device``.

    ``ram_bytes`` defaults to the machine's physical memory (see the module docstring for why).
    """
    if device.type != "cpu":
        return "swap"
    ram_bytes = physical_memory_bytes() if ram_bytes is None else ram_bytes
    if ram_bytes is None or adapted_bytes > BUFFER_MAX_RAM_FRACTION * ram_bytes:
        return "swap"
    return "buffer"


@dataclass(eq=False)
class FoldGroup:
    """Adapted layers of one weight shape, folded by one batched product; every expert's
    factors are laid out by these groups (:class:`ttmm.factors.ExpertFactors`)."""

    names: list[str]
    modules: list[nn.Module]
    transposed: bool  # Conv1D: the weights are (d_in, d_out)
    d_in: int
    d_out: int


class FoldOutputs:
    """The outputs a fold writes merged weights into, per group of layers, for one policy."""

    def __init__(self, policy: str):
        if policy not in ("buffer", "swap"):
            raise ValueError(f"memory policy {policy!r} is not 'buffer' or 'swap'")
        self.policy = policy
        self._kept: dict[int, torch.Tensor] = {}

    def get(self, group: int, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """An output of ``shape`` for group number ``group``: its kept buffer, or a fresh one."""
        if self.policy == "swap":
            return torch.empty(shape, dtype=like.dtype, device=like.device)
        out = self._kept.get(group)
        if out is None:
            out = self._kept[group] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held at rest: the kept buffers (always 0 under ``swap``)."""
        return sum(t.numel() * t.element_size() for t in self._kept.values())

    def release(self) -> None:
        """Drop the kept buffers; the next fold allocates them again."""
        self._kept.clear()


def fold_product(
    out: torch.Tensor,
    weights: Sequence[torch.Tensor],
    A: torch.Tensor,
    B: torch.Tensor,
    transposed: bool,
) -> None:
    """out[i] = W_i + B'_i A'_i for the L layers of a group, one batched product for all.

    ``out`` (L, *W.shape); ``A`` (L, Σr, d_in); ``B`` (L, d_out, Σr). A Conv1D weight is
    (d_in, d_out), so it gets (B'A')ᵀ = A'ᵀ B'ᵀ. The weights are only read.

    Factors in another dtype than the weights (``lora_dtype``) are multiplied in theirs, one
    layer at a time into a layer-sized scratch that stays in cache, and added to W in W's
    dtype: the products run at the factors' GEMM rate and only the update is rounded.
    """
    if A.dtype != out.dtype:
        scratch = torch.empty(out.shape[1:], dtype=A.dtype, device=A.device)
        for i, weight in enumerate(weights):
            first, second = (A[i].T, B[i].T) if transposed else (B[i], A[i])
            torch.mm(first, second, out=scratch)
            torch.add(weight, scratch, out=out[i])
        return
    if len(weights) == 1:  # one layer: a plain addmm, no stacking
        first, second = (A[0].T, B[0].T) if transposed else (B[0], A[0])
        torch.addmm(weights[0], first, second, out=out[0])
        return
    for i, weight in enumerate(weights):
        out[i].copy_(weight)
    if transposed:
        out.baddbmm_(A.transpose(1, 2), B.transpose(1, 2))
    else:
        out.baddbmm_(B, A)
