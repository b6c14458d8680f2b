"""End to end on the real default model (SmolLM2-135M from its wheel) and encoder (MiniLM),
with a small bank of random non-zero adapters; and the CLI verbs over that bank."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ATOL, write_random_bank
from typer.testing import CliRunner

from ttmm.assets import DEFAULT_BASE_MODEL, load_base_model
from ttmm.bank import Bank
from ttmm.cli import app
from ttmm.model import TTMM
from ttmm.routing import RoutingPlan

pytestmark = pytest.mark.real_model

PROSE = (
    "The Amazon River in South America is the largest river by discharge volume of water in the "
    "world, and the disputed longest river system in the world in comparison to the Nile. The "
    "headwaters of the Apurímac River on Nevado Mismi had been considered for nearly a century "
    "as the Amazon basin's most distant source, until a 2014 study found it to be the headwaters "
    "of the Mantaro River on the Cordillera Rumi Cruz in Peru."
)


@pytest.fixture(scope="module")
def real_bank(tmp_path_factory):
    model, _ = load_base_model()
    path = tmp_path_factory.mktemp("real") / "bank"
    modules = [n for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj", "down_proj"))]
    assert len(modules) == 90  # 30 layers × 3: the real model is the one the design notes describe
    write_random_bank(
        path,
        model,
        384,
        num_experts=4,
        ranks=[4] * 4,
        base_model_name=DEFAULT_BASE_MODEL,
        magnitude=0.02,
    )
    return path


@pytest.fixture(scope="module")
def real_engine(real_bank):
    return TTMM.from_bank(real_bank)


def test_default_assets_load_offline(real_engine):
    model = real_engine.model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert next(model.parameters()).dtype == torch.float32
    assert real_engine.encoder.dim == 384
    assert real_engine.tokenizer.chat_template  # the GGUF carried the chat template


def test_real_model_merge_modes_agree_and_restore(real_engine):
    engine = real_engine
    before = {k: v.clone() for k, v in engine.model.state_dict().items()}
    [plan] = engine.route([PROSE])
    assert plan.rule == "sparse_softmax" and not plan.is_base
    [fold] = engine.score([PROSE], plans=[plan], mode="fold")
    [low] = engine.score([PROSE], plans=[plan], mode="lowrank")
    [base] = engine.score([PROSE], plans=[RoutingPlan.base()])
    assert fold.n_tokens == low.n_tokens > 0
    assert fold.nll == pytest.approx(low.nll, abs=ATOL * fold.n_tokens)
    assert abs(fold.nll - base.nll) > 1e-2  # the random experts really change the model
    assert 1.5 < base.perplexity < 60  # the real model predicts real prose
    [g_fold] = engine.generate([PROSE[:120]], max_new_tokens=8, plans=[plan], mode="fold")
    [g_low] = engine.generate([PROSE[:120]], max_new_tokens=8, plans=[plan], mode="lowrank")
    assert g_fold.text == g_low.text and g_fold.completion_tokens == 8
    for k, v in engine.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_cli_route_generate_score(real_bank, tmp_path):
    runner = CliRunner()
    routed = runner.invoke(
        app,
        [
            "route",
            "--bank",
            str(real_bank),
            PROSE,
            "--json",
            "--rule",
            "top_n",
            "--max-active",
            "2",
        ],
    )
    assert routed.exit_code == 0, routed.output
    data = json.loads(routed.stdout)
    assert data["rule"] == "top_n" and len(data["experts"]) == 2
    assert {"id", "weight", "similarity", "label"} <= set(data["experts"][0])

    generated = runner.invoke(
        app,
        [
            "generate",
            "--bank",
            str(real_bank),
            "The Amazon River",
            "--max-new-tokens",
            "4",
            "--json",
        ],
    )
    assert generated.exit_code == 0, generated.output
    payload = json.loads(generated.stdout)
    assert payload["usage"]["completion_tokens"] == 4 and payload["routing"]["experts"]

    # user text is printed as it is, never read as rich markup
    plain = runner.invoke(
        app,
        ["generate", "--bank", str(real_bank), "[section] name = value", "--max-new-tokens", "2"],
    )
    assert plain.exit_code == 0, plain.output
    assert "[section] name = value" in plain.output

    texts = tmp_path / "texts.jsonl"
    texts.write_text(json.dumps({"text": PROSE}) + "\n" + json.dumps({"text": PROSE[::-1]}) + "\n")
    scored = runner.invoke(app, ["score", "--bank", str(real_bank), str(texts), "--json"])
    assert scored.exit_code == 0, scored.output
    lines = [json.loads(line) for line in scored.stdout.splitlines()]
    assert (
        len(lines) == 2 and lines[0]["perplexity"] < lines[1]["perplexity"]
    )  # prose beats reversed text


def test_cli_errors_are_one_line_with_exit_code_2(real_bank, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["route", "--bank", str(tmp_path / "none"), "hello"])
    assert (
        missing.exit_code == 2
        and "does not exist" in missing.output
        and "Traceback" not in missing.output
    )
    empty = runner.invoke(app, ["generate", "--bank", str(real_bank), "  "])
    assert empty.exit_code == 2 and "empty" in empty.output
    bad_rule = runner.invoke(app, ["route", "--bank", str(real_bank), "hello", "--rule", "magic"])
    assert bad_rule.exit_code == 2 and "unknown" in bad_rule.output
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    bad_file = runner.invoke(app, ["score", "--bank", str(real_bank), str(tmp_path / "bad.jsonl")])
    assert bad_file.exit_code == 2 and "'text' field" in bad_file.output


def test_bank_records_the_default_model_identity(real_bank):
    bank = Bank.load(real_bank)
    assert bank.manifest.base_model["name"] == DEFAULT_BASE_MODEL
    assert bank.manifest.base_model["architecture"] == "LlamaForCausalLM"
