"""``poc.json``: every stage's output brought together, the verdicts and the three answers.

``poc.json`` (``schema_version`` 1) holds::

    schema_version, created, config (the PocConfig), environment (as results.json's)
    corpora, base_model, device
    rates, facts, plan          what was measured first and what was planned from it
    evaluation                  the evaluation's plan as run (docs, ttt_docs, neighbours, ...,
                                 seconds_left: what the build left it)
    run                         {budget_seconds, wall_seconds, budget_used, stage_seconds}
    quality                     {prefix_tokens, bootstrap, level, domains: {domain: {methods:
                                 {method: {label, ppl, ci_low, ci_high, n_docs, n_tokens,
                                  comparisons: {ref: {diff, ci_low, ci_high, rel_diff,
                                  rel_ci_low, rel_ci_high, significant, win_rate, n_docs}}}}}}}
    inference                   {new_tokens, prompts, price_per_hour, tokens_per_day,
                                 methods: {method: {label, seconds_per_100_tokens, ratio_to_base,
                                  adapt_seconds, source, machine_hours_per_million,
                                  cost_per_million, daily_cost}}, serving: {...}}
    engineering                 see :func:`ttmm.poc.engineering.engineering_cost`
    verdicts                    {domain: {domain, n_docs, pick, adopt_ttmm, reason, warnings}}
    answers                     {quality, inference, engineering}: the first screen, in words
    warnings                    everything the reader must know before trusting a number
    files                       what the run wrote, relative to its folder

Quality numbers are the evaluation's ``results.json`` rows, copied: ``ttmm eval`` on the same
bank and documents gives the same numbers.
"""

from __future__ import annotations

import json
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

from ttmm.atomic import atomic_write_json
from ttmm.eval.intervals import LEVEL
from ttmm.eval.methods import METHODS
from ttmm.eval.report import environment
from ttmm.poc.inference import cost_per_million, daily_cost
from ttmm.poc.plan import EvalPlan
from ttmm.poc.plots import plot_quality, plot_stages
from ttmm.poc.report import answers, write_reports
from ttmm.poc.rollout_file import write_rollout
from ttmm.poc.verdict import domain_verdict

SCHEMA_VERSION = 1
ROW_FIELDS = ("label", "ppl", "ci_low", "ci_high", "n_docs", "n_tokens", "comparisons")
COMPARISON_FIELDS = (
    "diff", "ci_low", "ci_high", "rel_diff", "rel_ci_low", "rel_ci_high", "significant",
    "win_rate", "n_docs",
)  # fmt: skip


def quality_section(report: dict) -> dict:
    domains: dict[str, dict] = {}
    for row in report["results"]:
        kept = {k: row[k] for k in ROW_FIELDS}
        kept["comparisons"] = {
            ref: {k: c[k] for k in COMPARISON_FIELDS} for ref, c in row["comparisons"].items()
        }
        domains.setdefault(row["domain"], {"methods": {}})["methods"][row["method"]] = kept
    config = report["config"]
    return {
        "prefix_tokens": config["prefix_tokens"],
        "bootstrap": config["bootstrap"],
        "level": LEVEL,
        "domains": domains,
    }


def inference_section(report: dict, serving: dict, price: float | None, per_day: int) -> dict:
    """Seconds per 100 tokens and × base of every method, and what that costs."""
    timing = {t["method"]: t for t in report["timing"]}
    new_tokens = report["config"]["new_tokens"]
    methods: dict[str, dict] = {}
    for method, t in timing.items():
        methods[method] = {
            "label": t["label"],
            "seconds": t["median_seconds"],
            "adapt_seconds": t["median_adapt_seconds"],
            "source": "timed generation",
        }
    ttt = [d["ttt_seconds"] for d in report["documents"] if d["method"] == "ttt"]
    if ttt and "base" in timing:  # TTT's adaptation, measured while scoring, + base decoding
        adapt = statistics.median(ttt)
        methods["ttt"] = {
            "label": METHODS["ttt"].label,
            "seconds": adapt + timing["base"]["median_seconds"],
            "adapt_seconds": adapt,
            "source": f"training on {len(ttt)} scored documents + base decoding",
        }
    base = methods.get("base", {}).get("seconds")
    for m in methods.values():
        seconds = m.pop("seconds")
        m["seconds_per_100_tokens"] = seconds * 100 / new_tokens
        m["ratio_to_base"] = seconds / base if base else None
        m |= cost_per_million(seconds / new_tokens, price)
        m["daily_cost"] = daily_cost(m["cost_per_million"], per_day)
    for s in serving.get("batch", {}).values():
        s |= cost_per_million(1 / s["tokens_per_second"], price)
    prompts = max((t["prompts"] for t in report["timing"]), default=0)
    return {
        "new_tokens": new_tokens,
        "prompts": prompts,
        "price_per_hour": price,
        "tokens_per_day": per_day,
        "methods": methods,
        "serving": serving,
    }


