"""benchmarks/reproduce.py: the bank table becomes build options, the preset the issue's eval."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ttmm.build.pipeline import BuildConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


def load_script(name: str):
    """A script of ``benchmarks/`` as a module, registered while it loads (dataclasses look
    their module up); the caller removes it from ``sys.modules``."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reproduce():
    yield load_script("reproduce")
    del sys.modules["reproduce"]


def test_default_preset_is_the_issues_evaluation(reproduce):
    args = reproduce.parse_args([])
    config = reproduce.eval_config(reproduce.PRESETS["small"], args)
    assert (config.docs, config.ttt_docs, config.ttt_full_docs) == (60, 30, 10)
    assert config.timing_prompts == 3 and config.bootstrap == 2000
    assert {"ttt", "ttt_full", "hybrid5", "hybrid20", "finetune"} <= set(config.methods)
    # TTT, all-weights TTT and the hybrids run with the committed sweep's choice
    chosen = json.loads(reproduce.TTT_SWEEP.read_text())["chosen"]
    assert config.ttt.train.learning_rate == chosen["lora"]["learning_rate"]
    assert config.ttt.neighbours == chosen["lora"]["neighbours"]
    assert config.ttt_full.full_learning_rate == chosen["all"]["learning_rate"]
    assert config.ttt_full.full_optimizer == chosen["all"]["optimizer"]
    untuned = reproduce.parse_args(["--ttt-sweep", "none"])
    plain = reproduce.eval_config(reproduce.PRESETS["small"], untuned)
    assert plain.ttt.train.learning_rate == 1e-3 and plain.ttt.neighbours == 20
    with pytest.raises(SystemExit):
        reproduce.parse_args(["--only", "no-such-bank"])


def test_bank_rows_become_build_options(reproduce):
    args = reproduce.parse_args([])
    preset = reproduce.PRESETS["small"]
    plain = reproduce.build_config(preset, reproduce.BankSpec("k4", 4), args)
    assert plain.experts == 4 and plain.with_finetune and plain.corpora == preset.corpora
    branched = next(s for s in preset.banks if s.branch_from == "finetune")
    if "budget_tokens" in BuildConfig.__dataclass_fields__:  # a ttmm with the build options
        config = reproduce.build_config(preset, branched, args)
        assert config.budget_tokens == 250_000 and config.branch_from == "finetune"
        assert config.continue_finetune
    else:  # says which option is missing, and where to change the table
        with pytest.raises(SystemExit, match="budget_tokens.*BANKS"):
            reproduce.build_config(preset, branched, args)


def test_banks_of_other_k_run_the_merges_only(reproduce):
    """The costly methods run on the main bank; the other rows list theirs, in run order."""
    preset = reproduce.PRESETS["small"]
    specs = {spec.name: spec for spec in preset.banks}
    assert specs["k16"].methods is None  # everything
    assert {specs["k4"].experts, specs["k64"].experts} == {4, 64}
    config = reproduce.eval_config(preset, reproduce.parse_args([]))
    chosen = reproduce.narrowed(specs, config.methods)
    assert set(chosen) == {"k16-branched", "k4", "k64", "k256"}
    assert chosen["k4"] == ["base", "finetune", "top1", "top3", "top10", "ttmm", "ttt"]
    assert chosen["k256"] == ["base", "top1", "top3", "top10", "ttmm"]  # no fine-tuning of its own
    assert specs["k256"].experts == 256 and not specs["k256"].with_finetune
    assert chosen["k16-branched"] == [*chosen["k4"][:2], "finetune_continued", *chosen["k4"][2:]]
    only = reproduce.narrowed(specs, ("base", "top10"))  # a narrower run narrows every bank
    assert only["k64"] == ["base", "top10"]


