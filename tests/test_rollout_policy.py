"""The rollout's pure pieces (issue 19): the confidence sequence, the policy's state machine,
the rollout file, sticky assignment, the state and decision files, and an A/A simulation
that checks the false promotion rate the design notes (§8) ask for."""

from __future__ import annotations

import json
import logging
import math
from statistics import NormalDist

import numpy as np
import pytest

from ttmm.serve.rollout.assign import assign_arm, key_point
from ttmm.serve.rollout.config import RolloutConfig, RolloutConfigError
from ttmm.serve.rollout.policy import (
    Decision,
    Interval,
    Observation,
    RolloutPolicy,
    RolloutState,
    RolloutStateError,
)
from ttmm.serve.rollout.sequential import (
    RunningMoments,
    confidence_sequence,
    ipw_observation,
    mixture_radius,
)
from ttmm.serve.rollout.store import RolloutController, RolloutStore


def make_config(**fields) -> RolloutConfig:
    """A rollout of a made-up bank; ``guardrails`` entries are merged into the defaults (the
    sequence tuned for unit-variance observations, which these tests draw)."""
    data = {"candidate": {"bank": "banks/candidate"}, "mode": "shadow", "min_requests": 50}
    guardrails = {"expected_sd": 1.0} | fields.pop("guardrails", {})
    data |= fields | {"guardrails": guardrails}
    return RolloutConfig.from_dict(data)


def request(
    policy: RolloutPolicy,
    rng: np.random.Generator,
    control_nll: float,
    candidate_nll: float,
    latency: tuple[float, float] = (0.1, 0.1),
    candidate_error: bool = False,
) -> Decision | None:
    """One request, assigned at the current share, scored as the rollout's mode scores it."""
    share, state = policy.share, policy.state
    arm = "candidate" if rng.random() < share / 100 else "control"
    on_candidate = arm == "candidate"
    error = candidate_error and on_candidate
    served, other = (candidate_nll, control_nll) if on_candidate else (control_nll, candidate_nll)
    return policy.observe(
        Observation(
            arm, share, state.step, state.rollout_id,
            nll=None if error else served,
            shadow_nll=other if policy.paired and not error else None,
            latency_s=latency[on_candidate], error=error,
        )
    )  # fmt: skip


def run(policy, rng, n, draw, **kwargs) -> list[Decision]:
    """Up to ``n`` requests with NLLs ``draw(rng)`` = (control, candidate), until the rollout
    stops running; the decisions taken."""
    decisions = []
    for _ in range(n):
        decision = request(policy, rng, *draw(rng), **kwargs)
        if decision is not None:
            decisions.append(decision)
        if policy.state.status != "running":
            break
    return decisions


def paired(shift: float, sd: float = 0.1):
    """Shadow NLLs whose difference (candidate − control) is N(shift, sd)."""
    return lambda rng: (2.0, 2.0 + shift + sd * rng.standard_normal())


# -- the confidence sequence ----------------------------------------------------------------


def test_running_moments_match_numpy_and_round_trip():
    x = 1e6 + np.random.default_rng(0).standard_normal(1000)  # a large offset: Welford's case
    moments = RunningMoments()
    assert moments.variance == 0.0
    moments.add(float(x[0]))
    assert moments.variance == 0.0  # one observation: no variance yet
    for value in x[1:]:
        moments.add(float(value))
    assert moments.n == 1000
    assert moments.mean == pytest.approx(x.mean(), rel=1e-12)
    assert moments.variance == pytest.approx(x.var(ddof=1), rel=1e-9)
    assert RunningMoments.from_dict(json.loads(json.dumps(moments.to_dict()))) == moments


