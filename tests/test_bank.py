"""The bank on disk: round trip, validation with clear errors, atomic writes, reference import."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import ATOL, build_tiny_gpt2, build_tiny_llama, random_adapter, write_random_bank
from safetensors.torch import save_file

from ttmm.adapter import AdapterError, LoraLayer, load_adapter, save_adapter
from ttmm.bank import CENTROIDS_NAME, MANIFEST_NAME, Bank, BankError, expert_dir
from ttmm.bank_files import check_files
from ttmm.build.reference import import_reference_bank
from ttmm.merge import MergeError
from ttmm.model import TTMM, InputError
from ttmm.routing import RoutingConfig

VOCAB = 512


@pytest.fixture
def model():
    return build_tiny_llama(VOCAB)


@pytest.fixture
def bank_path(tmp_path, model):
    return write_random_bank(tmp_path / "bank", model, encoder_dim=384, num_experts=3)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_round_trip_keeps_every_tensor_and_manifest_field(bank_path, model):
    bank = Bank.load(bank_path)
    assert bank.num_experts == 3
    assert bank.label(1) == "topic 1"
    assert bank.routing == RoutingConfig(max_active=3)
    assert torch.allclose(bank.centroids.norm(dim=1), torch.ones(3), atol=ATOL)
    expert = bank.manifest.experts[2]
    assert expert.rank == 6 and expert.size_bytes > 0 and expert.n_parameters > 0
    reloaded = load_adapter(bank_path / expert_dir(2))
    original = random_adapter(model, rank=6, alpha=12.0, seed=2)
    for name, layer in original.layers.items():
        assert torch.equal(reloaded.layers[name].A, layer.A)
        assert torch.equal(reloaded.layers[name].B, layer.B)
        assert reloaded.layers[name].scale == pytest.approx(2.0)
    bank.check_compatible(model, 384)


def test_bank_for_another_base_model_is_rejected_and_model_untouched(
    bank_path, encoder, smol_tokenizer
):
    other = build_tiny_gpt2(VOCAB)
    before = snapshot(other)
    with pytest.raises(BankError, match="built for base model 'tiny'.*load the bank's base model"):
        TTMM(other, smol_tokenizer, encoder, Bank.load(bank_path))
    assert_unchanged(other, before)


def test_adapter_shapes_that_do_not_fit_are_rejected(tmp_path, encoder, smol_tokenizer):
    model = build_tiny_llama(VOCAB)
    path = write_random_bank(tmp_path / "b", model, num_experts=2)
    bad = random_adapter(model, rank=4)
    name = next(iter(bad.layers))
    bad.layers[name] = type(bad.layers[name])(A=torch.ones(4, 10), B=torch.ones(3, 4), scale=1.0)
    save_adapter(bad, path / expert_dir(1))
    before = snapshot(model)
    with pytest.raises(MergeError, match="expert 1: layer .* the adapter was trained on another"):
        TTMM(model, smol_tokenizer, encoder, Bank.load(path, verify=False))
    assert_unchanged(model, before)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_or_truncated_safetensors_is_a_clear_error(bank_path, damage):
    weights = bank_path / expert_dir(1) / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    bank = Bank.load(bank_path, verify=False)  # an expert is read when first used
    bank.read_expert(0)
    with pytest.raises(BankError, match="expert 1: .*corrupt or truncated"):
        bank.read_expert(1)


def test_truncated_centroids_are_a_clear_error(bank_path):
    path = bank_path / CENTROIDS_NAME
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BankError, match="corrupt or truncated"):
        Bank.load(bank_path, verify=False)


@pytest.mark.parametrize("field", ["format_version", "base_model", "encoder", "routing", "experts"])
def test_missing_manifest_fields_are_named(bank_path, field):
    manifest = json.loads((bank_path / MANIFEST_NAME).read_text())
    del manifest[field]
    (bank_path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BankError, match=f"missing field.*{field}"):
        Bank.load(bank_path)


def test_other_manifest_damage(bank_path):
    path = bank_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(BankError, match="format_version 99"):
        Bank.load(bank_path)
    path.write_text(json.dumps({**manifest, "routing": {"rule": "nope"}}))
    with pytest.raises(BankError, match="bad routing defaults"):
        Bank.load(bank_path)
    path.write_text("{not json")
    with pytest.raises(BankError, match="not valid JSON"):
        Bank.load(bank_path)
    path.unlink()
    with pytest.raises(BankError, match="not a ttmm bank"):
        Bank.load(bank_path)
    with pytest.raises(BankError, match="does not exist"):
        Bank.load(bank_path / "nowhere")


def test_centroid_dimension_differing_from_encoder_is_rejected(tmp_path, encoder, smol_tokenizer):
    model = build_tiny_llama(len(smol_tokenizer))
    path = write_random_bank(tmp_path / "b", model, encoder_dim=128)
    with pytest.raises(BankError, match="128-dim centroids but the encoder gives 384-dim"):
        TTMM(model, smol_tokenizer, encoder, Bank.load(path))


def test_centroids_must_match_manifest_and_be_unit(bank_path):
    save_file({"centroids": torch.ones(3, 384)}, bank_path / CENTROIDS_NAME)
    with pytest.raises(BankError, match="unit vectors"):
        Bank.load(bank_path, verify=False)
    save_file({"centroids": torch.eye(4, 384)}, bank_path / CENTROIDS_NAME)
    with pytest.raises(BankError, match="lists 3 experts"):
        Bank.load(bank_path, verify=False)


def test_empty_prompt_is_rejected_before_anything_runs(tiny_engine):
    before = snapshot(tiny_engine.model)
    for bad in ([""], ["   "], [], "a string"):
        with pytest.raises(InputError):
            tiny_engine.generate(bad, max_new_tokens=2)
    assert_unchanged(tiny_engine.model, before)


def test_save_adapter_is_atomic_on_failure(tmp_path, model, monkeypatch):
    adapter = random_adapter(model, seed=1)
    save_adapter(adapter, tmp_path / "a")
    original = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("ttmm.adapter.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(random_adapter(model, seed=2), tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging folder left


def test_adapter_errors_are_specific(tmp_path, model):
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        load_adapter(tmp_path)
    adapter = random_adapter(model)
    save_adapter(adapter, tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        load_adapter(tmp_path / "a")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, "mixed"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_nan_or_infinity_in_an_adapter_file_names_its_layer(tmp_path, model, dtype, bad):
    """Files of one dtype are checked in one pass over their bytes, others per tensor."""
    adapter = random_adapter(model, seed=3)
    for i, (name, layer) in enumerate(sorted(adapter.layers.items())):
        to = (torch.float32, torch.bfloat16)[i % 2] if dtype == "mixed" else dtype
        adapter.layers[name] = LoraLayer(layer.A.to(to), layer.B.to(to), layer.scale)
    bad_layer = sorted(adapter.layers)[5]
    adapter.layers[bad_layer].B[1, 0] = bad
    save_adapter(adapter, tmp_path / "a")
    with pytest.raises(AdapterError, match=rf"layer {re.escape(bad_layer)} holds NaN or infinite"):
        load_adapter(tmp_path / "a")


def test_an_adapter_of_extreme_finite_values_loads_in_its_dtype(tmp_path, model):
    adapter = random_adapter(model, seed=4)
    name = sorted(adapter.layers)[0]
    A = adapter.layers[name].A.to(torch.bfloat16)
    A[0, :3] = torch.tensor([3.38e38, -3.38e38, 1e-40])  # near bf16's largest, a subnormal
    adapter.layers[name] = LoraLayer(A, adapter.layers[name].B.to(torch.bfloat16), 2.0)
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", dtype=None)
    assert loaded.layers[name].A.dtype == torch.bfloat16
    assert torch.equal(loaded.layers[name].A, A)


def test_import_reference_layout(tmp_path, model, encoder):
    src = tmp_path / "reference"
    adapters = [random_adapter(model, rank=4, seed=s) for s in range(3)]
    for k, adapter in enumerate(adapters):
        save_adapter(adapter, src / str(k))
    embeddings = torch.randn(3, 384) * 3  # not normalised: the import normalises
    torch.save(embeddings, src / "embeddings.pt")
    bank = import_reference_bank(src, tmp_path / "bank", model=model, encoder=encoder)
    assert bank.num_experts == 3
    assert bank.routing.rule == "threshold" and bank.routing.beta == pytest.approx(0.04)
    torch.testing.assert_close(bank.centroids, torch.nn.functional.normalize(embeddings, dim=1))
    for k in range(3):
        got = bank.adapters()[k]
        for name, layer in adapters[k].layers.items():
            assert torch.equal(got.layers[name].A, layer.A)
    bank.check_compatible(model, encoder.dim)


def test_import_refuses_mismatches_and_writes_nothing(tmp_path, model, encoder):
    src = tmp_path / "reference"
    for k in range(2):
        save_adapter(random_adapter(model, seed=k), src / str(k))
    torch.save(torch.randn(3, 384), src / "embeddings.pt")
    with pytest.raises(BankError, match="3 rows, .* holds 2 adapters"):
        import_reference_bank(src, tmp_path / "out", model=model, encoder=encoder)
    torch.save(torch.randn(2, 100), src / "embeddings.pt")
    with pytest.raises(BankError, match="100-dim but encoder"):
        import_reference_bank(src, tmp_path / "out", model=model, encoder=encoder)
    torch.save(torch.randn(2, 384), src / "embeddings.pt")
    with pytest.raises(MergeError):
        import_reference_bank(src, tmp_path / "out", model=build_tiny_gpt2(VOCAB), encoder=encoder)
    assert not (tmp_path / "out").exists()
    save_adapter(random_adapter(model), src / "3")
    with pytest.raises(BankError, match="without gaps"):
        import_reference_bank(src, tmp_path / "out", model=model, encoder=encoder)


# -- integrity: every file's sha256 in the manifest, checked on load ------------------------


def test_manifest_records_every_file_and_load_verifies_them(bank_path):
    manifest = json.loads((bank_path / MANIFEST_NAME).read_text())
    files = manifest["files"]
    assert CENTROIDS_NAME in files and f"{expert_dir(0)}/adapter_model.safetensors" in files
    assert MANIFEST_NAME not in files
    assert all(len(digest) == 64 for digest in files.values())
    assert all(
        c.status == "ok" for c in check_files(bank_path, Bank.load(bank_path).manifest.files)
    )


@pytest.mark.parametrize("target", ["adapter_model.safetensors", "adapter_config.json"])
def test_a_flipped_byte_anywhere_is_caught_and_named(bank_path, target):
    path = bank_path / expert_dir(2) / target
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, same shape: only the checksum can tell
    path.write_bytes(bytes(data))
    bank = Bank.load(bank_path)  # the experts' files are checked on each one's first read
    assert len(bank.read_expert(1).layers) > 0
    with pytest.raises(BankError, match=f"{expert_dir(2)}/{target} has sha256 .* corrupt"):
        bank.read_expert(2)
    with pytest.raises(BankError, match=f"{expert_dir(2)}/{target} has sha256 .* corrupt"):
        bank.adapters()
    checks = {
        c.path: c.status for c in check_files(bank_path, Bank.load(bank_path, False).manifest.files)
    }
    assert checks[f"{expert_dir(2)}/{target}"] == "changed"
    assert sum(status != "ok" for status in checks.values()) == 1


def test_a_missing_file_is_named(bank_path):
    (bank_path / CENTROIDS_NAME).unlink()
    with pytest.raises(BankError, match=f"{CENTROIDS_NAME} is missing"):
        Bank.load(bank_path)


def test_a_bank_without_checksums_still_loads(bank_path, caplog):
    path = bank_path / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    del manifest["files"]
    path.write_text(json.dumps(manifest))
    assert Bank.load(bank_path).num_experts == 3
    assert "records no file checksums" in caplog.text


def test_info_verify_reports_each_file(bank_path):
    from typer.testing import CliRunner

    from ttmm.cli import app

    ok = CliRunner().invoke(app, ["info", str(bank_path), "--verify"])
    assert ok.exit_code == 0, ok.output
    assert "all files match" in ok.output and CENTROIDS_NAME in ok.output
    path = bank_path / CENTROIDS_NAME
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    bad = CliRunner().invoke(app, ["info", str(bank_path), "--verify"])
    assert bad.exit_code == 1 and "changed" in bad.output
