"""The evaluation harness: only continuations scored, the result schema, table, plots, resuming."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import ATOL
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)

from ttmm.build.chunks import read_test_documents
from ttmm.build.train import LoraTrainConfig
from ttmm.eval.harness import METHODS, EvalConfig, EvalError, MethodRunner, evaluate
from ttmm.eval.report import RESULT_FIELDS, SCHEMA, TIMING_FIELDS, validate, write_report
from ttmm.eval.ttt import TTTConfig
from ttmm.model import continuation_nll

P = 20


@pytest.fixture(scope="module")
def engine(eval_engine):  # noqa: F811
    return eval_engine


def small_config(**changes) -> EvalConfig:
    ttt = TTTConfig(
        neighbours=3,
        train=LoraTrainConfig(rank=2, alpha=4.0, max_seq_len=48, num_threads=1, shuffle=False),
        full_optimizer="sgd",
    )
    settings = dict(
        docs=2,
        ttt_docs=1,
        ttt_full_docs=1,
        bootstrap=200,
        prefix_tokens=P,
        max_tokens=96,
        timing_prompts=1,
        new_tokens=3,
        ttt=ttt,
        ttt_full=ttt.replace(weights="all"),
    )
    return EvalConfig(**(settings | changes))


def test_prefix_targets_are_never_scored(engine):
    """Same logits and same continuation, different prefix *targets*: the same score. Changing
    the first continuation target changes it, so the boundary sits exactly at P."""
    text = "The river flows through the old town, past the market and the stone bridge. " * 4
    ids = engine.tokenizer([text], add_special_tokens=False, return_tensors="pt").input_ids
    attention = torch.ones_like(ids)
    with torch.no_grad():
        logits = engine.model(input_ids=ids).logits
    ((nll, n),) = continuation_nll(logits, ids, attention, P)
    assert n == ids.shape[1] - P
    for position in (1, P // 2, P - 1):  # targets inside the routed prefix
        changed = ids.clone()
        changed[0, position] = (changed[0, position] + 7) % logits.shape[-1]
        ((nll_changed, _),) = continuation_nll(logits, changed, attention, P)
        assert nll_changed == nll
    changed = ids.clone()
    changed[0, P] = (changed[0, P] + 7) % logits.shape[-1]  # the first scored target
    ((nll_changed, _),) = continuation_nll(logits, changed, attention, P)
    assert nll_changed != nll


@pytest.mark.parametrize(
    "method", ["base", "finetune", "top3", "ttmm", "ensemble3", "ttt", "ttt_full", "hybrid5"]
)
def test_every_method_scores_exactly_the_continuation(engine, method):
    config = small_config()
    doc = next(
        d
        for d in read_test_documents(engine.bank.path)
        if len(engine.tokenizer(d.text, add_special_tokens=False).input_ids) > 60
    )
    ids = engine.tokenizer([doc.text], add_special_tokens=False).input_ids[0][: config.max_tokens]
    record = MethodRunner(engine, config).score(METHODS[method], doc.text)
    assert record["tokens"] == len(ids) - P
    if method == "base":  # by hand: −Σ_{t ≥ P} log p(x_t | x_<t)
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([ids])).logits[0]
        log_probs = torch.log_softmax(logits.double(), -1)
        expected = -sum(float(log_probs[t - 1, ids[t]]) for t in range(P, len(ids)))
        assert record["nll"] == pytest.approx(expected, abs=ATOL * record["tokens"])
    if method in ("top3", "ensemble3"):
        assert record["active_experts"] == 3 and len(record["experts"]) == 3
    if method == "hybrid5":  # the TTMM-10 plan (3 experts here) and 5 neighbours
        assert record["active_experts"] == 3 and len(record["neighbour_docs"]) == 5


def test_evaluate_writes_schema_table_plot_and_resumes(engine, tmp_path, monkeypatch):
    config = small_config()
    report = evaluate({"tiny": engine}, tmp_path, config, progress=False)
    data = json.loads((tmp_path / "results.json").read_text())
    validate(data)
    assert set(SCHEMA) <= set(data) and data["schema_version"] == 2
    assert data["config"]["methods"] == list(METHODS)
    assert {"torch", "transformers", "peft"} <= set(data["environment"]["packages"])
    domains = {r["domain"] for r in data["results"]}
    assert domains == {"wiki", "stdlib"}
    ran = [m for m in METHODS if m != "finetune_continued"]  # the bank has no continuation
    assert len(data["results"]) == len(ran) * len(domains)
    subsets = data["banks"]["tiny"]["subsets"]
    for row in data["results"]:
        assert set(RESULT_FIELDS) <= set(row)
        in_domain = [d for d in subsets["all"] if d.startswith(row["domain"])]
        assert 1 <= len(in_domain) <= 2
        expected = 1 if METHODS[row["method"]].subset != "all" else len(in_domain)
        assert row["n_docs"] == expected and row["n_tokens"] > 0
        assert row["ci_low"] <= row["ppl"] <= row["ci_high"] and math.isfinite(row["ppl"])
        if row["method"] == "base":
            assert row["normalised_perplexity"] == pytest.approx(1.0)
            assert set(row["comparisons"]) == {"finetune", "ttt"}
        if row["method"] == "ttt":
            assert row["normalised_perplexity"] == pytest.approx(0.0, abs=1e-12)
        if row["method"] == "top1":  # compared with TTT on the one document TTT scored
            assert row["comparisons"]["base"]["n_docs"] == len(in_domain)
            assert row["comparisons"]["ttt"]["n_docs"] == 1
            ttt_doc = [d for d in subsets["ttt"] if d.startswith(row["domain"])]
            assert ttt_doc == in_domain[:1]
    assert {t["method"] for t in data["timing"]} == set(ran)
    for row in data["timing"]:
        assert set(TIMING_FIELDS) <= set(row) and row["median_seconds"] > 0
    ratio = {t["method"]: t["ratio_to_base"] for t in data["timing"]}
    assert ratio["base"] == pytest.approx(1.0)
    table = (tmp_path / "table.md").read_text()
    assert "| TTT |" in table and "| fine-tuning |" in table and "× base" in table
    assert "Difference to fine-tuning" in table and "Difference to TTT" in table
    assert (tmp_path / "tradeoff.png").stat().st_size > 1000
    assert report["results"] == data["results"]

    lines = (tmp_path / "documents.jsonl").read_text().count("\n")

    def fail(*args, **kwargs):
        raise AssertionError("a finished document was scored again")

    monkeypatch.setattr(MethodRunner, "score", fail)
    monkeypatch.setattr(MethodRunner, "time_generation", fail)
    evaluate({"tiny": engine}, tmp_path, config, progress=False)
    assert (tmp_path / "documents.jsonl").read_text().count("\n") == lines


def count_scoring(monkeypatch) -> list[str]:
    """Record the method of every document scored from now on."""
    scored: list[str] = []
    real = MethodRunner.score

    def counting(self, spec, text):
        scored.append(spec.name)
        return real(self, spec, text)

    monkeypatch.setattr(MethodRunner, "score", counting)
    return scored


def test_rerun_with_another_prefix_recomputes(engine, tmp_path, monkeypatch):
    config = small_config(methods=("base", "top1"), docs=1, timing_prompts=0)
    evaluate({"tiny": engine}, tmp_path, config, progress=False)
    scored = count_scoring(monkeypatch)
    evaluate({"tiny": engine}, tmp_path, config, progress=False)
    assert scored == []  # same settings: reused
    evaluate({"tiny": engine}, tmp_path, small_config(**_asdict(config, prefix_tokens=P + 4)))
    assert sorted(scored) == ["base", "base", "top1", "top1"]  # one document per domain each
    evaluate({"tiny": engine}, tmp_path, small_config(**_asdict(config, max_tokens=80)))
    assert len(scored) == 8


def _asdict(config: EvalConfig, **changes) -> dict:
    keep = ("methods", "docs", "timing_prompts", "prefix_tokens", "max_tokens")
    return {name: getattr(config, name) for name in keep} | changes


def test_rerun_after_a_rebuild_at_the_same_path_recomputes(engine, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file, save_file

    from ttmm.bank import Bank, write_manifest
    from ttmm.model import TTMM

    bank_dir = tmp_path / "bank"
    shutil.copytree(engine.bank.path, bank_dir)

    def engine_over(path):
        return TTMM(engine.model, engine.tokenizer, engine.encoder, Bank.load(path))

    config = small_config(methods=("base", "top1", "finetune"), docs=1, timing_prompts=0)
    first = evaluate({"b": engine_over(bank_dir)}, tmp_path / "out", config, progress=False)
    scored = count_scoring(monkeypatch)
    # "rebuild": the experts' weights change, the path, names and sizes stay the same
    for weights in sorted((bank_dir / "experts").rglob("*.safetensors")):
        tensors = load_file(weights)
        save_file({k: v * 1.5 for k, v in tensors.items()}, weights)
    write_manifest(bank_dir, Bank.load(bank_dir, verify=False).manifest)  # as a build would
    second = evaluate({"b": engine_over(bank_dir)}, tmp_path / "out", config, progress=False)
    assert sorted(scored) == ["finetune", "finetune", "top1", "top1"]  # base: not the bank's
    assert first["banks"]["b"]["content"] != second["banks"]["b"]["content"]
    assert first["banks"]["b"]["keys"]["base"] == second["banks"]["b"]["keys"]["base"]
    top1 = {r["domain"]: r["ppl"] for r in second["results"] if r["method"] == "top1"}
    assert top1 != {r["domain"]: r["ppl"] for r in first["results"] if r["method"] == "top1"}


def test_documents_are_drawn_by_a_seeded_hash_of_their_id(engine):
    from ttmm.build.corpus import Document
    from ttmm.eval.documents import document_order, select_documents

    text = "word " * 80
    docs = [Document(id=f"wiki/{name}", text=text, domain="wiki") for name in "abcdefghijkl"]
    chosen = [d.id for d in select_documents(docs, engine.tokenizer, small_config(docs=4))]
    by_hash = sorted((d.id for d in docs), key=lambda i: document_order(i, 0))[:4]
    assert chosen == by_hash
    assert chosen != [d.id for d in docs[:4]]  # not the name order
    other = select_documents(docs, engine.tokenizer, small_config(docs=4, seed=1))
    assert [d.id for d in other] != chosen


def _report_bank(num_experts: int, branch_from: str | None) -> dict:
    """A bank's entry in a hand-made report: what the plots read of it."""
    return {
        "num_experts": num_experts,
        "path": "",
        "routing": {},
        "base_model": "m",
        "build": {},
        "branch_from": branch_from,
        "keys": {},
        "documents": [],
    }


