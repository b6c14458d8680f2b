"""The PoC's ``rollout.yaml``: the next step of adoption, a staged rollout of its bank."""

from __future__ import annotations

from pathlib import Path

import yaml

from ttmm.atomic import atomic_write_text


def write_rollout(out: Path, bank: Path, has_finetune: bool) -> Path:
    """A staged-rollout file for this bank (shadow mode, against the fine-tuning adapter when
    the bank has one), checked by loading it back."""
    from ttmm.serve.rollout.config import RolloutConfig

    try:
        bank_ref = str(bank.resolve().relative_to(out.resolve()))
    except ValueError:
        bank_ref = str(bank.resolve())
    data = {
        "control": {"kind": "finetune" if has_finetune else "base"},
        "candidate": {"bank": bank_ref},
        "mode": "shadow",
        "assignment": {"key": "user", "salt": "ttmm-poc"},
        "steps": [5, 25, 50, 100],
        "min_requests": 200,
        "state_dir": "rollout-state",
    }
    path = out / "rollout.yaml"
    text = (
        "# Staged rollout of the PoC's bank (ttmm serve --rollout rollout.yaml); see the\n"
        "# README's 'Rolling out'. Shadow mode scores every request under both arms.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    atomic_write_text(path, text)
    RolloutConfig.load(path)
    return path