def warnings_for(poc: dict, eval_plan: dict) -> list[str]:
    found = list(eval_plan.get("notes", []))
    for verdict in poc["verdicts"].values():
        found += [f"'{verdict['domain']}': {w}" for w in verdict["warnings"]]
    ttt = poc["inference"]["methods"].get("ttt")
    if eval_plan["ttt_docs"]:
        found.append(
            f"TTT scored {eval_plan['ttt_docs']} document(s) a domain only (its training "
            "dominates the budget): its numbers are indicative"
        )
    elif ttt is None:
        found.append("the budget left no time for TTT: it was not evaluated")
    if poc["run"]["budget_used"] > 1.2:
        found.append(
            f"the run took {poc['run']['budget_used'] * 100:.0f} % of its budget: the machine "
            "was slower than measured at the start (another load?)"
        )
    return found


def assemble(run, report_started: float) -> dict:
    """Bring the stages together, write poc.json, the reports, the plots and rollout.yaml."""
    out: Path = run.out
    stored = run.read_stage("plan")
    report = json.loads((out / "eval" / "results.json").read_text())
    serving = run.read_stage("inference")
    engineering = run.read_stage("engineering")
    bank_info = report["banks"]["bank"]
    eval_plan = run.state["eval_plan"]
    stage_seconds = {name: s["seconds"] for name, s in run.state["stages"].items()}
    stage_seconds["report"] = round(time.perf_counter() - report_started, 3)
    wall = sum(stage_seconds.values())
    rollout = write_rollout(out, run.bank_path, engineering["finetune_bytes"] > 0)
    poc = {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": run.config.to_dict(),
        "environment": environment(),
        "corpora": list((bank_info.get("build") or {}).get("config", {}).get("corpora", []))
        or list(run.config.corpora),
        "base_model": bank_info["base_model"],
        "device": bank_info["device"],
        "rates": stored["rates"],
        "facts": stored["facts"],
        "plan": stored["plan"],
        "evaluation": EvalPlan.from_dict(eval_plan).to_dict()
        | {"seconds_left": eval_plan["seconds_left"]},
        "run": {
            "budget_seconds": stored["plan"]["budget_seconds"],
            "wall_seconds": wall,
            "budget_used": wall / stored["plan"]["budget_seconds"],
            "stage_seconds": stage_seconds,
        },
        "quality": quality_section(report),
        "inference": inference_section(
            report, serving, run.config.price_per_hour, run.config.tokens_per_day
        ),
        "engineering": engineering,
        "files": {
            "report_html": "report.html",
            "report_md": "report.md",
            "poc_json": "poc.json",
            "rollout": rollout.name,
            "evaluation": "eval/results.json",
            "bank": str(run.bank_path),
        },
    }
    poc["verdicts"] = {
        domain: domain_verdict(domain, d["methods"])
        for domain, d in poc["quality"]["domains"].items()
    }
    poc["answers"] = answers(poc)
    poc["warnings"] = warnings_for(poc, eval_plan)
    images = {"quality": str(out / "quality.png"), "stages": str(out / "stages.png")}
    plot_quality(poc, images["quality"])
    plot_stages(poc, images["stages"])
    atomic_write_json(out / "poc.json", poc)
    write_reports(poc, out, images)
    return poc
