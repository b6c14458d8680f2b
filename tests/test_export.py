"""A merge exported as one PEFT LoRA (design notes §7): PEFT runs it exactly as ttmm folds it."""

from __future__ import annotations

import base64
import json

import pytest
import torch
from conftest import ATOL, build_tiny_gpt2, build_tiny_llama, linear_shapes, random_adapter
from safetensors.torch import load, load_file
from test_merge import VOCAB, assert_bitwise_unchanged, snapshot, tokens

from ttmm.adapter import CONFIG_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from ttmm.bank import (
    Bank,
    BankManifest,
    ExpertInfo,
    base_model_record,
    expert_dir,
    write_centroids,
    write_manifest,
)
from ttmm.export import PROVENANCE_NAME, export_merge, merged_adapter
from ttmm.merge import ExpertMerger, MergeError
from ttmm.routing import RoutingConfig, RoutingPlan

ARCHITECTURES = {"llama": build_tiny_llama, "gpt2": build_tiny_gpt2}


def make_bank(path, model, rslora: bool, modules_of=None, ranks=(2, 4, 6, 4)):
    """A bank of len(ranks) random experts; ``modules_of[k]`` limits expert k's layers."""
    modules_of = modules_of or {}
    experts = []
    for k, rank in enumerate(ranks):
        adapter = random_adapter(
            model, rank=rank, alpha=3.0 * rank, seed=k, use_rslora=rslora, modules=modules_of.get(k)
        )
        if hasattr(model, "transformer"):  # GPT-2: PEFT adapts its Conv1D layers transposed
            adapter.config["fan_in_fan_out"] = True
        save_adapter(adapter, path / expert_dir(k))
        experts.append(ExpertInfo.describe(k, expert_dir(k), adapter, path, label=f"topic {k}"))
    centroids = torch.nn.functional.normalize(torch.randn(len(ranks), 384), dim=1)
    write_centroids(path, centroids)
    manifest = BankManifest(
        base_model=base_model_record("tiny", model),
        encoder={"name": "all-minilm-l6-v2", "dim": 384},
        routing=RoutingConfig(max_active=3).to_dict(),
        experts=experts,
    )
    write_manifest(path, manifest)
    return Bank.load(path)


def fold_logits(model, bank, plan, x):
    with ExpertMerger(model, bank.adapters()).fold(plan):
        return model(x).logits


def peft_logits(model_fn, folder, x):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model_fn(VOCAB), folder).eval()
    with torch.no_grad():
        return peft_model(x).logits


