"""The quality gate's measurements at the end of a build (:mod:`ttmm.quality_gate`).

Each expert's training already scored its own validation chunks before and after training
(``val_before`` / ``val_after`` of its training record). A fresh LoRA starts with B = 0, so its
``val_before`` is the base model's loss; a branched expert starts from the fine-tuning adapter,
so its ``val_before`` is that adapter's; an expert retrained by ``ttmm update`` starts from its
previous version. What the records lack is measured here, one pass over the validation chunks
each: the base model's loss (experts that did not start fresh) and the fine-tuning adapter's
(unless the experts started from it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ttmm.adapter import LoraAdapter
from ttmm.build.executors import TrainJob
from ttmm.build.train import mean_nll
from ttmm.merge import ExpertMerger
from ttmm.quality_gate import ExpertHealth
from ttmm.routing import RoutingPlan


@torch.no_grad()
def adapter_losses(
    model: torch.nn.Module,
    adapter: LoraAdapter | None,
    validation: Sequence[Sequence[Sequence[int]]],
    pad_token_id: int,
    max_seq_len: int,
) -> list[float | None]:
    """Mean NLL per token of ``model`` (with ``adapter`` folded in, or bare) on each list of
    chunks of ``validation``; the weights are bitwise restored after."""

    def losses() -> list[float | None]:
        return [mean_nll(model, chunks, pad_token_id, max_seq_len) for chunks in validation]

    was_training = model.training
    model.eval()
    try:
        if adapter is None:
            return losses()
        with ExpertMerger(model, [adapter], memory="swap").fold(RoutingPlan.explicit({0: 1.0})):
            return losses()
    finally:
        model.train(was_training)


def expert_health(
    model: torch.nn.Module,
    experts: list[TrainJob],
    records: dict[int, dict],
    finetune: LoraAdapter | None,
    from_finetune: bool = False,
) -> list[ExpertHealth]:
    """Per expert job, its validation losses against the base model and ``finetune``.
    ``from_finetune``: every expert started from ``finetune`` (a branched build)."""
    if not experts:
        return []
    pad, max_len = experts[0].pad_token_id, experts[0].config.max_seq_len
    validation = [job.validation for job in experts]
    fresh = not from_finetune and all(job.init is None for job in experts)
    measured_base = None if fresh else adapter_losses(model, None, validation, pad, max_len)
    measured_finetune = (
        adapter_losses(model, finetune, validation, pad, max_len)
        if finetune is not None and not from_finetune
        else None
    )
    health = []
    for i, job in enumerate(experts):
        record = records[job.id]
        before = record.get("val_before")
        base = measured_base[i] if measured_base is not None else before
        tuned = measured_finetune[i] if measured_finetune is not None else None
        if from_finetune and finetune is not None:
            tuned = before  # a branched expert starts at the fine-tuning adapter
        health.append(ExpertHealth(len(job.validation), record.get("val_after"), base, tuned))
    return health
