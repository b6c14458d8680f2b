"""benchmarks/reproduce.py: the bank table becomes build options, the preset the issue's eval."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from ttmm.build.pipeline import BuildConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"


@pytest.fixture(scope="module")
def reproduce():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["reproduce"]


def test_default_preset_is_the_issues_evaluation(reproduce):
    args = reproduce.parse_args([])
    config = reproduce.eval_config(reproduce.PRESETS["small"], args)
    assert (config.docs, config.ttt_docs, config.ttt_full_docs) == (60, 30, 10)
    assert config.timing_prompts == 3 and config.bootstrap == 2000
    assert {"ttt", "ttt_full", "hybrid5", "hybrid20", "finetune"} <= set(config.methods)
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
    assert set(chosen) == {"k16-branched", "k4", "k64"}
    assert chosen["k4"] == ["base", "finetune", "top1", "top3", "top10", "ttmm", "ttt"]
    assert chosen["k16-branched"] == [*chosen["k4"][:2], "finetune_continued", *chosen["k4"][2:]]
    only = reproduce.narrowed(specs, ("base", "top10"))  # a narrower run narrows every bank
    assert only["k64"] == ["base", "top10"]


def test_scoring_threads_leave_the_banks_identity_alone(reproduce):
    """Evaluating the committed banks on more threads must not turn them into "a different
    configuration"; training on more threads is one (its numbers may differ)."""
    preset = reproduce.PRESETS["small"]
    spec = preset.banks[0]

    def config_hash(*argv):
        return reproduce.build_config(preset, spec, reproduce.parse_args(list(argv))).content_hash()

    assert config_hash("--threads", "2") == config_hash()
    assert config_hash("--build-threads", "2") != config_hash()
