"""TTT-NN: retrieval on the routing prefix only, from the training chunks only, one step per
neighbour nearest first, LoRA or all weights, from the base or a routed merge (hybrid), and the
base weights bitwise intact afterwards."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)

from ttmm.build.chunks import SPLIT_NAME, ChunkIndex, read_test_documents
from ttmm.build.train import LoraTrainConfig, _batches
from ttmm.eval.methods import EvalError
from ttmm.eval.ttt import TestTimeTrainer, TTTConfig, TTTConfigError
from ttmm.routing import RoutingPlan

P = 30
TRAIN = LoraTrainConfig(rank=2, alpha=4.0, max_seq_len=64, num_threads=1, shuffle=False)


@pytest.fixture(scope="module")
def built(eval_engine):  # noqa: F811
    """The evaluation engine, routed (and so retrieving) on P tokens."""
    engine = copy.copy(eval_engine)
    engine.routing = eval_engine.routing_for(prefix_tokens=P)
    return engine


@pytest.fixture(scope="module")
def index(built):
    return ChunkIndex.load(built.bank.path)


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_intact(model, before: dict[str, torch.Tensor]) -> None:
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed"
    assert not any(p.requires_grad for p in model.parameters())


def long_doc(engine):
    return next(
        d
        for d in read_test_documents(engine.bank.path)
        if len(engine.tokenizer(d.text, add_special_tokens=False).input_ids) > P + 40
    )


def test_ttt_retrieves_training_chunks_and_restores_base_weights(built, index):
    engine = built
    split = json.loads((engine.bank.path / SPLIT_NAME).read_text())["domains"]
    train_ids = {i for part in split.values() for i in part["train"]}
    test_docs = read_test_documents(engine.bank.path)
    trainer = TestTimeTrainer(engine, index, TTTConfig(neighbours=5, train=TRAIN))
    before = snapshot(engine.model)
    for doc in test_docs[:2]:
        ((score, adaptation),) = trainer.score([doc.text], prefix_tokens=P, max_tokens=128)
        # only training chunks, never the held-out document itself or any other test document
        assert set(adaptation.doc_ids) <= train_ids
        assert doc.id not in adaptation.doc_ids
        assert len(adaptation.chunk_ids) == 5 == len(adaptation.losses)  # one step per neighbour
        assert adaptation.similarities == sorted(adaptation.similarities, reverse=True)
        (base,) = engine.score([doc.text], P, 128, plans=[RoutingPlan.base()])
        assert score.n_tokens == base.n_tokens
        assert score.nll != base.nll  # the adapter was applied
        assert_intact(engine.model, before)
    generation, _ = trainer.generate(test_docs[0].text[:200], max_new_tokens=3)
    assert generation.completion_tokens <= 3
    assert_intact(engine.model, before)


def test_ttt_neighbours_are_the_nearest_by_cosine_to_the_prefix_only(built, index):
    engine = built
    trainer = TestTimeTrainer(engine, index, TTTConfig(neighbours=4))
    text = long_doc(engine).text
    rows, sims = trainer.retrieve(text)
    (query,) = engine.query_texts([text])  # the first P tokens
    q = engine.encoder.encode([query])[0]
    cosine = index.embeddings @ q  # (n,)
    assert rows == [int(i) for i in cosine.argsort()[::-1][:4]]
    assert sims == pytest.approx(cosine[rows].tolist(), abs=1e-4)
    # what follows the prefix never reaches the query: another continuation, same neighbours
    ids = engine.tokenizer(text, add_special_tokens=False).input_ids
    other = engine.tokenizer.decode(ids[:P]) + " def main(): return sorted(values)[::-1]" * 20
    assert trainer.retrieve(other)[0] == rows


@pytest.mark.parametrize("weights", ["lora", "all"])
def test_ttt_trains_one_step_per_neighbour_nearest_first(built, index, weights):
    """The chunks the model saw while training, in order, are the neighbours nearest first."""
    engine = built
    config = TTTConfig(neighbours=4, weights=weights, train=TRAIN, full_optimizer="sgd")
    trainer = TestTimeTrainer(engine, index, config)
    seen: list[list[int]] = []
    embed = engine.model.get_input_embeddings()
    hook = embed.register_forward_hook(
        lambda module, inputs, output: (
            seen.append(inputs[0][0].tolist()) if torch.is_grad_enabled() else None
        )
    )
    before = snapshot(engine.model)
    try:
        with trainer.adapted(long_doc(engine).text) as adaptation:
            assert (adaptation.adapter is None) == (weights == "all")
    finally:
        hook.remove()
    expected = [index.token_ids[i][: TRAIN.max_seq_len] for i in adaptation.chunk_ids]
    assert seen == expected
    assert adaptation.similarities == sorted(adaptation.similarities, reverse=True)
    assert_intact(engine.model, before)


def test_trainer_keeps_the_given_order_without_shuffle():
    chunks = [[i, i + 1, i + 2] for i in range(0, 30, 3)]
    kept = _batches(chunks, LoraTrainConfig(shuffle=False), seed=3)
    assert [batch[0] for batch in kept] == chunks
    shuffled = _batches(chunks, LoraTrainConfig(), seed=3)
    assert [batch[0] for batch in shuffled] != chunks  # the default still shuffles


def test_all_weights_ttt_changes_the_score_and_restores_bitwise(built, index):
    engine = built
    doc = long_doc(engine)
    config = TTTConfig(neighbours=3, weights="all", train=TRAIN, full_learning_rate=1e-2)
    trainer = TestTimeTrainer(engine, index, config)
    before = snapshot(engine.model)
    ((score, adaptation),) = trainer.score([doc.text], prefix_tokens=P, max_tokens=128)
    (base,) = engine.score([doc.text], P, 128, plans=[RoutingPlan.base()])
    assert len(adaptation.losses) == 3 and score.n_tokens == base.n_tokens
    assert score.nll != base.nll
    assert_intact(engine.model, before)


def test_hybrid_trains_from_the_merge_and_leaves_base_weights_bitwise_intact(built, index):
    engine = built
    doc = long_doc(engine)
    plan = engine.route([doc.text], engine.routing.replace(rule="top_n", max_active=2))[0]
    assert len(plan.expert_ids) == 2
    trainer = TestTimeTrainer(engine, index, TTTConfig(neighbours=3, train=TRAIN))
    before = snapshot(engine.model)
    ((hybrid, adaptation),) = trainer.score([doc.text], P, 128, start=plan)
    assert_intact(engine.model, before)
    ((ttt, _),) = trainer.score([doc.text], P, 128)
    (merged,) = engine.score([doc.text], P, 128, plans=[plan])
    assert len(adaptation.losses) == 3
    assert hybrid.nll not in (ttt.nll, merged.nll)  # both the merge and the training count
    assert_intact(engine.model, before)
    with pytest.raises(RuntimeError, match="boom"), trainer.adapted(doc.text, start=plan):
        raise RuntimeError("boom")  # a failure inside the block restores as well
    assert_intact(engine.model, before)


def test_ttt_refuses_a_prefix_other_than_the_routing_prefix(built, index):
    trainer = TestTimeTrainer(built, index, TTTConfig(neighbours=2, train=TRAIN))
    with pytest.raises(EvalError, match="routing prefix of 30 tokens"):
        trainer.score([long_doc(built).text], prefix_tokens=P + 10, max_tokens=128)


def test_ttt_config_names_bad_fields():
    with pytest.raises(TTTConfigError, match="neighbours"):
        TTTConfig(neighbours=0)
    with pytest.raises(TTTConfigError, match="weights"):
        TTTConfig(weights="some")
    with pytest.raises(TTTConfigError, match="shuffle=False"):
        TTTConfig(train=LoraTrainConfig())  # shuffled: not nearest first
    with pytest.raises(TypeError):
        TTTConfig(query_tokens=50)  # the query is always the routing prefix
