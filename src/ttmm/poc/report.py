"""``report.md`` and ``report.html`` from ``poc.json``, and nothing else.

The report is a list of blocks (heading, paragraph, bullets, table, code, image) built from the
``poc.json`` object alone, then rendered twice: as markdown and as one self-contained HTML page
(styles inline, plots as base64 PNGs, no script, no CDN: it reads offline). Every number either
file shows is a number of ``poc.json``, formatted (tests/test_poc.py checks it).

First screen: the three answers (quality gained, inference cost, engineering cost) in plain
words, then the verdict per domain; then the evidence: quality with intervals and win rates,
inference cost and memory, engineering cost and the operator's steps; then how it was measured.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from ttmm.atomic import atomic_write_text

PICKS = {"ttmm": "TTMM", "finetune": "fine-tuning", "base": "the base model", None: "none"}


@dataclass
class Block:
    kind: str  # heading | text | bullets | table | code | image
    text: str = ""
    level: int = 2
    items: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    image: str | None = None  # a PNG file's path (html inlines it)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:+.1f} %"


def interval(value: float, low: float | None, high: float) -> str:
    if low is None:
        return pct(value)
    return f"{pct(value)} [{100 * low:+.1f}, {100 * high:+.1f}]"


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f} ×"


def mb(n: float | None) -> str:
    return "–" if n is None else f"{n / 1e6:.1f} MB"


def minutes(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds / 60:.1f} min"


def money(x: float | None) -> str:
    return "–" if x is None else f"{x:.4f}"


# -- the three answers -------------------------------------------------------------------------


def quality_answer(domain: str, row: dict) -> str:
    """One domain's quality in plain words, from TTMM's result row."""
    c = row["comparisons"].get("finetune")
    if c is None:
        return f"on '{domain}' documents TTMM was not compared with fine-tuning"
    bounds = f"[{100 * c['rel_ci_low']:+.1f}, {100 * c['rel_ci_high']:+.1f}]"
    if c["rel_ci_high"] < 0 or c["rel_ci_low"] > 0:
        word = "lowers" if c["rel_diff"] < 0 else "raises"
        change = f"{word} perplexity by {100 * abs(c['rel_diff']):.1f} % {bounds}"
        tail = ""
    else:
        change = f"changes perplexity by {pct(c['rel_diff'])} {bounds}"
        tail = ", an interval that holds zero: no difference shows"
    return (
        f"on '{domain}' documents TTMM {change} against fine-tuning ({c['n_docs']} documents{tail})"
    )


def inference_answer(inference: dict) -> str:
    methods = inference["methods"]
    ttmm, finetune = methods.get("ttmm"), methods.get("finetune")
    if ttmm is None or ttmm["ratio_to_base"] is None:
        return "each answer's cost was not measured (no timing)"
    text = f"each answer costs {times(ttmm['ratio_to_base'])} the base model's time with TTMM"
    if finetune and finetune["ratio_to_base"] is not None:
        text += f" ({times(finetune['ratio_to_base'])} with fine-tuning"
        ttt = methods.get("ttt")
        if ttt and ttt["ratio_to_base"] is not None:
            text += f", {times(ttt['ratio_to_base'])} with TTT"
        text += ")"
    cost = ttmm.get("cost_per_million")
    if cost is not None:
        text += f": {money(cost)} per million tokens"
    return text


def engineering_answer(eng: dict) -> str:
    cpu = eng.get("build_cpu_seconds")
    what = (
        f"{minutes(cpu)} of CPU time ({minutes(eng['build_wall_seconds'])} wall)"
        if cpu is not None
        else f"{minutes(eng['build_wall_seconds'])} wall (recorded in the bank)"
    )
    return (
        f"the bank of {eng['experts']} experts took {what} to build, trained on "
        f"{eng['tokens_trained']} tokens, and holds {mb(eng['bank_bytes'])}; "
        f"updating one expert takes {eng['expert_update_seconds_median']:.1f} s"
    )


def answers(poc: dict) -> dict:
    quality = [
        quality_answer(domain, d["methods"]["ttmm"])
        for domain, d in poc["quality"]["domains"].items()
        if "ttmm" in d["methods"]
    ]
    return {
        "quality": "; ".join(quality) or "no domain could be scored",
        "inference": inference_answer(poc["inference"]),
        "engineering": engineering_answer(poc["engineering"]),
    }


# -- blocks ------------------------------------------------------------------------------------


def _quality_table(d: dict) -> Block:
    rows = []
    for r in d["methods"].values():
        vs = {ref: r["comparisons"].get(ref) for ref in ("finetune", "base")}
        if r["n_docs"] < 2:  # one document has no spread: no interval is claimed
            vs = {ref: c and c | {"rel_ci_low": None} for ref, c in vs.items()}
        rows.append(
            [
                r["label"],
                f"{r['ppl']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
                if r["n_docs"] >= 2
                else f"{r['ppl']:.3f} (one document: no interval)",
                "–"
                if vs["finetune"] is None
                else interval(
                    vs["finetune"]["rel_diff"],
                    vs["finetune"]["rel_ci_low"],
                    vs["finetune"]["rel_ci_high"],
                ),
                "–"
                if vs["base"] is None
                else interval(
                    vs["base"]["rel_diff"], vs["base"]["rel_ci_low"], vs["base"]["rel_ci_high"]
                ),
                "–" if vs["finetune"] is None else f"{100 * vs['finetune']['win_rate']:.0f} %",
                str(r["n_docs"]),
            ]
        )
    return Block(
        "table",
        header=[
            "method",
            "perplexity [95 %]",
            "vs fine-tuning",
            "vs base",
            "wins vs fine-tuning",
            "documents",
        ],
        rows=rows,
    )


def _inference_table(inference: dict) -> Block:
    rows = []
    for m in inference["methods"].values():
        rows.append(
            [
                m["label"],
                "–"
                if m["seconds_per_100_tokens"] is None
                else f"{m['seconds_per_100_tokens']:.2f}",
                times(m["ratio_to_base"]),
                "–" if m["adapt_seconds"] is None else f"{m['adapt_seconds']:.3f}",
                f"{m['machine_hours_per_million']:.2f}"
                if m.get("machine_hours_per_million") is not None
                else "–",
                money(m.get("cost_per_million")),
                money(m.get("daily_cost")),
                m["source"],
            ]
        )
    return Block(
        "table",
        header=[
            "method",
            "s / 100 tokens",
            "× base",
            "adaptation s",
            "machine-hours / M tokens",
            "cost / M tokens",
            "cost a day",
            "measured by",
        ],
        rows=rows,
    )


def build_blocks(poc: dict, images: dict[str, str]) -> list[Block]:
    config, plan, run = poc["config"], poc["plan"], poc["run"]
    eng, inference = poc["engineering"], poc["inference"]
    a = poc["answers"]
    blocks = [
        Block("heading", f"TTMM proof of concept: {', '.join(poc['corpora'])}", level=1),
        Block(
            "text",
            f"Base model `{poc['base_model']}`, bank of {eng['experts']} experts, measured on "
            f"{poc['environment']['cpu_count']} CPU cores ({poc['device']}) in "
            f"{minutes(run['wall_seconds'])} of a {config['budget_minutes']:g}-minute budget.",
        ),
        Block("heading", "The three answers"),
        Block(
            "bullets",
            items=[
                f"**Quality:** {a['quality']}.",
                f"**Inference cost:** {a['inference']}.",
                f"**Engineering cost:** {a['engineering']}.",
            ],
        ),
        Block("heading", "Verdict per domain"),
        Block(
            "table",
            header=["domain", "pick", "why", "documents"],
            rows=[
                [v["domain"], PICKS[v["pick"]], v["reason"], str(v["n_docs"])]
                for v in poc["verdicts"].values()
            ],
        ),
    ]
    if poc["warnings"]:
        blocks += [
            Block("heading", "Warnings", level=3),
            Block("bullets", items=list(poc["warnings"])),
        ]
    blocks.append(
        Block(
            "text",
            f"Next step: a staged rollout on live traffic with `{poc['files']['rollout']}` "
            "(shadow mode: every request scored by both arms).",
        )
    )
    blocks.append(Block("heading", "Quality on held-out documents"))
    blocks.append(
        Block(
            "text",
            "Perplexity of the tokens after each document's first "
            f"{poc['quality']['prefix_tokens']} (routed on those, never scored); differences are "
            "ppl / ppl_ref − 1 on the documents both scored, with paired 95 % bootstrap "
            f"intervals ({poc['quality']['bootstrap']} resamples); negative is better.",
        )
    )
    for domain, d in poc["quality"]["domains"].items():
        blocks.append(Block("heading", f"'{domain}'", level=3))
        blocks.append(_quality_table(d))
    if "quality" in images:
        blocks.append(
            Block("image", "Perplexity against fine-tuning, per method", image=images["quality"])
        )
    blocks.append(Block("heading", "Inference cost"))
    price = config["price_per_hour"]
    blocks.append(
        Block(
            "text",
            f"One prompt of {poc['quality']['prefix_tokens']} tokens, "
            f"{inference['new_tokens']} new tokens, median over {inference['prompts']} prompt(s), "
            "everything included (routing, merging, restoring; retrieval and training for TTT), "
            "every method timed in the same process. "
            + (
                f"Costs at {price:g} an hour and {config['tokens_per_day']} tokens a day."
                if price is not None
                else "No --price-per-hour given: costs in machine-hours."
            ),
        )
    )
    blocks.append(_inference_table(inference))
    serving = inference.get("serving")
    if serving:
        items = [
            f"{m}: {s['tokens_per_second']:.1f} tokens/s "
            f"({times(s['ratio_to_base'])} the base model's throughput)"
            for m, s in serving["batch"].items()
        ]
        items.append(
            f"memory: {mb(serving['rss_at_rest_bytes'])} resident at rest, "
            f"{mb(serving['rss_peak_bytes'])} at peak"
            + (
                f", {mb(serving['gpu_peak_bytes'])} GPU peak"
                if serving.get("gpu_peak_bytes")
                else ""
            )
        )
        blocks += [
            Block(
                "text",
                f"A batch of {serving['batch_size']} prompts, {serving['new_tokens']} new tokens "
                f"each ({serving['distinct_merges']} different merges in the TTMM batch), in a "
                "fresh process holding only the engine:",
            ),
            Block("bullets", items=items),
        ]
    blocks.append(Block("heading", "Engineering cost"))
    cpu = eng["build_cpu_seconds"]
    blocks.append(
        Block(
            "bullets",
            items=[
                f"build: {minutes(eng['build_wall_seconds'])} wall"
                + (f", {minutes(cpu)} of CPU time" if cpu is not None else "")
                + (
                    f", {minutes(eng['build_gpu_seconds'])} of GPU time"
                    if eng["build_gpu_seconds"]
                    else ""
                )
                + f" on {eng['build_device']}",
                f"tokens trained: {eng['expert_tokens']} for the {eng['experts']} experts and "
                f"{eng['finetune_tokens']} for the fine-tuning baseline",
                f"bank on disk: {mb(eng['bank_bytes'])} ({mb(eng['expert_bytes'])} of experts, "
                f"{mb(eng['finetune_bytes'])} fine-tuning adapter, "
                f"{mb(eng['index_bytes'])} chunk index and metadata)",
                f"updating one expert (retraining it on its cluster): "
                f"{eng['expert_update_seconds_median']:.1f} s median, "
                f"{eng['expert_update_seconds_max']:.1f} s at most",
            ],
        )
    )
    if "stages" in images:
        blocks.append(Block("image", "Where the PoC's time went", image=images["stages"]))
    blocks.append(Block("heading", "What an operator runs", level=3))
    blocks.append(
        Block("code", "\n".join(f"# {s['step']}\n{s['command']}" for s in eng["operator_steps"]))
    )
    blocks.append(Block("heading", "How this was measured"))
    blocks.append(Block("bullets", items=list(plan["reasons"])))
    blocks.append(
        Block(
            "text",
            f"Planned {minutes(plan['budget_seconds'])}; took {minutes(run['wall_seconds'])} "
            f"({run['wall_seconds'] / plan['budget_seconds'] * 100:.0f} % of the budget). "
            "Stage times (s): "
            + ", ".join(f"{k} {v:.0f}" for k, v in run["stage_seconds"].items())
            + ".",
        )
    )
    blocks.append(
        Block(
            "text",
            "Files: "
            + ", ".join(f"`{v}`" for v in poc["files"].values())
            + ". Created "
            + poc["created"]
            + " by ttmm "
            + poc["environment"]["packages"].get("ttmm", "?")
            + ".",
        )
    )
    return blocks


# -- renderers ---------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: list[Block]) -> str:
    out = []
    for b in blocks:
        if b.kind == "heading":
            out.append("#" * b.level + " " + b.text)
        elif b.kind == "text":
            out.append(b.text)
        elif b.kind == "bullets":
            out.append("\n".join(f"- {item}" for item in b.items))
        elif b.kind == "table":
            lines = ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("\n".join(lines))
        elif b.kind == "code":
            out.append("```\n" + b.text + "\n```")
        elif b.kind == "image":
            out.append(f"![{b.text}]({Path(b.image).name})")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Markdown's **bold** and `code` as HTML, the rest escaped."""
    parts = html.escape(text).split("`")
    for i in range(1, len(parts), 2):
        parts[i] = f"<code>{parts[i]}</code>"
    text = "".join(parts)
    bold = text.split("**")
    for i in range(1, len(bold), 2):
        bold[i] = f"<strong>{bold[i]}</strong>"
    return "".join(bold)


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1d2430;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}
h2{border-bottom:1px solid #d5dae1;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #d5dae1;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f1f4f8}ul li{margin:.25em 0}
pre{background:#f6f8fa;padding:.8em;overflow-x:auto;border-radius:4px}
code{background:#f1f4f8;padding:0 .2em;border-radius:3px}
img{max-width:100%;border:1px solid #e3e7ed;margin:.5em 0}
"""


def to_html(blocks: list[Block], title: str) -> str:
    body = []
    for b in blocks:
        if b.kind == "heading":
            body.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif b.kind == "text":
            body.append(f"<p>{_inline(b.text)}</p>")
        elif b.kind == "bullets":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            rows = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b.rows
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "code":
            body.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
        elif b.kind == "image":
            data = base64.b64encode(Path(b.image).read_bytes()).decode()
            body.append(
                f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(b.text)}</figcaption></figure>"
            )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_reports(poc: dict, out: Path, images: dict[str, str]) -> dict[str, Path]:
    """report.md and report.html into ``out`` (atomically), from ``poc`` and the plots."""
    blocks = build_blocks(poc, images)
    paths = {"md": out / "report.md", "html": out / "report.html"}
    atomic_write_text(paths["md"], to_markdown(blocks))
    atomic_write_text(paths["html"], to_html(blocks, blocks[0].text))
    return paths
