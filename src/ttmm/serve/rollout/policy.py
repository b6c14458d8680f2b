"""The rollout's state machine: steps, evidence, guardrails and decisions (issue 19).

Pure state and rules, no I/O: :class:`RolloutPolicy` takes one :class:`Observation` per
finished request and answers with a :class:`Decision` when one is due; :mod:`store` persists
its state and the decisions. Every decision carries the evidence it was taken on.

The rules, checked after every observation while the rollout runs:

Quality is acted on once ``min_evidence`` observations exist (the sequence is asymptotic).

1. **Roll back** at the first breach: the quality confidence sequence's lower bound above
   ``max_loss`` (the candidate is worse, with confidence), or, once both arms have
   ``min_latency_samples`` requests in the step, the candidate's p95 latency over control's
   above ``max_latency_ratio``, or its error rate above ``max_error_rate``.
2. **Promote** to the next step when the step has ``min_requests`` scored requests, the
   confidence sequence's upper bound is below ``−min_gain`` (the candidate is better, with
   confidence), and latency and errors were judged and hold. Reaching the last step
   completes the rollout.
3. **Inconclusive** after ``max_requests`` scored requests in a step: hold (wait for an
   operator) or roll back, as configured. Resuming a held step gives it ``max_requests``
   more.

The quality evidence spans the whole rollout, not one step: the confidence sequence
(:mod:`sequential`) is valid however often it is looked at, so evidence need not be
thrown away at a step change. Latency and errors are judged per step, since the load changes
with the share.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import asdict, dataclass, field

from ttmm.serve.rollout.config import RolloutConfig
from ttmm.serve.rollout.sequential import (
    Interval,
    RunningMoments,
    confidence_sequence,
    ipw_observation,
)

RUNNING, PAUSED, HELD, COMPLETE, ROLLED_BACK = (
    "running",
    "paused",
    "held",
    "complete",
    "rolled_back",
)
STATUSES = (RUNNING, PAUSED, HELD, COMPLETE, ROLLED_BACK)
MAX_LATENCIES = 1000
"""Latencies kept per arm and step (the most recent), for the p95."""


class RolloutStateError(ValueError):
    """An operator action the rollout's status does not allow, with what would."""


@dataclass(frozen=True)
class Observation:
    """One finished request, as the policy sees it."""

    arm: str
    """``control`` or ``candidate``: the arm that served it."""
    share: float
    """The candidate's share (percent) when the request was assigned: its propensity."""
    step: int
    """The step the request was assigned in."""
    rollout_id: str
    """The rollout it was assigned in; observations of an earlier rollout are ignored."""
    nll: float | None = None
    """NLL per token of the prompt after the routing prefix, under the serving arm; None
    when the prompt was too short to score (or the request failed)."""
    shadow_nll: float | None = None
    """The same text's NLL per token under the other arm (shadow mode)."""
    latency_s: float | None = None
    """Seconds from arrival to the last byte."""
    error: bool = False


@dataclass
class ArmCounts:
    """What one arm saw, over a step or over the rollout."""

    requests: int = 0
    errors: int = 0
    scored: int = 0
    nll_sum: float = 0.0
    """Sum of per-token NLLs of scored requests (served ones)."""
    latencies: list[float] = field(default_factory=list)
    feedback_n: int = 0
    feedback_sum: float = 0.0

    def add(self, obs: Observation) -> None:
        self.requests += 1
        self.errors += int(obs.error)
        if obs.nll is not None:
            self.scored += 1
            self.nll_sum += obs.nll
        if obs.latency_s is not None and not obs.error:
            self.latencies.append(obs.latency_s)
            del self.latencies[:-MAX_LATENCIES]

    @property
    def mean_nll(self) -> float | None:
        return self.nll_sum / self.scored if self.scored else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def p95(self) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "scored": self.scored,
            "mean_nll_per_token": self.mean_nll,
            "p95_latency_s": self.p95(),
            "feedback": {
                "count": self.feedback_n,
                "mean": self.feedback_sum / self.feedback_n if self.feedback_n else None,
            },
        }

    @classmethod
    def from_dict(cls, data: dict) -> ArmCounts:
        return cls(**data)


