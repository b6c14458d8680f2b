"""The TTMM model: per-prompt routing in a batch, thread safety, exact restore after every call."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import ATOL

from ttmm.merge import MergeError
from ttmm.model import InputError
from ttmm.routing import RoutingConfig, RoutingPlan

PROMPTS = [
    "The Roman Empire was the post-Republican state of ancient Rome",
    "def parse_args(argv):\n    parser = argparse.ArgumentParser()",
    "Photosynthesis is the process by which green plants use sunlight",
]
PLANS = [
    RoutingPlan.explicit({0: 1.0}),
    RoutingPlan.explicit({1: 0.6, 2: 0.4}),
    RoutingPlan.explicit({3: 0.5, 0: 0.25, 2: 0.25}),
]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def long_text(seed: int) -> str:
    words = ["alpha", "river", "stone", "number", "light", "green", "market", "code", "lambda"]
    g = torch.Generator().manual_seed(seed)
    return " ".join(words[i] for i in torch.randint(0, len(words), (90,), generator=g).tolist())


def test_generate_returns_routing_and_restores_weights(tiny_engine):
    before = snapshot(tiny_engine.model)
    results = tiny_engine.generate(PROMPTS, max_new_tokens=4)
    assert_unchanged(tiny_engine.model, before)
    plans = tiny_engine.route(PROMPTS)
    assert [r.plan for r in results] == plans
    for r in results:
        assert r.completion_tokens == 4 and r.finish_reason == "length" and r.prompt_tokens > 0
        assert 1 <= len(r.plan.expert_ids) <= 3 and sum(r.plan.weights) == pytest.approx(1.0)


def test_batch_of_three_merges_equals_three_single_calls(tiny_engine):
    texts = [long_text(s) for s in range(3)]
    batched = tiny_engine.score(texts, prefix_tokens=50, plans=PLANS)
    singles = [tiny_engine.score([t], prefix_tokens=50, plans=[p])[0] for t, p in zip(texts, PLANS)]
    for b, s in zip(batched, singles):
        assert b.n_tokens == s.n_tokens
        assert b.nll == pytest.approx(s.nll, abs=ATOL * max(1, s.n_tokens))
    # the three merges really differ
    assert len({round(s.nll, 3) for s in singles}) == 3
    base = tiny_engine.score(texts, prefix_tokens=50, plans=[RoutingPlan.base()] * 3)
    assert all(abs(b.nll - s.nll) > 1e-3 for b, s in zip(base, singles))

    gen_batched = tiny_engine.generate(PROMPTS, max_new_tokens=6, plans=PLANS)
    for prompt, plan, got in zip(PROMPTS, PLANS, gen_batched):
        [single] = tiny_engine.generate([prompt], max_new_tokens=6, plans=[plan])
        assert got.text == single.text and got.plan == plan


def test_routed_batch_equals_routed_single_calls(tiny_engine):
    texts = [long_text(s) for s in range(3, 6)]
    batched = tiny_engine.score(texts, prefix_tokens=50)
    for text, b in zip(texts, batched):
        [s] = tiny_engine.score([text], prefix_tokens=50)
        # the encoder pads a batch, so similarities agree to float precision, not bitwise
        assert s.plan.expert_ids == b.plan.expert_ids
        assert s.plan.weights == pytest.approx(b.plan.weights, abs=ATOL)
        assert b.nll == pytest.approx(s.nll, abs=ATOL * s.n_tokens)


def test_eight_threads_get_the_outputs_of_sequential_calls(tiny_engine):
    jobs = [(PROMPTS[i % 3], PLANS[(i * 2) % 3]) for i in range(8)]
    expected = [
        tiny_engine.generate([p], max_new_tokens=5, plans=[plan])[0].text for p, plan in jobs
    ]
    before = snapshot(tiny_engine.model)
    results: list[str | None] = [None] * 8
    barrier = threading.Barrier(8)

    def worker(i):
        barrier.wait()
        prompt, plan = jobs[i]
        results[i] = tiny_engine.generate([prompt], max_new_tokens=5, plans=[plan])[0].text

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == expected
    assert_unchanged(tiny_engine.model, before)


@pytest.mark.parametrize("mode", ["fold", "lowrank"])
def test_weights_restored_after_a_call_that_raised_half_way(tiny_engine, monkeypatch, mode):
    before = snapshot(tiny_engine.model)
    real_forward = tiny_engine.model.forward
    calls = {"n": 0}

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("out of memory half-way through decoding")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_engine.model, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="half-way"):
        tiny_engine.generate(PROMPTS[:1], max_new_tokens=8, plans=PLANS[1:2], mode=mode)
    assert calls["n"] == 3
    monkeypatch.undo()
    assert_unchanged(tiny_engine.model, before)
    assert all(not m._forward_hooks for m in tiny_engine.model.modules())


def test_bad_calls_raise_clear_errors_and_change_nothing(tiny_engine):
    before = snapshot(tiny_engine.model)
    with pytest.raises(MergeError, match="unknown expert"):
        tiny_engine.generate(PROMPTS[:1], max_new_tokens=2, plans=[RoutingPlan.explicit({9: 1.0})])
    with pytest.raises(InputError, match="2 plans for 1 prompts"):
        tiny_engine.generate(PROMPTS[:1], plans=PLANS[:2])
    with pytest.raises(InputError, match="one merge for the whole batch"):
        tiny_engine.generate(PROMPTS, plans=PLANS, mode="fold")
    with pytest.raises(InputError, match="mode="):
        tiny_engine.generate(PROMPTS[:1], mode="dense")
    with pytest.raises(InputError, match="max_new_tokens"):
        tiny_engine.generate(PROMPTS[:1], max_new_tokens=0)
    with pytest.raises(InputError, match="nothing is left to score"):
        tiny_engine.score(["too short"], prefix_tokens=50)
    assert_unchanged(tiny_engine.model, before)


def test_score_never_scores_the_routed_prefix(tiny_engine):
    text = long_text(7)
    n = len(tiny_engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    [s] = tiny_engine.score([text], prefix_tokens=50)
    assert s.n_tokens == n - 50
    [s10] = tiny_engine.score([text], prefix_tokens=10, plans=[s.plan])
    assert s10.n_tokens == n - 10 and s10.nll > s.nll


def test_routing_overrides_apply(tiny_engine):
    [plan] = tiny_engine.route(PROMPTS[:1], RoutingConfig(rule="top_n", max_active=2))
    assert plan.rule == "top_n" and len(plan.expert_ids) == 2
    [one] = tiny_engine.generate(
        PROMPTS[:1], max_new_tokens=2, routing=RoutingConfig(rule="top_n", max_active=1)
    )
    assert len(one.plan.expert_ids) == 1 and one.plan.weights == (1.0,)


def test_two_engines_over_one_model_share_its_lock_and_keep_its_weights(tiny_engine):
    """Folds by two engines over one model, from many threads, never restore each other's
    merged weights as originals: the lock belongs to the model, not to an engine."""
    from ttmm.model import TTMM, model_lock

    model = tiny_engine.model
    other = TTMM(model, tiny_engine.tokenizer, tiny_engine.encoder, tiny_engine.bank)
    assert other.lock is tiny_engine.lock is model_lock(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plans = [RoutingPlan.explicit({k: 1.0}) for k in range(tiny_engine.bank.num_experts)]
    barrier = threading.Barrier(8)
    errors = []

    def worker(i: int) -> None:
        engine = (tiny_engine, other)[i % 2]
        barrier.wait()
        try:
            for j in range(6):
                with engine.merged([plans[(i + j) % len(plans)]], mode="fold"):
                    engine.model(input_ids=torch.tensor([[1, 2, 3]]))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("model", ["tiny_engine", "gpt2_engine"])
def test_the_prefill_scores_the_prompt_as_score_does_and_changes_no_token(model, request):
    """generate(score_prefix=P) keeps the logits of the prefill it runs anyway: the NLL after
    P tokens equals score()'s (right padding, a forward of its own) under left padding, per
    row and with one prefix per row, and the greedy continuation is the one without it."""
    engine = request.getfixturevalue(model)
    texts = ["word " * 30 + "end", "The history of the Roman empire spans many centuries " * 2]
    plans = [RoutingPlan.explicit({0: 1.0}), RoutingPlan.explicit({1: 0.5, 2: 0.5})]
    plain = engine.generate(texts, max_new_tokens=4, plans=plans)
    scored = engine.generate(texts, max_new_tokens=4, plans=plans, score_prefix=8)
    assert [g.text for g in scored] == [g.text for g in plain]
    expected = engine.score(texts, prefix_tokens=8, plans=plans)
    for generation, score in zip(scored, expected, strict=True):
        nll, tokens = generation.prompt_nll
        assert tokens == score.n_tokens > 0
        assert nll == pytest.approx(score.nll, abs=ATOL * tokens)
    per_row = engine.prompt_nll(texts, plans, [8, 12])
    assert per_row[0] == pytest.approx(scored[0].prompt_nll, abs=ATOL * 40)
    assert per_row[1][1] == expected[1].n_tokens - 4  # four more tokens unscored


def test_prompt_logprobs_from_the_prefill_match_a_forward_per_prompt_under_left_padding(
    tiny_engine,
):
    """generate(prompt_logprobs=k): each prompt token after the first gets log p(token |
    tokens before it) under the row's merge, padding aside, with the k likeliest there; the
    same prefill also scores the prompt (score_prefix) and the continuation is unchanged."""
    engine = tiny_engine
    texts = ["short prompt", "a much longer prompt about the history of the Roman empire"]
    plans = [RoutingPlan.explicit({0: 1.0}), RoutingPlan.explicit({1: 0.5, 2: 0.5})]
    plain = engine.generate(texts, max_new_tokens=3, plans=plans)
    scored = engine.generate(
        texts, max_new_tokens=3, plans=plans, prompt_logprobs=4, score_prefix=2
    )
    assert [g.text for g in scored] == [g.text for g in plain]
    for text, plan, generation in zip(texts, plans, scored, strict=True):
        ids = engine.tokenizer([text], return_tensors="pt")["input_ids"]
        assert generation.prompt_ids == tuple(ids[0].tolist())
        with torch.no_grad(), engine.merged([plan]):
            log_probs = torch.log_softmax(engine.model(input_ids=ids).logits[0, :-1].float(), -1)
        expected = log_probs.gather(-1, ids[0, 1:, None])[:, 0]
        lp = generation.prompt_logprobs
        assert lp.chosen.shape == (1, ids.shape[1] - 1) and lp.top_ids.shape[-1] == 4
        assert lp.chosen[0].tolist() == pytest.approx(expected.tolist(), abs=ATOL)
        top = log_probs.topk(4, dim=-1).values
        assert torch.allclose(lp.top_logprobs[0], top, atol=ATOL)
        nll, tokens = generation.prompt_nll
        assert tokens == ids.shape[1] - 2
        assert nll == pytest.approx(-float(expected[1:].sum()), abs=ATOL * tokens)
    assert plain[0].prompt_logprobs is None and plain[0].prompt_ids == ()
    for k in (0, 2):  # a one-token prompt has nothing to score, with or without alternatives
        (alone,) = engine.generate(["0"], max_new_tokens=1, plans=plans[:1], prompt_logprobs=k)
        assert alone.prompt_logprobs.chosen.shape == (1, 0) and len(alone.prompt_ids) == 1


@pytest.fixture
def gpt2_engine(tmp_path, tiny_gpt2, smol_tokenizer, encoder):
    from conftest import write_random_bank

    from ttmm.bank import Bank
    from ttmm.model import TTMM

    bank = Bank.load(write_random_bank(tmp_path / "gpt2-bank", tiny_gpt2, encoder.dim))
    return TTMM(tiny_gpt2, smol_tokenizer, encoder, bank)
