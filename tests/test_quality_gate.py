"""The quality gate (issue 22): an expert worse than the base model on its own cluster is
disabled, routing never selects it (and says so), operators override it by hand, and the
build records every expert's health."""

# ruff: noqa: F811  (the evalbank fixtures are imported, then requested by name)

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_random_bank
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from ttmm.bank import Bank, write_manifest
from ttmm.build.executors import TrainJob
from ttmm.build.health import adapter_losses, expert_health
from ttmm.build.train import LoraTrainConfig, train_lora
from ttmm.cli import app as cli_app
from ttmm.eval.documents import held_out_documents
from ttmm.model import TTMM, InputError
from ttmm.quality_gate import ExpertHealth, apply_gate, set_enabled
from ttmm.routing import RoutingConfig, RoutingError, RoutingPlan, route, route_enabled

TRAIN = LoraTrainConfig(
    rank=2, alpha=4.0, learning_rate=1e-2, epochs=4, max_seq_len=96, num_threads=1
)


def test_routing_passes_over_disabled_experts_as_if_they_were_not_there():
    z = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.05])
    config = RoutingConfig(rule="sparse_softmax", tau=0.05, beta=0.1, max_active=3)
    whole = route(z, config)
    assert 0 in whole.expert_ids
    plan = route_enabled(z, config, frozenset({0, 3}))
    without = route(z[[1, 2, 4]], config)  # the bank without experts 0 and 3
    assert plan.expert_ids == tuple([1, 2, 4][i] for i in without.expert_ids)
    assert plan.weights == without.weights and plan.skipped == (0,)
    assert plan.to_dict()["skipped_disabled"] == [{"id": 0}]
    assert route_enabled(z, config, frozenset()) == whole
    with pytest.raises(RoutingError, match="every expert of the bank is disabled"):
        route_enabled(z, config, frozenset(range(5)))


def test_the_gate_disables_what_is_worse_than_base_and_respects_operators(tmp_path, tiny_llama):
    path = write_random_bank(tmp_path / "bank", tiny_llama, num_experts=3)
    manifest = Bank.load(path).manifest
    health = [
        ExpertHealth(4, expert_loss=2.0, base_loss=2.5, finetune_loss=1.9),  # behind fine-tuning
        ExpertHealth(4, expert_loss=2.7, base_loss=2.5, finetune_loss=2.2),  # worse than base
        ExpertHealth(0, expert_loss=None, base_loss=None),  # no validation chunks: unchecked
    ]
    assert [h.status for h in health] == ["behind fine-tuning", "worse than base", "unchecked"]
    assert apply_gate(manifest, health) == [1]
    assert manifest.experts[1].disabled["by"] == "gate"
    assert "worse than the base model's 2.5000" in manifest.experts[1].disabled["reason"]
    assert manifest.experts[0].disabled is None and manifest.experts[2].disabled is None
    assert manifest.experts[1].health["expert_loss"] == 2.7
    write_manifest(path, manifest)

    assert set_enabled(path, [1], enabled=True, reason="checked by hand") == [1]
    manifest = Bank.load(path).manifest  # checksums still hold: only the manifest changed
    assert manifest.experts[1].disabled is None
    assert manifest.history[-1]["overrides"]["by"] == "gate"
    assert apply_gate(manifest, health) == []  # an operator's override stands
    health[1] = ExpertHealth(4, expert_loss=2.1, base_loss=2.5)
    manifest.experts[1].disabled = {"by": "gate", "reason": "old"}
    apply_gate(manifest, health)
    assert manifest.experts[1].disabled is None  # retrained and healthy: the gate lets it in


