"""ttmm.atomic: a reader sees the old file or folder or the new one, never half of either."""

from __future__ import annotations

import json

import pytest

from ttmm.atomic import atomic_directory, atomic_file, atomic_write_json, atomic_write_text


def test_a_write_replaces_the_file_and_leaves_no_staging(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"x": "é"})
    assert json.loads(path.read_text(encoding="utf-8")) == {"x": "é"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "a.txt"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_file(path) as staging:
        staging.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapter"
    with atomic_directory(target) as staging:
        (staging / "w").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as staging:
        (staging / "w").write_text("2")
        raise RuntimeError("killed")
    assert (target / "w").read_text() == "1"
    with atomic_directory(target) as staging:
        (staging / "w").write_text("3")
    assert (target / "w").read_text() == "3"
    with atomic_directory(target, replace=False) as staging:  # a cache: the first one wins
        (staging / "w").write_text("4")
    assert (target / "w").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