def test_mixture_radius_shrinks_with_n_and_is_infinite_below_two():
    assert mixture_radius(0, 1.0, 0.05, 500) == math.inf
    assert mixture_radius(1, 1.0, 0.05, 500) == math.inf
    radii = [mixture_radius(n, 0.25, 0.05, 500) for n in (2, 10, 100, 1000, 10_000, 100_000)]
    assert all(b < a for a, b in zip(radii, radii[1:]))
    assert radii[-1] < 0.02
    # wider for more variance and for a smaller alpha
    assert mixture_radius(500, 1.0, 0.05, 500) > mixture_radius(500, 0.25, 0.05, 500)
    assert mixture_radius(500, 1.0, 0.01, 500) > mixture_radius(500, 1.0, 0.05, 500)
    # the price of validity at every n: wider than the fixed-n interval at that n
    fixed = NormalDist().inv_cdf(0.975) * math.sqrt(1.0 / 500)
    assert mixture_radius(500, 1.0, 0.05, 500) > 1.5 * fixed


def test_tuning_n_is_where_a_unit_variance_sequence_is_tightest():
    at = {t: mixture_radius(500, 1.0, 0.05, t) for t in (100, 250, 500, 1000, 2500)}
    assert min(at, key=at.get) == 500


def test_fixed_n_interval_is_the_normal_interval():
    moments = RunningMoments()
    for value in (0.1, -0.4, 0.3, 0.7, -0.2):
        moments.add(value)
    fixed = confidence_sequence(moments, 0.05, 500, anytime=False)
    half = NormalDist().inv_cdf(0.975) * math.sqrt(moments.variance / 5)
    assert (fixed.lower, fixed.upper) == pytest.approx((moments.mean - half, moments.mean + half))
    anytime = confidence_sequence(moments, 0.05, 500)
    assert anytime.lower < fixed.lower and anytime.upper > fixed.upper
    empty = confidence_sequence(RunningMoments(), 0.05, 500).to_dict()
    assert empty["lower"] is None and empty["upper"] is None  # JSON has no infinity


@pytest.mark.parametrize("baseline", ["fixed", "running"])
def test_ipw_observation_is_unbiased(baseline):
    rng = np.random.default_rng(1)
    share, mu_control, mu_candidate, n = 0.2, 2.0, 1.7, 40_000
    served_candidate = rng.random(n) < share
    y = np.where(served_candidate, mu_candidate, mu_control) + 0.5 * rng.standard_normal(n)
    moments, level = RunningMoments(), RunningMoments()
    for a, value in zip(served_candidate, y):
        m = 3.0 if baseline == "fixed" else (level.mean if level.n else float(value))
        moments.add(ipw_observation(bool(a), share, float(value), m))
        level.add(float(value))
    standard_error = math.sqrt(moments.variance / n)
    assert abs(moments.mean - (mu_candidate - mu_control)) < 4 * standard_error
    assert standard_error < 0.02  # the check has teeth: 0.3 is 15 standard errors from 0


def test_ipw_observation_needs_a_share_strictly_inside():
    for share in (0.0, 1.0):
        with pytest.raises(ValueError, match="0 < share < 1"):
            ipw_observation(True, share, 2.0, 2.0)


def test_the_sequence_covers_the_mean_at_every_time_and_the_fixed_interval_does_not():
    rng = np.random.default_rng(2)
    true_mean, sequences, length = 0.3, 200, 400
    missed = {True: 0, False: 0}
    for x in true_mean + rng.standard_normal((sequences, length)):
        moments, out = RunningMoments(), {True: False, False: False}
        for value in x:
            moments.add(float(value))
            for anytime in (True, False):
                interval = confidence_sequence(moments, 0.05, 500, anytime)
                out[anytime] |= not interval.lower <= true_mean <= interval.upper
        for anytime in (True, False):
            missed[anytime] += out[anytime]
    assert missed[True] / sequences <= 0.05
    assert missed[False] / sequences > 0.2  # checked at every n, a fixed-n interval misses


