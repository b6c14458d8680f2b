"""Banks larger than memory (issue 21): the LRU of experts' factors, its budget, pins and
prefetch, and an engine over 2,000 experts on disk that evicts and still merges exactly."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import build_tiny_llama, random_adapter, save_tiny_llama, write_random_bank

from ttmm.bank import Bank
from ttmm.expert_cache import MB, CacheBudgetError, ExpertCache
from ttmm.factors import ExpertFactors, MergeError
from ttmm.merge import ExpertMerger
from ttmm.model import TTMM, InputError
from ttmm.routing import RoutingConfig, RoutingPlan

VOCAB = 512


def entry(nbytes: int) -> ExpertFactors:
    return ExpertFactors([torch.zeros(nbytes // 4)], [None])


def counting_cache(budget: int | None, sizes=(100,) * 10, readers: int = 1):
    reads = []

    def read(k):
        reads.append(k)
        return entry(sizes[k])

    return ExpertCache(read, sizes, budget, readers=readers), reads


def test_the_least_recently_used_expert_goes_first_and_the_budget_holds():
    cache, reads = counting_cache(budget=300)
    cache.get([0, 1])
    cache.get([2])
    cache.get([0])  # 0 is now the most recent: 1 goes next
    cache.get([3])
    assert 1 not in cache and {0, 2, 3} <= set(range(10)) and len(cache) == 3
    assert reads == [0, 1, 2, 3]
    assert cache.stats.hits == 1 and cache.stats.misses == 4 and cache.stats.evictions == 1
    assert cache.stats.peak_bytes <= 300 and cache.nbytes == 300


def test_a_merge_larger_than_the_budget_is_refused_before_any_read():
    cache, reads = counting_cache(budget=250)
    with pytest.raises(CacheBudgetError, match=r"needs 3 expert\(s\).*--adapter-cache-mb 1 "):
        cache.get([0, 1, 2])
    assert reads == []
    cache.pin([5])
    with pytest.raises(CacheBudgetError, match=r"and 1 pinned"):
        cache.get([0, 1])


def test_pinned_experts_stay_and_prefetch_never_evicts_them():
    cache, reads = counting_cache(budget=300)
    cache.pin([7])
    for k in range(6):
        cache.get([k])
    assert 7 in cache and reads.count(7) == 1
    cache.prefetch([8, 9])  # fits by evicting older, unpinned experts
    assert {7, 8, 9} <= {k for k in range(10) if k in cache}
    cache.unpin([7])
    cache.get([0, 1, 2])
    assert 7 not in cache and cache.stats.peak_bytes <= 300


def test_two_threads_needing_one_expert_read_it_once():
    gate = threading.Event()
    reads = []

    def read(k):
        reads.append(k)
        gate.wait(5)
        return entry(100)

    cache = ExpertCache(read, [100] * 4, budget_bytes=None)
    threads = [threading.Thread(target=cache.get, args=([2],)) for _ in range(3)]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join(5)
    assert reads == [2] and 2 in cache


def test_a_merge_reads_its_missing_experts_in_parallel_in_recency_order():
    together = threading.Barrier(3, timeout=5)  # broken unless 3 reads run at once
    reads = []

    def read(k):
        reads.append(k)
        if k < 3:
            together.wait()
        return entry(100 * (k + 1))

    cache = ExpertCache(read, [100 * (k + 1) for k in range(6)], budget_bytes=None, readers=4)
    got = cache.get([2, 0, 1, 2])
    assert [e.nbytes for e in got] == [300, 100, 200, 300] and sorted(reads) == [0, 1, 2]
    assert list(cache._entries) == [2, 0, 1]  # recency as asked, whichever read ended first
    cache.get([0, 4])  # one miss: read in the calling thread
    assert list(cache._entries) == [2, 1, 0, 4] and cache.stats.misses == 4


def test_a_failed_read_among_parallel_reads_is_raised_after_the_others_end():
    def read(k):
        if k == 1:
            raise MergeError("expert 1: corrupt")
        return entry(100)

    cache = ExpertCache(read, [100] * 4, budget_bytes=200, readers=4)
    with pytest.raises(MergeError, match="expert 1: corrupt"):
        cache.get([0, 1])
    assert 0 in cache and 1 not in cache and not cache._in_use and not cache._reading
    assert len(cache.get([2, 3])) == 2 and cache.nbytes == 200  # 0 evicted as usual


@pytest.fixture(scope="module")
def big_bank(tmp_path_factory, smol_tokenizer):
    """2,000 tiny experts on disk (about 15 kB each), every one different."""
    model = build_tiny_llama(len(smol_tokenizer))
    adapters = [random_adapter(model, rank=2, alpha=4.0, seed=k) for k in range(2000)]
    path = write_random_bank(tmp_path_factory.mktemp("big") / "bank", model, adapters=adapters)
    return path


def test_an_engine_over_2000_experts_on_disk_evicts_and_merges_exactly(
    big_bank, smol_tokenizer, encoder
):
    model = build_tiny_llama(len(smol_tokenizer))
    bank = Bank.load(big_bank)
    assert bank.manifest.adapted_layers  # the manifest lays the bank out: no expert read yet
    assert not bank._verified
    routing = RoutingConfig(rule="top_n", max_active=3)
    held = TTMM(model, smol_tokenizer, encoder, bank, routing)
    one_expert = held.merger.experts.sizes[0]
    budget_mb = 12 * one_expert / MB  # room for 12 of 2,000 experts
    lazy = TTMM(
        model, smol_tokenizer, encoder, Bank.load(big_bank), routing, adapter_cache_mb=budget_mb
    )
    assert len(lazy.merger.experts) == 0 and len(held.merger.experts) == 2000

    prompts = [f"text number {i} about {word}" for i, word in enumerate("abcdefghij" * 2)]
    assert [p.key() for p in lazy.route(prompts)] == [p.key() for p in held.route(prompts)]
    generator = torch.Generator().manual_seed(0)
    plans = [
        RoutingPlan.explicit({int(k): 0.2 + 0.1 * j for j, k in enumerate(ids)})
        for ids in torch.randint(0, 2000, (24, 3), generator=generator)
    ]
    ids = torch.randint(0, len(smol_tokenizer), (4, 9), generator=generator)
    for plan in plans:  # one merge folded, then the same low-rank
        for mode in ("fold", "lowrank"):
            logits = []
            for engine in (held, lazy):
                with torch.no_grad(), engine.merged([plan] * 4, mode):
                    logits.append(model(input_ids=ids).logits)
            assert torch.equal(*logits), (plan, mode)
    for start in range(0, 24, 4):  # batches whose rows carry four different merges
        rows = plans[start : start + 4]
        logits = []
        for engine in (held, lazy):
            with torch.no_grad(), engine.merged(rows, "lowrank"):
                logits.append(model(input_ids=ids).logits)
        assert torch.equal(*logits)
    wide = torch.randint(0, len(smol_tokenizer), (8, 9), generator=generator)
    rows = plans[:8]  # up to 24 experts, read and stacked in runs of at most 12
    assert len({k for p in rows for k in p.expert_ids}) > 12
    logits = []
    for engine in (held, lazy):
        with torch.no_grad(), engine.merged(rows, "lowrank"):
            logits.append(model(input_ids=wide).logits)
    assert torch.equal(*logits)
    stats = lazy.merger.experts.stats
    assert stats.evictions > 0 and stats.misses > 12
    assert stats.peak_bytes <= lazy.merger.experts.budget_bytes
    assert len(lazy.merger.experts) <= 12


def test_a_cache_too_small_for_one_merge_names_the_smallest_budget(
    big_bank, smol_tokenizer, encoder
):
    model = build_tiny_llama(len(smol_tokenizer))
    routing = RoutingConfig(rule="top_n", max_active=10)
    bank = Bank.load(big_bank)
    with pytest.raises(
        CacheBudgetError, match=r"up to 10 experts.*--adapter-cache-mb (\d+)"
    ) as err:
        TTMM(model, smol_tokenizer, encoder, bank, routing, adapter_cache_mb=0.05)
    smallest = int(err.value.args[0].rsplit(" ", 1)[-1])
    engine = TTMM(model, smol_tokenizer, encoder, bank, routing, adapter_cache_mb=smallest)
    [plan] = engine.route(["a prompt to merge ten experts for"])
    assert len(plan.expert_ids) == 10
    engine.generate(["a prompt to merge ten experts for"], max_new_tokens=2)
    for bad in (0, -1, float("nan")):
        with pytest.raises(InputError, match="adapter_cache_mb"):
            TTMM(model, smol_tokenizer, encoder, bank, routing, adapter_cache_mb=bad)


def test_an_expert_is_checked_when_first_read_not_when_the_bank_opens(tmp_path):
    model = build_tiny_llama(VOCAB)
    path = write_random_bank(tmp_path / "bank", model, num_experts=6)
    weights = path / "experts/004/adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    merger = ExpertMerger(
        model, _source(Bank.load(path)), cache_bytes=1 << 20
    )  # opens: expert 4 is not read
    merger.plan_factors(RoutingPlan.explicit({1: 1.0}))
    with pytest.raises(ValueError, match="experts/004/adapter_model.safetensors has sha256"):
        merger.plan_factors(RoutingPlan.explicit({4: 1.0}))


def _source(bank):
    from ttmm.expert_source import ExpertSource

    return ExpertSource.from_bank(bank)


def test_cli_summarises_a_large_bank_and_routes_within_a_cache_budget(
    big_bank, smol_tokenizer, tmp_path
):
    from typer.testing import CliRunner

    from ttmm.cli import app

    model_dir = tmp_path / "tiny-llama"
    save_tiny_llama(model_dir, smol_tokenizer)
    runner = CliRunner()
    shown = runner.invoke(app, ["info", str(big_bank)], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert "2000 experts" in shown.output and "the 5 with the most tokens" in shown.output
    assert shown.output.count("topic ") == 10  # the 5 with the most and the fewest tokens
    common = ["--bank", str(big_bank), "--base-model", str(model_dir), "--rule", "top_n"]
    refused = runner.invoke(app, ["route", "a prompt", *common, "--adapter-cache-mb", "0.01"])
    assert refused.exit_code == 2 and "the smallest budget that works is" in refused.output
    assert "Traceback" not in refused.output
    routed = runner.invoke(app, ["route", "a prompt", *common, "--adapter-cache-mb", "2", "--json"])
    assert routed.exit_code == 0, routed.output
    plan = json.loads(routed.output[routed.output.index("{\n") :])  # after the spinner
    assert len(plan["experts"]) == Bank.load(big_bank).routing.max_active


def test_choosing_fold_or_lowrank_reads_no_expert(tiny_engine):
    engine = TTMM(
        tiny_engine.model, tiny_engine.tokenizer, tiny_engine.encoder, tiny_engine.bank,
        adapter_cache_mb=1.0,
    )  # fmt: skip
    plan = RoutingPlan.explicit({0: 0.5, 2: 0.5})
    ranks = [engine.bank.manifest.experts[k].rank for k in (0, 2)]
    assert engine.merger.plan_rank(plan) == sum(ranks) and len(engine.merger.experts) == 0
    engine.generate(["a prompt"], max_new_tokens=2, plans=[plan])
    stats = engine.merger.experts.stats  # one miss per expert, no hit counted by the choice
    assert (stats.misses, stats.hits) == (2, 0)


def test_a_rollout_reads_both_banks_through_one_bounded_cache(tmp_path, smol_tokenizer, encoder):
    """A rollout whose control is another bank: its experts join the merger after the
    candidate's, read on use through the same cache, and merge as when held in memory."""
    from ttmm.serve.rollout.arms import Arms
    from ttmm.serve.rollout.config import RolloutConfig, RolloutConfigError

    model = build_tiny_llama(len(smol_tokenizer))
    candidate = write_random_bank(tmp_path / "candidate", model, num_experts=12, seed=1)
    control = write_random_bank(tmp_path / "control", model, num_experts=9, seed=2)
    config = RolloutConfig.from_dict(
        {
            "candidate": {"bank": str(candidate), "routing": {"rule": "top_n", "max_active": 3}},
            "control": {
                "kind": "bank",
                "bank": str(control),
                "routing": {"rule": "top_n", "max_active": 3},
            },
            "mode": "shadow",
            "steps": [0, 100],
            "state_dir": str(tmp_path / "state"),
        }
    )
    held = Arms.load(config, model, smol_tokenizer, encoder)
    one_expert = max(held.engine.merger.experts.sizes)
    bounded = Arms.load(
        config, model, smol_tokenizer, encoder, adapter_cache_mb=4 * one_expert / MB
    )
    cache = bounded.engine.merger.experts
    assert len(held.engine.merger.experts) == 21 and len(cache) == 0  # nothing read yet

    prompts = [f"a prompt about {word} number {i}" for i, word in enumerate("abcdefgh")]
    ids = torch.randint(0, len(smol_tokenizer), (2, 7), generator=torch.Generator().manual_seed(0))
    control_ids = set()
    for prompt in prompts:
        rows = []
        for arms in (held, bounded):
            ask = arms.merge("control", prompt)
            [control_plan] = ask.router.route([prompt], ask.routing)
            [candidate_plan] = arms.engine.route([prompt])
            rows.append([candidate_plan, control_plan])
        assert [p.key() for p in rows[0]] == [p.key() for p in rows[1]]
        assert min(rows[0][1].expert_ids) >= 12  # the control's ids follow the candidate's
        control_ids |= set(rows[0][1].expert_ids)
        logits = []
        for arms, plans in zip((held, bounded), rows):
            with torch.no_grad(), arms.engine.merged(plans, "lowrank"):
                logits.append(model(input_ids=ids).logits)
        assert torch.equal(*logits), prompt
    assert len(control_ids) > 1 and cache.stats.evictions > 0
    assert cache.stats.peak_bytes <= cache.budget_bytes  # 6 experts a batch, 4 held at most
    with pytest.raises(RolloutConfigError, match=r"adapter_cache_mb: .*--adapter-cache-mb \d+"):
        Arms.load(config, model, smol_tokenizer, encoder, adapter_cache_mb=one_expert / MB)
    wide = RolloutConfig.from_dict(
        config.to_dict()
        | {
            "control": {
                "kind": "bank",
                "bank": str(control),
                "routing": {"rule": "top_n", "max_active": 6},
            }
        }
    )
    with pytest.raises(RolloutConfigError, match=r"control bank \(up to 6 experts"):
        Arms.load(wide, model, smol_tokenizer, encoder, adapter_cache_mb=4 * one_expert / MB)
