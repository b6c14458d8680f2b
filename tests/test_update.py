"""``ttmm update`` (issue 22): a bank built on prose grown with code into a new version that
retrains only the experts that got new text, adds experts for novel text, hard-links the rest,
records its lineage (``ttmm diff``), never touches its parent, and resumes after SIGKILL to
the bank an uninterrupted update makes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_build import small_config, tiny_model_dir  # noqa: F401 (a fixture)
from test_build_faults import _build, _comparable, _killed, _leftovers
from typer.testing import CliRunner

from ttmm.adapter import WEIGHTS_NAME
from ttmm.bank import MANIFEST_NAME, Bank, expert_dir, manifest_digest
from ttmm.bank_diff import diff_banks
from ttmm.build.chunks import read_chunks
from ttmm.build.pipeline import STATE_NAME, run_build
from ttmm.build.update import UpdateOptions, run_update
from ttmm.cli import app
from ttmm.quality_gate import ExpertHealth

NEW = ("stdlib@12",)


def _snapshot(folder: Path) -> dict[str, tuple[int, int, bytes]]:
    """Every file's size, mtime and bytes: what an update must leave as it was."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def parent(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """A bank of 3 experts built on Wikipedia alone, with its fine-tuning adapter; a fifth of
    the training documents (the update's too) kept for validation, so that the quality gate
    has held-out chunks to check the updated experts on."""
    out = tmp_path_factory.mktemp("update") / "parent"
    config = small_config(
        tiny_model_dir, corpora=("wiki@40",), with_finetune=True, validation_fraction=0.2
    )
    run_build(config, out, progress=False)
    return out


@pytest.fixture(scope="module")
def updated(tmp_path_factory, parent):
    before = _snapshot(parent)
    out = tmp_path_factory.mktemp("update") / "v2"
    result = run_update(parent, UpdateOptions(corpora=NEW), out, progress=False)
    assert _snapshot(parent) == before  # the parent is only read
    return out, result


def test_an_update_adds_code_experts_and_retrains_only_what_got_new_text(parent, updated):
    out, result = updated
    old, new = Bank.load(parent), Bank.load(out)  # every checksum of the new version holds
    lineage = new.manifest.lineage
    assert lineage["parent"]["manifest_sha256"] == manifest_digest(parent)
    assert lineage["corpora"] == list(NEW) and new.manifest.history[-1]["action"] == "update"
    added, retrained = lineage["added"], lineage["retrained"]
    assert added and added == list(range(old.num_experts, new.num_experts))
    assert sorted(result.trained) == sorted([*retrained, *added])

    chunks, _, experts = read_chunks(out)
    n_old = len(read_chunks(parent)[0])
    assert [c.doc_id for c in chunks[:n_old]] == [c.doc_id for c in read_chunks(parent)[0]]
    assert {c.domain for c in chunks[n_old:]} == {"stdlib"}
    received = set(experts[n_old:].tolist())
    assert received == {*retrained, *added}  # the experts that got new text, and no other
    assert all(chunks[i].domain == "stdlib" for i, k in enumerate(experts) if k in added)

    untouched = [k for k in range(old.num_experts) if k not in retrained]
    assert lineage["unchanged"] == len(untouched)
    for k in untouched:  # hard links: same bytes, same inode, same checksums, same centroid
        for name in (WEIGHTS_NAME, "adapter_config.json", "training.json"):
            a, b = parent / expert_dir(k) / name, out / expert_dir(k) / name
            assert os.path.samefile(a, b)
        prefix = expert_dir(k) + "/"
        assert {p: s for p, s in new.manifest.files.items() if p.startswith(prefix)} == {
            p: s for p, s in old.manifest.files.items() if p.startswith(prefix)
        }
        assert torch.equal(new.centroids[k], old.centroids[k])
        assert new.manifest.experts[k] == old.manifest.experts[k]
    assert os.path.samefile(parent / "finetune" / WEIGHTS_NAME, out / "finetune" / WEIGHTS_NAME)
    checked = 0
    for k in [*retrained, *added]:  # trained now, and checked by the quality gate
        info = new.manifest.experts[k]
        health = ExpertHealth.from_dict(info.health)
        assert info.extra["new_chunks"] > 0
        # losses exactly when the expert's cluster held validation chunks, and the gate's
        # verdict follows them
        assert (health.validation_chunks > 0) == (health.expert_loss is not None)
        assert (health.expert_loss is not None) == (health.base_loss is not None)
        assert (health.failure() is not None) == (info.disabled is not None)
        checked += health.validation_chunks
        if k < old.num_experts:
            weights = parent / expert_dir(k) / WEIGHTS_NAME
            assert not os.path.samefile(weights, out / expert_dir(k) / WEIGHTS_NAME)
    assert checked > 0  # the gate measured the updated experts, not merely recorded them
    for k in retrained:  # continued from the parent's adapter
        assert new.manifest.experts[k].extra["initialised_from"] == f"parent expert {k}"
        name = next(iter(old.read_expert(k).layers))
        assert not torch.equal(new.read_expert(k).layers[name].B, old.read_expert(k).layers[name].B)


def test_diff_names_what_the_update_changed(parent, updated):
    out, _ = updated
    lineage = Bank.load(out).manifest.lineage
    found = diff_banks(parent, out)
    assert found.relation == "update"
    assert (found.added, found.retrained) == (lineage["added"], lineage["retrained"])
    assert found.unchanged == lineage["unchanged"] and found.finetune == "unchanged"
    assert set(found.centroids_moved) == set(lineage["retrained"])
    assert found.corpora_added == list(NEW)
    assert diff_banks(out, parent).relation == "parent"

    result = CliRunner().invoke(app, ["diff", str(parent), str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "is an update of" in result.output and "stdlib@12" in result.output
    shown = json.loads(CliRunner().invoke(app, ["diff", str(parent), str(out), "--json"]).output)
    assert shown["added"] == lineage["added"]


def test_running_the_same_update_again_does_nothing(parent, updated):
    out, _ = updated
    again = run_update(parent, UpdateOptions(corpora=NEW), out, progress=False)
    assert again.nothing_to_do


def test_an_update_refreshes_the_fine_tuning_adapter_only_when_asked(tmp_path, parent):
    out = tmp_path / "refreshed"
    result = run_update(parent, UpdateOptions(NEW, refresh_finetune=True), out, progress=False)
    assert -1 in result.trained
    assert diff_banks(parent, out).finetune == "changed"
    assert Bank.load(out).manifest.lineage["finetune"] == "refreshed"


def test_an_update_killed_at_three_moments_resumes_to_the_uninterrupted_one(
    tmp_path, parent, updated
):
    reference, _ = updated
    before = _snapshot(parent)
    out, home = tmp_path / "v2", tmp_path / "home"
    args = ["update", str(parent), "--corpus", NEW[0], "--out", str(out), "--no-progress"]

    _killed(_build(None, out, home, "update_written", args=args))
    assert (out / STATE_NAME).is_file() and not (out / MANIFEST_NAME).exists()
    _killed(_build(None, out, home, "adapter_saved", args=args))
    assert not (out / MANIFEST_NAME).exists()
    _killed(_build(None, out, home, "write_manifest", args=args))
    assert not (out / MANIFEST_NAME).exists()
    done = _build(None, out, home, args=args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed: kept" in done.stdout
    assert "Loading weights" not in done.stderr and "%|" not in done.stderr  # --no-progress

    assert _snapshot(parent) == before
    assert _leftovers(out) == []
    built, expected = _comparable_update(out), _comparable_update(reference)
    assert built == expected
    for info in Bank.load(reference).manifest.experts:
        left = load_file(out / info.path / WEIGHTS_NAME)
        right = load_file(reference / info.path / WEIGHTS_NAME)
        assert all(torch.equal(left[k], right[k]) for k in right)


def _comparable_update(bank: Path) -> dict:
    manifest = _comparable(bank)
    lineage = manifest.pop("lineage")
    for key in ("stage_seconds", "total_seconds"):
        lineage.pop(key)
    manifest["history"] = [{k: v for k, v in h.items() if k != "at"} for h in manifest["history"]]
    for entry in manifest["experts"]:
        entry.get("disabled") and entry["disabled"].pop("at", None)
    return {**manifest, "lineage": lineage}


def test_bad_updates_fail_with_one_clear_line(tmp_path, parent, tiny_model_dir):  # noqa: F811
    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("too short")
    other_model = tmp_path / "other-model"
    from conftest import build_tiny_llama
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = build_tiny_llama(len(tokenizer))
    model.model.layers = model.model.layers[:1]
    model.config.num_hidden_layers = 1
    model.save_pretrained(other_model)
    tokenizer.save_pretrained(other_model)
    cases = [
        ([str(parent), "-c", NEW[0], "--out", str(parent)], "never changes its parent"),
        ([str(parent), "-c", f"notes=dir:{short}", "--out", str(tmp_path / "a")], "no chunk"),
        ([str(parent), "-c", "wiki@40", "--out", str(tmp_path / "b")], "already"),
        (
            [
                str(parent),
                "-c",
                NEW[0],
                "--out",
                str(tmp_path / "c"),
                "--base-model",
                str(other_model),
            ],  # fmt: skip
            "was built for base model",
        ),
        ([str(parent), "-c", NEW[0], "--out", str(tmp_path / "d"), "--replay", "-1"], "replay"),
    ]
    for args, message in cases:
        result = CliRunner().invoke(app, ["update", *args, "--no-progress"])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert "Traceback" not in result.output
    for name in "abcd":
        assert not (tmp_path / name).exists()  # a refused update writes nothing


def test_the_new_version_is_served_as_a_rollout_candidate_against_its_parent(
    tmp_path,
    parent,
    updated,
    tiny_model_dir,  # noqa: F811
):
    from ttmm.assets import load_base_model
    from ttmm.embed import Encoder
    from ttmm.serve.rollout.arms import Arms
    from ttmm.serve.rollout.config import RolloutConfig

    out, _ = updated
    model, tokenizer = load_base_model(tiny_model_dir, device="cpu")
    config = RolloutConfig.from_dict(
        {
            "candidate": {"bank": str(out)},
            "control": {"kind": "bank", "bank": str(parent)},
            "state_dir": str(tmp_path / "state"),
        },
        root=tmp_path,
    )
    arms = Arms.load(config, model, tokenizer, Encoder(device="cpu"))
    added = Bank.load(out).manifest.lineage["added"]
    query = "def parse_args(argv):\n    import argparse\n    parser = argparse.ArgumentParser()"
    candidate = arms.engine.route([query])[0]
    assert set(candidate.expert_ids) & set(added)  # code goes to the experts the update added
    request = arms.merge("control", query)
    [control] = request.router.route([query], request.routing)
    assert all(k >= arms.offset for k in control.expert_ids)  # the parent's own experts
    assert arms.describe("control", control)["arm"] == "control"