# -- the policy -----------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [[5, 25, 50, 100], [0, 25, 50, 100]])
def test_a_clearly_better_candidate_promotes_through_every_step(steps):
    policy = RolloutPolicy(make_config(steps=steps))
    decisions = run(policy, np.random.default_rng(3), 5000, paired(-0.3))
    assert [d.action for d in decisions] == ["promote", "promote", "complete"]
    assert [d.to_share for d in decisions] == [25.0, 50.0, 100.0]
    assert all(d.by == "policy" and d.evidence["quality"]["upper"] < 0 for d in decisions)
    # each decision carries the evidence of the step it ended, not of the empty next one
    assert all(d.evidence["step_scored"] >= 50 for d in decisions)
    judged = [d.evidence["latency_p95_ratio"] for d in decisions if d.from_share > 0]
    assert judged == [pytest.approx(1.0)] * len(judged) and len(judged) >= 2
    assert policy.state.status == "complete" and policy.share == 100.0
    assert policy.state.step == len(steps) - 1
    assert request(policy, np.random.default_rng(0), 2.0, 1.0) is None  # no more decisions


def test_a_clearly_worse_candidate_rolls_back_at_the_first_step():
    policy = RolloutPolicy(make_config(steps=[5, 25, 50, 100]))
    decisions = run(policy, np.random.default_rng(4), 5000, paired(+0.3))
    assert [d.action for d in decisions] == ["rollback"]
    assert decisions[0].reason.startswith("quality")
    assert decisions[0].evidence["quality"]["lower"] > 0
    assert decisions[0].from_share == 5.0 and decisions[0].to_share == 0.0
    assert policy.state.status == "rolled_back" and policy.share == 0.0
    assert policy.state.step == 0


def test_a_slow_candidate_rolls_back_once_both_arms_have_enough_latencies():
    config = make_config(steps=[50, 100], guardrails={"min_latency_samples": 20})
    slow = RolloutPolicy(config)
    decisions = run(slow, np.random.default_rng(5), 2000, paired(0.0), latency=(1.0, 2.0))
    assert [d.action for d in decisions] == ["rollback"]
    assert decisions[0].reason.startswith("latency")
    step = decisions[0].evidence["step"]
    assert min(step["candidate"]["requests"], step["control"]["requests"]) == 20
    assert decisions[0].evidence["latency_p95_ratio"] == pytest.approx(2.0)
    within = RolloutPolicy(config)  # 1.4x is within max_latency_ratio = 1.5
    assert run(within, np.random.default_rng(5), 300, paired(0.0), latency=(1.0, 1.4)) == []


def test_a_failing_candidate_rolls_back_on_its_error_rate():
    config = make_config(mode="canary", steps=[50, 100], guardrails={"max_error_rate": 0.05})
    rng = np.random.default_rng(6)
    failing = RolloutPolicy(config)
    decisions = []
    for _ in range(500):
        decision = request(failing, rng, 2.0, 2.0, candidate_error=rng.random() < 0.3)
        decisions += [decision] if decision else []
        if failing.state.status != "running":
            break
    assert [d.action for d in decisions] == ["rollback"]
    assert decisions[0].reason.startswith("errors")
    assert decisions[0].evidence["step"]["candidate"]["error_rate"] > 0.05
    assert failing.state.status == "rolled_back"
    assert failing.state.total["control"].errors == 0


@pytest.mark.parametrize(("action", "status"), [("hold", "held"), ("rollback", "rolled_back")])
def test_an_inconclusive_step_holds_or_rolls_back_as_configured(action, status):
    config = make_config(steps=[0, 50, 100], max_requests=300, on_inconclusive=action)
    policy = RolloutPolicy(config)
    decisions = run(policy, np.random.default_rng(7), 1000, paired(0.0))
    assert [d.action for d in decisions] == [action]
    assert decisions[0].reason.startswith("inconclusive")
    assert decisions[0].evidence["step_scored"] == 300
    assert policy.state.status == status and policy.share == 0.0
    held = RolloutPolicy(make_config(steps=[25, 50, 100], max_requests=300))
    run(held, np.random.default_rng(7), 1000, paired(0.0))
    assert held.state.status == "held" and held.share == 25.0  # a hold keeps the share