def test_several_banks_plot_perplexity_against_experts(tmp_path):
    from ttmm.eval.plots import experts_series

    rows, banks = [], {}
    # (bank, K, branched from, top1's perplexity); k16-branched differs in more than K
    for name, k, branch, ppl in (
        ("k4", 4, None, 9.0),
        ("k16", 16, None, 8.5),
        ("k16-branched", 16, "finetune", 7.0),
    ):
        banks[name] = _report_bank(k, branch)
        scored = [("base", 10.0), ("finetune", 9.5), ("top1", ppl), ("ttt", 8.0)]
        if name == "k16":
            scored.append(("ensemble10", 8.2))  # scored at one K only: no line
        for method, value in scored:
            rows.append(
                {
                    "bank": name,
                    "domain": "wiki",
                    "method": method,
                    "label": METHODS[method].label,
                    "ppl": value,
                    "ci_low": value - 0.5,
                    "ci_high": value + 0.5,
                    "n_docs": 1,
                    "n_tokens": 10,
                    "normalised_perplexity": (value - 8.0) / 2.0,
                    "normalised_ci_low": (value - 8.5) / 2.0,
                    "normalised_ci_high": (value - 7.5) / 2.0,
                    "nll": 1.0,
                    "mean_active_experts": 1.0,
                    "comparisons": {
                        "finetune": {
                            "diff": value - 9.5,
                            "ci_low": value - 9.6,
                            "ci_high": value - 9.4,
                            "rel_diff": value / 9.5 - 1,
                            "rel_ci_low": value / 9.6 - 1,
                            "rel_ci_high": value / 9.4 - 1,
                            "significant": True,
                            "win_rate": 1.0,
                            "n_docs": 1,
                        }
                    }
                    if method != "finetune"
                    else {},
                }
            )
    methods = ("base", "finetune", "top1", "ttt", "ensemble10")
    report = {
        "schema_version": 2,
        "created": "now",
        "config": {"bootstrap": 10},
        "environment": {},
        "methods": {m: {"kind": METHODS[m].kind, "label": METHODS[m].label} for m in methods},
        "banks": banks,
        "results": rows,
        "timing": [],
        "documents": [],
        "timings": [],
    }
    lines = experts_series(report)["wiki"]
    assert set(lines) == {"base", "finetune", "top1", "ttt"}  # no ensemble: one K only
    assert lines["top1"] == [(4, 9.0, 8.5, 9.5), (16, 8.5, 8.0, 9.0)]  # not the branched 7.0
    differences = experts_series(report, against="finetune")["wiki"]
    assert "finetune" not in differences
    assert [(k, round(d, 6)) for k, d, *_ in differences["top1"]] == [(4, -0.5), (16, -1.0)]
    paths = write_report(report, tmp_path)
    assert paths["experts"].stat().st_size > 1000
    assert "k4 wiki" in paths["table"].read_text()


