"""Routing a prompt to experts (design notes §2, test time, step 2).

Scores z_k = c_k · q between the query embedding q and the expert centroids;
probabilities p = softmax(z / β). Three rules turn p into merge weights w:

- ``sparse_softmax`` (the paper): w_k = relu(p_k − τ) / Σ_j relu(p_j − τ);
- ``threshold`` (the reference code): keep p_k > τ, w_k = p_k / Σ_kept p_j;
- ``top_n``: keep the ``max_active`` largest p_k, w_k = p_k / Σ_kept p_j.

Both threshold rules keep at most ``max_active`` experts (largest p first). When
nothing is kept the plan is empty (the base model runs); when p is NaN the single
nearest expert runs. The reference code's ``beta`` is sqrt(β): its default 0.2 is β = 0.04.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

logger = logging.getLogger(__name__)

PREFIX_TOKENS = 50
"""P: a prompt is routed (and TTT retrieves) on its first P tokens, which are never scored."""

# The reference code (``ttmerge``) and its defaults; its ``beta`` is sqrt(β) of the paper.
REFERENCE_BETA = 0.2
REFERENCE_TAU = 0.01
REFERENCE_MAX_ACTIVE = 50


class RoutingError(ValueError):
    """A routing configuration or input that cannot be used."""


@dataclass(frozen=True)
class RoutingConfig:
    """How a prompt's centroid similarities become merge weights."""

    rule: str = "sparse_softmax"
    """Name of the rule: ``sparse_softmax`` (paper), ``threshold`` (reference code) or ``top_n``."""
    beta: float = 0.04
    """Temperature β of the paper, p = softmax(z / β); the reference code's beta squared."""
    tau: float = 0.01
    """Threshold τ on p for the two threshold rules; must lie in [0, 1/K) to keep anything."""
    max_active: int = 10
    """Most experts merged at once; for ``top_n`` it is n."""
    prefix_tokens: int = PREFIX_TOKENS
    """Route on the first P tokens of the prompt, decoded back to text."""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise RoutingError(f"rule={self.rule!r} is unknown; choose one of {sorted(RULES)}")
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise RoutingError(f"beta must be a positive number, got {self.beta!r}")
        if not (isinstance(self.tau, int | float) and 0 <= self.tau < 1):
            raise RoutingError(f"tau must lie in [0, 1), got {self.tau!r}")
        if not (isinstance(self.max_active, int) and self.max_active >= 1):
            raise RoutingError(f"max_active must be an integer >= 1, got {self.max_active!r}")
        if not (isinstance(self.prefix_tokens, int) and self.prefix_tokens >= 1):
            raise RoutingError(f"prefix_tokens must be an integer >= 1, got {self.prefix_tokens!r}")

    @classmethod
    def from_reference(
        cls,
        beta: float = REFERENCE_BETA,
        tau: float = REFERENCE_TAU,
        max_active: int = REFERENCE_MAX_ACTIVE,
    ) -> RoutingConfig:
        """The reference code's settings with its rule. Its ``beta`` is sqrt(β), and its
        ``max_merge_count`` is our ``max_active``."""
        return cls(rule="threshold", beta=beta**2, tau=tau, max_active=max_active)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RoutingConfig:
        data = dict(data)
        if "query_tokens" in data:  # banks written before the prefix had one name
            data["prefix_tokens"] = data.pop("query_tokens")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise RoutingError(f"unknown routing fields {sorted(unknown)}")
        return cls(**data)

    def replace(self, **changes) -> RoutingConfig:
        return RoutingConfig(
            **{**self.to_dict(), **{k: v for k, v in changes.items() if v is not None}}
        )


@dataclass(frozen=True)
class RoutingPlan:
    """The merge to run for one prompt: which experts, with which weights, and why."""

    expert_ids: tuple[int, ...]
    weights: tuple[float, ...]
    similarities: tuple[float, ...] = ()
    """z_k of the chosen experts, in the same order."""
    rule: str = "explicit"
    fallback: str | None = None
    """``"base"`` when no expert passed the rule, ``"nearest"`` when p was NaN."""
    skipped: tuple[int, ...] = ()
    """Disabled experts that routing over the whole bank would have merged (and did not)."""

    def __post_init__(self) -> None:
        if len(self.expert_ids) != len(self.weights):
            raise RoutingError("a plan needs one weight per expert")
        if len(set(self.expert_ids)) != len(self.expert_ids):
            raise RoutingError(f"expert ids repeat in {self.expert_ids}")
        if any(not math.isfinite(w) for w in self.weights):
            raise RoutingError(f"weights must be finite, got {self.weights}")

    @classmethod
    def explicit(cls, experts: dict[int, float] | None) -> RoutingPlan:
        """A plan given by hand: ``{expert_id: weight}``; ``None`` or ``{}`` is the base model."""
        experts = experts or {}
        ids = tuple(int(k) for k in experts)
        return cls(
            expert_ids=ids, weights=tuple(float(experts[k]) for k in experts), rule="explicit"
        )

    @classmethod
    def base(cls) -> RoutingPlan:
        return cls(expert_ids=(), weights=(), rule="base")

    @property
    def is_base(self) -> bool:
        return len(self.expert_ids) == 0

    def key(self, decimals: int = 4) -> tuple:
        """Cache key: expert ids with weights rounded, order-free."""
        return tuple(sorted((i, round(w, decimals)) for i, w in zip(self.expert_ids, self.weights)))

    def to_dict(self) -> dict:
        return {
            "rule": self.rule,
            "fallback": self.fallback,
            "experts": [
                {"id": i, "weight": w, **({"similarity": s} if self.similarities else {})}
                for i, w, s in zip(
                    self.expert_ids,
                    self.weights,
                    self.similarities or (None,) * len(self.expert_ids),
                )
            ],
            **({"skipped_disabled": [{"id": k} for k in self.skipped]} if self.skipped else {}),
        }