def test_resuming_a_held_step_gives_it_max_requests_more():
    policy = RolloutPolicy(make_config(steps=[0, 50, 100], max_requests=300))
    rng = np.random.default_rng(8)
    assert [d.action for d in run(policy, rng, 1000, paired(0.0))] == ["hold"]
    policy.resume()
    assert run(policy, rng, 299, paired(0.0)) == []
    decisions = run(policy, rng, 1, paired(0.0))
    assert [d.action for d in decisions] == ["hold"]
    assert decisions[0].evidence["step_scored"] == 600


def test_observations_of_another_rollout_are_ignored():
    policy = RolloutPolicy(make_config())
    for _ in range(300):
        obs = Observation("control", 0.0, 0, "another-rollout", nll=2.0, shadow_nll=5.0)
        assert policy.observe(obs) is None
    state = policy.state
    assert state.quality.n == 0 and state.step_scored == 0
    assert state.total["control"].requests == 0 and state.status == "running"
    with pytest.raises(ValueError, match="unknown arm"):
        policy.observe(Observation("treatment", 0.0, 0, state.rollout_id, nll=2.0))


def test_operator_actions_and_the_states_they_need():
    policy = RolloutPolicy(make_config(steps=[5, 25, 50, 100]))
    with pytest.raises(RolloutStateError, match="paused or held"):
        policy.resume()
    decision = policy.promote("looks fine")
    assert (decision.action, decision.by, decision.reason) == ("promote", "operator", "looks fine")
    assert (decision.from_share, decision.to_share, policy.state.step) == (5.0, 25.0, 1)
    assert policy.pause().action == "pause" and policy.state.status == "paused"
    with pytest.raises(RolloutStateError, match="only a running rollout can pause"):
        policy.pause()
    # paused: counts, takes no automatic decision, even on a clearly worse candidate
    rng = np.random.default_rng(9)
    for _ in range(400):
        assert request(policy, rng, *paired(+0.5)(rng)) is None
    assert policy.state.total["candidate"].requests + policy.state.total["control"].requests == 400
    assert policy.interval().lower > 0 and policy.state.status == "paused"
    assert policy.resume().action == "resume" and policy.state.status == "running"
    assert request(policy, rng, *paired(+0.5)(rng)).action == "rollback"  # evidence kept
    assert policy.share == 0.0
    for act in (policy.promote, policy.rollback, policy.pause, policy.resume):
        with pytest.raises(RolloutStateError):
            act()


def test_operator_promotion_of_the_last_step_completes_and_then_only_rollback():
    policy = RolloutPolicy(make_config(steps=[50, 100]))
    decision = policy.promote()
    assert decision.action == "complete" and policy.state.status == "complete"
    assert policy.share == 100.0
    for act in (policy.promote, policy.pause, policy.resume):
        with pytest.raises(RolloutStateError):
            act()
    assert policy.rollback().to_share == 0.0 and policy.state.status == "rolled_back"


def test_a_held_rollout_can_be_promoted_or_paused_by_an_operator():
    policy = RolloutPolicy(make_config(steps=[0, 50, 100], max_requests=100))
    run(policy, np.random.default_rng(10), 500, paired(0.0))
    assert policy.state.status == "held"
    assert policy.promote().action == "promote" and policy.state.status == "running"
    assert policy.state.step_scored == 0 and policy.share == 50.0


@pytest.mark.parametrize("steps", [[5, 25, 50, 100], [20, 100]])
def test_a_canary_promotes_a_clearly_better_candidate_on_unpaired_evidence(steps):
    config = make_config(mode="canary", steps=steps, guardrails={"min_latency_samples": 5})
    policy = RolloutPolicy(config)

    def draw(rng):  # unpaired: each arm's own NLL, a common per-request spread
        level = 0.2 * rng.standard_normal()
        return 2.0 + level, 1.5 + level

    decisions = run(policy, np.random.default_rng(11), 20_000, draw)
    assert [d.action for d in decisions][-1] == "complete"
    assert {d.action for d in decisions} <= {"promote", "complete"}
    assert policy.state.status == "complete" and policy.share == 100.0
    quality = policy.interval()
    assert quality.upper < 0 and quality.lower < -0.5 < quality.upper  # covers the truth
    assert not decisions[0].evidence["quality"]["paired"]


