"""The train-time pipeline end to end on a tiny Llama, the real tokenizer and encoder, and a
small slice of the real corpora: bank validity, data hygiene, Ray = sequential, resume, errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import yaml
from conftest import ATOL, build_tiny_llama
from typer.testing import CliRunner

import ttmm.build.executors
from ttmm.bank import MANIFEST_NAME, Bank, expert_dir
from ttmm.build.chunks import SPLIT_NAME, ChunkIndex, read_test_documents
from ttmm.build.cluster import ClusterError
from ttmm.build.config import BuildConfig, BuildError
from ttmm.build.corpus import CorpusError, read_corpora
from ttmm.build.pipeline import CONFIG_NAME, STATE_NAME, run_build
from ttmm.build.train import LoraTrainConfig

STAGES = ("read", "split", "load_model", "chunk", "embed", "cluster", "write_index", "train")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the real vocabulary, saved so that Ray workers can load it."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama(len(smol_tokenizer)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def notes_dir(tmp_path_factory):
    """A user folder corpus with one file that is not UTF-8."""
    folder = tmp_path_factory.mktemp("notes")
    (folder / "lighthouse.txt").write_text(
        "The lighthouse keeper logged every ship that rounded the cape in a leather book. " * 8
    )
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 30)
    return folder


def small_config(model_dir: str, **changes) -> BuildConfig:
    base = BuildConfig(
        corpora=("wiki@40", "stdlib@10"),
        experts=3,
        base_model=model_dir,
        window=64,
        min_tokens=16,
        max_chunks_per_document=3,
        test_fraction=0.2,
        train=LoraTrainConfig(num_threads=1),
    )
    return base.with_overrides(**changes)


@pytest.fixture(scope="module")
def bank(tmp_path_factory, tiny_model_dir, notes_dir):
    out = tmp_path_factory.mktemp("banks") / "bank"
    config = small_config(
        tiny_model_dir,
        corpora=("wiki@40", "stdlib@10", f"notes=dir:{notes_dir}"),
        with_finetune=True,
    )
    result = run_build(config, out, progress=False)
    return out, config, result


@pytest.fixture(scope="module")
def sequential_bank(tmp_path_factory, tiny_model_dir):
    """The reference: a plain sequential build of the small configuration, never interrupted."""
    out = tmp_path_factory.mktemp("banks") / "sequential"
    run_build(small_config(tiny_model_dir), out, progress=False)
    return Bank.load(out)


def _assert_same_adapters(left_bank: Bank, right_bank: Bank) -> None:
    left, right = left_bank.adapters(), right_bank.adapters()
    assert len(left) == len(right)
    for a, b in zip(left, right, strict=True):
        assert a.layers.keys() == b.layers.keys()
        for name, layer in a.layers.items():
            torch.testing.assert_close(layer.A, b.layers[name].A, atol=ATOL, rtol=0)
            torch.testing.assert_close(layer.B, b.layers[name].B, atol=ATOL, rtol=0)


def _chunk_rows(path) -> list[dict]:
    return [json.loads(line) for line in open(path / "index" / "chunks.jsonl")]


def test_bank_is_valid_and_loads_in_the_engine(bank, encoder):
    from ttmm.model import TTMM

    out, config, result = bank
    loaded = Bank.load(out)
    assert loaded.num_experts == 3 and len(loaded.adapters()) == 3
    assert loaded.finetune_adapter() is not None
    torch.testing.assert_close(loaded.centroids.norm(dim=1), torch.ones(3), atol=ATOL, rtol=0)
    build = loaded.manifest.build
    assert set(STAGES) <= set(build["stage_seconds"])
    assert build["corpus_reports"]["notes"]["skipped_non_utf8"] == 1
    assert build["training"]["expert_tokens"] == sum(e.n_tokens for e in loaded.manifest.experts)
    assert loaded.manifest.finetune.n_tokens == build["training"]["expert_tokens"]  # same budget
    for info in loaded.manifest.experts:
        assert info.label and info.n_chunks > 0 and info.loss_curve and info.size_bytes > 0
    # the written config reproduces the build
    rewritten = BuildConfig.from_file(out / CONFIG_NAME)
    assert rewritten.content_hash() == build["config_hash"] == config.resolved().content_hash()
    engine = TTMM.from_bank(out, encoder=encoder)
    (plan,) = engine.route(["The river delta floods every spring."])
    assert plan.weights  # routed to at least one expert
    (score,) = engine.score(["def parse(self, text):\n    return text.split()\n" * 6], 8, 64)
    assert np.isfinite(score.perplexity)


def test_every_training_chunk_is_in_one_cluster_and_no_test_document_in_any(bank):
    out, config, _ = bank
    rows = _chunk_rows(out)
    manifest = Bank.load(out).manifest
    sizes = Counter(row["expert"] for row in rows)
    assert sizes == {info.id: info.n_chunks for info in manifest.experts}
    assert len({(row["doc_id"], tuple(row["token_ids"])) for row in rows}) == len(rows)
    index = ChunkIndex.load(out)
    assert list(index.experts) == [row["expert"] for row in rows]
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=ATOL)
    nearest, sims = index.search(index.embeddings[5], 3)
    assert nearest[0] == 5 and sims[0] == pytest.approx(1.0, abs=ATOL)

    split = json.loads((out / SPLIT_NAME).read_text())
    test_ids = {i for domain in split["domains"].values() for i in domain["test"]}
    train_ids = {i for domain in split["domains"].values() for i in domain["train"]}
    assert test_ids and test_ids.isdisjoint(train_ids)
    assert test_ids.isdisjoint(row["doc_id"] for row in rows)
    documents, _ = read_corpora(config.corpora)
    by_id = {doc.id: doc for doc in documents}
    held_out = read_test_documents(out)
    assert {doc.id for doc in held_out} == test_ids
    assert all(doc.text == by_id[doc.id].text for doc in held_out)  # full text kept
    assert {row["doc_id"] for row in rows} <= train_ids


def test_rebuild_with_same_config_does_nothing(bank, monkeypatch):
    out, config, _ = bank
    monkeypatch.setattr(ttmm.build.executors, "train_lora", _forbidden)
    before = (out / MANIFEST_NAME).read_bytes()
    assert run_build(config, out, progress=False).nothing_to_do
    assert (out / MANIFEST_NAME).read_bytes() == before


def _forbidden(*args, **kwargs):
    raise AssertionError("the trainer must not run")


def test_ray_executor_gives_the_same_adapters_as_sequential(
    tmp_path, tiny_model_dir, sequential_bank
):
    on_ray = small_config(tiny_model_dir, executor="ray", ray_num_cpus=2)
    assert on_ray.content_hash() == small_config(tiny_model_dir).content_hash()
    result = run_build(on_ray, tmp_path / "ray", progress=False)
    assert sorted(result.trained) == [0, 1, 2]
    assert result.manifest.build["executor"] == "ray"
    _assert_same_adapters(sequential_bank, Bank.load(tmp_path / "ray"))


class Killed(RuntimeError):
    pass


def test_killed_build_resumes_without_retraining_finished_experts(
    tmp_path, tiny_model_dir, sequential_bank
):
    config = small_config(tiny_model_dir)
    out = tmp_path / "bank"

    def kill_after_first(job_id):
        if job_id == 0:
            raise Killed("simulated kill after expert 0 was saved")

    with pytest.raises(Killed):
        run_build(config, out, progress=False, on_saved=kill_after_first)
    assert not (out / MANIFEST_NAME).exists() and (out / STATE_NAME).exists()
    weights = out / expert_dir(0) / "adapter_model.safetensors"
    saved_bytes, saved_mtime = weights.read_bytes(), weights.stat().st_mtime_ns
    assert not (out / expert_dir(1)).exists()

    calls = []
    real = ttmm.build.executors.train_lora

    def counting(model, chunks, *args, **kwargs):
        calls.append(len(chunks))
        return real(model, chunks, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ttmm.build.executors, "train_lora", counting)
        result = run_build(config, out, progress=False)
    assert result.reused == [0] and result.trained == [1, 2]
    manifest = Bank.load(out).manifest
    assert calls == [manifest.experts[1].n_chunks, manifest.experts[2].n_chunks]
    assert weights.read_bytes() == saved_bytes and weights.stat().st_mtime_ns == saved_mtime
    assert manifest.build["resumed_adapters"] == [0]
    _assert_same_adapters(sequential_bank, Bank.load(out))  # as if never interrupted


def test_output_folder_holding_something_else_is_refused(tmp_path, tiny_model_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("not yours")
    with pytest.raises(BuildError, match="not empty and holds no ttmm build.*thesis.tex"):
        run_build(small_config(tiny_model_dir), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "not yours"


def test_output_folder_with_another_build_is_refused(bank, tiny_model_dir):
    out, _, _ = bank
    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(BuildError, match="different configuration"):
        run_build(small_config(tiny_model_dir, experts=2), out, progress=False)
    assert (out / MANIFEST_NAME).read_bytes() == before


def test_bad_input_fails_before_writing_anything(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        ((f"jsonl:{empty}",), 2, CorpusError, "no usable documents"),
        ((f"dir:{tmp_path / 'missing'}",), 2, CorpusError, "does not exist"),
        (("wiki@3",), 50, ClusterError, "K=50 experts but only"),
    ]
    for corpora, experts, error, message in cases:
        out = tmp_path / f"out-{experts}-{len(message)}"
        with pytest.raises(error, match=message):
            run_build(small_config(tiny_model_dir, corpora=corpora, experts=experts), out)
        assert not out.exists()


def test_config_files_and_field_validation(tmp_path):
    toml = tmp_path / "build.toml"
    toml.write_text('corpora = ["wiki@10"]\nexperts = 4\n[train]\nrank = 4\nmax_tokens = 500\n')
    config = BuildConfig.from_file(toml)
    assert config.corpora == ("wiki@10",) and config.train.rank == 4
    as_yaml = tmp_path / "build.yaml"
    as_yaml.write_text(yaml.safe_dump(config.to_dict()))
    assert BuildConfig.from_file(as_yaml) == config
    toml.write_text("expert = 4\n")
    with pytest.raises(BuildError, match="unknown build setting.*expert"):
        BuildConfig.from_file(toml)
    with pytest.raises(BuildError, match="BuildConfig.experts"):
        BuildConfig(experts=0)
    with pytest.raises(CorpusError, match="unknown kind"):
        BuildConfig(corpora=("books",))


def test_cli_info_and_one_line_errors(bank, tmp_path):
    from ttmm.cli import app

    out, _, _ = bank
    runner = CliRunner()
    shown = runner.invoke(app, ["info", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "experts" in shown.output and "purity" in shown.output
    as_json = runner.invoke(app, ["info", str(out), "--json"])
    assert json.loads(as_json.output)["build"]["config_hash"]
    failed = runner.invoke(
        app, ["build", "--out", str(tmp_path / "x"), "--corpus", "dir:/no/such/dir", "-k", "2"]
    )
    assert failed.exit_code == 2
    assert "does not exist" in failed.output and "Traceback" not in failed.output
    assert not (tmp_path / "x").exists()


def test_cli_build_from_a_config_file_with_flag_overrides(tmp_path, tiny_model_dir):
    from ttmm.cli import app

    config_file = tmp_path / "build.yaml"
    config_file.write_text(yaml.safe_dump(small_config(tiny_model_dir).to_dict()))
    out = tmp_path / "bank"
    args = ["build", "--out", str(out), "--config", str(config_file), "-k", "2", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = Bank.load(out).manifest
    assert len(manifest.experts) == 2  # the flag wins over the file
    assert manifest.build["config"]["window"] == 64  # the file wins over the defaults
    assert "stage train" in result.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
