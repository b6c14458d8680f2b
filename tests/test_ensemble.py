"""Ensembling: p = Σ w_k p_k over single-expert forwards; one expert ensembled = merged."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL

from ttmm.eval.ensemble import ensemble_generate, ensemble_score, members, mixture_log_probs
from ttmm.routing import RoutingConfig, RoutingPlan

TEXT = (
    "The river flows through the old town, past the market and the stone bridge, where "
    "fishermen sell the morning catch. In winter the water freezes and children skate on it, "
    "while the bakers light their ovens before dawn and the smell of bread fills every street."
)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("expert", [0, 2])
def test_ensemble_of_one_expert_equals_merge_of_one_expert(tiny_engine, expert):
    plan = RoutingPlan.explicit({expert: 1.0})
    (merged,) = tiny_engine.score([TEXT], prefix_tokens=20, plans=[plan])
    (ensembled,) = ensemble_score(tiny_engine, [TEXT], [plan], prefix_tokens=20)
    assert ensembled.n_tokens == merged.n_tokens > 0
    assert ensembled.nll == pytest.approx(merged.nll, abs=ATOL * merged.n_tokens)
    (base,) = tiny_engine.score([TEXT], prefix_tokens=20, plans=[RoutingPlan.base()])
    assert abs(base.nll - merged.nll) > ATOL * merged.n_tokens  # the expert does something


def test_top1_routing_ensemble_equals_top1_merge(tiny_engine):
    routing = RoutingConfig(rule="top_n", max_active=1)
    (merged,) = tiny_engine.score([TEXT], prefix_tokens=20, routing=routing)
    plans = tiny_engine.route([TEXT], routing.replace(prefix_tokens=20))
    (ensembled,) = ensemble_score(tiny_engine, [TEXT], plans, prefix_tokens=20)
    assert merged.plan == ensembled.plan
    assert ensembled.nll == pytest.approx(merged.nll, abs=ATOL * merged.n_tokens)


def test_two_expert_ensemble_mixes_probabilities_not_weights(tiny_engine):
    """NLL = −Σ_t log(0.7 p_1 + 0.3 p_3), by hand from two single-expert forwards."""
    before = snapshot(tiny_engine.model)
    plan = RoutingPlan.explicit({1: 0.7, 3: 0.3})
    P = 20
    ids = tiny_engine.tokenizer([TEXT], add_special_tokens=False, return_tensors="pt").input_ids
    probs = []
    for k in (1, 3):
        with tiny_engine.merged([RoutingPlan.explicit({k: 1.0})]):
            probs.append(torch.softmax(tiny_engine.model(input_ids=ids).logits[0].double(), -1))
    mix = 0.7 * probs[0] + 0.3 * probs[1]  # (s, V)
    targets = ids[0, P:]  # scored targets t >= P, predicted from positions t - 1
    expected = -torch.log(mix[P - 1 : -1].gather(1, targets[:, None])).sum().item()
    (ensembled,) = ensemble_score(tiny_engine, [TEXT], [plan], prefix_tokens=P)
    assert ensembled.n_tokens == ids.shape[1] - P
    assert ensembled.nll == pytest.approx(expected, abs=ATOL * ensembled.n_tokens)
    for name, tensor in tiny_engine.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_members_normalise_weights_and_mixture_is_normalised():
    parts = members(RoutingPlan.explicit({4: 2.0, 1: 6.0}))
    assert [p.expert_ids for p, _ in parts] == [(4,), (1,)]
    assert [w for _, w in parts] == pytest.approx([0.25, 0.75])
    assert members(RoutingPlan.base())[0][0].is_base
    logits = [torch.randn(3, 11), torch.randn(3, 11)]
    mixed = mixture_log_probs(logits, [0.25, 0.75])
    assert torch.allclose(mixed.exp().sum(-1), torch.ones(3), atol=ATOL)


def test_ensemble_generation_of_one_expert_equals_merged_generation(tiny_engine):
    plan = RoutingPlan.explicit({2: 1.0})
    prompt = TEXT[:80]
    (merged,) = tiny_engine.generate([prompt], max_new_tokens=6, plans=[plan])
    assert ensemble_generate(tiny_engine, prompt, plan, max_new_tokens=6) == merged.text
    mixed = ensemble_generate(tiny_engine, prompt, RoutingPlan.explicit({0: 0.5, 2: 0.5}), 6)
    assert isinstance(mixed, str)
