"""The ΔW merge: PEFT equivalence, the explicit formula, fold = low-rank, exact restore."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, build_tiny_gpt2, build_tiny_llama, random_adapter

from ttmm.adapter import LoraAdapter, load_adapter, save_adapter
from ttmm.factors import ExpertFactors, merge_group
from ttmm.merge import ExpertMerger, MergeError, linear_modules
from ttmm.routing import RoutingPlan

VOCAB = 512
ARCHITECTURES = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2}


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_bitwise_unchanged(model, before):
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), f"{name} changed"


def tokens(batch=1, length=12, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def explicit_model(model_fn, adapters, plan):
    """The reference: a fresh copy of the model with W += Σ w_k s_k B_k A_k written out."""
    model = model_fn(VOCAB)
    modules = linear_modules(model)
    with torch.no_grad():
        for name, module in modules.items():
            delta = torch.zeros(
                module.weight.shape[::-1] if name_is_conv(module) else module.weight.shape
            )
            touched = False
            for k, w in zip(plan.expert_ids, plan.weights):
                layer = adapters[k].layers.get(name)
                if layer is not None:
                    delta += w * layer.scale * layer.B @ layer.A
                    touched = True
            if touched:
                module.weight += delta.T if name_is_conv(module) else delta
    return model


def name_is_conv(module):
    return not isinstance(module, torch.nn.Linear)


def test_merge_group_is_one_lora_of_summed_rank():
    g = torch.Generator().manual_seed(0)
    As = [torch.randn(r, 5, generator=g) for r in (2, 3)]
    Bs = [torch.randn(4, r, generator=g) for r in (2, 3)]
    scales, weights = (2.0, 0.5), (0.3, 0.7)
    experts = [  # one group of one layer; the scale is folded into A
        ExpertFactors([(A * s).unsqueeze(0)], [B.T.unsqueeze(0)]) for A, B, s in zip(As, Bs, scales)
    ]
    merged = merge_group(experts, weights, 0)
    A, B = merged.A[0], merged.B[0]
    assert A.shape == (5, 5) and B.shape == (4, 5) and merged.rank == 5
    expected = 0.3 * 2.0 * Bs[0] @ As[0] + 0.7 * 0.5 * Bs[1] @ As[1]
    torch.testing.assert_close(B @ A, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(merged.B_t[0].T, B, atol=0, rtol=0)
    # averaging A and B separately is a different model: make sure we did not do that
    wrong = (0.3 * Bs[0][:, :2] + 0.7 * Bs[1][:, :2]) @ (0.3 * As[0] + 0.7 * As[1][:2])
    assert not torch.allclose(B @ A, wrong, atol=ATOL)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_one_adapter_fold_equals_peft_merge_and_unload(arch, tmp_path):
    from peft import PeftModel

    model_fn = ARCHITECTURES[arch]
    model = model_fn(VOCAB)
    adapter = random_adapter(model, rank=4, alpha=8, seed=1)
    if arch == "gpt2":
        adapter.config["fan_in_fan_out"] = True
    save_adapter(adapter, tmp_path / "a")
    reloaded = load_adapter(tmp_path / "a")
    x = tokens()

    peft_model = PeftModel.from_pretrained(model_fn(VOCAB), tmp_path / "a")
    expected = peft_model.merge_and_unload()(x).logits

    before = snapshot(model)
    merger = ExpertMerger(model, [reloaded])
    with torch.no_grad(), merger.fold(RoutingPlan.explicit({0: 1.0})):
        got = model(x).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert_bitwise_unchanged(model, before)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rslora", [False, True])
def test_weighted_merge_of_three_ranks_matches_formula_in_both_modes(arch, rslora):
    model_fn = ARCHITECTURES[arch]
    model = model_fn(VOCAB)
    adapters = [
        random_adapter(model, rank=r, alpha=a, seed=s, use_rslora=rslora)
        for r, a, s in ((2, 4, 1), (4, 16, 2), (8, 8, 3))
    ]
    # one expert adapts only part of the model: the merge must leave other layers alone
    some = list(adapters[1].layers)[::2]
    adapters[1] = LoraAdapter({k: adapters[1].layers[k] for k in some}, adapters[1].config)
    plan = RoutingPlan.explicit({0: 0.2, 1: 0.5, 2: 0.3})
    x = tokens()
    expected = explicit_model(model_fn, adapters, plan)(x).logits

    before = snapshot(model)
    merger = ExpertMerger(model, adapters)
    with torch.no_grad():
        with merger.fold(plan):
            folded = model(x).logits
        assert_bitwise_unchanged(model, before)
        with merger.lowrank([plan]):
            lowrank = model(x).logits
    assert_bitwise_unchanged(model, before)
    torch.testing.assert_close(folded, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(lowrank, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(folded, model(x).logits, atol=ATOL)  # the merge did something


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_lowrank_batch_rows_carry_their_own_merge(arch):
    model = ARCHITECTURES[arch](VOCAB)
    adapters = [random_adapter(model, rank=r, seed=s) for r, s in ((2, 1), (4, 2), (6, 3))]
    plans = [
        RoutingPlan.explicit({0: 1.0}),
        RoutingPlan.explicit({1: 0.4, 2: 0.6}),
        RoutingPlan.base(),
    ]
    x = tokens(batch=3)
    merger = ExpertMerger(model, adapters)
    with torch.no_grad():
        with merger.lowrank(plans):
            batched = model(x).logits
        for i, plan in enumerate(plans):
            with merger.fold(plan):
                single = model(x[i : i + 1]).logits
            torch.testing.assert_close(batched[i : i + 1], single, atol=ATOL, rtol=0)


def test_restore_is_bitwise_after_an_error_inside_the_block():
    model = build_tiny_llama(VOCAB)
    merger = ExpertMerger(model, [random_adapter(model, seed=1), random_adapter(model, seed=2)])
    before = snapshot(model)
    with (
        pytest.raises(RuntimeError, match="boom"),
        merger.fold(RoutingPlan.explicit({0: 0.5, 1: 0.5})),
    ):
        assert not torch.equal(
            model.model.layers[0].self_attn.q_proj.weight,
            before["model.layers.0.self_attn.q_proj.weight"],
        )
        raise RuntimeError("boom")
    assert_bitwise_unchanged(model, before)
    with pytest.raises(MergeError, match="batch of 2"), torch.no_grad():
        with merger.lowrank([RoutingPlan.explicit({0: 1.0}), RoutingPlan.explicit({1: 1.0})]):
            model(tokens(batch=3))
    assert_bitwise_unchanged(model, before)
    assert all(not m._forward_hooks for m in model.modules()), "hooks left behind"


@pytest.mark.parametrize("memory", ["buffer", "swap"])
@pytest.mark.parametrize("grouped", [True, False])
def test_restore_is_bitwise_after_a_failure_half_way_through_the_merge(
    memory, grouped, monkeypatch
):
    import ttmm.merge

    model = build_tiny_llama(VOCAB)
    merger = ExpertMerger(model, [random_adapter(model, seed=1)], memory=memory, grouped=grouped)
    before = snapshot(model)
    calls = []
    real_product = ttmm.merge.fold_product

    def fails_third_time(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        real_product(*args)

    monkeypatch.setattr(ttmm.merge, "fold_product", fails_third_time)
    with pytest.raises(RuntimeError, match="out of memory"):
        with merger.fold(RoutingPlan.explicit({0: 1.0})):
            pass
    assert len(calls) == 3  # two groups were already swapped in when the third failed
    assert_bitwise_unchanged(model, before)


def test_merger_holds_no_copy_of_base_weights_at_rest():
    model = build_tiny_llama(VOCAB)
    merger = ExpertMerger(model, [random_adapter(model, rank=2, seed=1)])
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    [expert] = merger.experts.get([0])
    held = [t for t in (*expert.A, *expert.B_t) if t is not None]
    assert all(t.data_ptr() not in base_ptrs for t in held)
    adapter_numel = sum(t.numel() for t in held)
    assert adapter_numel == merger.n_parameters == merger.source.read(0).n_parameters
    assert adapter_numel < sum(p.numel() for p in model.parameters()) / 4


def test_adapter_for_another_model_is_rejected_with_names():
    model = build_tiny_llama(VOCAB)
    gpt2 = build_tiny_gpt2(VOCAB)
    with pytest.raises(MergeError, match="matches no linear layer"):
        ExpertMerger(model, [random_adapter(gpt2)])
    wide = random_adapter(model)
    name = next(iter(wide.layers))
    layer = wide.layers[name]
    wide.layers[name] = type(layer)(A=torch.zeros(4, 7), B=layer.B, scale=layer.scale)
    with pytest.raises(MergeError, match="maps .* features"):
        ExpertMerger(model, [wide])


def test_unknown_expert_in_plan_is_rejected():
    model = build_tiny_llama(VOCAB)
    merger = ExpertMerger(model, [random_adapter(model)])
    before = snapshot(model)
    with (
        pytest.raises(MergeError, match="unknown expert"),
        merger.fold(RoutingPlan.explicit({3: 1.0})),
    ):
        pass
    assert_bitwise_unchanged(model, before)


def test_adapter_paths_with_extra_prefix_are_matched_by_suffix():
    model = build_tiny_llama(VOCAB)
    adapter = random_adapter(model, seed=4)
    prefixed = LoraAdapter({f"wrapper.{k}": v for k, v in adapter.layers.items()}, adapter.config)
    x = tokens()
    with torch.no_grad():
        with ExpertMerger(model, [adapter]).fold(RoutingPlan.explicit({0: 1.0})):
            a = model(x).logits
        with ExpertMerger(model, [prefixed]).fold(RoutingPlan.explicit({0: 1.0})):
            b = model(x).logits
    assert torch.equal(a, b)
