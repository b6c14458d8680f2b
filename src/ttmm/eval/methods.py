"""The evaluated methods of design notes §2 (baselines) and §7 (hybrid), registered by name.

The base model; the fine-tuning adapter; TTMM merging with the top 1, 3 and 10 experts and
with the bank's default (threshold) rule; TTMM ensembling of the top 3 and 10 experts; TTT-NN
with a LoRA and with all weights; and the hybrid TTMM->TTT (the top-10 merge folded in, then
TTT-NN from it with 5 or 20 neighbours). How each one adapts to a prompt is
:class:`ttmm.eval.harness.MethodRunner`'s job.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class EvalError(ValueError):
    """An evaluation setting or bank that cannot be evaluated, with the fix."""


SUBSETS = ("all", "ttt", "ttt_full")
"""Which of a domain's evaluation documents a method scores: all ``EvalConfig.docs``, the first
``ttt_docs`` or the first ``ttt_full_docs`` of them (same seeded order, so comparisons pair)."""


@dataclass(frozen=True)
class MethodSpec:
    """One evaluated method: how it adapts to a prompt, and its row label in the table."""

    name: str
    kind: str
    """``base``, ``finetune``, ``merge``, ``ensemble``, ``ttt`` or ``hybrid``."""
    label: str
    top_n: int | None = None
    """Route to the n most similar experts (``top_n`` rule); None = the bank's default rule."""
    neighbours: int | None = None
    """TTT and hybrid: training chunks retrieved; None = ``TTTConfig.neighbours``."""
    weights: str | None = None
    """TTT: ``lora`` or ``all`` (all parameters); None = ``TTTConfig.weights``."""
    subset: str = "all"
    """The documents it scores, one of :data:`SUBSETS`."""
    continued: bool = False
    """Fine-tuning: the bank's equal-compute continuation of the adapter
    (``finetune_continued/``, made by ``ttmm build --continue-finetune``)."""

    def to_dict(self) -> dict:
        return asdict(self)


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("base", "base", "base"),
        MethodSpec("finetune", "finetune", "fine-tuning"),
        MethodSpec("finetune_continued", "finetune", "fine-tuning, equal compute", continued=True),
        MethodSpec("top1", "merge", "TTMM, 1 expert", top_n=1),
        MethodSpec("top3", "merge", "TTMM, 3 experts, merged", top_n=3),
        MethodSpec("top10", "merge", "TTMM, 10 experts, merged", top_n=10),
        MethodSpec("ttmm", "merge", "TTMM, default rule, merged"),
        MethodSpec("ensemble3", "ensemble", "TTMM, 3 experts, ensembled", top_n=3),
        MethodSpec("ensemble10", "ensemble", "TTMM, 10 experts, ensembled", top_n=10),
        MethodSpec("ttt", "ttt", "TTT", subset="ttt"),
        MethodSpec("ttt_full", "ttt", "TTT, all weights", weights="all", subset="ttt_full"),
        MethodSpec("hybrid5", "hybrid", "TTMM-10 -> TTT, 5 nb.", 10, 5, subset="ttt"),
        MethodSpec("hybrid20", "hybrid", "TTMM-10 -> TTT, 20 nb.", 10, 20, subset="ttt"),
    )
}

REFERENCES = ("base", "finetune", "ttt")
"""Methods every other method is compared with (difference, interval, win rate)."""
