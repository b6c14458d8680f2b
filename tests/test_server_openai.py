"""The OpenAI API as vLLM serves it, through the official ``openai`` client: prompt lists,
``n``, log-probabilities, ``echo``, ``seed``, ``max_completion_tokens`` and usage in streams."""

from __future__ import annotations

import openai
import pytest
import torch
from conftest import ATOL
from test_server import NEW, PROMPT, engine_text, live_server, plan_of  # noqa: F401

from ttmm.routing import RoutingPlan

OTHER = "def fibonacci(n): return n if n < 2 else"
EXPERT = {"ttmm": {"experts": {"1": 1.0}}}


@pytest.fixture
def client(live_server):  # noqa: F811
    return openai.OpenAI(base_url=live_server, api_key="sesame", max_retries=0)


def first_token_logprobs(engine, prompt: str, plan: RoutingPlan) -> torch.Tensor:
    """log p(next token | prompt) under the plan's merge, from one forward pass, (V,)."""
    batch = engine.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad(), engine.merged([plan]):
        logits = engine.model(**batch).logits[0, -1]
    return torch.log_softmax(logits.float(), dim=-1)


def test_prompt_lists_route_each_prompt_and_n_gives_n_choices(client, tiny_engine):
    completion = client.completions.create(
        model="ttmm", prompt=[PROMPT, OTHER], n=2, max_tokens=NEW, temperature=0
    )
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    routed = tiny_engine.route([PROMPT, OTHER])
    for choice, prompt, plan in zip(
        completion.choices, [PROMPT, PROMPT, OTHER, OTHER], [routed[0]] * 2 + [routed[1]] * 2
    ):
        assert plan_of(choice.model_extra).key() == plan.key()
        assert choice.text == engine_text(tiny_engine, prompt, plan)
    prompt_tokens = sum(len(tiny_engine.tokenizer(p)["input_ids"]) for p in (PROMPT, OTHER))
    assert completion.usage.prompt_tokens == prompt_tokens  # each prompt once, not per sample
    assert completion.usage.completion_tokens == 4 * NEW


def test_completion_logprobs_have_openai_shape_and_the_merged_models_values(client, tiny_engine):
    completion = client.completions.create(
        model="ttmm", prompt=PROMPT, max_tokens=NEW, temperature=0, logprobs=3, extra_body=EXPERT
    )
    [choice] = completion.choices
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.tokens) == NEW
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(NEW)]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3
        assert value == pytest.approx(max(top.values()), abs=ATOL)  # greedy takes the best
    expected = first_token_logprobs(tiny_engine, PROMPT, RoutingPlan.explicit({1: 1.0}))
    assert lp.token_logprobs[0] == pytest.approx(float(expected.max()), abs=ATOL)
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(
        expected.topk(3).values.tolist(), abs=ATOL
    )


def test_chat_logprobs_and_max_completion_tokens(client):
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(
        model="ttmm",
        messages=messages,
        max_completion_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    [choice] = chat.choices
    assert chat.usage.completion_tokens == 5
    content = choice.logprobs.content
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode())
        assert [t.logprob for t in entry.top_logprobs][0] == pytest.approx(entry.logprob, abs=ATOL)
        assert len(entry.top_logprobs) == 2
    plain = client.chat.completions.create(
        model="ttmm", messages=messages, max_completion_tokens=5, temperature=0
    )
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == choice.message.content


