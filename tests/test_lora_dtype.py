"""``lora_dtype``: the experts' factors kept and multiplied in bfloat16 over float32 weights."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_gpt2, build_tiny_llama, random_adapter
from typer.testing import CliRunner

from ttmm.device import DeviceError, resolve_lora_dtype
from ttmm.merge import ExpertMerger, MergeError
from ttmm.routing import RoutingPlan

VOCAB = 512
ARCHITECTURES = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2}
PLAN = RoutingPlan.explicit({0: 0.3, 2: 0.7})
OTHER = RoutingPlan.explicit({1: 1.0})


def tokens(batch=1, length=10):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0))


def adapters_for(model):
    return [random_adapter(model, rank=4, alpha=8.0, seed=k, magnitude=0.2) for k in range(3)]


def relative_gap(got, want, base):
    """How far ``got`` is from ``want``, relative to the merge's effect ``want - base``."""
    return float((got - want).norm() / (want - base).norm())


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_bfloat16_factors_give_the_float32_merge_in_every_mode(arch):
    model = ARCHITECTURES[arch](VOCAB)
    adapters = adapters_for(model)
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    x = tokens(batch=2)
    exact = ExpertMerger(model, adapters)
    with torch.no_grad():
        base = model(x).logits
        with exact.fold(PLAN):
            want = model(x).logits
        with exact.lowrank([PLAN, OTHER]):
            want_rows = model(x).logits
        got = {}
        for memory in ("buffer", "swap"):
            for grouped in (True, False):
                merger = ExpertMerger(
                    model, adapters, memory=memory, grouped=grouped, lora_dtype=torch.bfloat16
                )
                with merger.fold(PLAN):
                    assert all(p.dtype == torch.float32 for p in model.parameters())
                    got["fold", memory, grouped] = model(x).logits
                for name, p in model.state_dict().items():  # restored bitwise
                    assert torch.equal(p, before[name]), name
        with merger.lowrank([PLAN, PLAN]):
            got["lowrank"] = model(x).logits
        with merger.lowrank([PLAN, OTHER]):
            rows = model(x).logits
    assert relative_gap(want, want, base) == 0 and (want - base).norm() > 1e-2
    for key, logits in got.items():
        assert logits.dtype == torch.float32
        # bfloat16 keeps 8 bits of mantissa: the update is off by ~0.4%, not by its size
        assert relative_gap(logits, want, base) < 0.03, key
        assert relative_gap(logits, want, base) > 0, key  # the factors really were rounded
    assert relative_gap(rows[1], want_rows[1], base[1]) < 0.03


def test_factors_are_stored_in_the_lora_dtype_at_half_the_bytes():
    model = build_tiny_llama(VOCAB)
    adapters = adapters_for(model)
    exact = ExpertMerger(model, adapters)
    half = ExpertMerger(model, adapters, lora_dtype=torch.bfloat16)
    assert exact.lora_dtype == torch.float32 and half.lora_dtype == torch.bfloat16
    assert all(A.dtype == torch.bfloat16 for A in half.experts.get([0])[0].A)
    assert half.factor_bytes * 2 == exact.factor_bytes
    assert ExpertMerger(model, adapters, lora_dtype=torch.float32).lora_dtype == torch.float32


def test_float32_factors_over_bfloat16_weights_fold_into_bfloat16_weights():
    model = build_tiny_llama(VOCAB).to(torch.bfloat16)
    adapters = adapters_for(model)
    x = tokens()
    with torch.no_grad():
        base = model(x).logits.float()
        with ExpertMerger(model, adapters).fold(PLAN):
            same = model(x).logits.float()
        merger = ExpertMerger(model, adapters, lora_dtype=torch.float32)
        with merger.fold(PLAN):
            assert all(p.dtype == torch.bfloat16 for p in model.parameters())
            wider = model(x).logits.float()
        with merger.lowrank([PLAN]):
            lowrank = model(x).logits.float()
    assert relative_gap(wider, same, base) < 0.1
    assert relative_gap(lowrank, same, base) < 0.1


