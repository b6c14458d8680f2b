"""What the bank costs to build and keep: time, compute, tokens, bytes, and the operator's steps.

Everything here is read from what ran: the build's own timings and token counts in the bank's
manifest, the CPU seconds the PoC process and its children used while building (from
``getrusage``), the bytes on disk. Updating one expert is retraining it on its cluster with the
bank's recipe, so its cost is the build's measured time per expert (median and slowest).
"""

from __future__ import annotations

import resource
import statistics
from pathlib import Path

from ttmm.bank import Bank


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children so far."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def operator_steps(bank: str, rollout: str, corpora: list[str], experts: int) -> list[dict]:
    """The commands an operator runs to take the bank from this PoC to production."""
    corpus = " ".join(f"--corpus {c}" for c in corpora) or "--corpus SPEC"
    return [
        {
            "step": "build the bank (resumable; add --executor ray to train experts in parallel)",
            "command": f"ttmm build {corpus} --experts {experts} --with-finetune --out {bank}",
        },
        {"step": "check it", "command": f"ttmm info {bank}"},
        {
            "step": "measure quality on held-out documents",
            "command": f"ttmm eval --bank {bank} --out eval-results",
        },
        {
            "step": "serve it beside the model in use, with a staged rollout",
            "command": f"ttmm serve --rollout {rollout} --admin-key $TTMM_ADMIN_KEY",
        },
        {
            "step": "watch the rollout (the server promotes or rolls back by itself)",
            "command": "ttmm rollout status --server http://127.0.0.1:8000",
        },
        {
            "step": "step in by hand if needed",
            "command": "ttmm rollout pause|resume|promote|rollback --server http://127.0.0.1:8000",
        },
    ]


def engineering_cost(
    bank_path: str | Path,
    build_record: dict | None,
    rollout_path: str,
) -> dict:
    """The engineering and operating cost of ``bank_path``; ``build_record`` is what the PoC
    measured around the build (None when it evaluated a bank it did not build)."""
    bank = Bank.load(bank_path, verify=False)
    manifest = bank.manifest
    build = manifest.build or {}
    training = build.get("training", {})
    expert_seconds = [e.extra.get("seconds", 0.0) for e in manifest.experts]
    adapters = sum(e.size_bytes for e in manifest.experts)
    finetune = manifest.finetune.size_bytes if manifest.finetune else 0
    total = folder_bytes(Path(bank_path))
    device = build.get("device", "cpu")
    wall = build_record["wall_seconds"] if build_record else build.get("total_seconds")
    train_seconds = training.get("expert_seconds", 0.0) + training.get("finetune_seconds", 0.0)
    return {
        "measured_by_poc": build_record is not None,
        "build_wall_seconds": wall,
        "build_cpu_seconds": build_record["cpu_seconds"] if build_record else None,
        "build_gpu_seconds": train_seconds if device.startswith("cuda") else 0.0,
        "build_device": device,
        "cpu_count": build.get("cpu_count"),
        "stage_seconds": build.get("stage_seconds", {}),
        "experts": bank.num_experts,
        "expert_tokens": training.get("expert_tokens", 0),
        "finetune_tokens": training.get("finetune_tokens", 0),
        "tokens_trained": training.get("expert_tokens", 0) + training.get("finetune_tokens", 0),
        "training_tokens_per_second": training.get("tokens_per_second"),
        "bank_bytes": total,
        "expert_bytes": adapters,
        "finetune_bytes": finetune,
        "index_bytes": total - adapters - finetune,
        "expert_update_seconds_median": statistics.median(expert_seconds),
        "expert_update_seconds_max": max(expert_seconds),
        "operator_steps": operator_steps(
            str(bank_path),
            rollout_path,
            list(build.get("config", {}).get("corpora", [])),
            bank.num_experts,
        ),
    }
