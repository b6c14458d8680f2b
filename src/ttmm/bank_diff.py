"""What differs between two versions of a bank (``ttmm diff OLD NEW``, issue 22).

Experts are compared by id and by the checksums their manifests record for their files, so two
banks are compared without reading a single adapter: an expert is *unchanged* when every file
of its folder has the same sha256 in both, *retrained* when its files differ, *added* or
*removed* when only one bank has it. Centroids that moved are reported with the cosine between
their old and new direction. When NEW's lineage names OLD's manifest digest (an update of OLD)
the diff says so and shows what the update recorded: the corpora it added and its novelty
threshold.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ttmm.bank import Bank, BankManifest, expert_dir, manifest_digest


@dataclass
class BankDiff:
    """OLD against NEW; expert ids are those of the banks (NEW's added ones follow OLD's)."""

    old: str
    new: str
    relation: str
    """``update`` (NEW's lineage names OLD), ``parent`` (OLD's names NEW), ``same``, or
    ``unrelated``."""
    added: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    retrained: list[int] = field(default_factory=list)
    unchanged: int = 0
    disabled: dict[int, str] = field(default_factory=dict)
    """Experts disabled in NEW and not in OLD, with NEW's reason."""
    enabled: list[int] = field(default_factory=list)
    """Experts disabled in OLD and not in NEW."""
    centroids_moved: dict[int, float] = field(default_factory=dict)
    """Cosine between OLD's and NEW's centroid, for the experts both have whose row changed."""
    finetune: str = "absent"
    """``unchanged``, ``changed``, ``added``, ``removed`` or ``absent``."""
    corpora_added: list[str] = field(default_factory=list)
    corpora_removed: list[str] = field(default_factory=list)
    base_model: tuple[str, str] | None = None
    """(OLD's, NEW's) base-model fingerprint when they differ."""
    lineage: dict = field(default_factory=dict)
    """NEW's lineage when it is an update of OLD."""

    def to_dict(self) -> dict:
        return asdict(self)


def _folder_sums(manifest: BankManifest, folder: str) -> dict[str, str]:
    prefix = folder + "/"
    return {k[len(prefix) :]: v for k, v in manifest.files.items() if k.startswith(prefix)}


def diff_banks(old_path: str | os.PathLike, new_path: str | os.PathLike) -> BankDiff:
    """Compare two banks from their manifests and centroids (checksums not re-read)."""
    old, new = Bank.load(old_path, verify=False), Bank.load(new_path, verify=False)
    a, b = old.manifest, new.manifest
    old_digest, new_digest = manifest_digest(old.path), manifest_digest(new.path)
    if old_digest == new_digest:
        relation = "same"
    elif b.lineage.get("parent", {}).get("manifest_sha256") == old_digest:
        relation = "update"
    elif a.lineage.get("parent", {}).get("manifest_sha256") == new_digest:
        relation = "parent"
    else:
        relation = "unrelated"
    diff = BankDiff(str(Path(old_path)), str(Path(new_path)), relation)
    shared = min(old.num_experts, new.num_experts)
    diff.added = list(range(shared, new.num_experts))
    diff.removed = list(range(shared, old.num_experts))
    for k in range(shared):
        if _folder_sums(a, expert_dir(k)) == _folder_sums(b, expert_dir(k)):
            diff.unchanged += 1
        else:
            diff.retrained.append(k)
        if not old.centroids[k].equal(new.centroids[k]):
            diff.centroids_moved[k] = round(float(old.centroids[k] @ new.centroids[k]), 6)
    for info in b.experts:
        was = a.experts[info.id].disabled if info.id < old.num_experts else None
        if info.disabled and not was:
            diff.disabled[info.id] = info.disabled.get("reason", "")
        if was and not info.disabled:
            diff.enabled.append(info.id)
    if a.finetune and b.finetune:
        same = _folder_sums(a, a.finetune.path) == _folder_sums(b, b.finetune.path)
        diff.finetune = "unchanged" if same else "changed"
    elif a.finetune or b.finetune:
        diff.finetune = "added" if b.finetune else "removed"
    old_corpora, new_corpora = a.data.get("corpora", []), b.data.get("corpora", [])
    diff.corpora_added = [c for c in new_corpora if c not in old_corpora]
    diff.corpora_removed = [c for c in old_corpora if c not in new_corpora]
    if a.base_model["fingerprint"] != b.base_model["fingerprint"]:
        diff.base_model = (a.base_model["fingerprint"], b.base_model["fingerprint"])
    if relation == "update":
        diff.lineage = b.lineage
    return diff
