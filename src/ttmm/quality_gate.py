"""The quality gate of a bank's experts (issue 22): bad experts are kept out of every merge.

An expert is trained on one cluster of the corpus, and a share of that cluster's documents is
held out of training (its validation chunks). After training, the gate compares the mean NLL
per token of the expert on those chunks with the base model's and, when the bank has one, the
fine-tuning adapter's. An expert *worse than the base model on its own cluster* (a bad learning
rate, a cluster of boilerplate, corrupted data) is marked disabled in the manifest with the
reason; routing then never selects it (:func:`ttmm.routing.route_enabled`) and a plan says
which disabled experts it passed over. Being worse than fine-tuning is reported, not punished:
fine-tuning saw every cluster's text and the paper's experts are often behind it alone.

An operator overrides the gate by hand (``ttmm bank enable/disable``); every change is
recorded in the manifest's ``history`` with who made it, when and why. Editing the
enabled set rewrites only ``manifest.json`` (atomically): the experts' files and checksums
stay as they are.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from ttmm.atomic import atomic_write_json
from ttmm.bank import MANIFEST_NAME, Bank, BankError, BankManifest

GATE = "gate"
OPERATOR = "operator"


@dataclass(frozen=True)
class ExpertHealth:
    """One expert's validation losses on its own cluster's held-out chunks (NLL per token)."""

    validation_chunks: int
    expert_loss: float | None
    base_loss: float | None
    finetune_loss: float | None = None

    def to_dict(self) -> dict:
        return {
            "validation_chunks": self.validation_chunks,
            "expert_loss": _rounded(self.expert_loss),
            "base_loss": _rounded(self.base_loss),
            "finetune_loss": _rounded(self.finetune_loss),
        }

    @classmethod
    def from_dict(cls, data: dict) -> ExpertHealth:
        return cls(
            data.get("validation_chunks", 0),
            data.get("expert_loss"),
            data.get("base_loss"),
            data.get("finetune_loss"),
        )

    def failure(self) -> str | None:
        """Why the gate disables this expert, or None (also when there was nothing to check)."""
        if self.expert_loss is None or self.base_loss is None:
            return None
        if self.expert_loss > self.base_loss:
            return (
                f"validation loss {self.expert_loss:.4f} on its own cluster's "
                f"{self.validation_chunks} held-out chunk(s) is worse than the base model's "
                f"{self.base_loss:.4f}"
            )
        return None

    @property
    def status(self) -> str:
        """``unchecked`` (no validation chunks), ``worse than base``, ``behind fine-tuning``
        or ``ok``."""
        if self.expert_loss is None or self.base_loss is None:
            return "unchecked"
        if self.failure():
            return "worse than base"
        if self.finetune_loss is not None and self.expert_loss > self.finetune_loss:
            return "behind fine-tuning"
        return "ok"


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(float(value), 5)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def apply_gate(manifest: BankManifest, health: Sequence[ExpertHealth]) -> list[int]:
    """Record each expert's health in ``manifest`` and disable those that fail the gate
    (unless an operator enabled them by hand). Returns the ids the gate disabled now."""
    disabled_now = []
    for info, record in zip(manifest.experts, health, strict=True):
        info.health = record.to_dict()
        reason = record.failure()
        if reason is None:
            if info.disabled and info.disabled.get("by") == GATE:
                info.disabled = None  # retrained and healthy again
            continue
        if info.disabled is not None or _operator_enabled(manifest, info.id):
            continue
        info.disabled = {"by": GATE, "reason": reason, "at": _now()}
        manifest.history.append(
            {"action": "disable", "expert": info.id, "by": GATE, "reason": reason, "at": _now()}
        )
        disabled_now.append(info.id)
    return disabled_now


def _operator_enabled(manifest: BankManifest, expert_id: int) -> bool:
    """Whether the last change to the expert was an operator enabling it."""
    changes = [h for h in manifest.history if h.get("expert") == expert_id]
    return bool(changes) and (changes[-1].get("action"), changes[-1].get("by")) == (
        "enable",
        OPERATOR,
    )


def set_enabled(
    bank_path: str | os.PathLike, expert_ids: Sequence[int], enabled: bool, reason: str = ""
) -> list[int]:
    """Enable or disable experts of the bank at ``bank_path`` by hand, recorded in its
    manifest's history; returns the ids whose state changed. Refuses to disable every expert."""
    bank = Bank.load(bank_path, verify=False)
    manifest = bank.manifest
    bad = [k for k in expert_ids if not 0 <= k < bank.num_experts]
    if bad:
        raise BankError(
            f"no expert {bad[0]} in {bank.path}: its experts are 0..{bank.num_experts - 1}"
        )
    if not enabled and not reason.strip():
        raise BankError("say why the experts are disabled: --reason TEXT (kept in the manifest)")
    changed = []
    for k in dict.fromkeys(expert_ids):
        info = manifest.experts[k]
        if (info.disabled is None) == enabled:
            continue
        action = "enable" if enabled else "disable"
        entry = {"action": action, "expert": k, "by": OPERATOR, "at": _now()}
        if reason:
            entry["reason"] = reason
        if not enabled:
            info.disabled = {"by": OPERATOR, "reason": reason, "at": entry["at"]}
        else:
            entry["overrides"] = info.disabled
            info.disabled = None
        manifest.history.append(entry)
        changed.append(k)
    if all(info.disabled is not None for info in manifest.experts):
        raise BankError(
            "that would disable every expert of the bank: routing would have nothing to merge; "
            "leave at least one enabled"
        )
    if changed:
        # only the manifest changes: the experts' files and their checksums stay as they are
        atomic_write_json(Path(bank.path) / MANIFEST_NAME, manifest.to_dict())
    return changed