def _cap(p: torch.Tensor, kept: torch.Tensor, max_active: int) -> torch.Tensor:
    """Indices of the kept experts, at most ``max_active``, largest p first."""
    ids = torch.nonzero(kept).flatten()
    order = torch.argsort(p[ids], descending=True, stable=True)
    return ids[order][:max_active]


def sparse_softmax(p: torch.Tensor, config: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's rule: w_k = relu(p_k − τ) / Σ_j relu(p_j − τ) over the kept set."""
    ids = _cap(p, p > config.tau, config.max_active)
    excess = torch.relu(p[ids] - config.tau)
    return ids, excess / excess.sum()


def reference_threshold(
    p: torch.Tensor, config: RoutingConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's rule: keep p_k > τ, w_k = p_k / Σ_kept p_j."""
    ids = _cap(p, p > config.tau, config.max_active)
    return ids, p[ids] / p[ids].sum()


def top_n(p: torch.Tensor, config: RoutingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the n = ``max_active`` largest p_k and renormalise."""
    ids = _cap(p, torch.ones_like(p, dtype=torch.bool), config.max_active)
    return ids, p[ids] / p[ids].sum()


RULES: dict[str, Callable[[torch.Tensor, RoutingConfig], tuple[torch.Tensor, torch.Tensor]]] = {
    "sparse_softmax": sparse_softmax,
    "threshold": reference_threshold,
    "top_n": top_n,
}
_THRESHOLD_RULES = {"sparse_softmax", "threshold"}


def route(similarities: torch.Tensor, config: RoutingConfig) -> RoutingPlan:
    """Route one prompt: ``similarities`` are z_k = c_k · q, shape (K,)."""
    z = torch.as_tensor(similarities, dtype=torch.float64).flatten()  # (K,)
    K = z.numel()
    if K == 0:
        raise RoutingError("the bank has no experts to route to")
    if config.rule in _THRESHOLD_RULES and config.tau >= 1.0 / K:
        warnings.warn(
            f"tau={config.tau} >= 1/K={1.0 / K:.4g}: with {K} experts some prompts keep no "
            "expert and fall back to the base model; use tau < 1/K",
            stacklevel=2,
        )
    p = torch.softmax(z / config.beta, dim=0)  # (K,)
    if torch.isnan(p).any():
        if torch.isnan(z).all():
            logger.warning("routing scores are all NaN; falling back to the base model")
            return RoutingPlan((), (), (), rule=config.rule, fallback="base")
        nearest = int(torch.argmax(torch.nan_to_num(z, nan=-math.inf)))
        return RoutingPlan((nearest,), (1.0,), (float(z[nearest]),), config.rule, "nearest")
    ids, weights = RULES[config.rule](p, config)
    if ids.numel() == 0:
        return RoutingPlan((), (), (), rule=config.rule, fallback="base")
    return RoutingPlan(
        expert_ids=tuple(int(i) for i in ids),
        weights=tuple(float(w) for w in weights),
        similarities=tuple(float(z[i]) for i in ids),
        rule=config.rule,
    )


def route_nearest(
    expert_ids: torch.Tensor, similarities: torch.Tensor, config: RoutingConfig
) -> RoutingPlan:
    """Route one prompt by ``top_n`` from its nearest experts alone (``expert_ids`` and their
    z, at least ``max_active`` of them, e.g. from a faiss index): p_k / Σ_kept p_j does not
    depend on the softmax's normaliser, so the plan is the one :func:`route` gives from all K
    scores. The threshold rules need every score: use :func:`route`."""
    if config.rule != "top_n":
        raise RoutingError(f"rule {config.rule!r} needs every expert's score; use route()")
    z = torch.as_tensor(similarities, dtype=torch.float64).flatten()
    if torch.isnan(z).all():  # as route() does with NaN scores
        return RoutingPlan((), (), (), rule=config.rule, fallback="base")
    if torch.isnan(z).any():
        nearest = int(torch.argmax(torch.nan_to_num(z, nan=-math.inf)))
        k = int(expert_ids[nearest])
        return RoutingPlan((k,), (1.0,), (float(z[nearest]),), config.rule, "nearest")
    ids, weights = top_n(torch.softmax(z / config.beta, dim=0), config)
    return RoutingPlan(
        expert_ids=tuple(int(expert_ids[i]) for i in ids),
        weights=tuple(float(w) for w in weights),
        similarities=tuple(float(z[i]) for i in ids),
        rule=config.rule,
    )


def route_enabled(
    similarities: torch.Tensor, config: RoutingConfig, disabled: frozenset[int]
) -> RoutingPlan:
    """Route one prompt over the experts that are not ``disabled``: the plan of the bank
    without them (its softmax and threshold over the others), in the bank's ids, naming in
    ``skipped`` the disabled experts that routing over the whole bank would have merged."""
    z = torch.as_tensor(similarities, dtype=torch.float64).flatten()
    if not disabled:
        return route(z, config)
    enabled = torch.tensor([k for k in range(z.numel()) if k not in disabled], dtype=torch.long)
    if enabled.numel() == 0:
        raise RoutingError(
            "every expert of the bank is disabled; enable one (ttmm bank enable) to route"
        )
    plan = route(z[enabled], config)
    whole = route(z, config)
    return replace(
        plan,
        expert_ids=tuple(int(enabled[i]) for i in plan.expert_ids),
        skipped=tuple(k for k in whole.expert_ids if k in disabled),
    )
