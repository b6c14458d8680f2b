"""What a rollout file says: the two arms, how traffic is split, and the guardrails.

A rollout file (YAML) reads::

    control:                    # what serves today
      kind: finetune            # base | finetune | adapter | bank
      bank: banks/k16           # finetune: the bank whose fine-tuning adapter (default: the
                                #   candidate's); bank: the other bank
      # path: adapters/prod     # adapter: a PEFT LoRA folder
    candidate:
      bank: banks/k16-v2        # routed per request
      # routing: {rule: top_n, max_active: 3}
    mode: canary                # canary | shadow
    assignment:
      key: user                 # user | header:<name> | api_key | request
      salt: k16-v2
    steps: [5, 25, 50, 100]     # candidate's share of traffic, in percent, step by step
    min_requests: 200           # scored requests a step needs before it may promote
    guardrails:
      alpha: 0.05
      max_latency_ratio: 1.5
      max_error_rate: 0.02
    state_dir: rollout-state    # state.json and decisions.jsonl (default: beside this file)

Relative paths are read from the file's folder. Every field is checked when the file is
loaded, and a mistake names the field and what it accepts.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

ARM_KINDS = ("base", "finetune", "adapter", "bank")
MODES = ("canary", "shadow")
KEY_SOURCES = ("user", "api_key", "request")
INCONCLUSIVE_ACTIONS = ("hold", "rollback")
EXPECTED_SD = {"shadow": 0.1, "canary": 3.0}
"""Spread of one quality observation by mode, measured on the recorded streams of
``benchmarks/results`` (benchmarks/rollout_simulation.py): paired NLL differences per token
(sd 0.11), and the weighted canary observation at a 5 % share (sd 3.3)."""


class RolloutConfigError(ValueError):
    """A rollout file or setting that cannot be used; the message names the field."""


@dataclass(frozen=True)
class ControlArm:
    """The model in use today, as a merge policy over the one base model."""

    kind: str = "base"
    """``base`` (no adapter), ``finetune`` (a bank's fine-tuning adapter), ``adapter`` (a PEFT
    LoRA folder) or ``bank`` (another bank, routed per request)."""
    bank: str | None = None
    """For ``finetune``: the bank holding the adapter (default: the candidate the file
    names, kept when a new candidate is swapped in); for ``bank``: the bank to route over."""
    path: str | None = None
    """For ``adapter``: the PEFT adapter folder."""
    routing: dict | None = None
    """For ``bank``: routing settings over that bank's own (rule, beta, tau, max_active)."""

    def __post_init__(self) -> None:
        _check_types(self, "control")
        if self.kind not in ARM_KINDS:
            raise RolloutConfigError(
                f"control.kind={self.kind!r} is unknown; choose one of {ARM_KINDS}"
            )
        if self.kind == "adapter" and not self.path:
            raise RolloutConfigError(
                "control.kind=adapter needs control.path: a PEFT adapter folder"
            )
        if self.kind == "bank" and not self.bank:
            raise RolloutConfigError("control.kind=bank needs control.bank: the bank's folder")
        if self.kind != "adapter" and self.path is not None:
            raise RolloutConfigError(f"control.path is only for kind=adapter, not {self.kind!r}")
        if self.kind in ("base", "adapter") and self.bank is not None:
            raise RolloutConfigError(f"control.bank is not used with kind={self.kind!r}")
        if self.routing is not None and self.kind != "bank":
            raise RolloutConfigError("control.routing is only for kind=bank")


@dataclass(frozen=True)
class CandidateArm:
    """The bank being rolled out, routed per request."""

    bank: str = ""
    """The bank's folder."""
    routing: dict | None = None
    """Routing settings over the bank's own (rule, beta, tau, max_active)."""

    def __post_init__(self) -> None:
        _check_types(self, "candidate")
        if not self.bank:
            raise RolloutConfigError(
                "candidate.bank is required: the folder of the bank to roll out"
            )


@dataclass(frozen=True)
class Assignment:
    """How a request is given an arm: sticky per user by a hash of a key."""

    key: str = "user"
    """``user`` (the OpenAI ``user`` field), ``header:<name>`` (a request header),
    ``api_key`` (the bearer token) or ``request`` (no stickiness: each request drawn anew).
    A request without the key is drawn anew."""
    salt: str = "ttmm"
    """Mixed into the hash, so that two rollouts split users differently."""

    def __post_init__(self) -> None:
        _check_types(self, "assignment")
        header = self.key.startswith("header:") and len(self.key) > len("header:")
        if self.key not in KEY_SOURCES and not header:
            raise RolloutConfigError(
                f"assignment.key={self.key!r} is unknown; choose one of {KEY_SOURCES} or "
                "'header:<name>'"
            )


