"""The three routing rules of design §2 against hand-computed cases, and their fallbacks."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from ttmm.routing import RoutingConfig, RoutingError, RoutingPlan, route

Z = torch.tensor([0.9, 0.5, 0.1, 0.8])  # similarities of 4 experts


def softmax(z, beta):
    e = [math.exp(v / beta) for v in z]
    return [v / sum(e) for v in e]


def test_paper_sparse_softmax_by_hand():
    beta, tau = 0.2, 0.1
    p = softmax(Z.tolist(), beta)  # ≈ [0.547, 0.074, 0.010, 0.369]: experts 0 and 3 pass τ
    plan = route(Z, RoutingConfig(rule="sparse_softmax", beta=beta, tau=tau, max_active=10))
    excess = {0: p[0] - tau, 3: p[3] - tau}
    total = sum(excess.values())
    assert plan.expert_ids == (0, 3)
    assert plan.weights == pytest.approx([excess[0] / total, excess[3] / total], abs=1e-9)
    assert plan.similarities == pytest.approx([0.9, 0.8])
    assert plan.rule == "sparse_softmax" and plan.fallback is None


def test_reference_threshold_rule_by_hand():
    beta, tau = 0.2, 0.1
    p = softmax(Z.tolist(), beta)
    plan = route(Z, RoutingConfig(rule="threshold", beta=beta, tau=tau))
    assert plan.expert_ids == (0, 3)
    assert plan.weights == pytest.approx([p[0] / (p[0] + p[3]), p[3] / (p[0] + p[3])], abs=1e-9)
    assert plan.rule == "threshold"


def test_top_n_by_hand():
    p = softmax(Z.tolist(), 1.0)
    plan = route(Z, RoutingConfig(rule="top_n", beta=1.0, max_active=3))
    kept = p[0] + p[3] + p[1]
    assert plan.expert_ids == (0, 3, 1)
    assert plan.weights == pytest.approx([p[0] / kept, p[3] / kept, p[1] / kept], abs=1e-9)


def test_reference_beta_is_sqrt_of_paper_beta():
    config = RoutingConfig.from_reference(beta=0.2)
    assert config.beta == pytest.approx(0.04) and config.rule == "threshold"
    # the reference kernel exp(-(1 - z) / beta_ref^2), normalised, is softmax(z / β)
    z = torch.tensor([0.3, 0.2, 0.25], dtype=torch.float64)
    kernel = torch.exp(-(1 - z) / 0.2**2)
    p_ref = kernel / kernel.sum()
    plan = route(z, RoutingConfig.from_reference(beta=0.2, tau=0.0))
    kept = p_ref[list(plan.expert_ids)]
    assert plan.weights == pytest.approx((kept / kept.sum()).tolist(), abs=1e-9)


@pytest.mark.parametrize("rule", ["sparse_softmax", "threshold"])
def test_max_active_caps_the_kept_set_largest_first(rule):
    z = torch.tensor([0.50, 0.52, 0.49, 0.51, 0.48])
    plan = route(z, RoutingConfig(rule=rule, beta=1.0, tau=0.0, max_active=2))
    assert plan.expert_ids == (1, 3)
    assert sum(plan.weights) == pytest.approx(1.0)


def test_nothing_kept_falls_back_to_base_model():
    z = torch.tensor([0.5, 0.5, 0.5, 0.5])  # p = 0.25 each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = route(z, RoutingConfig(rule="sparse_softmax", beta=1.0, tau=0.3))
    assert plan.is_base and plan.fallback == "base" and plan.weights == ()


def test_nan_falls_back_to_the_single_nearest_expert():
    z = torch.tensor([0.1, float("nan"), 0.7, 0.2])
    plan = route(z, RoutingConfig())
    assert plan.expert_ids == (2,) and plan.weights == (1.0,) and plan.fallback == "nearest"
    all_nan = route(torch.full((3,), float("nan")), RoutingConfig())
    assert all_nan.is_base and all_nan.fallback == "base"


def test_tau_at_or_above_one_over_k_warns():
    with pytest.warns(UserWarning, match="tau=0.25 >= 1/K"):
        route(Z, RoutingConfig(tau=0.25))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        route(Z, RoutingConfig(tau=0.2))  # below 1/4: no warning
        route(Z, RoutingConfig(rule="top_n", tau=0.9))  # top_n ignores τ


@pytest.mark.parametrize(
    "field,value",
    [
        ("rule", "softmax"),
        ("beta", 0.0),
        ("beta", float("nan")),
        ("tau", 1.0),
        ("tau", -0.1),
        ("max_active", 0),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(RoutingError, match=field if field != "rule" else "unknown"):
        RoutingConfig(**{field: value})


def test_plan_key_ignores_order_and_rounds_weights():
    a = RoutingPlan.explicit({1: 0.300001, 2: 0.699999})
    b = RoutingPlan.explicit({2: 0.7, 1: 0.3})
    assert a.key() == b.key()
    assert (
        RoutingPlan.explicit({1: 0.3, 2: 0.7}).key() != RoutingPlan.explicit({1: 0.7, 2: 0.3}).key()
    )
    with pytest.raises(RoutingError, match="repeat"):
        RoutingPlan(expert_ids=(1, 1), weights=(0.5, 0.5))


def test_to_dict_says_which_rule_ran():
    plan = route(Z, RoutingConfig(rule="top_n", max_active=2))
    data = plan.to_dict()
    assert data["rule"] == "top_n"
    assert [e["id"] for e in data["experts"]] == [0, 3]
    assert {"weight", "similarity"} <= set(data["experts"][0])
