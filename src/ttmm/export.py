"""A routed merge written as ONE PEFT LoRA adapter (design notes §7, "Export").

The merge of n experts, ΔW = Σ_k w_k s_k B_k A_k, is one LoRA of rank R = Σ_k r_k with
B' = [B_1 … B_n] and A' = [w_1 s_1 A_1; …; w_n s_n A_n] (as :mod:`ttmm.factors` builds it for
a merge; here every layer is written out for a PEFT folder). Written
with ``r = lora_alpha = R``, the adapter's own scale is 1, so any LoRA runtime (PEFT, vLLM,
LoRAX) that applies x A'ᵀ B'ᵀ runs exactly ttmm's merge.

Every exported layer has the full rank R, expert k's block at the same rows in every layer:
a layer some chosen expert does not adapt gets zero rows there (runtimes such as vLLM take one
rank per adapter). The exported layers are the union of the chosen experts' layers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from ttmm.adapter import CONFIG_NAME, WEIGHTS_NAME, LoraAdapter, LoraLayer
from ttmm.atomic import atomic_directory
from ttmm.bank import Bank
from ttmm.merge import MergeError
from ttmm.routing import RoutingPlan

PROVENANCE_NAME = "ttmm_merge.json"


@dataclass(frozen=True)
class ExportedMerge:
    """A plan's merge as one adapter: the plan, the adapter, and the experts' row blocks."""

    bank: Bank
    plan: RoutingPlan
    adapter: LoraAdapter
    """One layer per layer any chosen expert adapts, all of rank R, scale 1."""
    blocks: dict[int, tuple[int, int]]
    """Expert id → its rows [start, end) of A' (and columns of B')."""

    @property
    def rank(self) -> int:
        return self.adapter.config["r"]

    def config_json(self) -> str:
        return json.dumps(self.adapter.config, indent=2, default=str)

    def provenance(self) -> dict:
        """What ``ttmm_merge.json`` records beside the adapter: the bank, the routing, and
        each expert's rows (runtimes ignore the file)."""
        return {
            "bank": str(self.bank.path),
            "base_model": self.bank.manifest.base_model,
            "routing": self.bank.describe_plan(self.plan),
            "rank": self.rank,
            "blocks": {str(k): list(span) for k, span in self.blocks.items()},
        }

    def safetensors_bytes(self) -> bytes:
        """``adapter_model.safetensors``, in memory (what the server sends)."""
        return save(self.adapter.state_dict(), metadata={"format": "pt"})

    def save(self, out: str | os.PathLike, replace: bool = True) -> Path:
        """Write the PEFT folder atomically: a reader sees the old folder or the new one.
        ``replace=False`` keeps an existing folder (when its name already identifies it)."""
        out = Path(out)
        with atomic_directory(out, replace=replace) as staging:
            save_file(self.adapter.state_dict(), staging / WEIGHTS_NAME, metadata={"format": "pt"})
            (staging / CONFIG_NAME).write_text(self.config_json())
            (staging / PROVENANCE_NAME).write_text(json.dumps(self.provenance(), indent=2))
            for file in staging.iterdir():  # readable by a runtime running as another user
                file.chmod(0o644)
            staging.chmod(0o755)  # (the staging folder is created private)
        return out


def merged_adapter(bank: Bank, plan: RoutingPlan) -> ExportedMerge:
    """The plan's merge as one LoRA adapter of rank Σ r_k (see the module docstring)."""
    if plan.is_base:
        raise MergeError("the plan keeps no expert: the base model needs no adapter")
    K = bank.num_experts
    bad = [k for k in plan.expert_ids if not 0 <= k < K]
    if bad:
        raise MergeError(f"unknown expert id(s) {bad}; the bank has experts 0..{K - 1}")
    chosen = [(k, w, bank.read_expert(k)) for k, w in zip(plan.expert_ids, plan.weights)]
    blocks, offset = {}, 0
    for k, _, adapter in chosen:
        blocks[k] = (offset, offset + adapter.rank)
        offset += adapter.rank
    R = offset
    names = list(dict.fromkeys(name for _, _, a in chosen for name in a.layers))
    layers = {}
    for name in names:
        present = [(k, w, a.layers[name]) for k, w, a in chosen if name in a.layers]
        _, _, first = present[0]
        d_in, d_out = first.A.shape[1], first.B.shape[0]
        A_stack = torch.zeros(R, d_in, dtype=first.A.dtype)  # (R, d_in), zero where absent
        B_t_stack = torch.zeros(R, d_out, dtype=first.B.dtype)  # (R, d_out)
        row_scale = torch.zeros(R, dtype=first.A.dtype)  # w_k s_k on expert k's rows
        for k, w, layer in present:
            if layer.A.shape[1] != d_in or layer.B.shape[0] != d_out:
                raise MergeError(
                    f"layer {name}: expert {k} maps {layer.A.shape[1]} → {layer.B.shape[0]} "
                    f"features, another chosen expert {d_in} → {d_out}; the bank is inconsistent"
                )
            start = blocks[k][0]
            rows = slice(start, start + layer.rank)  # a lower per-layer rank leaves zero rows
            A_stack[rows], B_t_stack[rows] = layer.A, layer.B.T
            row_scale[rows] = w * layer.scale
        A = A_stack * row_scale.unsqueeze(1)  # A' = [w_k s_k A_k], B' = [B_k]
        layers[name] = LoraLayer(A=A, B=B_t_stack.T.contiguous(), scale=1.0)
    config = _peft_config(bank, plan, [a for _, _, a in chosen], names, R)
    adapter = LoraAdapter(layers=layers, config=config)
    return ExportedMerge(bank=bank, plan=plan, adapter=adapter, blocks=blocks)


def _peft_config(
    bank: Bank, plan: RoutingPlan, adapters: list[LoraAdapter], names: list[str], rank: int
) -> dict:
    """A plain LoRA config of rank R with lora_alpha = R (scale 1) on the exported layers."""
    fan_in_fan_out = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters}
    if len(fan_in_fan_out) > 1:
        raise MergeError("the chosen experts disagree on fan_in_fan_out; they cannot be one LoRA")
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": bank.manifest.base_model.get("name"),
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out.pop(),
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in names}),
        "inference_mode": True,
    }


def export_merge(source, plan: RoutingPlan, out: str | os.PathLike) -> ExportedMerge:
    """Write ``plan``'s merge of ``source`` (a :class:`Bank` or an engine with a ``bank``) as
    one PEFT LoRA folder at ``out``; returns what was written."""
    bank = source if isinstance(source, Bank) else source.bank
    exported = merged_adapter(bank, plan)
    exported.save(out)
    return exported
