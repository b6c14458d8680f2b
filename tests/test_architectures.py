"""Families beyond Llama and GPT-2: Qwen2 (tied embeddings, biased q/k/v), Phi-3 (fused qkv_proj
and gate_up_proj) and Mistral, tiny and built from a config. The merge matches its formula in
both modes, restores bit for bit, and routes and generates through TTMM; the export runs in PEFT.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL, linear_shapes, random_adapter, write_random_bank
from test_merge import VOCAB, assert_bitwise_unchanged, explicit_model, snapshot, tokens

from ttmm.bank import Bank
from ttmm.export import export_merge
from ttmm.merge import ExpertMerger
from ttmm.model import TTMM
from ttmm.routing import RoutingPlan

SIZE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)


def build_tiny_qwen2(vocab_size: int, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=vocab_size, tie_word_embeddings=True, **SIZE)
    return Qwen2ForCausalLM(config).eval().requires_grad_(False)


def build_tiny_phi3(vocab_size: int, seed: int = 0):
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=vocab_size, pad_token_id=0, bos_token_id=0, eos_token_id=0, **SIZE
    )
    return Phi3ForCausalLM(config).eval().requires_grad_(False)


def build_tiny_mistral(vocab_size: int, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(seed)
    config = MistralConfig(vocab_size=vocab_size, tie_word_embeddings=False, **SIZE)
    return MistralForCausalLM(config).eval().requires_grad_(False)


ARCHITECTURES = {"qwen2": build_tiny_qwen2, "phi3": build_tiny_phi3, "mistral": build_tiny_mistral}
LAYER_NAMES = {  # what each family's adaptable linear layers are called
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_fold_and_lowrank_match_the_formula_and_restore_bitwise(arch):
    model_fn = ARCHITECTURES[arch]
    model = model_fn(VOCAB)
    assert {name.rsplit(".", 1)[-1] for name in linear_shapes(model)} == LAYER_NAMES[arch]
    adapters = [
        random_adapter(model, rank=r, alpha=2.0 * r, seed=k, use_rslora=k == 1)
        for k, r in enumerate((2, 4, 3))
    ]
    plan = RoutingPlan.explicit({0: 0.5, 1: 0.3, 2: 0.2})
    x = tokens(batch=2)
    merger = ExpertMerger(model, adapters)
    assert merger.tied_layers == []  # lm_head is tied in Qwen2, but never adapted
    before = snapshot(model)
    with torch.no_grad():
        base = model(x).logits
        expected = explicit_model(model_fn, adapters, plan)(x).logits
        with merger.fold(plan):
            folded = model(x).logits
        assert_bitwise_unchanged(model, before)
        with merger.lowrank([plan, plan]):
            lowrank = model(x).logits
        assert_bitwise_unchanged(model, before)
    assert not torch.allclose(folded, base, atol=ATOL)
    torch.testing.assert_close(folded, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(lowrank, expected, atol=ATOL, rtol=0)
    if arch == "qwen2":  # tied embeddings: still one tensor after the merges
        assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_ttmm_routes_and_generates_on_the_family(arch, tmp_path, smol_tokenizer, encoder):
    model = ARCHITECTURES[arch](len(smol_tokenizer))
    bank = Bank.load(write_random_bank(tmp_path / "bank", model, encoder.dim, magnitude=0.3))
    engine = TTMM(model, smol_tokenizer, encoder, bank)
    before = snapshot(model)
    prompts = ["The Roman Senate met in the Curia", "import os\nfor name in os.listdir('.'):"]
    plans = engine.route(prompts)
    assert all(not plan.is_base for plan in plans)
    folded = [
        engine.generate([p], max_new_tokens=4, plans=[q], mode="fold")[0]
        for p, q in zip(prompts, plans)
    ]
    batched = engine.generate(prompts, max_new_tokens=4, plans=plans, mode="lowrank")
    base = engine.generate(prompts[:1], max_new_tokens=4, plans=[RoutingPlan.base()])[0]
    assert_bitwise_unchanged(model, before)
    assert [g.text for g in folded] == [g.text for g in batched]
    assert all(g.completion_tokens >= 1 for g in batched) and batched[0].plan == plans[0]
    scores = engine.score([prompts[0] * 4], prefix_tokens=8, plans=[plans[0]])
    base_score = engine.score([prompts[0] * 4], prefix_tokens=8, plans=[RoutingPlan.base()])
    assert scores[0].nll != base_score[0].nll  # the merge changes the model
    assert base.plan.is_base


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_the_export_runs_in_peft_on_the_family(arch, tmp_path):
    from peft import PeftModel

    model_fn = ARCHITECTURES[arch]
    model = model_fn(VOCAB)
    bank = Bank.load(write_random_bank(tmp_path / "bank", model, num_experts=3, magnitude=0.1))
    plan, x = RoutingPlan.explicit({2: 0.6, 0: 0.4}), tokens()
    with torch.no_grad(), ExpertMerger(model, bank.adapters()).fold(plan):
        expected = model(x).logits
    export_merge(bank, plan, tmp_path / "out")
    peft_model = PeftModel.from_pretrained(model_fn(VOCAB), tmp_path / "out").eval()
    with torch.no_grad():
        got = peft_model(x).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
