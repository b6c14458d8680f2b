"""The rollout inside a server: assign each request an arm, measure it, swap candidates.

:class:`RolloutService` is what the completion endpoints call: :meth:`assign` picks the arm
of a request (sticky per user), :meth:`rows` says what its rows merge, score and shadow-score,
and :meth:`finish` turns the finished request into metrics and an observation for the policy
(which may promote or roll back on it). :meth:`swap` loads a new candidate bank beside the
running one: requests already assigned keep the engine they were planned on, new ones get the
new engine, and the rollout restarts from its first step.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from ttmm.serve.batching import Served
from ttmm.serve.rollout.arms import Arms
from ttmm.serve.rollout.config import RolloutConfig
from ttmm.serve.rollout.metrics import RolloutMetrics
from ttmm.serve.rollout.policy import Decision, Observation, fingerprint
from ttmm.serve.rollout.store import RolloutController, Ticket

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Assigned:
    """One request's place in the rollout, and the arms it runs on."""

    ticket: Ticket
    arms: Arms
    """The arms (and engine) of the rollout when the request arrived."""

    @property
    def arm(self) -> str:
        return self.ticket.arm

    @property
    def other(self) -> str:
        return "control" if self.arm == "candidate" else "candidate"


class RolloutService:
    def __init__(
        self,
        controller: RolloutController,
        arms: Arms,
        loader: Callable[[RolloutConfig], Arms],
    ):
        """``loader`` builds the arms of a configuration over the server's base model (for
        hot swaps)."""
        self.controller, self.arms, self.loader = controller, arms, loader
        self.metrics = RolloutMetrics(CollectorRegistry())
        self._swapping = asyncio.Lock()
        self.on_swap: Callable[[Arms], None] = lambda arms: None
        """Called with the new arms after a swap (the app points its engine at them)."""
        self._publish()

    @classmethod
    def over(
        cls,
        config: RolloutConfig,
        model,
        tokenizer,
        encoder,
        lora_dtype: str = "auto",
        controller=None,
        candidate=None,
        adapter_cache_mb: float | None = None,
    ) -> RolloutService:
        """The rollout of ``config`` over a loaded base model, tokenizer and encoder: both arms
        (the candidate's bank may be given, already loaded), the rollout's own controller
        unless ``controller`` is given, and a loader that builds the arms of a hot swap;
        ``adapter_cache_mb`` bounds the experts held in memory (None: all of them)."""
        options = {"lora_dtype": lora_dtype, "adapter_cache_mb": adapter_cache_mb}

        def loader(config: RolloutConfig) -> Arms:
            return Arms.load(config, model, tokenizer, encoder, **options)

        arms = Arms.load(config, model, tokenizer, encoder, candidate=candidate, **options)
        return cls(controller or RolloutController(config), arms, loader)

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """Register the rollout's metrics in the server's registry (its /metrics)."""
        self.metrics = RolloutMetrics(registry)
        self._publish()

    # -- serving ---------------------------------------------------------------------------

    @property
    def config(self) -> RolloutConfig:
        """The configuration of the arms this server runs."""
        return self.arms.config

    async def assign(self, key: str | None) -> Assigned:
        """The arm of a request with sticky ``key``. When the rollout has moved to another
        candidate than this server's (another replica swapped it), that one is loaded first."""
        ticket = await asyncio.to_thread(self.controller.assign, key)
        arms = self.arms
        if fingerprint(ticket.config) != fingerprint(arms.config):
            arms = await self.follow()
            ticket = await asyncio.to_thread(self.controller.assign, key)
        return Assigned(ticket, arms)

    async def follow(self) -> Arms:
        """Load the arms of the rollout's configuration if ours are older (another replica
        swapped the candidate); the arms."""
        async with self._swapping:
            config = await asyncio.to_thread(self.controller.current_config)
            if fingerprint(config) != fingerprint(self.arms.config):
                arms = await asyncio.to_thread(self.loader, config)
                self.arms = arms
                self.on_swap(arms)
                logger.info("following the rollout to candidate %s", config.candidate.bank)
            return self.arms

    def rows(
        self, assigned: Assigned, queries: Sequence[str], offsets: Sequence[int]
    ) -> list[dict]:
        """Per query: the ``merge`` of the serving arm and the batcher's row options (the
        engine, the scored prefix: the routing prefix after the ``offset`` tokens of the
        prompt before its routed text, and in shadow mode the other arm's merge)."""
        arms, ticket = assigned.arms, assigned.ticket
        shadow = ticket.measured and ticket.config.mode == "shadow"
        return [
            {
                "merge": arms.merge(assigned.arm, query),
                "engine": arms.engine,
                "score_prefix": offset + arms.score_prefix,
                "shadow": arms.merge(assigned.other, query) if shadow else None,
            }
            for query, offset in zip(queries, offsets)
        ]

    def finish(
        self,
        assigned: Assigned,
        served: Sequence[Served],
        latency_s: float,
        n: int = 1,
        error: bool = False,
        response_id: str | None = None,
    ) -> Decision | None:
        """Record a finished request: ``served`` holds its rows (``n`` samples of each
        prompt, in order), empty if it failed. Each prompt's quality counts once."""
        arm, m = assigned.arm, self.metrics
        m.requests.labels(arm=arm, outcome="error" if error else "success").inc()
        m.e2e.labels(arm=arm).observe(latency_s)
        firsts = served[::n]
        nll = _per_token([s.generation.prompt_nll for s in firsts])
        shadow = _per_token([s.shadow_nll for s in firsts])
        for s in served:
            self._observe_row(arm, assigned.other, s)
        if nll is not None:
            m.nll.labels(arm=arm, scored="served").observe(nll)
        if shadow is not None:
            m.nll.labels(arm=assigned.other, scored="shadow").observe(shadow)
        ticket = assigned.ticket
        observation = Observation(
            arm=arm,
            share=ticket.share,
            step=ticket.step,
            rollout_id=ticket.rollout_id,
            nll=None if error else nll,
            shadow_nll=None if error else shadow,
            latency_s=latency_s,
            error=error,
        )
        decision = self.controller.observe(observation, response_id)
        self._publish(decision)
        return decision

    def _observe_row(self, arm: str, other: str, served: Served) -> None:
        m, timing, result = self.metrics, served.timing, served.generation
        m.ttft.labels(arm=arm).observe(timing.route_s + timing.merge_s + timing.prefill_s)
        if result.completion_tokens > 1:
            m.itl.labels(arm=arm).observe(timing.decode_s / (result.completion_tokens - 1))
        if timing.decode_s > 0:
            m.tokens_per_second.labels(arm=arm).observe(result.completion_tokens / timing.decode_s)
        m.prompt_tokens.labels(arm=arm).inc(result.prompt_tokens)
        m.generation_tokens.labels(arm=arm).inc(result.completion_tokens)
        seconds = (timing.merge_s + timing.prefill_s + timing.decode_s) / served.rows
        m.observe_compute(arm, seconds, result.prompt_tokens + result.completion_tokens)
        if served.shadow_nll is not None:
            m.shadow_seconds.labels(arm=other).inc(served.shadow_s / served.rows)

    def _publish(self, decision: Decision | None = None) -> None:
        now = self.controller.snapshot()
        self.metrics.observe_status(now["share"], now["step"], now["quality"])
        if decision is not None:
            self.metrics.decisions.labels(action=decision.action).inc()

    # -- feedback and operators ------------------------------------------------------------

    def feedback(self, response_id: str, score: float) -> str | None:
        """Record ``score`` for the arm that served ``response_id`` (on any replica); that
        arm, or None if the id is unknown (too old, or never served by this rollout)."""
        arm = self.controller.feedback(response_id, score)
        if arm is not None:
            self.metrics.feedback.labels(arm=arm).observe(score)
        return arm

    def act(self, action: str, reason: str | None = None) -> Decision:
        decision = self.controller.act(action, reason)
        self._publish(decision)
        return decision

    async def swap(self, bank: str, routing: dict | None = None) -> Decision:
        """Load ``bank`` as the new candidate (in a worker thread, beside the running one),
        then restart the rollout and switch new requests to it; one swap at a time."""
        async with self._swapping:
            config = self.arms.config.with_candidate(bank, routing)
            arms = await asyncio.to_thread(self.loader, config)
            decision = await asyncio.to_thread(
                self.controller.restart, config, f"new candidate {bank}"
            )
            self.arms = arms  # requests assigned meanwhile wait on the lock in _follow
            self.on_swap(arms)
            self._publish(decision)
            logger.info("candidate swapped to %s", bank)
            return decision