def test_config_and_schema_errors_name_the_field():
    with pytest.raises(EvalError, match="methods"):
        EvalConfig(methods=("nope",))
    with pytest.raises(EvalError, match="max_tokens"):
        EvalConfig(prefix_tokens=50, max_tokens=60)
    with pytest.raises(ValueError, match="results"):
        validate(
            {key: kind() for key, kind in SCHEMA.items()} | {"schema_version": 2, "results": None}
        )


def test_eval_command_writes_results(eval_bank_path, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from ttmm.cli import app

    out = tmp_path / "cli"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "--bank",
            str(eval_bank_path),
            "--out",
            str(out),
            "--methods",
            "base,top1",
            "--docs",
            "1",
            "--bootstrap",
            "50",
            "--timing-prompts",
            "0",
            "--prefix-tokens",
            "20",
            "--max-tokens",
            "64",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Perplexity" in result.output
    validate(json.loads((out / "results.json").read_text()))
    bad = CliRunner().invoke(app, ["eval", "--bank", str(eval_bank_path), "--methods", "nope"])
    assert bad.exit_code == 2 and "nope" in bad.output


def test_methods_narrowed_per_bank(engine, tmp_path, monkeypatch):
    """A bank given its own methods runs only those; the others run the whole list. The copy
    has the same content, so its records are the main bank's: nothing is scored twice."""
    import shutil

    from ttmm.bank import Bank
    from ttmm.model import TTMM

    shutil.copytree(engine.bank.path, tmp_path / "other")
    engines = {
        "main": engine,
        "other": TTMM(
            engine.model, engine.tokenizer, engine.encoder, Bank.load(tmp_path / "other")
        ),
    }
    config = small_config(methods=("base", "top1", "finetune"), docs=1, timing_prompts=0)
    scored = count_scoring(monkeypatch)
    report = evaluate(engines, tmp_path / "out", config, False, {"other": ["base", "top1"]})
    assert sorted(scored) == ["base"] * 2 + ["finetune"] * 2 + ["top1"] * 2
    ran = {(r["bank"], r["method"]) for r in report["results"]}
    assert ran == {("main", "base"), ("main", "top1"), ("main", "finetune")} | {
        ("other", "base"),
        ("other", "top1"),
    }
    assert set(report["banks"]["other"]["keys"]) == {"base", "top1"}
    with pytest.raises(EvalError, match="not in the run's methods"):
        evaluate(engines, tmp_path / "out", config, False, {"other": ["ttt"]})
    with pytest.raises(EvalError, match="not among the banks"):
        evaluate(engines, tmp_path / "out", config, False, {"nope": ["base"]})


def test_tradeoff_panel_range_follows_the_points_not_a_wild_interval():
    """Code's TTT is close to base, so one normalised interval spanned -24..+28 and flattened
    every point: the range holds the points and both reference lines, with room, and no more."""
    from ttmm.eval.plots import y_limits

    low, high = y_limits([-1.4, -2.5, 0.0, 1.0, -1.9])
    assert low < -2.5 and high > 1.0  # every point and the base and TTT lines are inside
    assert high - low == pytest.approx(2 * (1.0 + 2.5))  # half the span of room on each side
    assert y_limits([0.5]) == (-0.5, 1.5)  # no points outside [0, 1]: the lines set the range


def test_no_experts_plot_without_banks_that_differ_only_in_k(tmp_path):
    """Branched banks differ in more than K: with no two plain banks of different K there is
    no line to draw, and the report is written without the plot."""
    from ttmm.eval.plots import experts_series

    rows, banks = [], {}
    for name, k, branch in (("a", 4, "finetune"), ("b", 16, "finetune"), ("c", 8, None)):
        banks[name] = _report_bank(k, branch)
        rows.append(
            {
                "bank": name,
                "domain": "wiki",
                "method": "top1",
                "label": METHODS["top1"].label,
                "ppl": 9.0,
                "ci_low": 8.5,
                "ci_high": 9.5,
                "n_docs": 1,
                "n_tokens": 10,
                "normalised_perplexity": None,
                "normalised_ci_low": None,
                "normalised_ci_high": None,
                "nll": 1.0,
                "mean_active_experts": 1.0,
                "comparisons": {},
            }
        )
    report = {
        "schema_version": 2,
        "created": "now",
        "config": {"bootstrap": 10},
        "environment": {},
        "methods": {"top1": {"kind": METHODS["top1"].kind, "label": METHODS["top1"].label}},
        "banks": banks,
        "results": rows,
        "timing": [],
        "documents": [],
        "timings": [],
    }
    assert not any(experts_series(report).values())
    paths = write_report(report, tmp_path)
    assert "experts" not in paths and not (tmp_path / "experts.png").exists()
    assert paths["table"].exists()
