"""``ttmm poc``: the plan (pure), the verdicts, the costs, and the whole command on a tiny model.

The end-to-end run builds a bank of a tiny Llama (with the real tokenizer and encoder) from
small slices of the default corpora within a budget, then checks that every number in
``report.md`` is one of ``poc.json``'s, that ``poc.json``'s quality numbers are what ``ttmm eval``
gives on the same bank and documents, that the HTML stands alone, that a killed run resumes
without redoing finished stages, and that the server links the report.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import ATOL, save_tiny_llama
from typer.testing import CliRunner

from ttmm.cli.app import app
from ttmm.poc import PocConfig, PocError, run_poc
from ttmm.poc.inference import cost_per_million, daily_cost
from ttmm.poc.plan import (
    SAFETY,
    CorpusFacts,
    Rates,
    fixed_seconds,
    plan_evaluation,
    plan_run,
)
from ttmm.poc.verdict import MIN_VERDICT_DOCS, domain_verdict

RATES = Rates(  # SmolLM2-135M on 2 cores, roughly
    train_tokens_per_second=100.0,
    score_tokens_per_second=300.0,
    decode_seconds_per_token=0.05,
    embed_seconds_per_chunk=0.05,
    load_seconds=8.0,
)
FACTS = CorpusFacts(
    domains=("code", "prose"),
    documents={"code": 120, "prose": 480},
    held_out={"code": 30, "prose": 90},
    train_chunks=900,
    train_tokens=200_000,
    window=256,
    test_fraction=0.25,
    doc_tokens=400.0,
)


# -- the plan ----------------------------------------------------------------------------------


def _predicted(plan, facts=FACTS, rates=RATES) -> float:
    return fixed_seconds(rates, facts) + plan.train_seconds + plan.evaluation.seconds


@pytest.mark.parametrize("minutes", [10, 20, 60])
def test_plan_fills_the_budget_and_no_more(minutes):
    plan = plan_run(RATES, FACTS, minutes)
    assert _predicted(plan) <= SAFETY * minutes * 60 + 1
    assert _predicted(plan) >= 0.8 * SAFETY * minutes * 60  # the budget is used, not wasted
    assert 2 * plan.budget_tokens / RATES.train_tokens_per_second == pytest.approx(
        plan.train_seconds, rel=1e-3
    )
    assert plan.experts >= 2 and plan.evaluation.docs >= 1


def test_more_budget_buys_more_training_and_more_documents():
    small, large = plan_run(RATES, FACTS, 10), plan_run(RATES, FACTS, 40)
    assert large.budget_tokens > small.budget_tokens
    assert large.experts >= small.experts
    assert large.evaluation.docs >= small.evaluation.docs
    assert large.evaluation.docs <= max(FACTS.held_out.values())


def test_documents_are_capped_by_what_the_corpus_holds_and_the_rest_trains():
    few = replace(FACTS, held_out={"code": 3, "prose": 4})
    plan = plan_run(RATES, few, 60)
    assert plan.evaluation.docs == 4  # the largest domain's count: the other scores all 3
    assert plan.train_seconds > plan_run(RATES, FACTS, 60).train_seconds


def test_training_is_capped_at_two_passes_over_a_small_corpus():
    tiny = replace(FACTS, train_tokens=5_000, train_chunks=40)
    plan = plan_run(RATES, tiny, 60)
    assert plan.budget_tokens == 10_000
    assert any("end early" in r for r in plan.reasons)


def test_evaluation_plan_shrinks_to_the_time_left():
    roomy = plan_evaluation(RATES, FACTS, 1200, max_docs=60)
    tight = plan_evaluation(RATES, FACTS, 120, max_docs=60)
    assert tight.docs < roomy.docs
    assert tight.seconds <= 120 and roomy.seconds <= 1200
    assert roomy.ttt_docs >= 2 and roomy.neighbours == 20
    assert tight.ttt_docs <= tight.docs


def test_a_budget_too_small_names_the_smallest_that_works():
    with pytest.raises(PocError, match=r"give --budget-minutes (\d+) or more") as caught:
        plan_run(RATES, FACTS, 0.5)
    needed = int(re.search(r"--budget-minutes (\d+)", str(caught.value)).group(1))
    plan_run(RATES, FACTS, needed)  # the suggestion is enough


def test_config_errors_name_the_field():
    for field, value in [
        ("budget_minutes", 0),
        ("price_per_hour", -1.0),
        ("experts", 0),
        ("max_docs", 0),
    ]:
        with pytest.raises(PocError, match=f"PocConfig.{field}"):
            PocConfig(**{field: value})
    with pytest.raises(PocError, match="PocConfig.corpora"):
        PocConfig(corpora=())


# -- verdicts and money ------------------------------------------------------------------------


def _row(n: int, vs_finetune: tuple, vs_base: tuple) -> dict:
    def comparison(interval):
        low, value, high = interval
        return {"rel_diff": value, "rel_ci_low": low, "rel_ci_high": high, "n_docs": n}

    return {
        "n_docs": n,
        "comparisons": {"finetune": comparison(vs_finetune), "base": comparison(vs_base)},
    }


def _finetune(vs_base: tuple) -> dict:
    low, value, high = vs_base
    return {"comparisons": {"base": {"rel_diff": value, "rel_ci_low": low, "rel_ci_high": high}}}


BETTER, WORSE, LEVEL = (-0.1, -0.05, -0.01), (0.01, 0.05, 0.1), (-0.05, 0.0, 0.05)


@pytest.mark.parametrize(
    ("ttmm", "finetune", "pick", "adopt"),
    [
        (_row(30, BETTER, BETTER), _finetune(BETTER), "ttmm", True),
        (_row(30, WORSE, BETTER), _finetune(BETTER), "finetune", False),
        (_row(30, WORSE, WORSE), _finetune(LEVEL), "base", False),
        (_row(30, LEVEL, BETTER), _finetune(BETTER), "finetune", None),
        (_row(30, LEVEL, LEVEL), _finetune(LEVEL), "base", False),
        (_row(MIN_VERDICT_DOCS - 1, BETTER, BETTER), _finetune(BETTER), None, None),
    ],
)  # fmt: skip
def test_verdict_reads_the_intervals(ttmm, finetune, pick, adopt):
    verdict = domain_verdict("d", {"ttmm": ttmm, "finetune": finetune})
    assert (verdict["pick"], verdict["adopt_ttmm"]) == (pick, adopt)
    assert verdict["reason"]
    if ttmm["n_docs"] < MIN_VERDICT_DOCS:
        assert verdict["warnings"] and "no verdict" in verdict["reason"]


def test_cost_per_million_tokens():
    cost = cost_per_million(0.05, price_per_hour=0.36)  # 20 tokens/s
    assert cost["machine_hours_per_million"] == pytest.approx(1e6 / 20 / 3600)
    assert cost["cost_per_million"] == pytest.approx(0.36 * 1e6 / 20 / 3600)
    assert daily_cost(cost["cost_per_million"], 2_000_000) == pytest.approx(
        2 * cost["cost_per_million"]
    )
    assert cost_per_million(0.05, None)["cost_per_million"] is None


def test_the_memory_sampler_sees_a_peak_that_is_gone_by_the_end():
    import time

    from ttmm.poc.inference import _MemorySampler

    size = 200_000_000
    with _MemorySampler(interval=0.005) as sampler:
        before = sampler.process.memory_info().rss
        block = bytearray(size)  # touched: resident
        time.sleep(0.05)
        del block
    assert sampler.peak >= before + 0.9 * size
    assert sampler.process.memory_info().rss < sampler.peak - 0.5 * size


# -- the whole command -------------------------------------------------------------------------

CORPORA = ("wiki@80", "stdlib@20")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("poc-model") / "tiny-llama"
    save_tiny_llama(folder, smol_tokenizer)
    return folder


@pytest.fixture(scope="module")
def poc_run(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("poc") / "poc"
    config = PocConfig(
        corpora=CORPORA,
        base_model=str(tiny_model_dir),
        budget_minutes=2.0,
        max_docs=8,
        price_per_hour=0.5,
        tokens_per_day=2_000_000,
    )
    return out, config, run_poc(config, out, progress=False)


def _numbers(value) -> list[float]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


# a number as the report prints it, and the unit after it
NUMBER = re.compile(r"(?<![\w.])([-+]?\d+(?:\.\d+)?)(?:\s*(%|×|MB|min|ms|s\b))?")
SCALE = {"%": 100.0, "MB": 1e-6, "min": 1 / 60, "ms": 1000.0}


def _shown_in(text: str, leaves: list[float]) -> list[str]:
    """The numbers of ``text`` that no leaf of poc.json gives when formatted as shown."""
    text = re.sub(r"`[^`]*`", "", text)  # commands and paths
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\(\S+\.png\)", "", text)
    text = re.sub(r"\d{4}-\d\d-\d\dT[\d:]+\+00:00", "", text)  # the creation time
    missing = []
    for match in NUMBER.finditer(text):
        shown, unit = match.group(1), match.group(2)
        decimals = len(shown.split(".")[1]) if "." in shown else 0
        scales = {SCALE.get(unit, 1.0), 1.0}  # "[+1.6, +5.1]" after a % carries no unit
        if unit is None:
            scales.add(100.0)
        candidates = {
            f"{v * scale:.{decimals}f}".lstrip("+")
            for v in leaves
            for scale in scales
            if math.isfinite(v)
        }
        candidates |= {f"{abs(float(c)):.{decimals}f}" for c in candidates}
        if (
            shown.lstrip("+") not in candidates
            and f"{abs(float(shown)):.{decimals}f}" not in candidates
        ):
            missing.append(match.group(0))
    return missing


def test_every_number_in_the_report_is_poc_json_s(poc_run):
    out, _, poc = poc_run
    assert json.loads((out / "poc.json").read_text()) == poc
    leaves = _numbers(poc)
    markdown = (out / "report.md").read_text()
    labels = {m["label"] for m in poc["inference"]["methods"].values()}
    labels |= {
        r["label"] for d in poc["quality"]["domains"].values() for r in d["methods"].values()
    }
    text = markdown
    for label in sorted(labels, key=len, reverse=True):  # "TTMM, 10 experts": a name, not a number
        text = text.replace(label, "")
    assert _shown_in(text, leaves) == []
    # the headline numbers, by where they live in poc.json
    for domain, d in poc["quality"]["domains"].items():
        c = d["methods"]["ttmm"]["comparisons"]["finetune"]
        assert f"{100 * abs(c['rel_diff']):.1f} % [{100 * c['rel_ci_low']:+.1f}" in markdown
        assert f"'{domain}'" in markdown
    ttmm = poc["inference"]["methods"]["ttmm"]
    assert f"{ttmm['ratio_to_base']:.2f} × the base model's time" in markdown
    assert f"{poc['engineering']['tokens_trained']} tokens" in markdown


def test_quality_numbers_equal_ttmm_eval_on_the_same_bank_and_documents(poc_run, tmp_path):
    out, config, poc = poc_run
    evaluation = poc["evaluation"]
    methods = ["base", "finetune", "top1", "top3", "top10", "ttmm"]
    args = ["eval", "--bank", str(out / "bank"), "--out", str(tmp_path / "eval"),
            "--docs", str(evaluation["docs"]), "--timing-prompts", "0",
            "--neighbours", str(evaluation["neighbours"])]  # fmt: skip
    if evaluation["ttt_docs"]:
        methods.append("ttt")
        args += ["--ttt-docs", str(evaluation["ttt_docs"])]
    result = CliRunner().invoke(app, [*args, "--methods", ",".join(methods)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    rows = {(r["domain"], r["method"]): r for r in report["results"]}
    compared = 0
    for domain, d in poc["quality"]["domains"].items():
        for method, mine in d["methods"].items():
            theirs = rows[domain, method]
            for key in ("ppl", "ci_low", "ci_high"):
                assert mine[key] == pytest.approx(theirs[key], rel=ATOL), (domain, method, key)
            assert mine["n_docs"] == theirs["n_docs"]
            for ref, c in mine["comparisons"].items():
                assert c["rel_diff"] == pytest.approx(
                    theirs["comparisons"][ref]["rel_diff"], abs=ATOL
                )
            compared += 1
    assert compared >= 2 * len(methods) - 1


def test_report_files_stand_alone_and_the_rollout_file_loads(poc_run):
    from ttmm.serve.rollout.config import RolloutConfig

    out, _, poc = poc_run
    page = (out / "report.html").read_text()
    assert "<script" not in page
    assert not re.search(r"""(src|href)=["']https?://""", page)  # no CDN, nothing fetched
    assert page.count('src="data:image/png;base64,') == 2
    assert poc["answers"]["quality"] in page.replace("&#x27;", "'")
    rollout = RolloutConfig.load(out / "rollout.yaml")
    assert Path(rollout.candidate.bank) == (out / "bank").resolve()
    assert rollout.mode == "shadow" and rollout.control.kind == "finetune"
    assert set(poc["verdicts"]) == {"stdlib", "wiki"}
    # stdlib@20 holds too few held-out documents for a verdict: the report says so
    assert poc["verdicts"]["stdlib"]["pick"] is None
    assert any("stdlib" in w and "no verdict" in w for w in poc["warnings"])
    engineering = poc["engineering"]
    assert engineering["tokens_trained"] == poc["plan"]["budget_tokens"] * 2
    assert engineering["build_cpu_seconds"] > 0 and engineering["bank_bytes"] > 0
    serving = poc["inference"]["serving"]
    assert serving["rss_peak_bytes"] >= serving["rss_at_rest_bytes"] > 0