def test_a_canary_rolls_back_a_clearly_worse_candidate():
    config = make_config(mode="canary", steps=[5, 25, 50, 100])
    policy = RolloutPolicy(config)
    decisions = run(policy, np.random.default_rng(12), 20_000, lambda rng: (2.0, 2.6))
    assert [d.action for d in decisions] == ["rollback"] and policy.state.step == 0


# -- the state ------------------------------------------------------------------------------


def test_state_round_trips_through_json_and_decides_identically():
    config = make_config(
        mode="canary", steps=[10, 20, 50, 100], guardrails={"min_latency_samples": 5}
    )

    def draw(rng):
        level = 0.3 * rng.standard_normal()
        return 2.0 + level, 1.8 + level

    policy = RolloutPolicy(config)
    assert [d.action for d in run(policy, np.random.default_rng(13), 360, draw)] == ["promote"]
    assert policy.state.step == 1 and policy.state.step_scored > 0  # mid-step, evidence kept
    policy.add_feedback("candidate", 1.0)
    restored = RolloutPolicy(
        config, RolloutState.from_dict(json.loads(json.dumps(policy.state.to_dict())))
    )
    assert restored.state == policy.state
    assert restored.state.total["candidate"].feedback_n == 1
    assert restored.interval() == policy.interval()
    # the same requests from here on: the same decisions, at the same requests
    seeds = np.random.default_rng(14).integers(1 << 30, size=3000)
    trails = []
    for p in (policy, restored):
        trail = []
        for k, seed in enumerate(seeds):
            d = request(p, np.random.default_rng(seed), *draw(np.random.default_rng(seed + 1)))
            if d is not None:
                trail.append((k, d.action, d.step, d.to_share, d.evidence))
            if p.state.status != "running":
                break
        trails.append(trail)
    assert [t[1] for t in trails[0]] == ["promote", "complete"]
    assert trails[0] == trails[1]
    assert policy.state.quality == restored.state.quality


def test_an_unknown_status_is_refused():
    state = RolloutPolicy(make_config()).state.to_dict() | {"status": "exploded"}
    with pytest.raises(ValueError, match="unknown rollout status"):
        RolloutState.from_dict(state)


# -- the rollout file -----------------------------------------------------------------------

VALID = """\
control:
  kind: finetune
  bank: banks/k16
candidate:
  bank: banks/k16-v2
  routing: {rule: top_n, max_active: 3}
mode: shadow
assignment: {key: "header:x-user", salt: v2}
steps: [0, 25, 100]
min_requests: 100
max_requests: 5000
on_inconclusive: rollback
guardrails: {alpha: 0.01, max_latency_ratio: 2, min_latency_samples: 10}
state_dir: state
"""


def test_a_valid_rollout_file_loads_with_paths_from_its_folder(tmp_path):
    folder = tmp_path / "rollouts"
    folder.mkdir()
    (folder / "k16.yaml").write_text(VALID)
    config = RolloutConfig.load(folder / "k16.yaml")
    assert config.candidate.bank == str(folder.resolve() / "banks" / "k16-v2")
    assert config.control.bank == str(folder.resolve() / "banks" / "k16")
    assert config.state_dir == str(folder.resolve() / "state")
    assert config.candidate.routing == {"rule": "top_n", "max_active": 3}
    assert (config.mode, config.steps, config.on_inconclusive) == (
        "shadow",
        (0, 25, 100),
        "rollback",
    )
    assert (config.min_requests, config.max_requests) == (100, 5000)
    assert config.assignment.key == "header:x-user" and config.assignment.salt == "v2"
    g = config.guardrails
    assert (g.alpha, g.max_latency_ratio, g.min_latency_samples) == (0.01, 2, 10)
    assert g.max_error_rate == 0.05  # unspecified: the default
    (folder / "minimal.yaml").write_text("candidate: {bank: /abs/bank}\n")
    minimal = RolloutConfig.load(folder / "minimal.yaml")
    assert minimal.candidate.bank == "/abs/bank"
    assert minimal.state_dir == str(folder.resolve() / "rollout-state")  # beside the file
    assert minimal.control.kind == "base" and minimal.mode == "canary"


