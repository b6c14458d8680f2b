"""The two arms of a rollout as merge policies over the one base model (issue 19).

Neither arm is a second model. The engine that serves a rollout holds one merger over the base
model with the candidate bank's K experts (ids 0..K−1) followed by the control's adapters
(ids K, K+1, ...): the fine-tuning adapter or a PEFT adapter (one id), or another bank's experts
(its K' ids, routed over that bank's own centroids). Each arm turns a request's routing query
into a :class:`~ttmm.serve.batching.MergeRequest` over that merger, so rows of both arms share
batches (different merges run side by side in low-rank mode) and memory is the base model plus
the adapters.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ttmm.adapter import AdapterError, LoraAdapter, load_adapter
from ttmm.bank import Bank, BankError
from ttmm.expert_cache import MB, CacheBudgetError
from ttmm.expert_source import ExpertSource
from ttmm.model import TTMM, InputError
from ttmm.routing import RoutingConfig, RoutingError, RoutingPlan, route_enabled
from ttmm.serve.batching import MergeRequest
from ttmm.serve.rollout.config import RolloutConfig, RolloutConfigError

logger = logging.getLogger(__name__)


def shifted(plan: RoutingPlan, offset: int) -> RoutingPlan:
    """``plan`` with every expert id moved by ``offset`` (into or out of the merger's ids)."""
    return replace(
        plan,
        expert_ids=tuple(k + offset for k in plan.expert_ids),
        skipped=tuple(k + offset for k in plan.skipped),
    )


@dataclass(frozen=True, eq=False)
class BankRouter:
    """Routes queries over another bank's centroids, to that bank's experts' ids in the
    rollout engine's merger (its own ids plus ``offset``)."""

    engine: TTMM
    """For the tokenizer (the routing prefix) and the encoder."""
    bank: Bank
    offset: int

    def route(self, texts: Sequence[str], routing: RoutingConfig) -> list[RoutingPlan]:
        queries = self.engine.query_texts(texts, routing)
        q = torch.from_numpy(self.engine.encoder.encode(queries))  # (n, dim)
        z = q @ self.bank.centroids.T  # (n, K')
        disabled = self.bank.disabled
        return [shifted(route_enabled(row, routing, disabled), self.offset) for row in z]


class Arms:
    """The rollout's engine and what each arm merges (see the module doc)."""

    def __init__(
        self,
        engine: TTMM,
        config: RolloutConfig,
        control_bank: Bank | None = None,
        control_routing: RoutingConfig | None = None,
    ):
        self.engine, self.config = engine, config
        self.offset = engine.bank.num_experts
        """The control's first id in the merger."""
        self.control_bank = control_bank
        self._router = (
            BankRouter(engine, control_bank, self.offset) if control_bank is not None else None
        )
        self._control_routing = control_routing

    @classmethod
    def load(
        cls,
        config: RolloutConfig,
        model: torch.nn.Module,
        tokenizer,
        encoder,
        memory: str = "auto",
        lora_dtype: str | torch.dtype | None = "auto",
        candidate: Bank | None = None,
        adapter_cache_mb: float | None = None,
    ) -> Arms:
        """Read both arms' banks and adapters and build the engine over ``model``; every
        mistake (a missing bank, a bank of another base model, no fine-tuning adapter) is a
        :class:`RolloutConfigError` naming the arm. ``candidate``: the candidate's bank,
        when the caller has already loaded it. ``adapter_cache_mb`` bounds the experts of
        both banks held in memory (one cache; see :mod:`ttmm.expert_cache`)."""
        if candidate is None:
            candidate = load_bank(config.candidate.bank, "candidate.bank")
        try:
            candidate.check_compatible(model, encoder.dim)
        except BankError as err:
            raise RolloutConfigError(f"candidate.bank: {err}") from None
        control = config.control
        control_bank, extra = None, []
        if control.kind == "finetune":
            source = candidate
            if control.bank is not None and Path(control.bank) != Path(config.candidate.bank):
                source = load_bank(control.bank, "control.bank")
            adapter = source.finetune_adapter()
            if adapter is None:
                raise RolloutConfigError(
                    f"control.kind=finetune: the bank {source.path} has no fine-tuning adapter; "
                    "rebuild it with --with-finetune, or choose another control"
                )
            extra = [adapter]
        elif control.kind == "adapter":
            extra = [_load_adapter(control.path)]
        elif control.kind == "bank":
            control_bank = load_bank(control.bank, "control.bank")
            try:
                control_bank.check_compatible(model, encoder.dim)
            except BankError as err:
                raise RolloutConfigError(f"control.bank: {err}") from None
            _check_same_encoder(candidate, control_bank)
            extra = ExpertSource.from_bank(control_bank)  # read on use, like the candidate's
        try:
            engine = TTMM(
                model, tokenizer, encoder, candidate, memory=memory, lora_dtype=lora_dtype,
                extra_adapters=extra, adapter_cache_mb=adapter_cache_mb,
            )  # fmt: skip
        except (InputError, CacheBudgetError) as err:  # a cache budget too small for a merge
            raise RolloutConfigError(f"adapter_cache_mb: {err}") from None
        except Exception as err:  # an adapter that does not fit the base model's layers
            raise RolloutConfigError(f"control: {err}") from None
        try:
            if config.candidate.routing:
                engine.routing = engine.routing_for(**config.candidate.routing)
            control_routing = None
            if control_bank is not None:
                control_routing = control_bank.routing.replace(**(control.routing or {}))
        except (RoutingError, TypeError) as err:
            raise RolloutConfigError(f"routing: {err}") from None
        _check_cache_fits(engine, adapter_cache_mb, control_routing)
        return cls(engine, config, control_bank, control_routing)

    @property
    def score_prefix(self) -> int:
        """P: the online quality scores a prompt's tokens after the routing prefix."""
        return self.engine.routing.prefix_tokens

    def merge(self, arm: str, query: str) -> MergeRequest:
        """What ``arm`` merges for a request routed on ``query``."""
        if arm == "candidate":
            return MergeRequest(query=query, routing=self.engine.routing)
        kind = self.config.control.kind
        if kind == "base":
            return MergeRequest(plan=RoutingPlan.base())
        if kind == "bank":
            return MergeRequest(query=query, routing=self._control_routing, router=self._router)
        return MergeRequest(plan=RoutingPlan(expert_ids=(self.offset,), weights=(1.0,), rule=kind))

    def describe(self, arm: str, plan: RoutingPlan) -> dict:
        """The plan a response reports, in the serving arm's own terms, with the arm."""
        if arm == "candidate" or (plan.is_base and self.config.control.kind == "base"):
            described = self.engine.bank.describe_plan(plan)
        elif self.control_bank is not None:
            described = self.control_bank.describe_plan(shifted(plan, -self.offset))
        else:
            source = self.config.control.path or "fine-tuning"
            described = {"rule": plan.rule, "fallback": None, "experts": [], "adapter": source}
        return described | {"arm": arm}


def _check_cache_fits(
    engine: TTMM, adapter_cache_mb: float | None, control_routing: RoutingConfig | None
) -> None:
    """The engine checked that its cache holds one candidate merge; the control's must fit too."""
    if adapter_cache_mb is None or control_routing is None:
        return
    needed = engine.merger.smallest_cache_bytes(control_routing.max_active)
    if needed > engine.merger.experts.budget_bytes:
        raise RolloutConfigError(
            f"adapter_cache_mb: {adapter_cache_mb:g} MB cannot hold one merge of the control "
            f"bank (up to {control_routing.max_active} experts, {needed / MB:.1f} MB); give "
            f"--adapter-cache-mb {-(-needed // MB)} or more"
        )


def load_bank(path: str, field: str) -> Bank:
    try:
        return Bank.load(path)
    except BankError as err:
        raise RolloutConfigError(f"{field}: {err}") from None


def _load_adapter(path: str) -> LoraAdapter:
    try:
        return load_adapter(path)
    except AdapterError as err:
        raise RolloutConfigError(f"control.path: {err}") from None


def _check_same_encoder(candidate: Bank, control: Bank) -> None:
    ours, theirs = candidate.manifest.encoder, control.manifest.encoder
    if ours.get("name") != theirs.get("name") or ours.get("dim") != theirs.get("dim"):
        raise RolloutConfigError(
            f"control.bank routes with the encoder {theirs.get('name')!r}, the candidate with "
            f"{ours.get('name')!r}: a rollout loads one encoder; rebuild one bank with the other's"
        )