def test_a_killed_run_resumes_without_redoing_finished_stages(
    poc_run, tmp_path, monkeypatch, tiny_model_dir
):
    import ttmm.poc.inference as inference

    out, config, _ = poc_run
    copy = tmp_path / "poc"
    import shutil

    shutil.copytree(out, copy)
    state = json.loads((copy / ".ttmm-poc.json").read_text())
    for stage in ("inference", "engineering", "report"):  # as if killed during inference
        del state["stages"][stage]
        (copy / "stages" / f"{stage}.json").unlink()
    (copy / ".ttmm-poc.json").write_text(json.dumps(state))

    def no_rebuild(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr("ttmm.build.pipeline.run_build", no_rebuild)
    monkeypatch.setattr("ttmm.eval.harness.evaluate", no_rebuild)
    calls = []
    measured = json.loads((out / "stages" / "inference.json").read_text())
    monkeypatch.setattr(
        inference, "measure_serving_in_subprocess", lambda *a, **k: calls.append(a) or measured
    )
    resumed = run_poc(config, copy, progress=False)
    assert len(calls) == 1
    assert resumed["quality"] == json.loads((out / "poc.json").read_text())["quality"]
    other = replace(config, budget_minutes=3.0)
    with pytest.raises(PocError, match="holds a PoC of other settings"):
        run_poc(other, copy, progress=False)


def test_the_server_links_the_report_of_the_bank_it_runs(poc_run, encoder):
    from fastapi.testclient import TestClient

    from ttmm.model import TTMM
    from ttmm.serve.app import create_app
    from ttmm.serve.settings import ServerSettings

    out, _, _ = poc_run
    engine = TTMM.from_bank(out / "bank", encoder=encoder)
    with TestClient(create_app(engine, ServerSettings())) as client:
        bank = client.get("/v1/ttmm/bank").json()
        assert bank["poc_report"] == "/v1/ttmm/poc/report.html"
        page = client.get(bank["poc_report"])
        assert page.status_code == 200
        assert page.text == (out / "report.html").read_text()


def test_the_server_without_a_poc_answers_404(tiny_engine):
    from fastapi.testclient import TestClient

    from ttmm.serve.app import create_app
    from ttmm.serve.settings import ServerSettings

    with TestClient(create_app(tiny_engine, ServerSettings())) as client:
        assert client.get("/v1/ttmm/bank").json()["poc_report"] is None
        answer = client.get("/v1/ttmm/poc/report.html")
        assert answer.status_code == 404 and "ttmm poc" in answer.json()["error"]["message"]


# -- bad input ---------------------------------------------------------------------------------


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["poc", "--no-progress", *args])
    return result.exit_code, result.output


