"""The fold's memory policies: kept buffers or fresh outputs, grouped or per-layer products."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, build_tiny_gpt2, build_tiny_llama, random_adapter

from ttmm.fold import BUFFER_MAX_RAM_FRACTION, default_memory
from ttmm.merge import ExpertMerger, MergeError
from ttmm.routing import RoutingPlan

VOCAB = 512
ARCHITECTURES = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2}
PLAN = RoutingPlan.explicit({0: 0.3, 2: 0.7})


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def assert_bitwise_unchanged(model, before):
    for name, p in model.state_dict().items():
        assert torch.equal(p, before[name]), f"{name} changed"


def tokens(batch=1, length=10):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def adapters_for(model, n=3):
    return [random_adapter(model, rank=2 + 2 * k, alpha=4.0, seed=k) for k in range(n)]


def adapted_bytes(merger):
    return sum(m.weight.numel() * 4 for g in merger.groups for m in g.modules)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_buffer_fold_gives_the_logits_of_swap_and_lowrank(arch):
    model = ARCHITECTURES[arch](VOCAB)
    adapters = adapters_for(model)
    x = tokens()
    before = snapshot(model)
    logits = {}
    with torch.no_grad():
        for memory in ("buffer", "swap"):
            for grouped in (True, False):
                merger = ExpertMerger(model, adapters, memory=memory, grouped=grouped)
                for _ in range(2):  # the second fold reuses the buffers of the first
                    with merger.fold(PLAN):
                        logits[memory, grouped] = model(x).logits
                    assert_bitwise_unchanged(model, before)
        with merger.lowrank([PLAN]):
            lowrank = model(x).logits
        base = model(x).logits
    for key, got in logits.items():
        torch.testing.assert_close(got, lowrank, atol=ATOL, rtol=0, msg=str(key))
    assert not torch.allclose(lowrank, base, atol=ATOL)  # the merge changed something


@pytest.mark.parametrize("memory", ["buffer", "swap"])
def test_restore_is_bitwise_after_an_exception_inside_the_block(memory):
    model = build_tiny_llama(VOCAB)
    merger = ExpertMerger(model, adapters_for(model), memory=memory)
    before = snapshot(model)
    q = model.model.layers[0].self_attn.q_proj.weight
    for _ in range(2):  # a buffer written by a failed block is reused correctly
        with pytest.raises(KeyError, match="boom"), merger.fold(PLAN):
            assert not torch.equal(q, before["model.layers.0.self_attn.q_proj.weight"])
            raise KeyError("boom")
        assert_bitwise_unchanged(model, before)
    with torch.no_grad(), merger.fold(PLAN):
        after_failure = model(tokens()).logits
    with torch.no_grad(), ExpertMerger(model, adapters_for(model), memory="swap").fold(PLAN):
        fresh = model(tokens()).logits
    torch.testing.assert_close(after_failure, fresh, atol=ATOL, rtol=0)


def test_buffers_are_kept_under_buffer_and_none_under_swap():
    model = build_tiny_llama(VOCAB)
    buffered = ExpertMerger(model, adapters_for(model), memory="buffer")
    swapping = ExpertMerger(model, adapters_for(model), memory="swap")
    assert buffered.buffer_bytes == 0  # allocated at the first fold, not before
    for merger in (buffered, swapping):
        with merger.fold(PLAN):
            pass
    assert buffered.buffer_bytes == adapted_bytes(buffered)
    assert swapping.buffer_bytes == 0
    buffered.release_buffers()
    assert buffered.buffer_bytes == 0


def test_two_mergers_never_share_a_buffer_and_their_folds_nest():
    """Merger b folds on top of merger a's fold; a's merged weights survive b's exit."""
    model = build_tiny_llama(VOCAB)
    a = ExpertMerger(model, adapters_for(model), memory="buffer")
    b = ExpertMerger(model, adapters_for(model), memory="buffer")
    for merger in (a, b):
        with merger.fold(PLAN):
            pass
    a_ptrs = {t.data_ptr() for t in a._outputs._kept.values()}
    b_ptrs = {t.data_ptr() for t in b._outputs._kept.values()}
    assert a_ptrs and b_ptrs and not a_ptrs & b_ptrs
    before = snapshot(model)
    x = tokens()
    other = RoutingPlan.explicit({1: 1.0})
    with torch.no_grad(), a.fold(PLAN):
        a_only = model(x).logits
        with b.fold(other):
            both = model(x).logits
        torch.testing.assert_close(model(x).logits, a_only, atol=0, rtol=0)
    assert_bitwise_unchanged(model, before)
    assert not torch.allclose(both, a_only, atol=ATOL)


def test_a_fold_inside_a_fold_of_the_same_buffered_merger_is_refused():
    model = build_tiny_llama(VOCAB)
    merger = ExpertMerger(model, adapters_for(model), memory="buffer")
    before = snapshot(model)
    with merger.fold(PLAN):
        merged = model.model.layers[0].mlp.up_proj.weight.clone()
        with pytest.raises(MergeError, match="already hold a fold"), merger.fold(PLAN):
            pass
        assert torch.equal(model.model.layers[0].mlp.up_proj.weight, merged)
    assert_bitwise_unchanged(model, before)


def test_grouping_stacks_layers_of_one_shape():
    model = build_tiny_llama(VOCAB)
    adapters = adapters_for(model)
    grouped = ExpertMerger(model, adapters)
    per_layer = ExpertMerger(model, adapters, grouped=False)
    # tiny Llama: q/o (64x64), k/v (32x64), gate/up (96x64), down (64x96)
    assert len(grouped.groups) == 4
    assert len(per_layer.groups) == len(adapters[0].layers)
    assert grouped.n_parameters == per_layer.n_parameters == sum(a.n_parameters for a in adapters)
    [expert] = grouped.experts.get([1])
    assert [A.shape[0] for A in expert.A] == [len(g.modules) for g in grouped.groups]


def test_unknown_memory_policy_is_rejected():
    model = build_tiny_llama(VOCAB)
    with pytest.raises(MergeError, match="memory='pinned' is unknown"):
        ExpertMerger(model, adapters_for(model), memory="pinned")


def test_default_memory_keeps_buffers_on_a_cpu_with_room_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    ram = 16 * 2**30
    assert default_memory(int(BUFFER_MAX_RAM_FRACTION * ram), cpu, ram_bytes=ram) == "buffer"
    assert default_memory(int(BUFFER_MAX_RAM_FRACTION * ram) + 1, cpu, ram_bytes=ram) == "swap"
    assert default_memory(1, cuda, ram_bytes=ram) == "swap"
    model = build_tiny_llama(VOCAB)
    assert ExpertMerger(model, adapters_for(model)).memory == "buffer"  # a tiny model on a CPU