def _with(line_from: str, line_to: str) -> str:
    assert line_from in VALID
    return VALID.replace(line_from, line_to)


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("candidate: [bank\n", "not valid YAML"),
        ("- candidate\n", "must be a mapping"),
        ("mode: shadow\n", "candidate"),
        (VALID + "stepz: [5]\n", "stepz"),
        (_with("{alpha: 0.01,", "{alpah: 0.01,"), "guardrails has unknown fields ['alpah']"),
        (_with("  kind: finetune", "  kind: finetune\n  colour: red"), "control has unknown"),
        (_with("steps: [0, 25, 100]", "steps: [0, 25, 25, 100]"), "steps must increase"),
        (_with("steps: [0, 25, 100]", "steps: [50, 25]"), "steps must increase"),
        (_with("steps: [0, 25, 100]", "steps: 25"), "steps must be a list"),
        (_with("steps: [0, 25, 100]", "steps: [5, 250]"), "steps: every share"),
        (_with("mode: shadow", "mode: canary"), "a step of 0 %"),
        (_with("mode: shadow", "mode: blue-green"), "mode="),
        (_with("  kind: finetune\n  bank: banks/k16", "  kind: adapter"), "control.path"),
        (_with("  kind: finetune", "  kind: lora"), "control.kind"),
        (_with('key: "header:x-user"', "key: cookie"), "assignment.key"),
        (_with('key: "header:x-user"', 'key: "header:"'), "assignment.key"),
        (_with('key: "header:x-user"', "key: 7"), "assignment.key"),
        (_with("alpha: 0.01", "alpha: 1.5"), "guardrails.alpha"),
        (_with("alpha: 0.01", "alpha: 0"), "guardrails.alpha"),
        (_with("max_latency_ratio: 2", "max_latency_ratio: 0.5"), "guardrails.max_latency_ratio"),
        (_with("min_latency_samples: 10", "min_latency_samples: 0"), "min_latency_samples"),
        (_with("max_requests: 5000", "max_requests: 10"), "max_requests"),
        (_with("min_requests: 100", "min_requests: 0"), "min_requests"),
        (_with("on_inconclusive: rollback", "on_inconclusive: retry"), "on_inconclusive"),
        (_with("  bank: banks/k16-v2", "  bank: 16"), "candidate.bank"),
        (_with("  routing: {rule: top_n, max_active: 3}", "  routing: top_n"), "routing"),
        (_with("state_dir: state", "state_dir: [a, b]"), "state_dir"),
    ],
)
def test_a_bad_rollout_file_names_the_field(tmp_path, text, names):
    path = tmp_path / "rollout.yaml"
    path.write_text(text)
    with pytest.raises(RolloutConfigError) as err:
        RolloutConfig.load(path)
    assert names in str(err.value)
    assert str(err.value).startswith(str(path))  # which file


def test_a_missing_rollout_file_is_a_config_error(tmp_path):
    with pytest.raises(RolloutConfigError, match="cannot read the rollout file"):
        RolloutConfig.load(tmp_path / "nowhere.yaml")


# -- assignment -----------------------------------------------------------------------------

KEYS = [f"user-{i}" for i in range(10_000)]


def test_assignment_is_sticky_and_salted():
    assert all(assign_arm(k, 30, "s") == assign_arm(k, 30, "s") for k in KEYS[:500])
    assert key_point("user-1", "s") == key_point("user-1", "s")
    points = [key_point(k, "s") for k in KEYS[:2000]]
    assert all(0 <= u < 1 for u in points)
    moved = sum(assign_arm(k, 50, "s") != assign_arm(k, 50, "t") for k in KEYS[:2000]) / 2000
    assert 0.4 < moved < 0.6  # another salt splits independently: 2 · 0.5 · 0.5