@dataclass(frozen=True)
class Guardrails:
    """When a step may promote and what rolls the candidate back."""

    alpha: float = 0.05
    """Error level of the quality confidence sequence: a candidate no better than control is
    promoted with probability at most alpha/2 over the whole rollout."""
    min_gain: float = 0.0
    """Nats per token the candidate must be better by (upper bound of the difference below
    −min_gain) to promote."""
    max_loss: float = 0.0
    """Nats per token the candidate may be worse by: a lower bound above it rolls back."""
    max_latency_ratio: float = 1.5
    """Largest p95 latency (candidate ÷ control, over the step) before rolling back."""
    max_error_rate: float = 0.05
    """Largest share of the candidate's requests that may fail in a step."""
    min_evidence: int = 30
    """Quality observations before the sequence is acted on: its guarantee is asymptotic,
    and a variance read off a handful of requests can be far too small."""
    min_latency_samples: int = 20
    """Requests each arm needs in a step before latency and errors are judged."""
    tuning_requests: int = 500
    """Where the confidence sequence is tightest (requests); any value keeps it valid."""
    expected_sd: float | None = None
    """Standard deviation expected of one quality observation, fixed before the rollout
    (reading it off the data would void the guarantee): with ``tuning_requests`` it places
    the tightest point. None: the mode's default (:data:`EXPECTED_SD`)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < 1):
            raise RolloutConfigError(f"guardrails.alpha must lie in (0, 1), got {self.alpha!r}")
        for name in ("min_gain", "max_loss"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise RolloutConfigError(f"guardrails.{name} must be a number >= 0, got {value!r}")
        if not (isinstance(self.max_latency_ratio, int | float) and self.max_latency_ratio >= 1):
            raise RolloutConfigError(
                f"guardrails.max_latency_ratio must be >= 1, got {self.max_latency_ratio!r}"
            )
        if not (isinstance(self.max_error_rate, int | float) and 0 <= self.max_error_rate <= 1):
            raise RolloutConfigError(
                f"guardrails.max_error_rate must lie in [0, 1], got {self.max_error_rate!r}"
            )
        sd = self.expected_sd
        if sd is not None and not (isinstance(sd, int | float) and math.isfinite(sd) and sd > 0):
            raise RolloutConfigError(f"guardrails.expected_sd must be a number > 0, got {sd!r}")
        for name in ("min_evidence", "min_latency_samples", "tuning_requests"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise RolloutConfigError(
                    f"guardrails.{name} must be an integer >= 1, got {value!r}"
                )


@dataclass(frozen=True)
class RolloutConfig:
    """A whole rollout: arms, traffic, steps and guardrails (see the module doc)."""

    candidate: CandidateArm
    control: ControlArm = field(default_factory=ControlArm)
    mode: str = "canary"
    """``canary``: each request is served and scored by one arm. ``shadow``: the arm that did
    not serve a request scores it too (nothing of it is sent), for paired evidence at the
    price of one more forward pass of the prompt per request."""
    assignment: Assignment = field(default_factory=Assignment)
    steps: tuple[float, ...] = (5.0, 25.0, 50.0, 100.0)
    """The candidate's share of traffic in percent, one value per step, increasing; the last
    is where the rollout completes. 0 (score in shadow only) is allowed in shadow mode."""
    min_requests: int = 200
    """Scored requests a step needs before it may promote."""
    max_requests: int | None = None
    """Scored requests after which a step without a decision is inconclusive; None = never."""
    on_inconclusive: str = "hold"
    """``hold`` (stay, log it, wait for an operator) or ``rollback``."""
    guardrails: Guardrails = field(default_factory=Guardrails)
    state_dir: str = "rollout-state"
    """Folder of ``state.json`` and the decision log ``decisions.jsonl``."""

    def __post_init__(self) -> None:
        _check_types(self, None)
        if self.mode not in MODES:
            raise RolloutConfigError(f"mode={self.mode!r} is unknown; choose one of {MODES}")
        steps = self.steps
        if not steps:
            raise RolloutConfigError(
                "steps is empty; give the candidate's shares, e.g. [5, 25, 100]"
            )
        for share in steps:
            if not (isinstance(share, int | float) and 0 <= share <= 100):
                raise RolloutConfigError(f"steps: every share must lie in [0, 100], got {share!r}")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise RolloutConfigError(f"steps must increase, got {list(steps)}")
        if steps[0] == 0 and self.mode != "shadow":
            raise RolloutConfigError(
                "a step of 0 % gives the candidate no traffic: in canary mode it could never "
                "be judged; use mode: shadow or start above 0"
            )
        if steps[-1] == 0:
            raise RolloutConfigError("the last step must give the candidate some traffic")
        if not (isinstance(self.min_requests, int) and self.min_requests >= 1):
            raise RolloutConfigError(
                f"min_requests must be an integer >= 1, got {self.min_requests!r}"
            )
        limit = self.max_requests
        if limit is not None and not (isinstance(limit, int) and limit >= self.min_requests):
            raise RolloutConfigError(
                f"max_requests must be None or an integer >= min_requests, got {limit!r}"
            )
        if self.on_inconclusive not in INCONCLUSIVE_ACTIONS:
            raise RolloutConfigError(
                f"on_inconclusive={self.on_inconclusive!r} is unknown; choose one of "
                f"{INCONCLUSIVE_ACTIONS}"
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["steps"] = list(self.steps)
        return data

    @property
    def tuning_n(self) -> float:
        """The confidence sequence's tuning in unit-variance observations: tightest near
        ``tuning_requests`` observations of sd ``expected_sd``."""
        sd = self.guardrails.expected_sd or EXPECTED_SD[self.mode]
        return self.guardrails.tuning_requests * sd**2

    @classmethod
    def from_dict(cls, data: dict, root: str | os.PathLike | None = None) -> RolloutConfig:
        """Build from parsed YAML; relative paths are read from ``root``."""
        if not isinstance(data, dict):
            raise RolloutConfigError("a rollout file must be a mapping (control:, candidate:, ...)")
        data = dict(data)
        sections = {
            "control": ControlArm,
            "candidate": CandidateArm,
            "assignment": Assignment,
            "guardrails": Guardrails,
        }
        if "candidate" not in data:
            raise RolloutConfigError("the rollout names no candidate: add candidate: {bank: ...}")
        for name, kind in sections.items():
            if name in data:
                data[name] = _section(kind, data[name], name)
        _check_keys(cls, data, "the rollout file")
        if "steps" in data:
            if not isinstance(data["steps"], list):
                raise RolloutConfigError(
                    f"steps must be a list of percentages, got {data['steps']!r}"
                )
            data["steps"] = tuple(data["steps"])
        config = cls(**data).resolved(Path(root) if root is not None else None)
        if config.control.kind == "finetune" and config.control.bank is None:
            # the model in use today stays fixed: a hot swap changes the candidate only
            config = replace(config, control=replace(config.control, bank=config.candidate.bank))
        return config

    def resolved(self, root: Path | None) -> RolloutConfig:
        """Relative paths made absolute against ``root`` (the rollout file's folder)."""
        if root is None:
            return self

        def absolute(path: str | None) -> str | None:
            return None if path is None else str((root / Path(path).expanduser()).resolve())

        return replace(
            self,
            candidate=replace(self.candidate, bank=absolute(self.candidate.bank)),
            control=replace(
                self.control, bank=absolute(self.control.bank), path=absolute(self.control.path)
            ),
            state_dir=absolute(self.state_dir),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> RolloutConfig:
        """Read a rollout file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise RolloutConfigError(
                f"cannot read the rollout file {path}: {err.strerror}"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise RolloutConfigError(f"{path} is not valid YAML: {err}") from None
        try:
            return cls.from_dict(data, root=path.resolve().parent)
        except RolloutConfigError as err:
            raise RolloutConfigError(f"{path}: {err}") from None

    def with_candidate(self, bank: str, routing: dict | None = None) -> RolloutConfig:
        """The same rollout for another candidate bank (a hot swap)."""
        return replace(self, candidate=CandidateArm(bank=bank, routing=routing))


_TEXT_FIELDS = ("kind", "bank", "path", "key", "salt", "mode", "on_inconclusive", "state_dir")
"""Fields that hold a string (a name or a folder); ``routing`` fields hold a mapping."""


def _check_types(section, where: str | None) -> None:
    """A field of the wrong YAML type (``bank: 5``, ``routing: top_n``) named, rather than a
    TypeError from deep inside."""
    for f in fields(section):
        value, name = getattr(section, f.name), f"{where}.{f.name}" if where else f.name
        if value is None:
            continue
        if f.name in _TEXT_FIELDS and not isinstance(value, str):
            raise RolloutConfigError(f"{name} must be a string, got {value!r}")
        if f.name == "routing" and not isinstance(value, dict):
            raise RolloutConfigError(f"{name} must be a mapping (rule:, max_active:, ...)")


def _check_keys(kind, data: dict, where: str) -> None:
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RolloutConfigError(f"{where} has unknown fields {unknown}; known: {sorted(known)}")


def _section(kind, data, name: str):
    if not isinstance(data, dict):
        raise RolloutConfigError(f"{name} must be a mapping, got {data!r}")
    _check_keys(kind, data, name)
    try:
        return kind(**data)
    except TypeError as err:
        raise RolloutConfigError(f"{name}: {err}") from None