def test_echo_and_seed(client):
    echoed = client.completions.create(
        model="ttmm", prompt=PROMPT, max_tokens=NEW, temperature=0, echo=True, extra_body=EXPERT
    )
    plain = client.completions.create(
        model="ttmm", prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body=EXPERT
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text

    def sample(seed: int) -> list[str]:
        drawn = client.completions.create(
            model="ttmm", prompt=PROMPT, max_tokens=NEW, temperature=1.0, seed=seed, n=2
        )
        return [c.text for c in drawn.choices]

    first = sample(7)
    assert sample(7) == first  # the same seed draws the same samples
    assert first[0] != first[1]  # sample j draws with seed + j
    assert sample(8) != first


def test_streams_with_several_choices_and_usage(client, tiny_engine):
    stream = client.completions.create(
        model="ttmm",
        prompt=[PROMPT, OTHER],
        n=2,
        max_tokens=NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, usage = ["", "", "", ""], None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    routed = tiny_engine.route([PROMPT, OTHER])
    expected = [engine_text(tiny_engine, p, plan) for p, plan in zip([PROMPT, OTHER], routed)]
    assert texts == [expected[0], expected[0], expected[1], expected[1]]
    assert usage.completion_tokens == 4 * NEW

    chat = client.chat.completions.create(
        model="ttmm",
        messages=[{"role": "user", "content": PROMPT}],
        max_completion_tokens=NEW,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(chat)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == NEW


def test_streamed_logprobs_come_with_their_chunks_and_equal_the_whole_answers(client):
    """As vLLM: each streamed chunk carries its tokens' log-probabilities; all chunks
    together list what the non-streamed answer lists (same tokens, values, alternatives)."""
    asked = dict(model="ttmm", prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body=EXPERT)
    whole = client.completions.create(**asked, logprobs=3).choices[0].logprobs
    chunks = list(client.completions.create(**asked, logprobs=3, stream=True))
    texts = [c.choices[0] for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) > 1 and all(c.logprobs is not None for c in texts)
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for choice in texts:
        for name in joined:
            joined[name] += getattr(choice.logprobs, name)
    assert joined["tokens"] == whole.tokens and joined["text_offset"] == whole.text_offset
    assert joined["token_logprobs"] == pytest.approx(whole.token_logprobs, abs=ATOL)
    assert [sorted(t) for t in joined["top_logprobs"]] == [sorted(t) for t in whole.top_logprobs]

    chat = dict(model="ttmm", messages=[{"role": "user", "content": PROMPT}], temperature=0,
                max_completion_tokens=NEW, logprobs=True, top_logprobs=2)  # fmt: skip
    expected = client.chat.completions.create(**chat).choices[0].logprobs.content
    streamed = [
        entry
        for chunk in client.chat.completions.create(**chat, stream=True)
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in expected]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in expected], abs=ATOL)
    assert all(len(e.top_logprobs) == 2 for e in streamed)


def prompt_token_logprobs(engine, prompt: str, plan: RoutingPlan) -> torch.Tensor:
    """log p(token t | tokens before it) of the prompt's tokens 1.., under the plan's merge."""
    batch = engine.tokenizer([prompt], return_tensors="pt")
    with torch.no_grad(), engine.merged([plan]):
        logits = engine.model(**batch).logits[0, :-1]
    ids = batch["input_ids"][0, 1:]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, None])[:, 0]


def test_echo_with_logprobs_lists_the_prompts_tokens_first_as_vllm(client, tiny_engine):
    """The prompt's tokens come first (the first with null, having no context), scored by the
    merged model from the prefill; then the completion's, as without echo; offsets run over
    the echoed text. Streamed, the echo chunk carries the prompt's and all chunks together
    equal the whole answer."""
    asked = dict(model="ttmm", prompt=PROMPT, max_tokens=NEW, temperature=0, extra_body=EXPERT)
    plain = client.completions.create(**asked, logprobs=2).choices[0]
    [choice] = client.completions.create(**asked, logprobs=2, echo=True).choices
    lp = choice.logprobs
    n_prompt = len(tiny_engine.tokenizer(PROMPT)["input_ids"])
    assert choice.text == PROMPT + plain.text
    assert len(lp.tokens) == n_prompt + NEW and "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expected = prompt_token_logprobs(tiny_engine, PROMPT, RoutingPlan.explicit({1: 1.0}))
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(expected.tolist(), abs=ATOL)
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    for value, top in zip(lp.token_logprobs[1:n_prompt], lp.top_logprobs[1:n_prompt]):
        assert value <= max(top.values()) + ATOL  # a prompt token need not be the likeliest
    assert lp.tokens[n_prompt:] == plain.logprobs.tokens
    assert lp.token_logprobs[n_prompt:] == pytest.approx(plain.logprobs.token_logprobs, abs=ATOL)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]

    chunks = list(client.completions.create(**asked, logprobs=2, echo=True, stream=True))
    texts = [c.choices[0] for c in chunks if c.choices and c.choices[0].text]
    assert texts[0].text == PROMPT and len(texts[0].logprobs.tokens) == n_prompt
    joined = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for part in texts:
        for name in joined:
            joined[name] += getattr(part.logprobs, name)
    assert joined["tokens"] == lp.tokens and joined["text_offset"] == lp.text_offset
    assert joined["token_logprobs"][0] is None
    assert joined["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=ATOL)


def test_what_cannot_be_served_is_refused_by_name(client):
    many = client.completions.create(model="ttmm", prompt=[PROMPT, OTHER], max_tokens=1, n=9)
    assert len(many.choices) == 18  # 2 prompts x 9 samples: the schema's bounds, served