def test_assignment_is_monotone_in_the_share():
    arms = {s: [assign_arm(k, s, "salt") for k in KEYS] for s in (5, 25, 50, 100)}
    for low, high in ((5, 25), (25, 50), (50, 100)):
        on_low = [a == "candidate" for a in arms[low]]
        on_high = [a == "candidate" for a in arms[high]]
        assert all(h for lo, h in zip(on_low, on_high) if lo)  # nobody moves back
        assert sum(on_high) > sum(on_low)


@pytest.mark.parametrize("share", [5, 10, 50, 90])
def test_the_candidate_gets_its_share_of_keys(share):
    on = sum(assign_arm(k, share, "ttmm") == "candidate" for k in KEYS) / len(KEYS)
    assert abs(on - share / 100) < 0.02


def test_assignment_at_zero_and_full_share_and_without_a_key():
    assert {assign_arm(k, 0, "s") for k in KEYS[:200]} | {assign_arm(None, 0, "s")} == {"control"}
    full = {assign_arm(k, 100, "s") for k in KEYS[:200]} | {assign_arm(None, 100, "s")}
    assert full == {"candidate"}
    drawn = [assign_arm(None, 50, "s") for _ in range(2000)]
    assert 0.4 < drawn.count("candidate") / 2000 < 0.6  # drawn anew each time


# -- state and decision files ---------------------------------------------------------------


def _controller_config(tmp_path, **fields) -> RolloutConfig:
    fields.setdefault("steps", [0, 25, 50, 100])
    return make_config(state_dir=str(tmp_path / "state"), **fields)


def _feed(controller: RolloutController, n: int, shift: float, seed: int) -> list[Decision]:
    """Up to ``n`` requests through the controller, until its first decision."""
    rng, decisions = np.random.default_rng(seed), []
    for _ in range(n):
        ticket = controller.assign(None)
        arm, share, step, rollout_id = ticket.arm, ticket.share, ticket.step, ticket.rollout_id
        control, candidate = paired(shift)(rng)
        served, other = (candidate, control) if arm == "candidate" else (control, candidate)
        obs = Observation(arm, share, step, rollout_id, served, other, latency_s=0.1)
        decision = controller.observe(obs)
        if decision is not None:
            return [decision]
    return decisions


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_decisions_are_logged_and_a_restart_resumes_the_rollout(tmp_path):
    config = _controller_config(tmp_path)
    controller = RolloutController(config)
    decisions = _feed(controller, 150, -0.3, seed=15)
    assert [d.action for d in decisions] == ["promote"]
    log = tmp_path / "state" / "decisions.jsonl"
    logged = _lines(log)
    rows = [json.loads(line) for line in logged]
    assert [r["action"] for r in rows] == ["start", "promote"]
    assert rows[1]["evidence"]["quality"]["upper"] < 0 and rows[1]["to_share"] == 25.0
    before = controller.policy.state

    again = RolloutController(config)  # a restarted server, the same file
    state = again.policy.state
    assert state.rollout_id == before.rollout_id and state.step == 1
    assert state.quality == before.quality and state.total == before.total
    assert len(_lines(log)) == 2  # resuming logs nothing
    status = again.status()
    assert status["share"] == {"candidate": 25.0, "control": 75.0}
    assert [d["action"] for d in status["decisions"]] == ["start", "promote"]
    ticket = again.assign("user-1")
    assert (ticket.share, ticket.step, ticket.rollout_id) == (25.0, 1, before.rollout_id)

    changed = RolloutController(_controller_config(tmp_path, steps=[0, 50, 100]))
    assert changed.policy.state.rollout_id != before.rollout_id
    assert changed.policy.state.step == 0 and changed.policy.state.quality.n == 0
    lines = _lines(log)
    assert len(lines) == 3 and lines[:2] == logged  # the old lines kept as they were
    new = json.loads(lines[-1])
    assert (new["action"], new["reason"]) == ("start", "the rollout file changed")
    assert new["rollout_id"] == changed.policy.state.rollout_id
    assert RolloutStore(tmp_path / "state").load_state() == changed.policy.state