def test_operators_disable_and_enable_from_the_cli(tmp_path, tiny_llama, smol_tokenizer, encoder):
    path = write_random_bank(tmp_path / "bank", tiny_llama, encoder.dim, num_experts=4)
    files = json.loads((path / "manifest.json").read_text())["files"]
    runner = CliRunner()
    result = runner.invoke(cli_app, ["bank", "disable", str(path), "1,2", "--reason", "leaks"])
    assert result.exit_code == 0, result.output
    bank = Bank.load(path)  # verified: the experts' files and checksums did not change
    assert bank.disabled == {1, 2} and bank.manifest.files == files
    assert [h["action"] for h in bank.manifest.history] == ["disable", "disable"]

    engine = TTMM(tiny_llama, smol_tokenizer, encoder, bank, RoutingConfig(rule="top_n"))
    plans = engine.route([f"prompt {i} about {w}" for i, w in enumerate("abcdefgh")])
    assert all(not {1, 2} & set(p.expert_ids) for p in plans)
    assert all(set(p.skipped) <= {1, 2} for p in plans) and any(p.skipped for p in plans)
    assert (
        "reason" in bank.describe_plan(next(p for p in plans if p.skipped))["skipped_disabled"][0]
    )
    with pytest.raises(InputError, match="expert 2 is disabled \\(leaks\\).*ttmm bank enable"):
        engine.generate(["hello"], max_new_tokens=1, plans=[RoutingPlan.explicit({2: 1.0})])

    for args, message in [
        (["disable", str(path), "3"], "--reason"),
        (["disable", str(path), "0,3", "--reason", "x"], "every expert"),
        (["enable", str(path), "9"], "no expert 9"),
        (["enable", str(path), "one"], "integers"),
    ]:
        result = runner.invoke(cli_app, ["bank", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert Bank.load(path).disabled == {1, 2}  # refused changes wrote nothing

    result = runner.invoke(cli_app, ["bank", "enable", str(path), "2"])
    assert result.exit_code == 0 and Bank.load(path).disabled == {1}
    health = runner.invoke(cli_app, ["bank", "health", str(path)], terminal_width=160)
    assert "disabled by operator" in health.output and "expert 1: leaks" in health.output
    info = runner.invoke(cli_app, ["info", str(path)], terminal_width=160)
    assert "expert health" in info.output and "disabled by operator" in info.output


def test_a_build_records_every_experts_health(eval_bank_path):
    manifest = Bank.load(eval_bank_path).manifest
    for info in manifest.experts:
        health = ExpertHealth.from_dict(info.health)
        assert health.validation_chunks == info.extra["n_validation_chunks"]
        if health.validation_chunks:
            assert health.base_loss == pytest.approx(info.extra["val_before"], abs=1e-4)
            assert health.expert_loss == pytest.approx(info.extra["val_after"], abs=1e-4)
            assert health.finetune_loss is not None  # the build trained a fine-tuning adapter
    assert "quality_gate" in manifest.build["stage_seconds"]


@pytest.fixture(scope="module")
def cluster(eval_bank_path, eval_engine):
    """The held-out prose of the eval bank's corpus as one cluster: texts, chunks to train
    on, held-out chunks the gate scores."""
    texts = [d.text for d in held_out_documents(Bank.load(eval_bank_path)) if d.domain == "wiki"]
    ids = [eval_engine.tokenizer(t, add_special_tokens=False)["input_ids"][:96] for t in texts]
    assert len(ids) >= 6
    return texts, ids[0::2], ids[1::2]


def test_an_expert_trained_on_corrupted_data_is_kept_out_of_every_merge(
    tmp_path, eval_engine, cluster
):
    """One good expert trained on the cluster, one trained on corrupted chunks (random rare
    tokens): the gate disables the bad one, routing never selects it, and the merged model's
    held-out loss on the cluster is better than with it."""
    model, tokenizer, encoder = eval_engine.model, eval_engine.tokenizer, eval_engine.encoder
    texts, train, validation = cluster
    generator = torch.Generator().manual_seed(0)
    corrupted = [torch.randint(40_000, 40_100, (len(c),), generator=generator).tolist()
                 for c in train]  # fmt: skip
    jobs, records, adapters = [], {}, []
    for k, chunks in enumerate((train, corrupted)):
        result = train_lora(model, chunks, TRAIN, seed=k, validation=validation)
        pad = tokenizer.pad_token_id
        jobs.append(
            TrainJob(k, (), k, TRAIN, "tiny", pad, validation=tuple(map(tuple, validation)))
        )
        records[k] = {"val_before": result.val_before, "val_after": result.val_after}
        adapters.append(result.adapter)
    health = expert_health(model, jobs, records, finetune=adapters[0])
    assert health[0].status == "ok" and health[1].status == "worse than base"
    assert health[1].finetune_loss == pytest.approx(health[0].expert_loss, abs=1e-3)
    [measured] = adapter_losses(model, adapters[1], [validation], pad, TRAIN.max_seq_len)
    assert measured == pytest.approx(health[1].expert_loss, abs=1e-3)

    # both experts' centroids on the cluster, the bad one nearest; a third expert elsewhere
    centre = torch.from_numpy(encoder.encode(texts)).mean(0)
    away = torch.randn(encoder.dim, generator=generator)
    centroids = torch.stack([centre + 0.05 * away, centre, away])
    path = write_random_bank(
        tmp_path / "bank", model, encoder.dim, adapters=[*adapters, adapters[0]],
        centroids=centroids, base_model_name=eval_engine.bank.manifest.base_model["name"],
    )  # fmt: skip
    manifest = Bank.load(path).manifest
    assert apply_gate(manifest, [*health, ExpertHealth(0, None, None)]) == [1]
    write_manifest(path, manifest)

    routing = RoutingConfig(rule="top_n", max_active=2, prefix_tokens=16)
    gated = TTMM(model, tokenizer, encoder, Bank.load(path), routing)
    plans = gated.route(texts)
    assert all(1 not in p.expert_ids for p in plans) and all(1 in p.skipped for p in plans)
    set_enabled(path, [1], enabled=True, reason="the test's control")
    ungated = TTMM(model, tokenizer, encoder, Bank.load(path), routing)
    assert all(1 in p.expert_ids for p in ungated.route(texts))

    def held_out_nll(engine: TTMM) -> float:
        scores = engine.score(texts, prefix_tokens=16, max_tokens=112)
        return sum(s.nll for s in scores) / sum(s.n_tokens for s in scores)

    assert held_out_nll(gated) < held_out_nll(ungated) - 0.05
