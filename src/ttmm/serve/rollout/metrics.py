"""Prometheus metrics of a rollout, every series labelled by the arm that served.

Names follow the conventions of LLM servers (vLLM's ``time_to_first_token_seconds``,
``inter_token_latency_seconds``, ``e2e_request_latency_seconds``, ``prompt_tokens_total``,
``generation_tokens_total``), under the ``ttmm_`` prefix, plus what only a rollout has: the
online NLL per token (served and shadow), compute seconds per 1k tokens, the traffic share,
the step and the quality difference's confidence sequence.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ttmm.serve.metrics import LATENCY_BUCKETS

NLL_BUCKETS = (0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 8, 10, 12, float("inf"))
TOKEN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, float("inf"))


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry):
        r = registry
        self.requests = Counter(
            "ttmm_arm_requests",
            "Generation requests by the arm that served them and their outcome.",
            ["arm", "outcome"],
            registry=r,
        )
        self.ttft = Histogram(
            "ttmm_time_to_first_token_seconds",
            "Routing, merging and prefill of a row until its first new token.",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "ttmm_inter_token_latency_seconds",
            "Mean seconds between a row's new tokens.",
            ["arm"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "ttmm_e2e_request_latency_seconds",
            "Seconds from a generation request's arrival to its last byte.",
            ["arm"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "ttmm_prompt_tokens", "Prompt tokens served.", ["arm"], registry=r
        )
        self.generation_tokens = Counter(
            "ttmm_generation_tokens", "Tokens generated.", ["arm"], registry=r
        )
        self.tokens_per_second = Histogram(
            "ttmm_generation_tokens_per_second",
            "A row's new tokens over its decoding seconds.",
            ["arm"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, float("inf")),
            registry=r,
        )
        self.nll = Histogram(
            "ttmm_online_nll_per_token",
            "NLL per token of a prompt after the routing prefix, under the arm that served it "
            "(scored=served) or under the other arm (scored=shadow, named by arm).",
            ["arm", "scored"],
            buckets=NLL_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Counter(
            "ttmm_compute_seconds",
            "Engine seconds spent serving an arm's rows (a batch's seconds split over its rows).",
            ["arm"],
            registry=r,
        )
        self.shadow_seconds = Counter(
            "ttmm_shadow_compute_seconds",
            "Engine seconds an arm spent scoring requests the other arm served (shadow mode).",
            ["arm"],
            registry=r,
        )
        self.compute_per_1k = Gauge(
            "ttmm_compute_seconds_per_1k_tokens",
            "Engine seconds per 1000 prompt and generated tokens, since the server started.",
            ["arm"],
            registry=r,
        )
        self.feedback = Histogram(
            "ttmm_feedback_score",
            "Scores sent to /v1/ttmm/feedback.",
            ["arm"],
            buckets=(0, 0.25, 0.5, 0.75, 1, float("inf")),
            registry=r,
        )
        self.share = Gauge(
            "ttmm_rollout_traffic_share",
            "Share of traffic per arm, in percent.",
            ["arm"],
            registry=r,
        )
        self.step = Gauge("ttmm_rollout_step", "The rollout's current step (0-based).", registry=r)
        self.quality = Gauge(
            "ttmm_rollout_quality_difference",
            "NLL per token, candidate − control: the estimate and the anytime-valid bounds.",
            ["bound"],
            registry=r,
        )
        self.decisions = Counter(
            "ttmm_rollout_decisions", "Decisions taken, by action.", ["action"], registry=r
        )
        self._compute: dict[str, float] = {}
        self._tokens: dict[str, int] = {}

    def observe_compute(self, arm: str, seconds: float, tokens: int) -> None:
        self.compute_seconds.labels(arm=arm).inc(seconds)
        self._compute[arm] = self._compute.get(arm, 0.0) + seconds
        self._tokens[arm] = self._tokens.get(arm, 0) + tokens
        if self._tokens[arm]:
            self.compute_per_1k.labels(arm=arm).set(1000 * self._compute[arm] / self._tokens[arm])

    def observe_status(self, share: float, step: int, quality: dict) -> None:
        self.share.labels(arm="candidate").set(share)
        self.share.labels(arm="control").set(100.0 - share)
        self.step.set(step)
        for bound in ("estimate", "lower", "upper"):
            value = quality.get(bound)
            self.quality.labels(bound=bound).set(float("nan") if value is None else value)
