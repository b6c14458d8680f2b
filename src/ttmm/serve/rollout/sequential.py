"""Anytime-valid confidence sequences for the quality difference of a rollout (design notes §8).

A rollout looks at its evidence after every request and acts as soon as it is clear. An
interval that is only valid at one fixed sample size, checked after every request, excludes
zero by chance far more often than its nominal level (the fixed-n normal interval checked at
every request promoted a no-better candidate in 9-15 % of simulated A/A rollouts and rolled it
back in another 40 %, against none and at most 1.2 % for this sequence:
``benchmarks/rollout_simulation.py``). A *confidence sequence* holds at every sample size at
once: P(the true difference leaves the sequence at any time) <= alpha, so it may be checked
after every request and acted on whenever it excludes zero.

We use the **asymptotic confidence sequence with the Gaussian-mixture boundary** of
Waudby-Smith, Arbour, Sinha, Kennedy and Ramdas, "Time-uniform central limit theory and
asymptotic confidence sequences", Annals of Statistics 52(6), 2024 (arXiv 2103.06476),
Theorem 2.2 with the boundary of Robbins' normal mixture: with t observations of mean
``mean`` and sample variance ``s2``,

    mean ± sqrt( 2 (t s2 ρ² + 1) / (t² ρ²) · log( sqrt(t s2 ρ² + 1) / α ) ),

whose width is smallest near t* requests for ρ² = (−2 log α + log(−2 log α + 1)) / t*
(their eq. for the optimal ρ, with unit variance). It needs no bound on the observations (a
per-token NLL has none), only a finite variance, and is what industrial experimentation
platforms ship for continuous monitoring. Why not the alternatives: an empirical-Bernstein
sequence needs bounded observations (clipping NLL differences biases them); an
alpha-spending group-sequential test needs the looks fixed in advance, while a rollout looks
after every request.

What is observed:

- **paired** (shadow mode): each request is scored under both arms; the observation is
  D_i = NLL_candidate − NLL_control, per token, on the same text;
- **unpaired** (canary mode): each request is scored under the arm that served it, chosen at
  random with the known probability π_i of the candidate. The augmented inverse-propensity
  weighted observation (the same paper, Section 3.2)

      ψ_i = (A_i / π_i − (1 − A_i) / (1 − π_i)) · (Y_i − m_{i−1})

  has mean equal to the difference of the arms' means whatever the predictable baseline
  m_{i−1} (here the running mean of every Y before request i); subtracting it removes the
  level of the NLL, which would otherwise dominate the variance.

Negative differences mean the candidate is better (lower NLL).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations of a stream (Welford's update): exact,
    numerically stable, and three numbers to persist."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def variance(self) -> float:
        """Sample variance (n − 1 in the denominator); 0 below two observations."""
        return self.m2 / (self.n - 1) if self.n > 1 else 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RunningMoments:
        return cls(n=int(data["n"]), mean=float(data["mean"]), m2=float(data["m2"]))


def optimal_rho2(alpha: float, tuning_n: float) -> float:
    """ρ² that makes the Gaussian-mixture boundary tightest near ``tuning_n`` observations."""
    log_term = -2.0 * math.log(alpha)
    return (log_term + math.log(log_term + 1.0)) / tuning_n


def mixture_radius(n: int, variance: float, alpha: float, tuning_n: float) -> float:
    """Half-width of the two-sided (1 − α) asymptotic confidence sequence after ``n``
    observations of sample variance ``variance``; infinite before two observations."""
    if n < 2:
        return math.inf
    rho2 = optimal_rho2(alpha, tuning_n)
    scaled = n * variance * rho2 + 1.0
    return math.sqrt(2.0 * scaled / (n * n * rho2) * math.log(math.sqrt(scaled) / alpha))


@dataclass(frozen=True)
class Interval:
    """A confidence sequence's value at one time: estimate and bounds of the difference."""

    estimate: float
    lower: float
    upper: float
    n: int

    def to_dict(self) -> dict:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None  # JSON has no infinity

        return {
            "estimate": self.estimate,
            "lower": finite(self.lower),
            "upper": finite(self.upper),
            "n": self.n,
        }


def confidence_sequence(
    moments: RunningMoments, alpha: float, tuning_n: float, anytime: bool = True
) -> Interval:
    """The interval for the mean of the observations in ``moments``.

    ``anytime=False`` gives the fixed-n normal interval instead (mean ± z σ/√n), valid only
    at one sample size decided in advance: kept to show what continuous monitoring does to
    it (``benchmarks/rollout_simulation.py``), never used by the policy.
    """
    if anytime:
        radius = mixture_radius(moments.n, moments.variance, alpha, tuning_n)
    elif moments.n < 2:
        radius = math.inf
    else:
        from statistics import NormalDist

        z = NormalDist().inv_cdf(1 - alpha / 2)
        radius = z * math.sqrt(moments.variance / moments.n)
    return Interval(moments.mean, moments.mean - radius, moments.mean + radius, moments.n)


def ipw_observation(served_candidate: bool, share: float, y: float, baseline: float) -> float:
    """ψ_i of one canary request (see the module doc): ``share`` is π_i, the probability the
    request had of going to the candidate, ``y`` its per-token NLL under the arm that
    served it, ``baseline`` m_{i−1}."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"an unpaired observation needs 0 < share < 1, got {share}")
    weight = 1.0 / share if served_candidate else -1.0 / (1.0 - share)
    return weight * (y - baseline)
