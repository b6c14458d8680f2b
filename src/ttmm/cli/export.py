"""``ttmm export``: a prompt's merge (or given experts') written as one PEFT LoRA folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ttmm.cli.options import EngineArgs, JsonOption, console, engine_options, user_errors


def parse_experts(text: str) -> dict[int, float]:
    """``"3=0.7,5=0.3"`` → ``{3: 0.7, 5: 0.3}``."""
    experts: dict[int, float] = {}
    for item in text.split(","):
        key, sep, value = item.strip().partition("=")
        try:
            if not sep:
                raise ValueError
            expert, weight = int(key), float(value)
        except ValueError:
            raise ValueError(
                f"--experts: {item.strip()!r} is not ID=WEIGHT; write e.g. --experts 3=0.7,5=0.3"
            ) from None
        if expert in experts:
            raise ValueError(f"--experts: expert {expert} is given twice")
        experts[expert] = weight
    return experts


@user_errors
@engine_options
def export(
    engine_args: EngineArgs,
    out: Annotated[Path, typer.Option("--out", "-o", help="PEFT adapter folder to write.")],
    prompt: Annotated[
        str | None, typer.Option(help="Route this prompt and export its merge.")
    ] = None,
    experts: Annotated[
        str | None,
        typer.Option(help="Export these experts with these weights instead: ID=W,ID=W,..."),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Write a merge as ONE PEFT LoRA (rank Σ r_k, scale 1) for PEFT, vLLM or LoRAX."""
    from ttmm.bank import Bank
    from ttmm.export import export_merge
    from ttmm.routing import RoutingPlan

    if (prompt is None) == (experts is None):
        raise ValueError("give exactly one of --prompt TEXT or --experts ID=W,...")
    if experts is not None:  # no routing: the bank alone, no model to load
        source = Bank.load(engine_args.bank)
        plan = RoutingPlan.explicit(parse_experts(experts))
    else:
        source = engine_args.engine()
        [plan] = source.route([prompt], engine_args.routing(source))
    with console.status("merging and writing"):
        exported = export_merge(source, plan, out)
    if as_json:
        print(json.dumps({"path": str(out), **exported.provenance()}, indent=2))
        return
    chosen = ", ".join(f"{k}:{w:.3f}" for k, w in zip(plan.expert_ids, plan.weights))
    console.print(
        f"wrote {out}: one LoRA of rank {exported.rank} over "
        f"{len(exported.adapter.layers)} layers (experts {chosen}; rule {plan.rule})"
    )
