"""A real bank built by ``run_build`` on a tiny saved Llama and small slices of the default
corpora: chunk index, held-out documents and fine-tuning adapter included (evaluation tests)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import save_tiny_llama


def build_eval_bank(root: Path, tokenizer, experts: int = 3) -> Path:
    """Save a tiny Llama with the real tokenizer under ``root`` and build a bank from it."""
    from ttmm.build.pipeline import BuildConfig, run_build
    from ttmm.build.train import LoraTrainConfig

    model_dir = root / "tiny-llama"
    save_tiny_llama(model_dir, tokenizer)
    config = BuildConfig(
        corpora=("wiki@30", "stdlib@8"),
        experts=experts,
        base_model=str(model_dir),
        test_fraction=0.3,
        window=96,
        max_chunks_per_document=2,
        with_finetune=True,
        train=LoraTrainConfig(rank=2, alpha=4.0, max_seq_len=96, num_threads=1),
    )
    out = root / "bank"
    run_build(config, out, progress=False)
    return out


@pytest.fixture(scope="session")
def eval_bank_path(tmp_path_factory, smol_tokenizer) -> Path:
    """One built bank shared by the evaluation and TTT tests (built once per session)."""
    return build_eval_bank(tmp_path_factory.mktemp("evalbank"), smol_tokenizer)


@pytest.fixture(scope="module")
def eval_engine(eval_bank_path, encoder):
    """The engine over the built bank, run on one thread (fastest for tiny matrices, and
    immune to a busy machine); the thread count is restored afterwards."""
    import torch

    from ttmm.bank import Bank
    from ttmm.model import TTMM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TTMM.from_bank(Bank.load(eval_bank_path), encoder=encoder)
    torch.set_num_threads(threads)
