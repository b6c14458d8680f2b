"""Issue 10 on the build side, on a tiny Llama: held-out near-duplicates dropped, the token
budget, validation losses before/after, branched experts and the equal-compute control,
content hashes and resume."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from test_build import small_config, tiny_model_dir  # noqa: F401  (a fixture)
from typer.testing import CliRunner

import ttmm.build.pipeline
from ttmm.bank import FINETUNE_CONTINUED_DIR, MANIFEST_NAME, Bank
from ttmm.build.budget import budget_shares, budgeted, data_tokens
from ttmm.build.chunks import SPLIT_NAME, read_test_documents
from ttmm.build.corpus import Document, _hash_unit, split_documents
from ttmm.build.dedup import drop_near_duplicates, jaccard, shingles
from ttmm.build.pipeline import STATE_NAME, run_build
from ttmm.build.train import (
    LoraTrainConfig,
    adapter_of,
    lr_factor,
    planned_tokens,
    unwrap_model,
    wrap_model,
)
from ttmm.cli import app

BUDGET = 3000
WORDS = (
    "granite harbour ferry lantern orchard meadow copper violin glacier canyon falcon "
    "saffron tundra quarry beacon harvest marble thistle cobalt willow"
).split()


def _essay(seed: int, n: int = 120) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n))


def _near_duplicate_ids(test_fraction: float, seed: int = 0) -> tuple[str, str]:
    """Two jsonl ids of which the split holds out the first and trains on the second."""
    held = train = None
    for i in range(1000):
        unit = _hash_unit(f"split:{seed}:dup/copy{i}")
        if unit < test_fraction and held is None:
            held = f"copy{i}"
        elif unit >= test_fraction and train is None:
            train = f"copy{i}"
    return held, train


@pytest.fixture(scope="module")
def dup_corpus(tmp_path_factory):
    """A jsonl corpus holding one document twice (one word changed): once held out, once not."""
    held, train = _near_duplicate_ids(0.2)
    text = _essay(7)
    copy = text.replace(WORDS[0], "pebble", 1)
    path = tmp_path_factory.mktemp("dup") / "dup.jsonl"
    rows = [{"id": held, "text": text}, {"id": train, "text": copy}]
    rows += [{"id": f"other{i}", "text": _essay(100 + i)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f"dup=jsonl:{path}", f"dup/{held}", f"dup/{train}"


@pytest.fixture(scope="module")
def branched(tmp_path_factory, tiny_model_dir, dup_corpus):  # noqa: F811
    out = tmp_path_factory.mktemp("banks") / "branched"
    config = small_config(
        tiny_model_dir,
        corpora=("wiki@40", "stdlib@10", dup_corpus[0]),
        budget_tokens=BUDGET,
        branch_from="finetune",
        continue_finetune=True,
        validation_fraction=0.15,
    )
    result = run_build(config, out, progress=False)
    return out, config, result


def test_shingle_jaccard_and_lsh_drop_only_near_duplicates():
    a = Document("t/a", _essay(1), "t")
    near = Document("t/b", a.text.replace(WORDS[3], "pebble", 1), "t")
    other = Document("t/c", _essay(2), "t")
    assert jaccard(shingles(a.text), shingles(near.text)) >= 0.8
    assert jaccard(shingles(a.text), shingles(other.text)) < 0.3
    found = drop_near_duplicates([near, other], [a, Document("t/d", _essay(3), "t")], 0.8)
    assert found.dropped == {"t/a": "t/b"} and [d.id for d in found.kept] == ["t/d"]
    assert found.dropped_per_domain([a, near]) == {"t": 1}
    assert drop_near_duplicates([near], [a], 1.0).dropped == {}  # not identical: kept


def _info(out, monkeypatch) -> str:
    from ttmm.cli.options import console

    monkeypatch.setattr(console, "width", 400)  # one line per row, whatever the terminal
    shown = CliRunner().invoke(app, ["info", str(out)])
    assert shown.exit_code == 0, shown.output
    return shown.output


def test_near_duplicate_held_out_document_is_dropped_and_counted(branched, dup_corpus, monkeypatch):
    out, _, _ = branched
    _, held, train = dup_corpus
    assert held not in {d.id for d in read_test_documents(out)}
    split = json.loads((out / SPLIT_NAME).read_text())
    assert split["near_duplicates"] == {held: train}
    assert held not in split["domains"]["dup"]["test"] and train in split["domains"]["dup"]["train"]
    manifest = Bank.load(out).manifest
    assert manifest.data["documents"]["dup"]["near_duplicates_dropped"] == 1
    assert manifest.data["documents"]["wiki"]["near_duplicates_dropped"] == 0
    assert "near-duplicates dropped" in _info(out, monkeypatch)


def test_budget_shares_are_proportional_and_sum_to_the_budget():
    shares = budget_shares([100, 300, 601], 1000)
    assert sum(shares) == 1000 and shares == [100, 300, 600]  # largest remainders
    assert budget_shares([1, 1, 1], 10) == [4, 3, 3]
    train = LoraTrainConfig()
    more = budgeted(train, 250, 100)  # a share beyond the data: more passes, cut at the share
    assert (more.epochs, more.max_tokens) == (3, 250)
    assert budgeted(train, 60, 100).epochs == 1
    chunks = [list(range(2, 12))] * 10  # 100 tokens
    assert planned_tokens(chunks, more, seed=0) == 250


def test_budget_is_respected_per_expert_and_by_the_baseline(branched):
    out, config, _ = branched
    manifest = Bank.load(out).manifest
    planned = [e.extra["planned_tokens"] for e in manifest.experts]
    assert sum(planned) == BUDGET
    cluster_tokens = [
        data_tokens([r["token_ids"] for r in _rows(out) if r["expert"] == e.id], config.train)
        for e in manifest.experts
    ]
    assert planned == budget_shares(cluster_tokens, BUDGET)
    # shares below the clusters' data: each expert sees a seeded subset of its chunks
    assert all(p < t for p, t in zip(planned, cluster_tokens, strict=True))
    for entry in manifest.experts:
        assert 0 < entry.n_tokens <= entry.extra["planned_tokens"]
        assert entry.n_tokens >= entry.extra["planned_tokens"] - 2 * config.train.batch_size
    assert manifest.finetune.extra["planned_tokens"] == BUDGET
    assert manifest.build["budget"] == {"tokens": BUDGET, "source": "budget_tokens"}
    continued = manifest.finetune_continued
    assert continued.path == FINETUNE_CONTINUED_DIR
    assert continued.extra["planned_tokens"] == sum(planned)  # equal compute
    assert Bank.load(out).finetune_adapter(continued=True) is not None


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in open(out / "index" / "chunks.jsonl")]


def test_validation_loss_before_and_after_for_every_adapter_and_in_info(branched, monkeypatch):
    out, _, _ = branched
    manifest = Bank.load(out).manifest
    split = json.loads((out / SPLIT_NAME).read_text())
    assert split["validation"]
    held_out = {i for d in split["domains"].values() for i in d["test"]}
    assert held_out.isdisjoint(split["validation"])  # never the evaluation documents
    assert not set(split["validation"]) & {r["doc_id"] for r in _rows(out)}  # train nothing
    entries = [*manifest.experts, manifest.finetune, manifest.finetune_continued]
    total = sum(manifest.data["validation_chunks_per_domain"].values())
    assert sum(e.extra["n_validation_chunks"] for e in manifest.experts) == total
    assert manifest.finetune.extra["n_validation_chunks"] == total
    for entry in entries:
        if entry.extra["n_validation_chunks"]:
            assert np.isfinite(entry.extra["val_before"]) and np.isfinite(entry.extra["val_after"])
            assert entry.extra["val_before"] != entry.extra["val_after"]
    # a branched expert starts where the fine-tuning adapter ended
    finetune_after = manifest.finetune.extra["val_after"]
    assert manifest.finetune_continued.extra["val_before"] == pytest.approx(
        finetune_after, abs=1e-4
    )
    shown = _info(out, monkeypatch)
    assert "val before → after" in shown and "finetune continued" in shown
    first = next(e for e in manifest.experts if e.extra["n_validation_chunks"])
    assert f"{first.extra['val_before']:.3f} → {first.extra['val_after']:.3f}" in shown


def test_branched_expert_before_its_first_step_equals_the_finetune_adapter(
    branched,
    tiny_model_dir,  # noqa: F811
):
    from ttmm.assets import load_base_model

    out, config, _ = branched
    bank = Bank.load(out)
    assert bank.manifest.branch_from == "finetune"
    assert all(e.extra["initialised_from"] == "finetune" for e in bank.manifest.experts)
    finetune = bank.finetune_adapter()
    model, _ = load_base_model(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    peft_model = None
    try:
        peft_model = wrap_model(model, config.train, seed=123, init=finetune)
        start = adapter_of(peft_model)
    finally:
        unwrap_model(model, peft_model)
    assert start.layers.keys() == finetune.layers.keys()
    for name, layer in finetune.layers.items():
        assert torch.equal(start.layers[name].A, layer.A)
        assert torch.equal(start.layers[name].B, layer.B)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # and training moved every expert away from it
    for adapter in bank.adapters():
        name = next(iter(adapter.layers))
        assert not torch.equal(adapter.layers[name].B, finetune.layers[name].B)


def test_branch_budget_and_recipe_change_the_content_hash(tiny_model_dir):  # noqa: F811
    base = small_config(tiny_model_dir)
    hashes = {
        base.content_hash(),
        replace(base, branch_from="finetune").content_hash(),
        replace(base, budget_tokens=1000).content_hash(),
        replace(base, budget_tokens=2000).content_hash(),
        replace(base, budget_minutes=5.0).content_hash(),
        replace(base, continue_finetune=True).content_hash(),
        replace(base, near_duplicate_threshold=0.9).content_hash(),
        replace(base, validation_fraction=0.1).content_hash(),
        replace(base, train=replace(base.train, schedule="cosine")).content_hash(),
    }
    assert len(hashes) == 9
    assert replace(base, branch_from="finetune").with_finetune  # branching needs the baseline


def test_killed_branched_build_resumes_and_keeps_the_minutes_budget(
    tmp_path,
    tiny_model_dir,  # noqa: F811
    monkeypatch,
):
    config = small_config(tiny_model_dir, budget_minutes=0.5, branch_from="finetune")
    out = tmp_path / "bank"
    monkeypatch.setattr(ttmm.build.pipeline, "measure_throughput", lambda *a, **k: 40.0)

    class Killed(RuntimeError):
        pass

    def kill_after_expert_0(job_id):
        if job_id == 0:
            raise Killed

    with pytest.raises(Killed):
        run_build(config, out, progress=False, on_saved=kill_after_expert_0)
    state = json.loads((out / STATE_NAME).read_text())
    assert state["budget"]["tokens"] == 1200  # 0.5 min x 60 s x 40 tokens/s
    assert not (out / MANIFEST_NAME).exists()

    def never(*args, **kwargs):
        raise AssertionError("a resumed build must reuse the converted budget")

    monkeypatch.setattr(ttmm.build.pipeline, "measure_throughput", never)
    result = run_build(config, out, progress=False)
    assert result.reused == [-1, 0] and result.trained == [1, 2]
    manifest = Bank.load(out).manifest
    assert sum(e.extra["planned_tokens"] for e in manifest.experts) == 1200
    assert manifest.build["budget"]["measured_tokens_per_second"] == 40.0


def test_schedule_warms_up_then_decays_to_the_floor():
    config = LoraTrainConfig(schedule="cosine", warmup_fraction=0.2, min_lr_ratio=0.1)
    factors = [lr_factor(step, 10, config) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[-1] == pytest.approx(0.1) and factors == sorted(factors[:2]) + sorted(
        factors[2:], reverse=True
    )
    linear = replace(config, schedule="linear", warmup_fraction=0.0)
    assert [lr_factor(s, 3, linear) for s in range(3)] == pytest.approx([1.0, 0.55, 0.1])
    assert lr_factor(5, 10, LoraTrainConfig()) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        LoraTrainConfig(schedule="step")


def test_split_validation_is_seeded_and_disjoint():
    from ttmm.build.corpus import split_validation

    docs = [Document(f"d/{i}", "text", "d") for i in range(200)]
    train, validation = split_validation(split_documents(docs, 0.1).train, 0.1, seed=3)
    again = split_validation(split_documents(docs, 0.1).train, 0.1, seed=3)
    assert [d.id for d in validation] == [d.id for d in again[1]]
    assert 5 <= len(validation) <= 40 and not {d.id for d in train} & {d.id for d in validation}


def test_a_branched_banks_gate_compares_its_experts_with_the_base_model(
    branched,
    tiny_model_dir,  # noqa: F811
):
    """A branched expert's val_before is the fine-tuning adapter's loss, not the base model's:
    the gate measures the base model's itself (or it would disable every expert behind
    fine-tuning)."""
    from ttmm.quality_gate import ExpertHealth

    out, _, _ = branched
    bank = Bank.load(out)
    checked = [e for e in bank.manifest.experts if e.extra["n_validation_chunks"]]
    assert checked
    for info in checked:
        health = ExpertHealth.from_dict(info.health)
        assert health.finetune_loss == pytest.approx(info.extra["val_before"], abs=1e-4)
        assert health.base_loss != pytest.approx(info.extra["val_before"], abs=1e-4)
        assert health.base_loss is not None
