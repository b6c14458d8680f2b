"""Tuning TTT on validation documents: never a test document, the lowest validation perplexity
chosen, resumed without rescoring, and the choice reaching TTT, all-weights TTT and the hybrids."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)

from ttmm.build.train import LoraTrainConfig
from ttmm.eval.documents import held_out_documents, select_documents, validation_documents
from ttmm.eval.harness import EvalConfig, EvalError, MethodRunner
from ttmm.eval.methods import METHODS
from ttmm.eval.ttt import TTTConfig
from ttmm.eval.ttt_sweep import (
    RESULT_FILE,
    Candidate,
    TTTSweep,
    best,
    read_tuned,
    run_staged,
    summary,
    tuned_config,
    write_summary,
)

P = 20


def small_config(**changes) -> EvalConfig:
    ttt = TTTConfig(
        neighbours=3,
        train=LoraTrainConfig(rank=2, alpha=4.0, max_seq_len=48, num_threads=1, shuffle=False),
    )
    settings = dict(
        docs=1,
        ttt_docs=1,
        ttt_full_docs=1,
        bootstrap=100,
        prefix_tokens=P,
        max_tokens=96,
        timing_prompts=0,
        ttt=ttt,
        ttt_full=ttt.replace(weights="all", full_optimizer="sgd"),
    )
    return EvalConfig(**(settings | changes))


@pytest.fixture(scope="module")
def held_out(eval_engine):  # noqa: F811
    return held_out_documents(eval_engine.bank)


@pytest.mark.parametrize("docs", [1, 2, 3])
def test_validation_documents_follow_the_test_documents_and_never_overlap(
    eval_engine,  # noqa: F811
    held_out,
    docs,
):
    config = small_config(docs=docs)
    test = select_documents(held_out, eval_engine.tokenizer, config)
    validation = validation_documents(held_out, eval_engine.tokenizer, config, 2)
    assert validation, "the tiny bank holds out documents beyond the test ones"
    assert not {d.id for d in test} & {d.id for d in validation}
    # they are exactly the next ones of the same seeded order, per domain
    wider = select_documents(held_out, eval_engine.tokenizer, replace(config, docs=docs + 2))
    for domain in {d.domain for d in wider}:
        in_order = [d.id for d in wider if d.domain == domain]
        assert [d.id for d in validation if d.domain == domain] == in_order[docs:]
        assert [d.id for d in test if d.domain == domain] == in_order[:docs]


def test_validation_documents_refuse_an_evaluation_of_every_document(eval_engine, held_out):  # noqa: F811
    with pytest.raises(EvalError, match="docs=None"):
        validation_documents(held_out, eval_engine.tokenizer, small_config(docs=None), 2)
    with pytest.raises(EvalError, match=">= 1"):
        validation_documents(held_out, eval_engine.tokenizer, small_config(), 0)


def test_sweep_scores_validation_documents_only_picks_the_lowest_and_resumes(
    eval_engine,  # noqa: F811
    held_out,
    tmp_path,
    monkeypatch,
):
    config = small_config()
    runner = MethodRunner(eval_engine, config)
    test = select_documents(held_out, eval_engine.tokenizer, config)
    validation = validation_documents(held_out, eval_engine.tokenizer, config, 1)
    seen = []
    real_score = MethodRunner.score

    def spy(self, spec, text):
        seen.append(text)
        return real_score(self, spec, text)

    monkeypatch.setattr(MethodRunner, "score", spy)
    grid = [
        Candidate("lora", 1e-3, neighbours=2),
        Candidate("lora", 5e-2, neighbours=2),
        Candidate("all", 1e-3, neighbours=2, optimizer="sgd"),
    ]
    sweeper = TTTSweep(runner, validation, tmp_path)
    rows = sweeper.run(grid, progress=False)
    assert len(seen) == len(grid) * len(validation)
    assert set(seen) == {d.text for d in validation}
    assert not set(seen) & {d.text for d in test}
    assert all(r.complete and set(r.documents) == {d.domain for d in validation} for r in rows)
    lora = [r for r in rows if r.candidate.weights == "lora"]
    assert lora[0].perplexity != lora[1].perplexity  # the learning rate matters
    assert best(rows, "lora") is min(lora, key=lambda r: r.objective)
    assert best(rows, "all").candidate == grid[2]

    seen.clear()
    again = sweeper.run(grid, progress=False)  # resumed: nothing scored twice
    assert seen == []
    assert [r.perplexity for r in again] == [r.perplexity for r in rows]

    data = summary(rows, validation, [d.id for d in test])
    assert data["test_documents_among_them"] == []
    assert data["validation_documents"] == [d.id for d in validation]
    assert data["chosen"]["lora"] == best(rows, "lora").candidate.to_dict()
    path = write_summary(tmp_path, data)
    assert path.name == RESULT_FILE
    assert read_tuned(path, config) == tuned_config(config, rows)


def test_the_choice_reaches_ttt_all_weights_ttt_and_the_hybrids(eval_engine):  # noqa: F811
    config = small_config()
    rows_best = {
        "lora": Candidate("lora", 2e-2, neighbours=50),
        "all": Candidate("all", 1e-4, neighbours=20, optimizer="adam"),
    }
    tuned = replace(
        config,
        ttt=rows_best["lora"].apply(config.ttt),
        ttt_full=rows_best["all"].apply(config.ttt_full),
    )
    plain, runner = MethodRunner(eval_engine, config), MethodRunner(eval_engine, tuned)
    ttt = runner.ttt_config(METHODS["ttt"])
    assert (ttt.train.learning_rate, ttt.neighbours, ttt.weights) == (2e-2, 50, "lora")
    for hybrid, n in (("hybrid5", 5), ("hybrid20", 20)):  # their own neighbours, tuned rate
        setting = runner.ttt_config(METHODS[hybrid])
        assert (setting.train.learning_rate, setting.neighbours) == (2e-2, n)
        assert runner.key(hybrid) != plain.key(hybrid)
    full = runner.ttt_config(METHODS["ttt_full"])
    assert (full.weights, full.full_optimizer, full.full_learning_rate) == ("all", "adam", 1e-4)
    assert full.neighbours == 20
    for method in ("ttt", "ttt_full"):
        assert runner.key(method) != plain.key(method)
    assert runner.key("top1") == plain.key("top1")  # a merge does not depend on TTT's setting
    assert runner.trainer(METHODS["ttt_full"]).config.full_learning_rate == 1e-4


def test_staged_sweep_widens_the_best_and_refuses_unknown_kinds(
    eval_engine,  # noqa: F811
    held_out,
    tmp_path,
    monkeypatch,
):
    import ttmm.eval.ttt_sweep as sweep_module

    config = small_config()
    validation = validation_documents(held_out, eval_engine.tokenizer, config, 1)
    grid = (Candidate("lora", 1e-3, neighbours=2), Candidate("lora", 5e-2, neighbours=2))
    monkeypatch.setitem(sweep_module.GRIDS, "lora", grid)
    sweeper = TTTSweep(MethodRunner(eval_engine, config), validation, tmp_path)
    rows, data = run_staged(sweeper, ["lora"], wide=4, progress=False)
    first = best(rows[:2], "lora").candidate
    assert rows[2].candidate == Candidate("lora", first.learning_rate, neighbours=4)
    assert json.loads((tmp_path / RESULT_FILE).read_text())["rows"] == data["rows"]
    assert len(data["rows"]) == 3 and "all" not in data["chosen"]
    base = data["base_perplexity"]  # the reference, on the same validation documents
    assert set(base) == {d.domain for d in validation} and all(p > 1 for p in base.values())
    with pytest.raises(EvalError, match="unknown"):
        run_staged(sweeper, ["everything"], progress=False)
    for bad, match in (
        (dict(weights="half", learning_rate=1e-3), "'lora' or 'all'"),
        (dict(weights="all", learning_rate=1e-3, optimizer="lbfgs"), "'adam' or 'sgd'"),
        (dict(weights="lora", learning_rate=0.0), "learning rate > 0"),
        (dict(weights="lora", learning_rate=1e-3, neighbours=0), "at least 1 neighbour"),
    ):
        with pytest.raises(EvalError, match=match):
            Candidate(**bad)


def test_eval_command_tunes_ttt_and_records_the_sweep(eval_bank_path, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    import ttmm.eval.ttt_sweep as sweep_module
    from ttmm.cli import app

    monkeypatch.setitem(sweep_module.GRIDS, "lora", (Candidate("lora", 1e-2, neighbours=2),))
    monkeypatch.setitem(
        sweep_module.GRIDS, "all", (Candidate("all", 1e-3, neighbours=2, optimizer="sgd"),)
    )
    out = tmp_path / "cli"
    common = ["--docs", "1", "--bootstrap", "50", "--timing-prompts", "0"]
    common += ["--prefix-tokens", "20", "--max-tokens", "64", "--neighbours", "2"]
    result = CliRunner().invoke(
        app,
        ["eval", "--bank", str(eval_bank_path), "--out", str(out), "--methods", "base,ttt"]
        + common
        + ["--tune-ttt", "1"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "results.json").read_text())
    sweep = report["ttt_sweep"]
    assert sweep["chosen"]["lora"]["learning_rate"] == 1e-2
    assert sweep["test_documents_among_them"] == []
    assert report["config"]["ttt"]["train"]["learning_rate"] == 1e-2
    assert report["config"]["ttt_full"]["full_optimizer"] == "sgd"
    scored = {d["doc_id"] for d in report["documents"]}
    assert not scored & set(sweep["validation_documents"])

    reused = CliRunner().invoke(
        app,
        ["eval", "--bank", str(eval_bank_path), "--out", str(tmp_path / "again")]
        + ["--methods", "base,ttt", *common, "--ttt-sweep", str(out / RESULT_FILE)],
    )
    assert reused.exit_code == 0, reused.output
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["config"]["ttt"] == report["config"]["ttt"]
    both = CliRunner().invoke(
        app,
        ["eval", "--bank", str(eval_bank_path), "--tune-ttt", "1"]
        + ["--ttt-sweep", str(out / RESULT_FILE)],
    )
    assert both.exit_code != 0 and "not both" in both.output