def _per_token(scores: Sequence[tuple[float, int] | None]) -> float | None:
    """Total NLL over total tokens of the rows that were scored; None if no token was."""
    pairs = [s for s in scores if s is not None and s[1] > 0]
    tokens = sum(n for _, n in pairs)
    return sum(nll for nll, _ in pairs) / tokens if tokens else None


def start_rollout(
    config: RolloutConfig,
    base_model: str | None = None,
    encoder: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    lora_dtype: str = "auto",
    controller=None,
    adapter_cache_mb: float | None = None,
) -> RolloutService:
    """Load the base model (the candidate bank's, unless given) and the encoder once, both
    arms over them, and the stored state of this rollout (or start it); ``controller``
    replaces the rollout's own (a :class:`~ttmm.serve.rollout.remote.RemoteController`
    shared by Ray replicas, whose ``config`` is the actor's); ``adapter_cache_mb`` bounds the
    experts held in memory, of both arms together."""
    from ttmm.assets import load_base_model
    from ttmm.device import DEFAULT_DEVICE, resolve_device, resolve_dtype, resolve_lora_dtype
    from ttmm.embed import Encoder
    from ttmm.serve.rollout.arms import load_bank

    device = resolve_device(device or DEFAULT_DEVICE)
    dtype = resolve_dtype(dtype, device)
    resolve_lora_dtype(lora_dtype)
    candidate = load_bank(config.candidate.bank, "candidate.bank")  # fail before the model
    model, tokenizer = load_base_model(
        base_model or candidate.manifest.base_model["name"], dtype=dtype, device=device
    )
    encoder = Encoder(encoder or candidate.manifest.encoder["name"], device=device)
    return RolloutService.over(
        config, model, tokenizer, encoder, lora_dtype, controller, candidate, adapter_cache_mb
    )
