"""The one LoRA trainer: learns, is deterministic, respects budgets, leaves the model alone."""

from __future__ import annotations

import pytest
import torch

from ttmm.adapter import load_adapter, save_adapter
from ttmm.build.train import LoraTrainConfig, TrainConfigError, planned_tokens, train_lora

FAST = LoraTrainConfig(num_threads=1)


def _chunks(tokenizer, n: int = 4, length: int = 48) -> list[list[int]]:
    text = "The lighthouse keeper counted the ships that passed the rocky northern cape. " * 60
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def _snapshot(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: type(m) for n, m in model.named_modules()},
        set(vars(model)),
    )


def _assert_untouched(model, snapshot):
    state, grads, types, attributes = snapshot
    now = model.state_dict()
    assert set(now) == set(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert set(vars(model)) == attributes


def test_loss_falls_on_repeated_text_and_model_is_bitwise_unchanged(tiny_llama, smol_tokenizer):
    tiny_llama.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # an odd caller state
    tiny_llama.train()
    snapshot = _snapshot(tiny_llama)
    chunks = _chunks(smol_tokenizer)
    config = LoraTrainConfig(epochs=4, learning_rate=1e-2, num_threads=1)
    result = train_lora(tiny_llama, chunks, config, seed=0)
    _assert_untouched(tiny_llama, snapshot)
    assert tiny_llama.training  # train/eval mode restored
    assert len(result.losses) == 16 and result.n_tokens == 4 * 4 * 48
    first, last = sum(result.losses[:4]) / 4, sum(result.losses[-4:]) / 4
    assert last < first - 0.5, (first, last)
    # every linear layer but the head is adapted: 7 per Llama layer, 2 layers
    assert len(result.adapter.layers) == 14
    assert result.adapter.config["r"] == 8 and result.seconds > 0


def test_same_seed_same_adapter_other_seed_other(tiny_llama, smol_tokenizer):
    chunks = _chunks(smol_tokenizer, n=3)
    a = train_lora(tiny_llama, chunks, FAST, seed=5).adapter
    b = train_lora(tiny_llama, chunks, FAST, seed=5).adapter
    c = train_lora(tiny_llama, chunks, FAST, seed=6).adapter
    assert a.layers.keys() == b.layers.keys()
    for name in a.layers:
        assert torch.equal(a.layers[name].A, b.layers[name].A)
        assert torch.equal(a.layers[name].B, b.layers[name].B)
    assert any(not torch.equal(a.layers[n].A, c.layers[n].A) for n in a.layers)


def test_target_modules_rank_rslora_and_peft_round_trip(tiny_llama, smol_tokenizer, tmp_path):
    config = LoraTrainConfig(
        rank=4, alpha=8, target_modules=("q_proj", "v_proj"), use_rslora=True, num_threads=1
    )
    adapter = train_lora(tiny_llama, _chunks(smol_tokenizer, n=2), config, seed=0).adapter
    assert sorted(adapter.layers) == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    )
    layer = next(iter(adapter.layers.values()))
    assert layer.rank == 4 and layer.scale == pytest.approx(8 / 2)
    assert any(bool(layer.B.abs().sum() > 0) for layer in adapter.layers.values())  # B trained
    loaded = load_adapter(save_adapter(adapter, tmp_path / "a"))
    for name, layer in adapter.layers.items():
        assert torch.equal(loaded.layers[name].B, layer.B)


def test_token_budget_is_respected_and_planned(tiny_llama, smol_tokenizer):
    chunks = _chunks(smol_tokenizer, n=6)
    config = LoraTrainConfig(max_tokens=100, epochs=3, num_threads=1)
    result = train_lora(tiny_llama, chunks, config, seed=1)
    assert result.n_tokens == planned_tokens(chunks, config, seed=1) == 100
    assert planned_tokens(chunks, FAST) == 6 * 48


def test_failure_midway_still_restores_the_model(tiny_llama, smol_tokenizer):
    snapshot = _snapshot(tiny_llama)
    bad = [[1, 2, 3], [10**9, 5, 6]]  # an id beyond the vocabulary fails inside the forward
    with pytest.raises((IndexError, RuntimeError)):
        train_lora(tiny_llama, bad, LoraTrainConfig(batch_size=2, num_threads=1), seed=0)
    _assert_untouched(tiny_llama, snapshot)
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize(
    ("field", "value"),
    [("rank", 0), ("learning_rate", 0.0), ("epochs", 0), ("max_tokens", 0), ("batch_size", 0)],
)
def test_config_validation_names_the_field(field, value):
    with pytest.raises(TrainConfigError, match=f"LoraTrainConfig.{field}"):
        LoraTrainConfig(**{field: value})


def test_config_round_trips_and_rejects_unknown_keys():
    config = LoraTrainConfig(target_modules=["q_proj"], max_tokens=10)
    assert config.target_modules == ("q_proj",)
    assert LoraTrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(TrainConfigError, match="lr"):
        LoraTrainConfig.from_dict({"lr": 1.0})


def test_no_chunks_is_an_error(tiny_llama):
    with pytest.raises(TrainConfigError, match="at least one chunk"):
        train_lora(tiny_llama, [[7]], FAST)