def test_empty_and_one_document_corpora_are_refused_clearly(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": "a single document " * 50}) + "\n")
    for corpus in (f"jsonl:{empty}", f"jsonl:{one}"):
        code, output = _cli("--corpus", corpus, "--base-model", str(tiny_model_dir),
                            "--out", str(tmp_path / "out"))  # fmt: skip
        assert code == 2, output
        assert "Traceback" not in output and "document" in output
    assert not (tmp_path / "out" / "poc.json").exists()


def test_a_budget_too_small_for_any_expert_is_refused_before_building(tmp_path, tiny_model_dir):
    code, output = _cli("--corpus", "wiki@40", "--base-model", str(tiny_model_dir),
                        "--budget-minutes", "0.05", "--out", str(tmp_path / "out"))  # fmt: skip
    assert code == 2, output
    assert "--budget-minutes" in output and "Traceback" not in output
    assert not (tmp_path / "out" / "bank").exists()


def test_an_output_folder_that_holds_something_else_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    code, output = _cli("--out", str(tmp_path))
    assert code == 2 and "holds no ttmm PoC" in output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_the_page_links_the_report_and_opens_it_with_the_api_key(poc_run, encoder):
    from playwright.sync_api import sync_playwright
    from test_server import running
    from test_ui_browser import CHROMIUM, CHROMIUM_ARGS

    from ttmm.model import TTMM
    from ttmm.serve.app import create_app
    from ttmm.serve.settings import ServerSettings

    out, _, poc = poc_run
    engine = TTMM.from_bank(out / "bank", encoder=encoder)
    app = create_app(engine, ServerSettings(api_key="sesame"))
    with running(app) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(f"{url}/#key=sesame")
        link = page.locator("#poc-link a")
        link.wait_for(state="visible", timeout=30_000)
        assert link.get_attribute("href") == "/v1/ttmm/poc/report.html"
        with page.context.expect_page(timeout=30_000) as opened:
            link.click()  # the key cannot ride on a link: the page fetches the report with it
        report = opened.value
        report.wait_for_load_state()
        assert "The three answers" in report.inner_text("body")
        browser.close()


def test_an_existing_bank_is_evaluated_without_building(poc_run, tmp_path, monkeypatch):
    out, config, _ = poc_run

    def no_build(*args, **kwargs):
        raise AssertionError("--bank must not build")

    monkeypatch.setattr("ttmm.build.pipeline.run_build", no_build)
    given = PocConfig(
        corpora=(),
        bank=str(out / "bank"),
        base_model=config.base_model,
        budget_minutes=0.8,
        max_docs=4,
    )
    poc = run_poc(given, tmp_path / "poc", progress=False)
    assert "build" not in poc["run"]["stage_seconds"]
    assert poc["files"]["bank"] == str(out / "bank")
    engineering = poc["engineering"]
    assert engineering["measured_by_poc"] is False and engineering["build_cpu_seconds"] is None
    assert engineering["build_wall_seconds"] > 0  # the bank's own record of its build
    assert set(poc["quality"]["domains"]) == {"stdlib", "wiki"}
    assert poc["inference"]["price_per_hour"] is None  # no price: machine-hours only
    assert poc["inference"]["methods"]["ttmm"]["cost_per_million"] is None
    assert "machine-hours" in (tmp_path / "poc" / "report.md").read_text()
