"""Faults during a build: a build SIGKILLed at any moment resumes to the bank an uninterrupted
build makes (same configuration hash, manifest, checksums and bitwise-equal weights); a full
disk or a read-only folder fails with one clear line and leaves no half-written bank.

The kills are real: ``ttmm build`` runs in a subprocess and ``TTMM_FAULT_AT``
(:mod:`ttmm.build.faults`) makes it SIGKILL itself at an exact moment, so nothing is left to
timing. One folder is killed at every moment in turn, each resume getting one step further,
then finished and compared with a build never interrupted.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_build import small_config, tiny_model_dir  # noqa: F401 (a fixture)
from typer.testing import CliRunner

import ttmm
import ttmm.adapter
from ttmm.adapter import WEIGHTS_NAME
from ttmm.atomic import remove_staging
from ttmm.bank import CENTROIDS_NAME, MANIFEST_NAME, Bank, expert_dir
from ttmm.build.faults import FAULT_ENV
from ttmm.build.pipeline import CONFIG_NAME, STATE_NAME, run_build, write_failure
from ttmm.cli import app

TIMINGS = {"seconds", "tokens_per_second", "train_seconds"}
"""Fields of an adapter's entry that measure time, so differ between any two builds."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """An uninterrupted build of the small configuration, run in this process."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    run_build(small_config(tiny_model_dir), out, progress=False)
    return out


