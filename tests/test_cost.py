"""mode='auto': fold or low-rank by predicted cost (ttmm.cost), and TTMM following it."""

from __future__ import annotations

import pytest
import torch

from ttmm.cost import (
    MEASURED_COSTS,
    AdaptedShape,
    ModeCosts,
    Workload,
    choose_mode,
    crossover_tokens,
    fold_seconds,
    lowrank_seconds,
    measured_costs,
)
from ttmm.routing import RoutingPlan

# SmolLM2-135M's 210 adapted linear layers
SMOL = AdaptedShape(layers=210, weights=106_168_320, fan_sum=305_280)
COSTS = ModeCosts(
    fold_seconds_per_weight=5e-10,
    fold_seconds_per_flop=1e-11,
    lowrank_seconds_per_layer_call=2e-5,
    lowrank_seconds_per_flop=1e-11,
)


@pytest.mark.parametrize("rank", [8, 24, 80])
def test_auto_folds_from_the_crossover_on(rank):
    n = crossover_tokens(rank, SMOL, COSTS)
    assert n is not None and n > 1
    before, at = (Workload.generation(1, 50, t) for t in (n - 1, n))
    assert choose_mode(1, rank, before, SMOL, COSTS) == "lowrank"
    assert choose_mode(1, rank, at, SMOL, COSTS) == "fold"
    # at the crossover the fold is no dearer than low-rank, one token earlier it was
    assert fold_seconds(rank, SMOL, COSTS) <= lowrank_seconds(rank, at, SMOL, COSTS)
    assert fold_seconds(rank, SMOL, COSTS) > lowrank_seconds(rank, before, SMOL, COSTS)


def test_crossover_formula_by_hand():
    # rank 8: fold = W (5e-10 + 16e-11) = 0.0701 s; low-rank = 4.2 ms a call (210 * 2e-5)
    # + 48.8 us a token position (2 * 8 * 305280 * 1e-11); n new tokens: 4.2488 ms n + 2.393 ms
    # (49 + n positions), >= 0.0701 s from n = 15.9, so 16
    fold = SMOL.weights * (5e-10 + 2 * 8 * 1e-11)
    assert fold_seconds(8, SMOL, COSTS) == pytest.approx(fold)
    work = Workload.generation(rows=1, prompt_tokens=50, new_tokens=10)
    assert work == Workload(forward_calls=10, token_rows=59)
    expected = 10 * 210 * 2e-5 + 2 * 8 * 305_280 * 59 * 1e-11
    assert lowrank_seconds(8, work, SMOL, COSTS) == pytest.approx(expected)
    assert crossover_tokens(8, SMOL, COSTS) == 16


def test_long_texts_to_score_fold_and_short_ones_do_not():
    assert choose_mode(1, 80, Workload.scoring(1, 2048), SMOL, COSTS) == "fold"
    assert choose_mode(1, 80, Workload.scoring(1, 60), SMOL, COSTS) == "lowrank"


def test_a_mix_of_merges_runs_lowrank_and_unknown_costs_fold_one_merge():
    long = Workload.generation(8, 50, 10_000)
    assert choose_mode(2, 8, long, SMOL, COSTS) == "lowrank"
    assert choose_mode(1, 8, Workload.generation(1, 50, 1), SMOL, None) == "fold"
    assert choose_mode(1, 8, None, SMOL, COSTS) == "fold"


def test_measured_costs_are_valid_and_bad_ones_are_named():
    assert ("cpu", "float32", "float32") in MEASURED_COSTS
    assert ("cpu", "float32", "bfloat16") in MEASURED_COSTS
    with pytest.raises(ValueError, match="lowrank_seconds_per_flop"):
        ModeCosts(1e-10, 1e-11, 1e-5, -1.0)


def _spy_modes(engine, monkeypatch) -> list[str]:
    used = []
    for mode in ("fold", "lowrank"):
        real = getattr(engine.merger, mode)

        def spy(*args, _real=real, _mode=mode):
            used.append(_mode)
            return _real(*args)

        monkeypatch.setattr(engine.merger, mode, spy)
    return used


def test_generate_auto_follows_the_cost_model(tiny_engine, monkeypatch):
    used = _spy_modes(tiny_engine, monkeypatch)
    plan = [RoutingPlan.explicit({0: 0.5, 1: 0.5})]
    # folding dear, low-rank cheap: low-rank; the reverse: fold
    tiny_engine.mode_costs = ModeCosts(1.0, 0.0, 0.0, 0.0)
    tiny_engine.generate(["hello world"], max_new_tokens=2, plans=plan)
    tiny_engine.mode_costs = ModeCosts(0.0, 0.0, 1.0, 0.0)
    tiny_engine.generate(["hello world"], max_new_tokens=2, plans=plan)
    tiny_engine.mode_costs = None  # no measurements: one merge folds, as before
    tiny_engine.generate(["hello world"], max_new_tokens=2, plans=plan)
    two = plan + [RoutingPlan.explicit({2: 1.0})]
    tiny_engine.generate(["hello world", "a second prompt"], max_new_tokens=2, plans=two)
    assert used == ["lowrank", "fold", "fold", "lowrank"]


def test_auto_gives_the_same_tokens_either_way(tiny_engine):
    plan = [RoutingPlan.explicit({0: 0.5, 1: 0.5})]
    outputs = []
    for costs in (ModeCosts(1.0, 0.0, 0.0, 0.0), ModeCosts(0.0, 0.0, 1.0, 0.0)):
        tiny_engine.mode_costs = costs
        outputs.append(tiny_engine.generate(["hello world"], max_new_tokens=4, plans=plan)[0])
    assert outputs[0].text == outputs[1].text


def test_merger_reports_the_shape_and_rank_the_costs_need():
    from conftest import build_tiny_llama, random_adapter

    from ttmm.merge import ExpertMerger

    model = build_tiny_llama(512)
    adapters = [random_adapter(model, rank=r, seed=r) for r in (2, 4, 6)]
    merger = ExpertMerger(model, adapters)
    # per block: q, o 64x64; k, v 32x64; gate, up 96x64; down 64x96; two blocks
    assert merger.adapted_shape == AdaptedShape(layers=14, weights=61_440, fan_sum=1_856)
    assert merger.plan_rank(RoutingPlan.explicit({0: 0.3, 2: 0.7})) == 8
    assert merger.plan_rank(RoutingPlan.base()) == 0


def test_engines_weigh_modes_with_the_costs_of_their_factors_dtype(
    tiny_engine, tiny_engine_bf16_factors
):
    half = tiny_engine_bf16_factors
    assert tiny_engine.mode_costs is MEASURED_COSTS["cpu", "float32", "float32"]
    assert half.mode_costs is MEASURED_COSTS["cpu", "float32", "bfloat16"]
    cpu = torch.device("cpu")
    assert measured_costs(cpu, torch.float32, torch.float16) is None  # never measured
    # bfloat16 weights with their own bfloat16 factors run other code paths: not measured
    assert measured_costs(cpu, torch.bfloat16, torch.bfloat16) is None
    # bfloat16 products make the fold cheaper on the measured CPU: auto folds sooner
    fold32 = crossover_tokens(80, SMOL, MEASURED_COSTS["cpu", "float32", "float32"])
    fold16 = crossover_tokens(80, SMOL, MEASURED_COSTS["cpu", "float32", "bfloat16"])
    assert fold16 < fold32
