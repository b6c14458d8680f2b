"""Fold or low-rank: the mode ``auto`` chooses by predicted cost, as dLoRA does (issue 11).

A fold pays once per merge: one pass over the adapted weights and the products B'A'
(2 R d_out d_in FLOPs per layer, R = Σ r_k). Low-rank pays on every forward call: a fixed cost
per adapted layer (hooks, small kernels) and x A'ᵀ B'ᵀ (2 R (d_in + d_out) FLOPs per layer per
token position). A long generation amortises the fold; a short one, or a short text to score,
does not. A batch that mixes merges cannot fold one merge for all its rows: it runs low-rank.

The constants of both costs were measured on one machine and live in :data:`MEASURED_COSTS`,
by device type, the weights' dtype and the dtype the factors are multiplied in (``lora_dtype``:
bfloat16 products make the fold about twice as fast on a CPU with AVX512-BF16, but not
low-rank's small ones; each pair of dtypes runs its own code path);
re-measure them with

    .venv/bin/python benchmarks/merge_overhead.py --calibrate

which prints the :class:`ModeCosts` to paste here. A device type and dtype without
measurements keep the rule ``auto`` had before: fold whenever the whole batch shares one merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ttmm.device import dtype_name


@dataclass(frozen=True)
class ModeCosts:
    """Seconds per unit of work of each mode, measured on one machine (see module docstring)."""

    fold_seconds_per_weight: float
    """Fold + restore, per adapted weight element: the pass that writes W + B'A'."""
    fold_seconds_per_flop: float
    """Fold, per FLOP of the products B'A'."""
    lowrank_seconds_per_layer_call: float
    """Low-rank, per adapted layer per forward call: the hook's fixed cost."""
    lowrank_seconds_per_flop: float
    """Low-rank, per FLOP of x A'ᵀ B'ᵀ."""

    def __post_init__(self):
        for name, value in vars(self).items():
            if not value >= 0:
                raise ValueError(f"ModeCosts.{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class AdaptedShape:
    """The sizes of a model's adapted linear layers that the costs scale with."""

    layers: int
    """Adapted linear layers."""
    weights: int
    """Σ d_out d_in over those layers."""
    fan_sum: int
    """Σ (d_in + d_out) over those layers."""


@dataclass(frozen=True)
class Workload:
    """What a block runs on the merged model."""

    forward_calls: int
    """Forward passes: n for a generation of n tokens, 1 to score a batch."""
    token_rows: int
    """Token positions those passes process, summed over calls and batch rows."""

    @classmethod
    def generation(cls, rows: int, prompt_tokens: int, new_tokens: int) -> Workload:
        """A prefill of the prompt, then one call per further new token (KV cache)."""
        return cls(new_tokens, rows * (prompt_tokens + new_tokens - 1))

    @classmethod
    def scoring(cls, rows: int, tokens: int) -> Workload:
        return cls(1, rows * tokens)


MEASURED_COSTS: dict[tuple[str, str, str], ModeCosts] = {
    # benchmarks/merge_overhead.py --repeats 7 --threads 2, 2026-11-29 14:35 UTC: 2-core AMD
    # EPYC (AVX-512, AVX512-BF16), torch 2.13, SmolLM2-135M fp32, the machine otherwise idle.
    # float32 factors: crossover 6, 8 and 17 new tokens at 1, 3 and 10 experts
    ("cpu", "float32", "float32"): ModeCosts(
        fold_seconds_per_weight=2.5569e-10,
        fold_seconds_per_flop=5.9066e-12,
        lowrank_seconds_per_layer_call=3.1132e-05,
        lowrank_seconds_per_flop=6.5612e-12,
    ),
    # bfloat16 factors over the float32 model (lora_dtype): the fold's products 3.4x cheaper a
    # FLOP, low-rank's small products dearer a call; crossover 3, 3 and 4 new tokens
    ("cpu", "float32", "bfloat16"): ModeCosts(
        fold_seconds_per_weight=3.0433e-10,
        fold_seconds_per_flop=1.7152e-12,
        lowrank_seconds_per_layer_call=7.5660e-05,
        lowrank_seconds_per_flop=4.4455e-12,
    ),
}


def measured_costs(
    device: torch.device, weights_dtype: torch.dtype, lora_dtype: torch.dtype
) -> ModeCosts | None:
    """The measured constants for ``device``'s type, weights in ``weights_dtype`` and factors
    multiplied in ``lora_dtype``, or None where none were measured."""
    return MEASURED_COSTS.get((device.type, dtype_name(weights_dtype), dtype_name(lora_dtype)))


def fold_seconds(rank: int, shape: AdaptedShape, costs: ModeCosts) -> float:
    """Predicted fold + restore time of a merge of rank ``rank``."""
    return shape.weights * (costs.fold_seconds_per_weight + 2 * rank * costs.fold_seconds_per_flop)


def lowrank_seconds(rank: int, work: Workload, shape: AdaptedShape, costs: ModeCosts) -> float:
    """Predicted extra time of running ``work`` with low-rank hooks of rank ``rank``."""
    calls = work.forward_calls * shape.layers * costs.lowrank_seconds_per_layer_call
    flops = 2 * rank * shape.fan_sum * work.token_rows
    return calls + flops * costs.lowrank_seconds_per_flop


def choose_mode(
    merges: int, rank: int, work: Workload | None, shape: AdaptedShape, costs: ModeCosts | None
) -> str:
    """``"fold"`` or ``"lowrank"`` for a batch holding ``merges`` distinct non-base merges.

    ``rank`` is the shared merge's Σ r_k. Without a workload or measured costs, one merge
    folds (the choice before costs were measured).
    """
    if merges != 1:
        return "lowrank"
    if work is None or costs is None:
        return "fold"
    fold = fold_seconds(rank, shape, costs)
    return "fold" if fold <= lowrank_seconds(rank, work, shape, costs) else "lowrank"


def crossover_tokens(
    rank: int, shape: AdaptedShape, costs: ModeCosts, prompt_tokens: int = 50, rows: int = 1
) -> int | None:
    """The fewest new tokens from which one shared merge folds (None: never up to 100,000)."""
    for new_tokens in range(1, 100_001):
        work = Workload.generation(rows, prompt_tokens, new_tokens)
        if choose_mode(1, rank, work, shape, costs) == "fold":
            return new_tokens
    return None