@pytest.mark.parametrize(
    "weights, factors", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)]
)
def test_lowrank_with_gradients_keeps_each_layers_output_dtype(weights, factors):
    """With gradients recorded the hook cannot add in place; its sum must stay in the layer's
    dtype, or the next layer gets float32 inputs against bfloat16 weights."""
    model = build_tiny_llama(VOCAB).to(weights)
    merger = ExpertMerger(model, adapters_for(model), lora_dtype=factors)
    x = tokens(batch=2)
    for plans in ([PLAN, PLAN], [PLAN, OTHER]):  # shared and per-row hooks
        with merger.lowrank(plans):
            logits = model(x).logits
        assert torch.is_grad_enabled()  # the hooks took their out-of-place path
        assert logits.dtype == weights and torch.isfinite(logits.float()).all()


def test_an_unsupported_lora_dtype_is_refused_with_the_choices():
    model = build_tiny_llama(VOCAB)
    with pytest.raises(MergeError, match="lora_dtype=torch.int8 is not supported.*bfloat16"):
        ExpertMerger(model, adapters_for(model), lora_dtype=torch.int8)
    assert resolve_lora_dtype("auto") is None and resolve_lora_dtype(None) is None
    assert resolve_lora_dtype("bf16") == torch.bfloat16
    with pytest.raises(DeviceError, match="LoRA dtype 'int8' is unknown; use auto"):
        resolve_lora_dtype("int8")


def test_the_engine_and_the_cli_take_a_lora_dtype(
    tiny_engine, tiny_engine_bf16_factors, monkeypatch
):
    from ttmm.cli.app import app
    from ttmm.model import TTMM

    engine = tiny_engine_bf16_factors
    assert engine.merger.lora_dtype == torch.bfloat16
    assert tiny_engine.merger.lora_dtype == tiny_engine.model.dtype  # "auto"
    [plan] = engine.route(["The Roman Senate met in the Curia"])
    text = engine.generate(["The Roman Senate"], max_new_tokens=4, plans=[plan])
    assert text[0].completion_tokens > 0

    seen = {}

    def from_bank(bank, **options):
        seen.update(options)
        return tiny_engine

    monkeypatch.setattr(TTMM, "from_bank", staticmethod(from_bank))
    bank = str(tiny_engine.bank.path)
    result = CliRunner().invoke(app, ["route", "some text", "--bank", bank, "--lora-dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert seen["lora_dtype"] == "bf16"
    seen.clear()
    result = CliRunner().invoke(app, ["route", "some text", "--bank", bank])
    assert result.exit_code == 0 and seen["lora_dtype"] == "auto", result.output

    monkeypatch.undo()
    result = CliRunner().invoke(app, ["route", "x", "--bank", bank, "--lora-dtype", "int8"])
    assert result.exit_code == 2 and "LoRA dtype 'int8' is unknown" in result.output
    assert "Traceback" not in result.output


def test_serve_passes_the_lora_dtype_to_its_engine_and_to_ray_replicas(tiny_engine, monkeypatch):
    import uvicorn

    import ttmm.cli.serve as serve_cli
    from ttmm.cli.app import app
    from ttmm.model import TTMM

    seen = {}

    def from_bank(bank, **options):
        seen.update(options)
        return tiny_engine

    monkeypatch.setattr(TTMM, "from_bank", staticmethod(from_bank))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)  # no server is started
    bank = str(tiny_engine.bank.path)
    result = CliRunner().invoke(app, ["serve", "--bank", bank, "--lora-dtype", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert seen["lora_dtype"] == "bfloat16"

    on_ray = {}
    monkeypatch.setattr(serve_cli, "_serve_on_ray", lambda *args, **kwargs: on_ray.update(args[-1]))
    result = CliRunner().invoke(app, ["serve", "--bank", bank, "--ray", "--lora-dtype", "bf16"])
    assert result.exit_code == 0, result.output
    assert on_ray["lora_dtype"] == "bf16"
    on_ray.clear()  # a typo is refused before Ray starts
    result = CliRunner().invoke(app, ["serve", "--bank", bank, "--ray", "--lora-dtype", "int8"])
    assert result.exit_code == 2 and "LoRA dtype 'int8' is unknown" in result.output
    assert not on_ray