PLANS = {
    1: RoutingPlan.explicit({2: 1.0}),
    3: RoutingPlan.explicit({3: 0.5, 0: 0.3, 1: 0.2}),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("rslora", [False, True], ids=["plain", "rslora"])
@pytest.mark.parametrize("n", sorted(PLANS))
def test_peft_runs_the_exported_adapter_as_ttmm_folds_the_plan(arch, rslora, n, tmp_path):
    model_fn = ARCHITECTURES[arch]
    model = model_fn(VOCAB)
    bank = make_bank(tmp_path / "bank", model, rslora)
    plan, x = PLANS[n], tokens()
    before = snapshot(model)
    with torch.no_grad():
        expected = fold_logits(model, bank, plan, x)
        base = model(x).logits
    assert_bitwise_unchanged(model, before)
    exported = export_merge(bank, plan, tmp_path / "out")
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    R = sum(bank.adapters()[k].rank for k in plan.expert_ids)
    assert config["r"] == config["lora_alpha"] == R == exported.rank
    assert not config["use_rslora"] and config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == {n.rsplit(".", 1)[-1] for n in linear_shapes(model)}
    got = peft_logits(model_fn, tmp_path / "out", x)
    assert not torch.allclose(got, base, atol=ATOL)  # the adapter does something
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_experts_with_different_layers_export_their_union_with_zero_rows(tmp_path):
    model = build_tiny_llama(VOCAB)
    layers = list(linear_shapes(model))
    q_only = [name for name in layers if name.endswith("q_proj")]
    mlp_only = [name for name in layers if name.endswith(("up_proj", "down_proj"))]
    bank = make_bank(tmp_path / "bank", model, False, {0: q_only, 1: mlp_only}, ranks=(2, 4))
    plan, x = RoutingPlan.explicit({1: 0.6, 0: 0.4}), tokens()
    with torch.no_grad():
        expected = fold_logits(model, bank, plan, x)
    exported = export_merge(bank, plan, tmp_path / "out")
    assert exported.blocks == {1: (0, 4), 0: (4, 6)}  # plan order
    assert set(exported.adapter.layers) == set(q_only) | set(mlp_only)
    for name, layer in exported.adapter.layers.items():
        assert layer.A.shape[0] == 6 and layer.B.shape[1] == 6  # every layer has rank R
        absent = slice(4, 6) if name in mlp_only else slice(0, 4)
        assert not layer.A[absent].any() and not layer.B[:, absent].any()
    state = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert all(key.startswith("base_model.model.") for key in state)
    assert json.loads((tmp_path / "out" / PROVENANCE_NAME).read_text())["rank"] == 6
    torch.testing.assert_close(peft_logits(build_tiny_llama, tmp_path / "out", x), expected)
    # ttmm reads the export back as one ordinary adapter with scale 1
    reloaded = load_adapter(tmp_path / "out")
    assert {layer.scale for layer in reloaded.layers.values()} == {1.0}


def test_in_memory_files_match_the_folder(tmp_path):
    model = build_tiny_llama(VOCAB)
    bank = make_bank(tmp_path / "bank", model, True)
    exported = merged_adapter(bank, PLANS[3])
    exported.save(tmp_path / "out")
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755  # a runtime may run as another user
    from_memory = load(exported.safetensors_bytes())
    from_disk = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert from_memory.keys() == from_disk.keys()
    assert all(torch.equal(from_memory[k], from_disk[k]) for k in from_disk)
    assert json.loads(exported.config_json()) == json.loads(
        (tmp_path / "out" / CONFIG_NAME).read_text()
    )
    assert (
        base64.b64decode(base64.b64encode(exported.safetensors_bytes()))
        == (tmp_path / "out" / WEIGHTS_NAME).read_bytes()
    )


def test_bad_plans_are_refused_and_nothing_is_written(tmp_path):
    model = build_tiny_llama(VOCAB)
    bank = make_bank(tmp_path / "bank", model, False)
    with pytest.raises(MergeError, match="unknown expert"):
        export_merge(bank, RoutingPlan.explicit({9: 1.0}), tmp_path / "out")
    with pytest.raises(MergeError, match="no expert"):
        export_merge(bank, RoutingPlan.base(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- the verb and the endpoint ------------------------------------------------------------------


def test_export_verb_writes_given_experts_or_a_routed_prompt(tiny_engine, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from ttmm.cli.app import app
    from ttmm.cli.options import EngineArgs

    bank = str(tiny_engine.bank.path)
    runner = CliRunner()
    args = ["export", "--bank", bank, "--experts", "1=0.25, 3=0.75", "--out", str(tmp_path / "e")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = merged_adapter(tiny_engine.bank, RoutingPlan.explicit({1: 0.25, 3: 0.75}))
    written = load_file(tmp_path / "e" / WEIGHTS_NAME)
    assert all(torch.equal(written[k], v) for k, v in expected.adapter.state_dict().items())

    monkeypatch.setattr(EngineArgs, "engine", lambda self: tiny_engine)  # no model to load
    prompt = "The Roman Senate met in the Curia"
    args = ["export", "--bank", bank, "--prompt", prompt, "--out", str(tmp_path / "p"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    [plan] = tiny_engine.route([prompt])
    assert json.loads(result.output)["routing"] == tiny_engine.bank.describe_plan(plan)
    config = json.loads((tmp_path / "p" / CONFIG_NAME).read_text())
    assert config["r"] == sum(tiny_engine.bank.adapters()[k].rank for k in plan.expert_ids)

    for bad, message in [
        (["--experts", "1:0.5"], "is not ID=WEIGHT"),
        (["--experts", "9=1"], "unknown expert"),
        ([], "exactly one of --prompt"),
    ]:
        result = runner.invoke(app, ["export", "--bank", bank, "--out", str(tmp_path / "x"), *bad])
        assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()


CODE = "import os\nos.listdir('.')"


def test_export_endpoint_sends_the_adapter_or_writes_it_to_its_folder(tiny_engine, tmp_path):
    from fastapi.testclient import TestClient

    from ttmm.serve.app import ServerSettings, create_app

    with TestClient(create_app(tiny_engine, ServerSettings(api_key="k"))) as client:
        headers = {"Authorization": "Bearer k"}
        body = {"experts": {"2": 0.6, "0": 0.4}}
        assert client.post("/v1/ttmm/export", json=body).status_code == 401
        answer = client.post("/v1/ttmm/export", json=body, headers=headers).json()
        routed = client.post(
            "/v1/ttmm/export",
            json={"input": CODE, "routing": {"max_active": 2}},
            headers=headers,
        ).json()
        errors = [
            client.post("/v1/ttmm/export", json=bad, headers=headers)
            for bad in (
                {"experts": {"7": 1.0}},
                {"experts": {}},
                {"experts": {"1": 1.0}, "input": "text"},
                {"experts": {"1": 1.0}, "path": "/tmp/x"},
            )
        ]
    expected = merged_adapter(tiny_engine.bank, RoutingPlan.explicit({2: 0.6, 0: 0.4}))
    assert answer["ttmm"]["experts"] == [{"id": 2, "weight": 0.6, "label": "topic 2"}] + [
        {"id": 0, "weight": 0.4, "label": "topic 0"}
    ]
    assert answer["adapter_config"] == expected.adapter.config and answer["rank"] == expected.rank
    assert base64.b64decode(answer["adapter_model"]) == expected.safetensors_bytes()
    [plan] = tiny_engine.route([CODE], tiny_engine.routing_for(max_active=2))
    assert routed["ttmm"] == tiny_engine.bank.describe_plan(plan)
    assert [e.status_code for e in errors] == [404, 400, 400, 400]
    assert [e.json()["error"]["code"] for e in errors[:2]] == ["expert_not_found", "invalid_value"]

    settings = ServerSettings(export_dir=str(tmp_path / "exports"))
    with TestClient(create_app(tiny_engine, settings)) as client:
        first = client.post("/v1/ttmm/export", json={"experts": {"2": 0.6, "0": 0.4}}).json()
        again = client.post("/v1/ttmm/export", json={"experts": {"2": 0.6, "0": 0.4}}).json()
    assert "adapter_model" not in first and first["path"] == again["path"]
    folder = tmp_path / "exports" / first["path"].rsplit("/", 1)[-1]
    assert str(folder.resolve()) == first["path"]
    assert (folder / WEIGHTS_NAME).read_bytes() == expected.safetensors_bytes()