def _arms() -> dict[str, ArmCounts]:
    return {"control": ArmCounts(), "candidate": ArmCounts()}


@dataclass
class RolloutState:
    """Everything a restarted server needs to resume a rollout where it was."""

    rollout_id: str
    fingerprint: str
    """What the rollout is of (candidate, control, mode, steps): a changed file starts anew."""
    origin: str | None = None
    """The fingerprint of the rollout file this rollout descends from (through hot swaps);
    None: the rollout is the file's own."""
    candidate: dict | None = None
    """The swapped-in candidate (``bank``, ``routing``) when it is not the file's."""
    status: str = RUNNING
    step: int = 0
    started_at: float = field(default_factory=time.time)
    step_started_at: float = field(default_factory=time.time)
    quality: RunningMoments = field(default_factory=RunningMoments)
    """The observations of the quality difference (paired D_i or weighted ψ_i)."""
    baseline: RunningMoments = field(default_factory=RunningMoments)
    """Every served per-token NLL: its running mean is the canary baseline m_{i−1}."""
    step_scored: int = 0
    """Scored requests in this step."""
    inconclusive_at: int | None = None
    """``step_scored`` at which this step is inconclusive: None for ``max_requests``; when an
    operator resumes a step already past it, ``max_requests`` more than at the resume."""
    total: dict[str, ArmCounts] = field(default_factory=_arms)
    this_step: dict[str, ArmCounts] = field(default_factory=_arms)
    reason: str | None = None
    """Why the status is what it is (the last decision's reason)."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RolloutState:
        data = dict(data)
        data["quality"] = RunningMoments.from_dict(data["quality"])
        data["baseline"] = RunningMoments.from_dict(data["baseline"])
        for name in ("total", "this_step"):
            data[name] = {arm: ArmCounts.from_dict(c) for arm, c in data[name].items()}
        if data.get("status") not in STATUSES:
            raise ValueError(f"unknown rollout status {data.get('status')!r}")
        return cls(**data)


@dataclass(frozen=True)
class Decision:
    """One entry of the audit log."""

    action: str
    """start (also of a swapped-in candidate), promote, complete, rollback, pause, resume,
    hold."""
    by: str
    """``policy`` or ``operator``."""
    reason: str
    rollout_id: str
    from_share: float
    to_share: float
    step: int
    """The step after the decision."""
    evidence: dict
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        return asdict(self)


class RolloutPolicy:
    """Steps, evidence and decisions of one rollout (see the module doc)."""

    def __init__(
        self, config: RolloutConfig, state: RolloutState | None = None, origin: str | None = None
    ):
        """A new rollout of ``config`` (swapped in from the file of fingerprint ``origin``),
        or the one ``state`` holds."""
        self.config = config
        self.state = state or RolloutState(uuid.uuid4().hex[:12], fingerprint(config), origin)

    # -- reading ---------------------------------------------------------------------------

    @property
    def share(self) -> float:
        """The candidate's share of traffic now, in percent."""
        status, steps = self.state.status, self.config.steps
        if status == ROLLED_BACK:
            return 0.0
        if status == COMPLETE:
            return float(steps[-1])
        return float(steps[self.state.step])

    @property
    def paired(self) -> bool:
        return self.config.mode == "shadow"

    def interval(self, anytime: bool = True) -> Interval:
        g = self.config.guardrails
        return confidence_sequence(self.state.quality, g.alpha, self.config.tuning_n, anytime)

    def latency_ratio(self) -> float | None:
        """p95 latency of the candidate over control's, this step; None until both arms have
        ``min_latency_samples`` requests in the step."""
        need = self.config.guardrails.min_latency_samples
        arms = self.state.this_step
        if min(len(arms["candidate"].latencies), len(arms["control"].latencies)) < need:
            return None
        control = arms["control"].p95()
        return arms["candidate"].p95() / control if control else None

    def evidence(self) -> dict:
        """What a decision is taken on (and what the status endpoint shows)."""
        s = self.state
        return {
            "quality": self.interval().to_dict()
            | {"metric": "NLL per token, candidate − control (nats)", "paired": self.paired},
            "step_scored": s.step_scored,
            "latency_p95_ratio": self.latency_ratio(),
            "step": {arm: c.summary() for arm, c in s.this_step.items()},
            "total": {arm: c.summary() for arm, c in s.total.items()},
        }

    # -- observing -------------------------------------------------------------------------

    def observe(self, obs: Observation) -> Decision | None:
        """Count one finished request; the decision it triggers, if any."""
        s = self.state
        if obs.rollout_id != s.rollout_id or s.status in (COMPLETE, ROLLED_BACK):
            return None
        if obs.arm not in s.total:
            raise ValueError(f"unknown arm {obs.arm!r}")
        s.total[obs.arm].add(obs)
        if obs.step == s.step:
            s.this_step[obs.arm].add(obs)
        self._add_quality(obs)
        if s.status != RUNNING:
            return None
        return self._decide()

    def _add_quality(self, obs: Observation) -> None:
        s = self.state
        if obs.nll is None or obs.error:
            return
        if self.paired:
            if obs.shadow_nll is None:
                return
            cand, ctrl = (obs.nll, obs.shadow_nll)[:: 1 if obs.arm == "candidate" else -1]
            s.quality.add(cand - ctrl)
        elif 0.0 < obs.share < 100.0:
            baseline = s.baseline.mean if s.baseline.n else obs.nll
            s.quality.add(
                ipw_observation(obs.arm == "candidate", obs.share / 100, obs.nll, baseline)
            )
        s.baseline.add(obs.nll)
        if obs.step == s.step:
            s.step_scored += 1

    def _decide(self) -> Decision | None:
        g, s = self.config.guardrails, self.state
        quality = self.interval()
        if quality.n < g.min_evidence:  # too few to act on the asymptotic sequence
            quality = Interval(quality.estimate, -math.inf, math.inf, quality.n)
        if quality.lower > g.max_loss:
            return self._rollback(
                f"quality: the candidate is worse by {quality.estimate:+.4f} nats/token "
                f"[{quality.lower:+.4f}, {quality.upper:+.4f}], beyond max_loss={g.max_loss}",
                "policy",
            )
        breach, judged = self._operational_breach()
        if breach:
            return self._rollback(breach, "policy")
        if s.step_scored >= self.config.min_requests and quality.upper < -g.min_gain and judged:
            reason = (
                f"quality: the candidate is better by {-quality.estimate:.4f} nats/token "
                f"[{quality.lower:+.4f}, {quality.upper:+.4f}] over {quality.n} requests; "
                f"{s.step_scored} scored in this step; latency and errors within limits"
            )
            return self._advance(reason, "policy")
        limit = s.inconclusive_at or self.config.max_requests
        if limit is not None and s.step_scored >= limit:
            reason = (
                f"inconclusive: {s.step_scored} scored requests in this step and the quality "
                f"interval [{quality.lower:+.4f}, {quality.upper:+.4f}] still holds zero"
            )
            if self.config.on_inconclusive == "rollback":
                return self._rollback(reason, "policy")
            s.status, s.reason = HELD, reason
            return self._decision("hold", reason, "policy", self.share)
        return None

    def _operational_breach(self) -> tuple[str | None, bool]:
        """(the breached latency or error guardrail, whether both were judged this step)."""
        g, arms = self.config.guardrails, self.state.this_step
        candidate = arms["candidate"]
        if self.share == 0:  # a shadow-only step: the candidate serves nothing to judge
            return None, True
        if candidate.requests < g.min_latency_samples:
            return None, False
        if candidate.error_rate > g.max_error_rate:
            return (
                f"errors: {candidate.errors} of the candidate's {candidate.requests} requests "
                f"failed this step ({candidate.error_rate:.1%} > {g.max_error_rate:.1%})",
                True,
            )
        ratio = self.latency_ratio()
        if ratio is not None and ratio > g.max_latency_ratio:
            return (
                f"latency: the candidate's p95 is {ratio:.2f}x control's this step "
                f"(> {g.max_latency_ratio})",
                True,
            )
        full = self.share >= 100  # no control traffic left to compare with
        return None, ratio is not None or full

    # -- acting ----------------------------------------------------------------------------

    def _decision(
        self, action: str, reason: str, by: str, from_share: float, evidence: dict | None = None
    ) -> Decision:
        return Decision(
            action, by, reason, self.state.rollout_id, from_share, self.share, self.state.step,
            self.evidence() if evidence is None else evidence,
        )  # fmt: skip

    def _advance(self, reason: str, by: str) -> Decision:
        s, before = self.state, self.share
        evidence = self.evidence()  # the step's, before _new_step clears it
        if s.step + 1 >= len(self.config.steps) - 1:
            s.step = len(self.config.steps) - 1
            s.status, s.reason = COMPLETE, reason
            action = "complete"
        else:
            s.step += 1
            s.status, s.reason = RUNNING, reason
            action = "promote"
        self._new_step()
        return self._decision(action, reason, by, before, evidence)

    def _rollback(self, reason: str, by: str) -> Decision:
        before = self.share
        self.state.status, self.state.reason = ROLLED_BACK, reason
        return self._decision("rollback", reason, by, before)

    def _new_step(self) -> None:
        s = self.state
        s.step_scored, s.this_step, s.step_started_at = 0, _arms(), time.time()
        s.inconclusive_at = None

    def start(self, reason: str = "rollout started") -> Decision:
        return self._decision("start", reason, "operator", 0.0)

    def promote(self, reason: str = "promoted by an operator") -> Decision:
        """Move to the next step now, whatever the evidence says."""
        if self.state.status in (COMPLETE, ROLLED_BACK):
            raise RolloutStateError(
                f"the rollout is {self.state.status}; load a candidate to start a new one"
            )
        return self._advance(reason, "operator")

    def rollback(self, reason: str = "rolled back by an operator") -> Decision:
        if self.state.status == ROLLED_BACK:
            raise RolloutStateError("the rollout is already rolled back")
        return self._rollback(reason, "operator")

    def pause(self, reason: str = "paused by an operator") -> Decision:
        """Keep the share and keep counting, but take no automatic decision."""
        if self.state.status not in (RUNNING, HELD):
            raise RolloutStateError(f"only a running rollout can pause; it is {self.state.status}")
        self.state.status, self.state.reason = PAUSED, reason
        return self._decision("pause", reason, "operator", self.share)

    def resume(self, reason: str = "resumed by an operator") -> Decision:
        if self.state.status not in (PAUSED, HELD):
            raise RolloutStateError(
                f"only a paused or held rollout can resume; it is {self.state.status}"
            )
        s, limit = self.state, self.config.max_requests
        if limit is not None and s.step_scored >= (s.inconclusive_at or limit):
            s.inconclusive_at = s.step_scored + limit  # past its limit: max_requests more
        s.status, s.reason = RUNNING, reason
        return self._decision("resume", reason, "operator", self.share)

    def add_feedback(self, arm: str, score: float) -> None:
        counts = self.state.total[arm]
        counts.feedback_n += 1
        counts.feedback_sum += score


def fingerprint(config: RolloutConfig) -> str:
    """What makes two rollout files the same rollout (state of one resumes the other)."""
    import hashlib
    import json

    key = {
        "candidate": asdict(config.candidate),
        "control": asdict(config.control),
        "mode": config.mode,
        "steps": list(config.steps),
        "salt": config.assignment.salt,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