def test_scoring_threads_leave_the_banks_identity_alone(reproduce):
    """Evaluating the committed banks on more threads must not turn them into "a different
    configuration", and neither does training on more threads (where the work runs is not
    what the bank is; issue 23); the hash those banks were built with still counts it."""
    preset = reproduce.PRESETS["small"]
    spec = preset.banks[0]

    def config_hash(*argv):
        return reproduce.build_config(preset, spec, reproduce.parse_args(list(argv))).content_hash()

    assert config_hash("--threads", "2") == config_hash()
    assert config_hash("--build-threads", "2") == config_hash()

    def legacy_hash(*argv):
        config = reproduce.build_config(preset, spec, reproduce.parse_args(list(argv)))
        return config.content_hash(legacy=True)

    assert legacy_hash("--build-threads", "2") != legacy_hash()


def test_compare_banks_reproduces_the_reports_paired_differences(tmp_path, capsys):
    """benchmarks/compare_banks.py: across banks with the report's own paired bootstrap, so a
    pair within one bank gives exactly the report's comparison."""
    import json
    import random

    from ttmm.eval.harness import EvalConfig
    from ttmm.eval.intervals import draw, paired_difference
    from ttmm.eval.report import build_report

    compare_banks = load_script("compare_banks")
    del sys.modules["compare_banks"]

    rng = random.Random(0)
    ids = [f"doc{i}" for i in range(12)]
    rng.shuffle(ids)  # the report's order is the selection's, not the ids'
    config = EvalConfig(methods=("base", "finetune", "top10"), bootstrap=300)
    documents, banks = [], {}
    for bank in ("k4", "k16"):
        keys = {m: f"{bank}-{m}" if m != "base" else "base" for m in config.methods}
        banks[bank] = {"keys": keys, "documents": ids, "num_experts": int(bank[1:])}
        for method, key in keys.items():
            for doc_id in reversed(ids):  # file order differs from the report's order
                record = {"key": key, "method": method, "doc_id": doc_id, "domain": "wiki"}
                for _ in range(2):  # a stale record, then the one the report takes (latest)
                    scores = {"nll": rng.uniform(20, 40), "tokens": 10, "active_experts": 1}
                    documents.append(record | scores)
    report = build_report(banks, config, documents, [])
    (tmp_path / "results.json").write_text(json.dumps(report))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "documents.jsonl").write_text("".join(json.dumps(d) + "\n" for d in documents))

    args = ["k4:top10", "k4:finetune", "k4:top10", "k16:top10", "--results", str(tmp_path)]
    assert compare_banks.main(args) == 0
    within, across = capsys.readouterr().out.splitlines()
    [row] = [r for r in report["results"] if r["bank"] == "k4" and r["method"] == "top10"]
    c = row["comparisons"]["finetune"]
    assert f"{c['diff']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]" in within
    assert "k4:top10 − k16:top10, wiki" in across and "of 12 documents" in across
    latest = {(d["key"], d["method"], d["doc_id"]): d for d in documents}
    a, b = ([latest[f"{k}-top10", "top10", i] for i in ids] for k in ("k4", "k16"))
    arrays = [[r[f] for r in side] for side in (a, b) for f in ("nll", "tokens")]
    d = paired_difference(*arrays, draw(ids, config.bootstrap, config.seed))
    assert f"{d.value:+.3f} [{d.ci_low:+.3f}, {d.ci_high:+.3f}]" in across
    with pytest.raises(SystemExit):
        compare_banks.main(["k4:top10", "--results", str(tmp_path)])  # not a pair
    with pytest.raises(SystemExit, match="k4:ttt was not scored"):
        compare_banks.main(["k4:ttt", "k4:base", "--results", str(tmp_path)])


def test_compare_banks_joins_a_bank_scored_in_its_own_run(capsys):
    """``--also``: the committed K = 256 records, scored in a run of their own, against the
    main run's K = 16 (the README's numbers)."""
    compare_banks = load_script("compare_banks")
    del sys.modules["compare_banks"]
    results = Path(compare_banks.HERE) / "results"
    args = ["k256:top10", "k16:top10", "--also", str(results / "k256")]
    assert compare_banks.main(args) == 0
    out = capsys.readouterr().out
    assert "k256:top10 − k16:top10, stdlib: +1.533 [+1.148, +1.924]*" in out
    assert "of 60 documents" in out
    with pytest.raises(SystemExit, match="k256:top10 was not scored"):
        compare_banks.main(["k256:top10", "k16:top10"])  # without --also