def test_guardrail_changes_resume_the_same_rollout(tmp_path):
    first = RolloutController(_controller_config(tmp_path))
    stricter = _controller_config(tmp_path, guardrails={"alpha": 0.01}, min_requests=80)
    assert RolloutController(stricter).policy.state.rollout_id == first.policy.state.rollout_id


def test_a_cut_last_line_is_skipped_and_the_next_decision_still_reads(tmp_path, caplog):
    controller = RolloutController(_controller_config(tmp_path))
    log = tmp_path / "state" / "decisions.jsonl"
    with open(log, "a", encoding="utf-8") as handle:
        handle.write('{"action": "promote", "by": "pol')  # a crash in the middle of a write
    store = RolloutStore(tmp_path / "state")
    with caplog.at_level(logging.WARNING):
        assert [d["action"] for d in store.decisions()] == ["start"]
    assert "cut line" in caplog.text
    controller.act("pause", "night")
    assert [d["action"] for d in store.decisions()] == ["start", "pause"]
    assert store.decisions(limit=1)[0]["reason"] == "night"
    assert RolloutStore(tmp_path / "empty").decisions() == []


def test_operator_actions_through_the_controller(tmp_path):
    controller = RolloutController(_controller_config(tmp_path))
    with pytest.raises(ValueError, match="unknown rollout action"):
        controller.act("explode")
    assert controller.act("promote").to_share == 25.0
    assert controller.act("rollback", "bad vibes").reason == "bad vibes"
    with pytest.raises(RolloutStateError):
        controller.act("resume")
    assert controller.assign("anyone").arm == "control"  # rolled back: all on control
    state = RolloutStore(tmp_path / "state").load_state()
    assert state.status == "rolled_back" and state == controller.policy.state
    restarted = controller.restart(_controller_config(tmp_path), "a new candidate")
    assert restarted.action == "start" and restarted.reason == "a new candidate"
    assert controller.policy.state.status == "running"


def test_a_corrupt_state_file_names_the_file(tmp_path):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.json").write_text('{"rollout_id": "x"}')
    with pytest.raises(ValueError, match="state.json is not a rollout state"):
        RolloutController(_controller_config(tmp_path))


# -- A/A: the false promotion rate ----------------------------------------------------------


class FixedNPolicy(RolloutPolicy):
    """The policy with the fixed-n normal interval, checked after every request."""

    def interval(self, anytime: bool = True) -> Interval:
        return super().interval(anytime=False)


def test_a_a_rollouts_rarely_promote_and_a_fixed_n_interval_often_does():
    config = make_config(steps=[0, 25, 50, 100], min_requests=50, max_requests=500)
    differences = 0.1 * np.random.default_rng(16).standard_normal((200, 500))
    promoted = {}
    for kind in (RolloutPolicy, FixedNPolicy):
        count = 0
        for row in differences:
            policy = kind(config)
            rollout_id = policy.state.rollout_id
            for d in row.tolist():
                decision = policy.observe(Observation("control", 0.0, 0, rollout_id, 0.0, d))
                if decision is not None:
                    count += decision.action in ("promote", "complete")
                    break
        promoted[kind] = count / len(differences)
    assert promoted[RolloutPolicy] <= 0.05
    assert promoted[FixedNPolicy] > 0.05
    assert promoted[FixedNPolicy] > 3 * max(promoted[RolloutPolicy], 0.01)


def test_a_restarted_server_resumes_the_swapped_in_candidate_not_the_files(tmp_path):
    config = _controller_config(tmp_path, control={"kind": "finetune"})
    assert config.control.bank == config.candidate.bank  # the control stays the file's
    controller = RolloutController(config)
    swapped = controller.restart(config.with_candidate("banks/v2"), "new candidate banks/v2")
    again = RolloutController(config)  # the server restarts on the same file
    assert again.current_config().candidate.bank == "banks/v2"
    assert again.current_config().control.bank == config.candidate.bank
    assert again.status()["rollout_id"] == swapped.rollout_id
    assert [d["action"] for d in again.status()["decisions"]] == ["start", "start"]
