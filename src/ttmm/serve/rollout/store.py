"""A rollout's memory on disk: its state (atomic JSON) and its decisions (fsynced JSONL).

``state.json`` is rewritten through :mod:`ttmm.atomic` after every observation and decision,
so a server killed at any moment restarts on the last complete state; ``decisions.jsonl``
gets one line per decision, flushed and fsynced before the decision takes effect, so a
decision that changed traffic is always in the log. :class:`RolloutController` is the
thread-safe face the server talks to: it assigns arms, takes observations and operator
actions, and writes both files.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ttmm.atomic import atomic_write_json
from ttmm.serve.rollout.assign import assign_arm
from ttmm.serve.rollout.config import RolloutConfig
from ttmm.serve.rollout.policy import (
    COMPLETE,
    ROLLED_BACK,
    Decision,
    Observation,
    RolloutPolicy,
    RolloutState,
    fingerprint,
)

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
DECISIONS_FILE = "decisions.jsonl"
MAX_FEEDBACK_IDS = 100_000
"""Response ids remembered for feedback (the most recent)."""
ACTIONS = ("promote", "rollback", "pause", "resume")
"""What an operator may do to a running rollout (besides loading a new candidate)."""


class RolloutStore:
    """The two files of one rollout folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_path = self.folder / STATE_FILE
        self.decisions_path = self.folder / DECISIONS_FILE

    def load_state(self) -> RolloutState | None:
        if not self.state_path.exists():
            return None
        try:
            return RolloutState.from_dict(json.loads(self.state_path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"{self.state_path} is not a rollout state ({err}); move it away to start anew"
            ) from None

    def save_state(self, state: RolloutState) -> None:
        atomic_write_json(self.state_path, state.to_dict(), indent=None)

    def append(self, decision: Decision) -> None:
        line = json.dumps(decision.to_dict(), ensure_ascii=False, default=str) + "\n"
        if self._ends_cut():  # a crash cut the last line: start a new one, or this one is lost
            line = "\n" + line
        with open(self.decisions_path, "a", encoding="utf-8") as log:
            log.write(line)
            log.flush()
            os.fsync(log.fileno())

    def _ends_cut(self) -> bool:
        """Whether the log's last line lacks its newline (a crash in the middle of a write)."""
        try:
            with open(self.decisions_path, "rb") as log:
                log.seek(-1, os.SEEK_END)
                return log.read(1) != b"\n"
        except OSError:  # no log yet, or an empty one
            return False

    def decisions(self, limit: int | None = None) -> list[dict]:
        """The logged decisions, oldest first (the last ``limit``); a line cut by a crash is
        skipped."""
        if not self.decisions_path.exists():
            return []
        rows = []
        for line in self.decisions_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                logger.warning("skipping a cut line in %s", self.decisions_path)
        if limit is None:
            return rows
        return rows[-limit:] if limit > 0 else []


@dataclass(frozen=True)
class Ticket:
    """A request's place in the rollout, as :meth:`RolloutController.assign` gives it."""

    arm: str
    share: float
    """The candidate's share when it was assigned: the request's propensity."""
    step: int
    rollout_id: str
    measured: bool
    """Whether the rollout still gathers evidence (not complete or rolled back)."""
    config: RolloutConfig
    """The rollout's configuration (a server on an older candidate loads this one's)."""


class RolloutController:
    """Assignment, observations and operator actions of the running rollout, under one lock,
    each change written to disk before it is acted on."""

    def __init__(self, config: RolloutConfig):
        self._lock = threading.Lock()
        self._responses: OrderedDict[str, str] = OrderedDict()
        """The arm of each recent response id (in memory: feedback after a restart is lost)."""
        self.store = RolloutStore(config.state_dir)
        self._open(config)

    def _open(self, config: RolloutConfig) -> Decision | None:
        """Resume the stored rollout of the rollout file ``config`` (or of a candidate swapped
        in since), or start a new one."""
        state = self.store.load_state()
        if state is not None and (state.origin or state.fingerprint) == fingerprint(config):
            if state.candidate is not None:
                config = config.with_candidate(state.candidate["bank"], state.candidate["routing"])
            if state.fingerprint == fingerprint(config):
                self.config, self.policy = config, RolloutPolicy(config, state)
                logger.info("resuming rollout %s at step %d", state.rollout_id, state.step)
                return None
        self.config, self.policy = config, RolloutPolicy(config)
        why = "the rollout file changed" if state is not None else "rollout started"
        return self._record(self.policy.start(why))

    def _record(self, decision: Decision | None) -> Decision | None:
        if decision is not None:
            self.store.append(decision)
            logger.info(
                "rollout %s: %s (%s)", decision.rollout_id, decision.action, decision.reason
            )
        self.store.save_state(self.policy.state)
        return decision

    # -- the serving path ------------------------------------------------------------------

    def assign(self, key: str | None) -> Ticket:
        """The arm of a request with sticky ``key``, and where the rollout stands."""
        with self._lock:
            share, state = self.policy.share, self.policy.state
            arm = assign_arm(key, share, self.config.assignment.salt)
            measured = state.status not in (COMPLETE, ROLLED_BACK)
            return Ticket(arm, share, state.step, state.rollout_id, measured, self.config)

    def current_config(self) -> RolloutConfig:
        with self._lock:
            return self.config

    def snapshot(self) -> dict:
        """The share, step and quality interval now (what the metrics publish)."""
        with self._lock:
            policy = self.policy
            return {
                "share": policy.share,
                "step": policy.state.step,
                "quality": policy.interval().to_dict(),
            }

    def observe(self, obs: Observation, response_id: str | None = None) -> Decision | None:
        """Count a finished request; ``response_id`` is remembered for feedback."""
        with self._lock:
            if response_id is not None:
                self._responses[response_id] = obs.arm
                while len(self._responses) > MAX_FEEDBACK_IDS:
                    self._responses.popitem(last=False)
            return self._record(self.policy.observe(obs))

    def feedback(self, response_id: str, score: float) -> str | None:
        """Count ``score`` for the arm that served ``response_id``; that arm, or None for an
        id this rollout does not know (too old, served before a restart, or never)."""
        with self._lock:
            arm = self._responses.get(response_id)
            if arm is not None:
                self.policy.add_feedback(arm, score)
                self.store.save_state(self.policy.state)
            return arm

    # -- operators -------------------------------------------------------------------------

    def act(self, action: str, reason: str | None = None) -> Decision:
        """``promote``, ``rollback``, ``pause`` or ``resume`` by an operator."""
        if action not in ACTIONS:
            raise ValueError(f"unknown rollout action {action!r}; choose one of {ACTIONS}")
        with self._lock:
            method = getattr(self.policy, action)
            return self._record(method(reason) if reason else method())

    def restart(self, config: RolloutConfig, reason: str) -> Decision:
        """A new rollout of ``config`` (a new candidate swapped in): fresh evidence from the
        first step; a restarted server resumes it, not the file's candidate."""
        with self._lock:
            origin = self.policy.state.origin or self.policy.state.fingerprint
            self.config, self.policy = config, RolloutPolicy(config, origin=origin)
            candidate = config.candidate
            self.policy.state.candidate = {"bank": candidate.bank, "routing": candidate.routing}
            return self._record(self.policy.start(reason))

    def status(self, decisions: int = 50) -> dict:
        with self._lock:
            policy, state = self.policy, self.policy.state
            return {
                "object": "ttmm.rollout",
                "rollout_id": state.rollout_id,
                "status": state.status,
                "reason": state.reason,
                "mode": self.config.mode,
                "step": state.step,
                "steps": list(self.config.steps),
                "share": {"candidate": policy.share, "control": 100.0 - policy.share},
                "min_requests": self.config.min_requests,
                "guardrails": self.config.to_dict()["guardrails"],
                "started_at": state.started_at,
                "step_started_at": state.step_started_at,
                "evidence": policy.evidence(),
                "decisions": self.store.decisions(limit=decisions),
            }
