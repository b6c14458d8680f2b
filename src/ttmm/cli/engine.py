"""``ttmm route``, ``generate``, ``score`` and ``import-bank``: verbs over a loaded engine."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from ttmm.cli.options import (
    EngineArgs,
    JsonOption,
    console,
    engine_options,
    user_errors,
)
from ttmm.routing import (
    PREFIX_TOKENS,
    REFERENCE_BETA,
    REFERENCE_MAX_ACTIVE,
    REFERENCE_TAU,
    RoutingConfig,
)


def _plan_table(engine, plan, title: str) -> Table:
    table = Table(title=title)
    for column in ("expert", "label", "weight", "similarity"):
        table.add_column(column)
    sims = plan.similarities or (float("nan"),) * len(plan.expert_ids)
    for k, w, z in zip(plan.expert_ids, plan.weights, sims):
        table.add_row(str(k), Text(engine.bank.label(k)), f"{w:.3f}", f"{z:.3f}")
    if plan.is_base:
        table.add_row("-", "base model (no expert passed the rule)", "-", "-")
    return table


@user_errors
@engine_options
def route(
    engine_args: EngineArgs,
    text: Annotated[str, typer.Argument(help="Prompt to route.")],
    as_json: JsonOption = False,
) -> None:
    """Show which experts a prompt is routed to, with labels and weights."""
    engine = engine_args.engine()
    [plan] = engine.route([text], engine_args.routing(engine))
    if as_json:
        print(json.dumps(engine.bank.describe_plan(plan), indent=2))
    else:
        console.print(_plan_table(engine, plan, f"routing ({plan.rule})"))


@user_errors
@engine_options
def generate(
    engine_args: EngineArgs,
    prompt: Annotated[str, typer.Argument(help="Prompt to continue.")],
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 100,
    mode: Annotated[str, typer.Option(help="auto, fold or lowrank.")] = "auto",
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Continue a prompt with the experts merged for it."""
    engine = engine_args.engine()
    routing = engine_args.routing(engine)
    with console.status("generating"):
        [result] = engine.generate(
            [prompt],
            max_new_tokens=max_new_tokens,
            routing=routing,
            mode=mode,
            do_sample=sample,
            temperature=temperature,
            seed=seed,
        )
    if as_json:
        payload = {
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
            },
            "routing": engine.bank.describe_plan(result.plan),
        }
        print(json.dumps(payload, indent=2))
    else:
        console.print(_plan_table(engine, result.plan, f"routing ({result.plan.rule})"))
        console.print(Text.assemble((prompt, "bold"), result.text))  # user text: no markup


def _read_texts(file: Path) -> list[str]:
    """Texts to score: JSONL with a ``text`` field, or a plain file holding one text."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist")
    raw = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    texts.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(
                        f"{file}:{number}: expected a JSON object with a 'text' field"
                    ) from err
        return texts
    return [raw]


@user_errors
@engine_options
def score(
    engine_args: EngineArgs,
    file: Annotated[
        Path, typer.Argument(help="A .jsonl file with a 'text' field per line, or a text file.")
    ],
    prefix_tokens: Annotated[
        int, typer.Option(help="Routed prefix, never scored.")
    ] = PREFIX_TOKENS,
    max_tokens: Annotated[int, typer.Option(help="Truncate each text to this many tokens.")] = 1024,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
) -> None:
    """Perplexity of each text's continuation after its routed prefix."""

    texts = _read_texts(file)
    engine = engine_args.engine()
    routing = engine_args.routing(engine)
    results = []
    for text in texts:  # one at a time: every text may get its own merge, folded
        results.extend(engine.score([text], prefix_tokens, max_tokens, routing=routing))
    total_nll = sum(r.nll for r in results)
    total_tokens = sum(r.n_tokens for r in results)
    if as_json:
        for r in results:
            print(
                json.dumps(
                    {
                        "nll": r.nll,
                        "tokens": r.n_tokens,
                        "perplexity": r.perplexity,
                        "routing": engine.bank.describe_plan(r.plan),
                    }
                )
            )
        return
    table = Table(title=f"{file} (prefix {prefix_tokens} tokens routed, not scored)")
    for column in ("#", "tokens", "perplexity", "experts"):
        table.add_column(column)
    for i, r in enumerate(results):
        experts = (
            ", ".join(f"{k}:{w:.2f}" for k, w in zip(r.plan.expert_ids, r.plan.weights)) or "base"
        )
        table.add_row(str(i), str(r.n_tokens), f"{r.perplexity:.3f}", experts)
    console.print(table)
    console.print(
        f"overall perplexity {math.exp(total_nll / total_tokens):.4f} over {total_tokens} tokens"
    )


@user_errors
def import_bank(
    src: Annotated[Path, typer.Argument(help="Reference-code layout: numbered folders 0/ … K-1/.")],
    dst: Annotated[Path, typer.Argument(help="New ttmm bank folder.")],
    embeddings: Annotated[
        Path | None,
        typer.Option(
            help="Centroid tensor file (.safetensors, .pt or .npy); found in SRC if omitted."
        ),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model the adapters were trained on.")
    ] = None,
    encoder: Annotated[str | None, typer.Option(help="Encoder that made the embeddings.")] = None,
    reference_beta: Annotated[
        float, typer.Option(help="The reference code's beta (sqrt of β).")
    ] = REFERENCE_BETA,
    tau: Annotated[float, typer.Option(help="Threshold τ.")] = REFERENCE_TAU,
    max_active: Annotated[
        int, typer.Option(help="Most experts merged at once.")
    ] = REFERENCE_MAX_ACTIVE,
) -> None:
    """Convert a bank in the paper's reference-code layout into a validated ttmm bank."""
    from ttmm.build.reference import import_reference_bank

    routing = RoutingConfig.from_reference(beta=reference_beta, tau=tau, max_active=max_active)
    with console.status("importing and validating"):
        bank = import_reference_bank(
            src, dst, embeddings=embeddings, base_model=base_model, encoder=encoder, routing=routing
        )
    console.print(
        f"wrote {dst}: {bank.num_experts} experts, {bank.centroids.shape[1]}-dim centroids"
    )
