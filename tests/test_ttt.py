"""TTT-NN: retrieval from the training chunks only, one step per neighbour, base weights intact."""

from __future__ import annotations

import pytest
import torch
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)

from ttmm.build.chunks import ChunkIndex, read_split, read_test_documents
from ttmm.build.train import LoraTrainConfig
from ttmm.eval.ttt import TestTimeTrainer, TTTConfig, TTTConfigError
from ttmm.routing import RoutingPlan


@pytest.fixture(scope="module")
def built(eval_engine):  # noqa: F811
    return eval_engine


def test_ttt_retrieves_training_chunks_and_restores_base_weights(built):
    engine = built
    split = read_split(engine.bank.path)["domains"]
    train_ids = {i for part in split.values() for i in part["train"]}
    test_docs = read_test_documents(engine.bank.path)
    assert test_docs
    index = ChunkIndex.load(engine.bank.path)
    config = TTTConfig(
        neighbours=5,
        prefix_tokens=30,
        train=LoraTrainConfig(rank=2, alpha=4.0, max_seq_len=64, num_threads=1),
    )
    trainer = TestTimeTrainer(engine, index, config)
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for doc in test_docs[:3]:
        ((score, adaptation),) = trainer.score([doc.text], prefix_tokens=30, max_tokens=128)
        # only training chunks, never the held-out document itself or any other test document
        assert set(adaptation.doc_ids) <= train_ids
        assert doc.id not in adaptation.doc_ids
        assert len(adaptation.chunk_ids) == 5 == len(adaptation.losses)  # one step per neighbour
        assert adaptation.similarities == sorted(adaptation.similarities, reverse=True)
        (base,) = engine.score([doc.text], 30, 128, plans=[RoutingPlan.base()])
        assert score.n_tokens == base.n_tokens
        assert score.nll != base.nll  # the adapter was applied
        for name, tensor in engine.model.state_dict().items():
            assert torch.equal(tensor, before[name]), f"{name} changed"
        assert not any(p.requires_grad for p in engine.model.parameters())
    generation, _ = trainer.generate(test_docs[0].text[:200], max_new_tokens=3)
    assert generation.completion_tokens <= 3
    for name, tensor in engine.model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed by generation"


def test_ttt_neighbours_are_the_nearest_by_cosine(built):
    engine = built
    index = ChunkIndex.load(engine.bank.path)
    trainer = TestTimeTrainer(engine, index, TTTConfig(neighbours=4))
    text = read_test_documents(engine.bank.path)[0].text
    rows, sims = trainer.retrieve(text)
    (query,) = engine.query_texts([text], engine.routing.replace(prefix_tokens=50))
    q = engine.encoder.encode([query])[0]
    cosine = index.embeddings @ q  # (n,)
    assert rows == [int(i) for i in cosine.argsort()[::-1][:4]]
    assert sims == pytest.approx(cosine[rows].tolist(), abs=1e-4)


def test_ttt_config_names_bad_fields():
    with pytest.raises(TTTConfigError, match="neighbours"):
        TTTConfig(neighbours=0)
