"""What a bank's identity is made of (issue 23): the fine-tuning job does not depend on K, so the
banks of a sweep share one fine-tuning adapter through an adapter store; the training thread
count is where the work runs, not what it computes; and banks built before these changes (their
hashes and digests counting the thread count) are still recognised, resumed and loaded."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from test_build import small_config, tiny_model_dir  # noqa: F401 (a fixture)

from ttmm.adapter import WEIGHTS_NAME
from ttmm.bank import MANIFEST_NAME, Bank, expert_dir
from ttmm.build.budget import job_digest, train_job
from ttmm.build.pipeline import STATE_NAME, run_build
from ttmm.build.train import LoraTrainConfig


def test_banks_of_a_sweep_share_one_fine_tuning_adapter(tmp_path, tiny_model_dir):  # noqa: F811
    store = tmp_path / "adapters"
    first, second = tmp_path / "k3", tmp_path / "k2"
    config = small_config(tiny_model_dir, with_finetune=True, adapter_store=str(store))
    built = run_build(config, first, progress=False)
    assert -1 in built.trained
    again = run_build(replace(config, experts=2), second, progress=False)
    assert -1 not in again.trained and sorted(again.trained) == [0, 1]  # only the experts
    for bank in (first, second):
        assert os.path.samefile(bank / "finetune" / WEIGHTS_NAME,
                                next(store.iterdir()) / WEIGHTS_NAME)  # fmt: skip
    a, b = Bank.load(first), Bank.load(second)  # the checksums of the linked files hold
    assert a.manifest.finetune.extra["seed"] == b.manifest.finetune.extra["seed"]
    weights = "finetune/" + WEIGHTS_NAME
    assert a.manifest.files[weights] == b.manifest.files[weights]
    # the store is where the work runs, not what the bank is
    assert config.content_hash() == replace(config, adapter_store=None).content_hash()


def test_the_thread_count_is_not_part_of_a_banks_identity(tmp_path, tiny_model_dir):  # noqa: F811
    one = small_config(tiny_model_dir, train=LoraTrainConfig(num_threads=1))
    two = small_config(tiny_model_dir, train=LoraTrainConfig(num_threads=2))
    assert one.content_hash() == two.content_hash()
    assert one.content_hash(legacy=True) != two.content_hash(legacy=True)
    jobs = [train_job(c, 0, [(1, 2, 3, 4)], 0, c.train, 0) for c in (one, two)]
    assert job_digest(jobs[0]) == job_digest(jobs[1])
    assert job_digest(jobs[0], legacy=True) != job_digest(jobs[1], legacy=True)

    out = tmp_path / "bank"
    run_build(one, out, progress=False)
    (out / MANIFEST_NAME).unlink()  # interrupted before its manifest, resumed with 2 threads
    state = json.loads((out / STATE_NAME).read_text()) | {"status": "in_progress"}
    (out / STATE_NAME).write_text(json.dumps(state))
    resumed = run_build(two, out, progress=False)
    assert resumed.trained == [] and sorted(resumed.reused) == [0, 1, 2]


def test_a_bank_built_before_resumes_and_loads_unchanged(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    """Built with the hashes of before (thread count included) and the fine-tuning seed that
    followed K, then interrupted before its manifest: the resume keeps every expert and
    retrains only the fine-tuning adapter, whose seed changed."""
    import ttmm.build.budget as budget

    config = small_config(tiny_model_dir, with_finetune=True)
    out = tmp_path / "old"
    with monkeypatch.context() as old_ttmm:
        old_ttmm.setattr(LoraTrainConfig, "hash_dict", lambda self, legacy=True: _legacy(self))
        old_ttmm.setattr(budget, "FINETUNE_SEED", config.experts)  # the seed followed K
        run_build(config, out, progress=False)
    state = json.loads((out / STATE_NAME).read_text())
    assert state["config_hash"] == config.resolved().content_hash(legacy=True)
    assert state["config_hash"] != config.resolved().content_hash()
    done = run_build(config, out, progress=False)
    assert done.nothing_to_do  # a finished bank of before is recognised as this build
    old_bank = Bank.load(out)  # and loads, its checksums as they were

    (out / MANIFEST_NAME).unlink()  # interrupted before its manifest
    state["status"] = "in_progress"
    (out / STATE_NAME).write_text(json.dumps(state))
    resumed = run_build(config, out, progress=False)
    assert sorted(resumed.reused) == list(range(config.experts))
    assert resumed.trained == [-1]
    bank = Bank.load(out)
    for k in range(config.experts):
        assert (
            bank.manifest.files[f"{expert_dir(k)}/{WEIGHTS_NAME}"]
            == (old_bank.manifest.files[f"{expert_dir(k)}/{WEIGHTS_NAME}"])
        )
    assert bank.manifest.finetune.extra["seed"] == config.seed + budget.FINETUNE_SEED


def _legacy(train: LoraTrainConfig) -> dict:
    added = train._ADDED_DEFAULTS
    return {k: v for k, v in train.to_dict().items() if k not in added or added[k] != v}
