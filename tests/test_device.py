"""Device and dtype: names resolved with clear errors, and the whole engine in bfloat16.

This machine has no GPU, so CUDA is exercised through torch's availability checks (patched
where a test needs a GPU to exist); bfloat16 runs for real on the CPU, which covers every path
where the weights' dtype differs from the adapters' float32.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from conftest import build_tiny_llama, random_adapter, write_random_bank
from test_build import small_config, tiny_model_dir  # noqa: F401 (a fixture)
from typer.testing import CliRunner

from ttmm.adapter import load_adapter
from ttmm.bank import Bank, expert_dir
from ttmm.build.config import BuildConfig
from ttmm.build.executors import RayExecutor, TrainJob
from ttmm.build.pipeline import run_build
from ttmm.build.train import LoraTrainConfig, train_lora
from ttmm.device import DeviceError, dtype_name, model_device, resolve_device, resolve_dtype
from ttmm.merge import ExpertMerger
from ttmm.model import TTMM
from ttmm.routing import RoutingPlan

BF16_ATOL = 0.05  # bfloat16 keeps 8 bits of mantissa: compare its logits loosely


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)


def test_device_names_resolve_or_say_what_to_use(no_gpu):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == resolve_device(" CPU ") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA GPU is usable here.*--device cpu"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match="MPS is not available"):
        resolve_device("mps")
    for name in ("tpu0", "gpu", "cuda:x"):
        with pytest.raises(DeviceError, match="unknown|not supported"):
            resolve_device(name)


def test_auto_prefers_a_gpu_and_checks_its_index(two_gpus):
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="2 CUDA device.*0 to 1"):
        resolve_device("cuda:2")
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_dtype_names(no_gpu, monkeypatch):
    assert resolve_dtype(None) == resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16") == resolve_dtype("torch.bfloat16") == torch.bfloat16
    assert resolve_dtype(torch.float16) == torch.float16
    assert dtype_name(torch.bfloat16) == "bfloat16"
    with pytest.raises(DeviceError, match="dtype 'int8' is unknown"):
        resolve_dtype("int8")
    with pytest.raises(DeviceError, match="not supported"):
        resolve_dtype(torch.int8)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16  # an older GPU


def test_build_config_pins_dtype_and_keeps_float32_hashes(no_gpu):
    config = BuildConfig(corpora=("wiki@10",), experts=2, train=LoraTrainConfig(num_threads=1))
    resolved = config.resolved()
    assert (resolved.device, resolved.dtype) == ("auto", "float32")  # device kept as given
    # The hash this configuration had before devices and dtypes existed (commit 11ab8e0), so
    # float32 banks built then still resume; they had no near-duplicate removal and no
    # validation split, which the defaults now add (so a default bank's hash changed with them).
    legacy = replace(config, near_duplicate_threshold=None, validation_fraction=0.0)
    # legacy=True: the hash as it was while the thread count counted (issue 23), which the
    # state file of a build from then holds and a resume still accepts
    assert legacy.resolved().content_hash(legacy=True) == "7ae9c78287fbb48a"
    assert resolved.content_hash(legacy=True) != "7ae9c78287fbb48a"
    bf16 = replace(config, dtype="BF16").resolved()
    assert bf16.dtype == "bfloat16" and bf16.content_hash() != resolved.content_hash()
    elsewhere = replace(config, device="cpu").resolved()
    assert elsewhere.content_hash() == resolved.content_hash()  # placement is not content
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        replace(config, device="cuda").resolved()
    with pytest.raises(ValueError, match="BuildConfig.dtype"):
        BuildConfig(dtype="double")


def test_cli_refuses_a_device_it_cannot_use_before_writing(no_gpu, tmp_path):
    from ttmm.cli import app

    out = tmp_path / "bank"
    result = CliRunner().invoke(
        app, ["build", "--out", str(out), "-k", "2", "--corpus", "wiki@10", "--device", "cuda"]
    )
    assert result.exit_code == 2, result.output
    assert "no CUDA GPU" in result.output and "Traceback" not in result.output
    assert not out.exists()
    bank = write_random_bank(tmp_path / "random", build_tiny_llama(64))
    for args in (["--device", "cuda:0"], ["--dtype", "half-ish"]):
        routed = CliRunner().invoke(app, ["route", "some text", "--bank", str(bank), *args])
        assert routed.exit_code == 2 and "Traceback" not in routed.output, routed.output


class _FakeRay:
    """Just enough of the ``ray`` module to see what RayExecutor.run asks of it."""

    def __init__(self):
        self.requests: list[tuple[float, str]] = []  # (num_gpus, device of the job sent)

    def is_initialized(self):
        return True

    def remote(self, **_):
        fake = self

        def decorate(function):
            class Task:
                def options(self, num_gpus):
                    class Bound:
                        def remote(self, job):
                            fake.requests.append((num_gpus, job.device))
                            return function, job

                    return Bound()

            return Task()

        return decorate

    def wait(self, refs, num_returns):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref[1].id  # stands for the trained adapter


def test_ray_asks_for_gpus_for_cuda_jobs_only(monkeypatch):
    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    config = LoraTrainConfig()
    jobs = [
        TrainJob(0, ((1, 2, 3),), 0, config, "tiny", 0, device="cuda:1", dtype="bfloat16"),
        TrainJob(1, ((1, 2, 3),), 1, config, "tiny", 0),
    ]
    results = []
    RayExecutor(gpus_per_task=0.5).run(jobs, lambda job, result: results.append(result))
    assert results == [0, 1]
    # Ray shows a task only its own GPU, so the CUDA job runs on the worker's first device.
    assert fake.requests == [(0.5, "cuda"), (0, "cpu")]


@pytest.fixture
def bf16_engine(tmp_path, smol_tokenizer, encoder):
    """The tiny engine with its base model in bfloat16 (adapters stay float32 on disk)."""
    model = build_tiny_llama(len(smol_tokenizer))
    bank = Bank.load(write_random_bank(tmp_path / "bank", model, encoder.dim))
    return TTMM(model.to(torch.bfloat16), smol_tokenizer, encoder, bank)


def test_bfloat16_engine_folds_restores_and_matches_low_rank(bf16_engine):
    engine = bf16_engine
    assert engine.device == model_device(engine.model) == torch.device("cpu")
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    text = "The committee met in the old town hall to vote on the new bridge. " * 4
    plan = RoutingPlan.explicit({0: 0.6, 2: 0.4})
    (folded,) = engine.score([text], prefix_tokens=8, plans=[plan], mode="fold")
    (low_rank,) = engine.score([text], prefix_tokens=8, plans=[plan], mode="lowrank")
    (base,) = engine.score([text], prefix_tokens=8, plans=[RoutingPlan.base()])
    assert folded.n_tokens == low_rank.n_tokens == base.n_tokens > 0
    per_token = abs(folded.nll - low_rank.nll) / folded.n_tokens
    assert per_token < BF16_ATOL, (folded.nll, low_rank.nll)
    assert abs(folded.nll - base.nll) / base.n_tokens > per_token  # the merge did something
    for name, param in engine.model.named_parameters():
        assert param.dtype == torch.bfloat16
        assert torch.equal(param, before[name]), name  # restored bit for bit
    other = RoutingPlan.explicit({1: 1.0})
    mixed = engine.score([text, text], prefix_tokens=8, plans=[plan, other], mode="lowrank")
    assert abs(mixed[0].nll - low_rank.nll) / low_rank.n_tokens < BF16_ATOL  # per-row path
    assert mixed[1].nll != mixed[0].nll
    (generation,) = engine.generate([text], max_new_tokens=5, plans=[plan])
    assert generation.completion_tokens <= 5
    for name, param in engine.model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_merges_keep_every_tensor_on_the_model_device(smol_tokenizer):
    """PyTorch's meta device refuses any tensor left on the CPU, as CUDA would."""
    model = build_tiny_llama(len(smol_tokenizer))
    adapters = [random_adapter(model, rank=2 + k, seed=k) for k in range(3)]
    model = model.to("meta")
    merger = ExpertMerger(model, adapters)
    assert {A.device.type for A in merger.experts.get([0])[0].A} == {"meta"}
    plans = [RoutingPlan.explicit({0: 0.5, 2: 0.5}), RoutingPlan.explicit({1: 1.0})]
    ids = torch.zeros(2, 6, dtype=torch.long, device="meta")
    for batch_plans in (plans, plans[:1] * 2):  # per-row merges, then one shared merge
        with merger.lowrank(batch_plans):
            assert model(input_ids=ids).logits.device.type == "meta"
    with merger.fold(plans[0]):
        assert model.model.layers[0].self_attn.q_proj.weight.device.type == "meta"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_train_lora_on_a_half_precision_model(smol_tokenizer, dtype):
    model = build_tiny_llama(len(smol_tokenizer)).to(dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    chunks = [list(range(5, 60)), list(range(100, 170))]
    result = train_lora(model, chunks, LoraTrainConfig(rank=4, epochs=3, learning_rate=5e-3))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert result.losses[-1] < result.losses[0]  # float16 learns too (with loss scaling)
    assert all(layer.B.abs().sum() > 0 for layer in result.adapter.layers.values())
    for name, param in model.named_parameters():
        assert param.dtype == dtype and torch.equal(param, before[name]), name


def test_bfloat16_build_records_its_dtype_and_keeps_adapters_float32(
    tmp_path,
    tiny_model_dir,  # noqa: F811
    no_gpu,
):
    # a small corpus: bfloat16 training is slow on a CPU, and the test reads the records only
    small = {"corpora": ("wiki@16", "stdlib@6"), "max_chunks_per_document": 1}
    config = small_config(tiny_model_dir, experts=2, dtype="bfloat16", **small)
    out = tmp_path / "bank"
    run_build(config, out, progress=False)
    bank = Bank.load(out)
    assert bank.manifest.build["config"]["dtype"] == "bfloat16"
    assert bank.manifest.build["device"] == "cpu"
    float32 = small_config(tiny_model_dir, experts=2, **small).resolved()
    assert bank.manifest.build["config_hash"] != float32.content_hash()
    for k in range(2):
        stored = load_adapter(out / expert_dir(k), dtype=None)  # as saved, not cast on load
        assert {layer.A.dtype for layer in stored.layers.values()} == {torch.float32}


def test_ray_resolves_auto_before_asking_for_resources(monkeypatch):
    """`--device auto` on a GPU host asks Ray for a GPU and trains on it; on a CPU host, none."""
    import ttmm.device

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    job = TrainJob(0, ((1, 2, 3),), 0, LoraTrainConfig(), "tiny", 0, device="auto")
    monkeypatch.setattr(ttmm.device, "resolve_device", lambda name: torch.device("cuda"))
    RayExecutor(gpus_per_task=1.0).run([job], lambda job, result: None)
    monkeypatch.setattr(ttmm.device, "resolve_device", lambda name: torch.device("cpu"))
    RayExecutor(gpus_per_task=1.0).run([job], lambda job, result: None)
    assert fake.requests == [(1.0, "cuda"), (0, "cpu")]


def test_auto_keeps_small_updates_that_a_bfloat16_fold_would_round_away(smol_tokenizer):
    """An update far below bfloat16's rounding step of the weights vanishes in a fold
    (W + ΔW rounds back to W); ``fold_keeps_update`` sees it coming, and low-rank mode, which
    never writes W, still adds it."""
    model = build_tiny_llama(len(smol_tokenizer)).to(torch.bfloat16)
    # |ΔW| <= 2 * (2 * 0.0005)^2 ≈ 2e-6 against weights ~0.016: half a bf16 step is ~6e-5
    small = random_adapter(model, rank=4, alpha=8.0, magnitude=0.0005, seed=1)
    large = random_adapter(model, rank=4, alpha=8.0, magnitude=0.05, seed=2)
    merger = ExpertMerger(model, [small, large])
    only_small, only_large = RoutingPlan.explicit({0: 1.0}), RoutingPlan.explicit({1: 1.0})
    assert not merger.fold_keeps_update(only_small)
    assert merger.fold_keeps_update(only_large)
    weights = [module.weight for group in merger.groups for module in group.modules]
    before = [w.detach().clone() for w in weights]

    def changed_share(plan) -> float:
        with merger.fold(plan):
            changed = sum(int((w != b).sum()) for w, b in zip(weights, before))
        return changed / sum(b.numel() for b in before)

    assert changed_share(only_small) < 0.1  # most of the small update was rounded away
    assert changed_share(only_large) > 0.5  # the large one was not
    ids = torch.tensor([smol_tokenizer("The committee met in the old town hall.")["input_ids"]])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        with merger.lowrank([only_small]):
            assert not torch.equal(model(input_ids=ids).logits, base)  # low-rank adds it


def test_engine_auto_mode_runs_low_rank_for_updates_a_fold_would_lose(bf16_engine, monkeypatch):
    engine = bf16_engine
    calls = []
    monkeypatch.setattr(engine.merger, "fold_keeps_update", lambda plan: False)
    original = engine.merger.lowrank

    def counting(plans):
        calls.append(len(plans))
        return original(plans)

    monkeypatch.setattr(engine.merger, "lowrank", counting)
    engine.score(["The committee met in the old town hall. " * 3], prefix_tokens=4)
    assert calls == [1]