def _build(config_file: Path | None, out: Path, home: Path, fault: str | None = None, args=None):
    """``ttmm build --config config_file --out out`` (or ``ttmm ARGS``) in a fresh
    interpreter."""
    env = {**os.environ, "PYTHONPATH": str(Path(ttmm.__file__).parents[1]), "TTMM_HOME": str(home)}
    env.pop(FAULT_ENV, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    command = "from ttmm.cli import app; app()"
    if args is None:
        args = ["build", "--config", str(config_file), "--out", str(out), "--no-progress"]
    return subprocess.run(
        [sys.executable, "-c", command, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _killed(result) -> None:
    assert result.returncode == -9, result.stderr[-2000:]


def _comparable(bank: Path) -> dict:
    """The manifest without what differs between two builds of one configuration: the time
    it was made, timings, which adapters a resume kept, and the training records' checksums
    (the records hold timings)."""
    manifest = json.loads((bank / MANIFEST_NAME).read_text())
    for key in ("created", "ttmm_version"):
        manifest.pop(key)
    for key in ("stage_seconds", "total_seconds", "resumed_adapters"):
        manifest["build"].pop(key)
    training = manifest["build"]["training"]
    for key in ("expert_seconds", "tokens_per_second", "finetune_seconds"):
        training.pop(key)
    for entry in [*manifest["experts"], manifest["finetune"] or {}]:
        for key in TIMINGS:
            entry.get("extra", {}).pop(key, None)
    manifest["files"] = {
        path: digest
        for path, digest in manifest["files"].items()
        if not path.endswith("training.json")
    }
    return manifest


def _assert_same_bank(bank: Path, reference: Path) -> None:
    assert (bank / CONFIG_NAME).read_text() == (reference / CONFIG_NAME).read_text()
    built, expected = _comparable(bank), _comparable(reference)
    assert built["build"]["config_hash"] == expected["build"]["config_hash"]
    assert {CENTROIDS_NAME, f"{expert_dir(2)}/{WEIGHTS_NAME}"} <= set(expected["files"])
    assert built == expected
    names = [e["path"] for e in expected["experts"]]
    for name in names:
        left = load_file(bank / name / WEIGHTS_NAME)
        right = load_file(reference / name / WEIGHTS_NAME)
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)
    Bank.load(bank)  # every checksum holds


def _leftovers(folder: Path) -> list[str]:
    """Staging files and folders of interrupted atomic writes anywhere under ``folder``."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob(".*")
        if p.name != STATE_NAME and (".tmp" in p.name or ".old-" in p.name)
    )


def _cli_build(config_file: Path, out: Path):
    """The same command, in this process (a resume needs no fresh interpreter)."""
    args = ["build", "--config", str(config_file), "--out", str(out), "--no-progress"]
    return CliRunner().invoke(app, args)


@pytest.fixture
def config_file(tmp_path, tiny_model_dir):  # noqa: F811
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(small_config(tiny_model_dir).to_dict()))
    return path


def test_build_killed_at_every_moment_resumes_to_the_uninterrupted_bank(
    tmp_path, config_file, reference, monkeypatch
):
    out, home = tmp_path / "bank", tmp_path / "home"
    losses = json.loads((reference / expert_dir(0) / "training.json").read_text())["losses"]

    _killed(_build(config_file, out, home, "embed"))
    assert not out.exists()  # nothing is written before the data stages are done

    _killed(_build(config_file, out, home, f"train_step:{len(losses) + 2}"))  # inside expert 1
    assert (out / STATE_NAME).is_file() and not (out / MANIFEST_NAME).exists()
    assert (out / expert_dir(0) / "training.json").is_file()
    assert not (out / expert_dir(1)).exists()
    first = (out / expert_dir(0) / WEIGHTS_NAME).stat().st_mtime_ns

    _killed(_build(config_file, out, home, "adapter_saved:1"))  # between experts 1 and 2
    assert (out / expert_dir(1) / "training.json").is_file()
    assert not (out / expert_dir(2)).exists()

    _killed(_build(config_file, out, home, "write_manifest"))
    assert not (out / MANIFEST_NAME).exists()
    assert _leftovers(out) and all(MANIFEST_NAME in p for p in _leftovers(out))  # mid-write

    monkeypatch.setenv("TTMM_HOME", str(home))
    finished = _cli_build(config_file, out)
    assert finished.exit_code == 0, finished.output
    assert "kept 3 finished adapter(s)" in finished.output
    assert (out / expert_dir(0) / WEIGHTS_NAME).stat().st_mtime_ns == first  # never retrained
    assert json.loads((out / STATE_NAME).read_text())["status"] == "done"
    assert _leftovers(out) == []  # the killed manifest write's staging file is gone
    _assert_same_bank(out, reference)


def _unfinished_copy(reference: Path, out: Path) -> Path:
    """The reference bank as a build killed just before its manifest: no manifest.json, state
    in progress."""
    shutil.copytree(reference, out)
    (out / MANIFEST_NAME).unlink()
    state = json.loads((out / STATE_NAME).read_text())
    (out / STATE_NAME).write_text(json.dumps({**state, "status": "in_progress"}))
    return out


def _assert_clean_failure(result, out: Path, reason: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if "error" in line]  # one line
    assert line.startswith(f"error: cannot write the bank into {out}: {reason}; ")
    assert line.endswith("then rerun the same command to resume the build")
    assert not (out / MANIFEST_NAME).exists()
    assert _leftovers(out) == []


def test_full_disk_during_an_adapter_write_fails_cleanly_and_resumes(
    tmp_path, config_file, reference, monkeypatch
):
    out = _unfinished_copy(reference, tmp_path / "bank")
    shutil.rmtree(out / expert_dir(2))

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 100)  # what fitted before the disk filled up
        raise SafetensorError(  # what safetensors raises for any I/O error
            "Error while serializing: I/O error: No space left on device (os error 28) "
            f'at path "{path}"'
        )

    with monkeypatch.context() as patch:
        patch.setattr(ttmm.adapter, "save_file", full_disk)
        failed = _cli_build(config_file, out)
    _assert_clean_failure(failed, out, "the disk is full")
    assert not (out / expert_dir(2)).exists()

    resumed = _cli_build(config_file, out)
    assert resumed.exit_code == 0, resumed.output
    _assert_same_bank(out, reference)


class _FullFile:
    """A file on a disk that fills up: half of the first write lands, then ENOSPC."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data) -> int:
        self.handle.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.handle.name)


def test_full_disk_during_the_manifest_write_fails_cleanly_and_resumes(
    tmp_path, config_file, reference, monkeypatch
):
    out = _unfinished_copy(reference, tmp_path / "bank")
    real_open = io.open

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        writing = Path(os.fsdecode(file)).name.startswith(f".{MANIFEST_NAME}.")
        return _FullFile(handle) if writing else handle

    with monkeypatch.context() as patch:
        patch.setattr(io, "open", open_on_full_disk)
        failed = _cli_build(config_file, out)
    _assert_clean_failure(failed, out, "the disk is full")

    resumed = _cli_build(config_file, out)
    assert resumed.exit_code == 0, resumed.output
    _assert_same_bank(out, reference)


def test_read_only_output_folder_fails_cleanly(tmp_path, config_file, monkeypatch):
    """Root ignores permission bits, so the read-only folder is simulated at ``open``."""
    out = tmp_path / "readonly"
    out.mkdir()
    real_open = io.open

    def read_only(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and Path(os.fsdecode(file)).parent == out:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(io, "open", read_only)
    failed = _cli_build(config_file, out)
    _assert_clean_failure(failed, out, "the file system is read-only")
    assert list(out.iterdir()) == []


def test_only_failed_writes_into_the_bank_become_build_errors(tmp_path):
    out = tmp_path / "bank"
    inside = OSError(errno.EACCES, "Permission denied", str(out / "experts" / "000"))
    assert "permission denied" in str(write_failure(out, inside))
    assert write_failure(out, OSError(errno.ENOSPC, "full", str(tmp_path / "cache"))) is None
    assert write_failure(out, SafetensorError("Error while serializing: bad dtype")) is None


def test_remove_staging_takes_only_what_interrupted_writes_leave(tmp_path):
    (tmp_path / "experts" / ".002.tmp-ab12cd").mkdir(parents=True)
    (tmp_path / "experts" / ".002.tmp-ab12cd" / WEIGHTS_NAME).write_bytes(b"half")
    (tmp_path / "experts" / ".001.old-77").mkdir()
    (tmp_path / f".{MANIFEST_NAME}.4242.tmp").write_text("{")
    kept = [STATE_NAME, CONFIG_NAME, f"experts/{WEIGHTS_NAME}", ".tmp", "notes.tmp"]
    for name in kept:
        (tmp_path / name).write_text("x")
    removed = remove_staging(tmp_path)
    assert sorted(p.name for p in removed) == [
        ".001.old-77",
        ".002.tmp-ab12cd",
        f".{MANIFEST_NAME}.4242.tmp",
    ]
    assert sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
    ) == sorted(kept)
