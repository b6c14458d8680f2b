"""The evaluated methods of design notes §2 (baselines), registered by name.

The base model; the fine-tuning adapter; TTMM merging with the top 1, 3 and 10 experts and
with the bank's default (threshold) rule; TTMM ensembling of the top 3 and 10 experts; TTT-NN.
How each one adapts to a prompt is :class:`ttmm.eval.harness.MethodRunner`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass


class EvalError(ValueError):
    """An evaluation setting or bank that cannot be evaluated, with the fix."""


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated method: how it adapts to a prompt, and its row label in the table."""

    name: str
    kind: str
    """``base``, ``finetune``, ``merge``, ``ensemble`` or ``ttt``."""
    label: str
    top_n: int | None = None
    """Route to the n most similar experts (``top_n`` rule); None = the bank's default rule."""


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("base", "base", "base"),
        MethodSpec("finetune", "finetune", "fine-tuning"),
        MethodSpec("top1", "merge", "TTMM, 1 expert", top_n=1),
        MethodSpec("top3", "merge", "TTMM, 3 experts, merged", top_n=3),
        MethodSpec("top10", "merge", "TTMM, 10 experts, merged", top_n=10),
        MethodSpec("ttmm", "merge", "TTMM, default rule, merged"),
        MethodSpec("ensemble3", "ensemble", "TTMM, 3 experts, ensembled", top_n=3),
        MethodSpec("ensemble10", "ensemble", "TTMM, 10 experts, ensembled", top_n=10),
        MethodSpec("ttt", "ttt", "TTT"),
    )
}
