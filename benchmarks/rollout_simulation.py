"""A simulation of the rollout policy on recorded NLL streams (design notes §8, issue 19).

Requests are documents drawn with replacement from the evaluation's scored documents
(``results/documents.jsonl``) of one bank: control = its fine-tuning adapter, candidate =
TTMM, each document's NLL per token as a request's quality signal. For both modes (canary:
unpaired, each request scored by the arm that served it, IPW with the step's share as its
propensity; shadow: paired differences) it runs thousands of rollouts of:

- **A/A** (candidate = control): canary: both arms draw the fine-tuning NLL of the drawn
  document; shadow: the real paired difference of the drawn document with a random sign (a
  symmetric null with the real spread). The false promotion rate (any promote or complete)
  of the policy's anytime-valid confidence sequence, beside the same policy with the fixed-n
  normal interval checked after every request.
- **gain**: TTMM against fine-tuning as measured (a small gain, about −0.018 nats/token on
  this bank): requests to the first promotion and to the final decision, and how rollouts end.
- **worse**: TTMM made worse by a known amount of nats per token: requests to rollback.

The rollouts run in lockstep with numpy (one array entry per rollout, the policy's rules
written over arrays); ``--check`` rollouts of every run are replayed through
:class:`~ttmm.serve.rollout.policy.RolloutPolicy` itself on the same draws, and the table says
whether every decision and its request agree. Latencies are equal in both arms and nothing
fails, so only quality decides.

    .venv/bin/python benchmarks/rollout_simulation.py [--rollouts 1000] [--bank k16]

Prints a table and writes ``benchmarks/results/rollout_simulation.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import NormalDist

import numpy as np
from rich.console import Console
from rich.table import Table

from ttmm.serve.rollout.config import Guardrails, RolloutConfig
from ttmm.serve.rollout.policy import Observation, RolloutPolicy
from ttmm.serve.rollout.sequential import Interval, mixture_radius, optimal_rho2

HERE = Path(__file__).resolve().parent
RUNNING, COMPLETE, ROLLED_BACK, HELD = 0, 1, 2, 3
ENDS = {COMPLETE: "complete", ROLLED_BACK: "rollback", HELD: "hold", RUNNING: "running"}


@dataclass(frozen=True)
class Streams:
    """Per-token NLL of each scored document under both arms (same documents, same order)."""

    control: np.ndarray  # (docs,)
    candidate: np.ndarray  # (docs,)
    doc_ids: list[str]
    domains: list[str]
    keys: dict[str, str]


def load_streams(results: Path, bank: str) -> Streams:
    """The fine-tuning and TTMM records of ``bank``, keyed as ``results.json`` keys them."""
    report = json.loads((results / "results.json").read_text())
    try:
        keys = report["banks"][bank]["keys"]
        keys = {"finetune": keys["finetune"], "ttmm": keys["ttmm"]}
    except KeyError:
        raise SystemExit(f"bank {bank!r} has no finetune and ttmm records in {results}") from None
    lines = (results / "documents.jsonl").read_text().splitlines()
    by_method: dict[str, dict[str, dict]] = {"finetune": {}, "ttmm": {}}
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        if row["method"] in keys and row["key"] == keys[row["method"]]:
            by_method[row["method"]][row["doc_id"]] = row  # the latest record of a document
    ids = sorted(set(by_method["finetune"]) & set(by_method["ttmm"]))
    if len(ids) < 10:
        raise SystemExit(f"bank {bank!r}: only {len(ids)} documents scored by both methods")

    def per_token(method: str) -> np.ndarray:
        rows = by_method[method]
        return np.array([rows[i]["nll"] / rows[i]["tokens"] for i in ids])

    domains = [by_method["finetune"][i]["domain"] for i in ids]
    return Streams(per_token("finetune"), per_token("ttmm"), ids, domains, keys)


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str
    """canary | shadow"""
    null: bool
    """A/A: the candidate is the control."""
    shift: float = 0.0
    """Nats per token added to the candidate's NLL (a worse candidate)."""

    def draw(self, streams: Streams, idx: np.ndarray, flip: np.ndarray):
        """(control, candidate) per-token NLL of the drawn documents."""
        control = streams.control[idx]
        if not self.null:
            return control, streams.candidate[idx] + self.shift
        if self.mode == "canary":
            return control, control.copy()
        diff = streams.candidate[idx] - control
        return control, control + np.where(flip, -diff, diff)


def radius(n, variance, config: RolloutConfig, anytime: bool):
    """The policy's interval half-width over arrays: :func:`mixture_radius` (anytime) or the
    fixed-n normal interval, as ``confidence_sequence`` computes them."""
    g = config.guardrails
    with np.errstate(divide="ignore", invalid="ignore"):
        if anytime:
            rho2 = optimal_rho2(g.alpha, config.tuning_n)
            scaled = n * variance * rho2 + 1.0
            r = np.sqrt(2.0 * scaled / (n * n * rho2) * np.log(np.sqrt(scaled) / g.alpha))
        else:
            z = NormalDist().inv_cdf(1 - g.alpha / 2)
            r = z * np.sqrt(variance / n)
    return np.where(n < 2, np.inf, r)


@dataclass
class Run:
    """How each rollout of one simulation ended."""

    end: np.ndarray  # (R,) RUNNING, COMPLETE, ROLLED_BACK or HELD
    decided_at: np.ndarray  # (R,) requests at the final decision (-1: none)
    first_promotion: np.ndarray  # (R,) requests at the first promote/complete (-1: none)
    seconds: float
    draws: list[list[tuple[float, float, float]]]  # the first rollouts' requests, to replay


def simulate(
    streams: Streams,
    scenario: Scenario,
    config: RolloutConfig,
    rollouts: int,
    seed: int,
    anytime: bool = True,
    record: int = 0,
) -> Run:
    """``rollouts`` rollouts in lockstep, one request each per iteration, under the rules of
    :class:`RolloutPolicy` (quality only: latencies equal, no errors)."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    g, paired = config.guardrails, config.mode == "shadow"
    shares = np.array([s / 100.0 for s in config.steps])
    last = len(shares) - 1
    R = rollouts
    step = np.zeros(R, dtype=np.int64)
    status = np.full(R, RUNNING)
    qn, qmean, qm2 = np.zeros(R), np.zeros(R), np.zeros(R)  # quality RunningMoments
    bn, bmean = np.zeros(R), np.zeros(R)  # baseline RunningMoments (mean only is read)
    scored = np.zeros(R, dtype=np.int64)  # step_scored
    cand_req, ctrl_req = np.zeros(R, dtype=np.int64), np.zeros(R, dtype=np.int64)
    decided_at, first_promotion = np.full(R, -1), np.full(R, -1)
    draws: list[list[tuple[float, float, float]]] = [[] for _ in range(min(record, R))]
    horizon = len(shares) * config.max_requests
    for i in range(horizon):
        active = status == RUNNING
        if not active.any():
            break
        idx = rng.integers(len(streams.control), size=R)
        u, flip = rng.random(R), rng.random(R) < 0.5
        y_ctrl, y_cand = scenario.draw(streams, idx, flip)
        for j, rows in enumerate(draws):
            if active[j]:
                rows.append((float(y_ctrl[j]), float(y_cand[j]), float(u[j])))
        share = shares[step]
        on_cand = u < share
        served = np.where(on_cand, y_cand, y_ctrl)
        if paired:
            x, add = y_cand - y_ctrl, active
        else:
            baseline = np.where(bn > 0, bmean, served)
            with np.errstate(divide="ignore"):
                weight = np.where(on_cand, 1.0 / share, -1.0 / (1.0 - share))
            x, add = weight * (served - baseline), active & (share > 0) & (share < 1)
            n1 = bn + 1  # baseline.add(nll), for every scored request
            bmean = np.where(active, bmean + (served - bmean) / n1, bmean)
            bn = np.where(active, n1, bn)
        n1 = qn + 1  # quality.add(x): Welford, as RunningMoments.add
        delta = x - qmean
        mean1 = qmean + delta / n1
        qm2 = np.where(add, qm2 + delta * (x - mean1), qm2)
        qmean, qn = np.where(add, mean1, qmean), np.where(add, n1, qn)
        scored += active
        cand_req += active & on_cand
        ctrl_req += active & ~on_cand

        variance = np.where(qn > 1, qm2 / np.maximum(qn - 1, 1), 0.0)
        r = radius(qn, variance, config, anytime)
        r = np.where(qn < g.min_evidence, np.inf, r)  # the policy acts from min_evidence on
        lower, upper = qmean - r, qmean + r
        # _operational_breach: judged once both arms have min_latency_samples in the step
        judged = (
            (share == 0)
            | (share >= 1)
            | ((cand_req >= g.min_latency_samples) & (ctrl_req >= g.min_latency_samples))
        )
        worse = active & (lower > g.max_loss)
        better = active & ~worse & (scored >= config.min_requests) & (upper < -g.min_gain)
        better &= judged
        stuck = active & ~worse & ~better & (scored >= config.max_requests)
        requests = i + 1
        status[worse] = ROLLED_BACK
        first_promotion[better & (first_promotion < 0)] = requests
        completes = better & (step + 1 >= last)
        status[completes] = COMPLETE
        step = np.where(completes, last, np.where(better, step + 1, step))
        scored[better], cand_req[better], ctrl_req[better] = 0, 0, 0
        status[stuck] = ROLLED_BACK if config.on_inconclusive == "rollback" else HELD
        decided_at[worse | completes | stuck] = requests
    return Run(status, decided_at, first_promotion, time.perf_counter() - started, draws)


class FixedNPolicy(RolloutPolicy):
    """The policy with the fixed-n normal interval: what checking it every request does."""

    def interval(self, anytime: bool = True) -> Interval:
        return super().interval(anytime=False)


def replay(config: RolloutConfig, rows, anytime: bool) -> tuple[str, int, int]:
    """(how it ended, requests at the final decision, at the first promotion) of one
    recorded rollout, through the real policy."""
    policy = (RolloutPolicy if anytime else FixedNPolicy)(config)
    decided, first = -1, -1
    for k, (y_ctrl, y_cand, u) in enumerate(rows, start=1):
        share = policy.share
        arm = "candidate" if u < share / 100.0 else "control"
        served, other = (y_cand, y_ctrl) if arm == "candidate" else (y_ctrl, y_cand)
        state = policy.state
        obs = Observation(
            arm, share, state.step, state.rollout_id, nll=served, latency_s=0.1,
            shadow_nll=other if config.mode == "shadow" else None,
        )  # fmt: skip
        decision = policy.observe(obs)
        if decision is not None and decision.action in ("promote", "complete") and first < 0:
            first = k
        if policy.state.status != "running":
            decided = k
            break
    end = {"complete": "complete", "rolled_back": "rollback", "held": "hold"}
    return end.get(policy.state.status, "running"), decided, first


def quantiles(values: np.ndarray) -> dict | None:
    if values.size == 0:
        return None
    q10, q50, q90 = np.quantile(values, [0.1, 0.5, 0.9])
    return {"p10": float(q10), "median": float(q50), "p90": float(q90), "n": int(values.size)}


def summarise(run: Run, check: list[tuple[str, int, int]]) -> dict:
    ends = {name: int((run.end == code).sum()) for code, name in ENDS.items()}
    promoted = run.first_promotion >= 0
    simulated = [
        (ENDS[int(run.end[j])], int(run.decided_at[j]), int(run.first_promotion[j]))
        for j in range(len(check))
    ]
    return {
        "rollouts": int(run.end.size),
        "ends": ends,
        "promoted_rate": float(promoted.mean()),
        "rollback_rate": float((run.end == ROLLED_BACK).mean()),
        "decided_rate": float((promoted | (run.end == ROLLED_BACK)).mean()),
        "requests_to_final_decision": quantiles(run.decided_at[run.decided_at >= 0]),
        "requests_to_first_promotion": quantiles(run.first_promotion[promoted]),
        "requests_to_rollback": quantiles(run.decided_at[run.end == ROLLED_BACK]),
        "policy_check": {
            "replayed": len(check),
            "agree": sum(a == b for a, b in zip(simulated, check)),
        },
        "seconds": round(run.seconds, 2),
    }


def requests_needed(variance: float, gap: float, config: RolloutConfig) -> int | None:
    """Requests at which the confidence sequence's radius, at the population variance,
    falls below ``gap``: roughly when a difference of that size is decided."""
    g = config.guardrails
    for n in np.unique(np.geomspace(2, 10**8, 4000).astype(int)):
        if mixture_radius(int(n), variance, g.alpha, config.tuning_n) < abs(gap):
            return int(n)
    return None


def psi_variance(streams: Streams, share: float) -> float:
    """Variance of the canary's IPW observation at a fixed share, baseline at the mean."""
    y0, y1 = streams.control, streams.candidate
    m = share * y1.mean() + (1 - share) * y0.mean()
    second = ((y1 - m) ** 2).mean() / share + ((y0 - m) ** 2).mean() / (1 - share)
    return float(second - (y1.mean() - y0.mean()) ** 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument("--bank", default="k16", help="the bank of results.json to replay")
    parser.add_argument("--rollouts", type=int, default=1000, help="rollouts per simulation")
    parser.add_argument("--min-requests", type=int, default=200)
    parser.add_argument("--max-requests", type=int, default=4000, help="per step, then hold")
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--tuning-requests", type=int, default=Guardrails().tuning_requests)
    parser.add_argument("--worse", type=float, nargs="+", default=[0.05, 0.5], help="nats/token")
    parser.add_argument("--check", type=int, default=10, help="rollouts replayed per run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "rollout_simulation.json")
    args = parser.parse_args(argv)
    if args.rollouts < 1:
        parser.error("--rollouts must be at least 1")
    streams = load_streams(args.results, args.bank)
    diff = streams.candidate - streams.control
    guardrails = Guardrails(alpha=args.alpha, tuning_requests=args.tuning_requests)
    common = {
        "candidate": {"bank": args.bank},
        "control": {"kind": "finetune"},
        "min_requests": args.min_requests,
        "max_requests": args.max_requests,
        "on_inconclusive": "hold",
    }
    configs = {
        "canary": RolloutConfig.from_dict(common | {"mode": "canary", "steps": [5, 25, 50, 100]}),
        "shadow": RolloutConfig.from_dict(common | {"mode": "shadow", "steps": [0, 25, 50, 100]}),
    }
    configs = {mode: replace(c, guardrails=guardrails) for mode, c in configs.items()}
    scenarios = []
    for mode in ("canary", "shadow"):
        scenarios.append((Scenario("A/A", mode, null=True), mode, (True, False)))
        scenarios.append((Scenario("gain (TTMM)", mode, null=False), mode, (True,)))
        for shift in args.worse:
            scenarios.append((Scenario(f"TTMM + {shift:g}", mode, False, shift), mode, (True,)))
    runs, replayed, replay_seconds, started = [], 0, 0.0, time.perf_counter()
    for n, (scenario, name, rules) in enumerate(scenarios):
        config = configs[name]
        for anytime in rules:
            seed = args.seed * 1000 + n  # the same draws for both rules of a scenario
            run = simulate(streams, scenario, config, args.rollouts, seed, anytime, args.check)
            replay_started = time.perf_counter()
            check = [replay(config, rows, anytime) for rows in run.draws]
            replay_seconds += time.perf_counter() - replay_started
            replayed += sum(len(rows) for rows in run.draws)
            truth = 0.0 if scenario.null else float(diff.mean() + scenario.shift)
            runs.append(
                {
                    "scenario": scenario.name,
                    "mode": scenario.mode,
                    "config": name,
                    "tuning_requests": config.guardrails.tuning_requests,
                    "tuning_n": config.tuning_n,
                    "interval": "anytime" if anytime else "fixed-n, every request",
                    "true_difference": truth,
                    "seed": seed,
                }
                | summarise(run, check)
            )
    shares = {f"canary {s:g} %": psi_variance(streams, s / 100) for s in (5, 25, 50)}
    variances = shares | {"shadow": float(diff.var())}
    needed = {
        name: {
            "variance": v,
            "requests_for_gain": requests_needed(v, diff.mean(), configs["shadow"]),
            **{
                f"requests_for_+{s:g}": requests_needed(v, diff.mean() + s, configs["shadow"])
                for s in args.worse
            },
        }
        for name, v in variances.items()
    }
    show(runs, needed)
    payload = {
        "benchmark": "rollout_simulation",
        "command": " ".join(
            ["benchmarks/rollout_simulation.py", *(sys.argv[1:] if argv is None else argv)]
        ),
        "machine": {"platform": platform.platform(), "numpy": np.__version__},
        "data": {
            "bank": args.bank,
            "keys": streams.keys,
            "why": f"results.json banks.{args.bank}.keys: the {args.bank} bank's finetune "
            "records (control) and ttmm records (candidate, the default rule, merged)",
            "documents": len(streams.doc_ids),
            "domains": {d: streams.domains.count(d) for d in sorted(set(streams.domains))},
            "signal": "NLL per token (nll / tokens) of a document, one document per request",
            "control_mean": float(streams.control.mean()),
            "candidate_mean": float(streams.candidate.mean()),
            "paired_difference": {"mean": float(diff.mean()), "sd": float(diff.std(ddof=1))},
        },
        "configs": {mode: c.to_dict() for mode, c in configs.items()},
        "rollouts": args.rollouts,
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 1),
        "policy_observe_us": round(1e6 * replay_seconds / max(replayed, 1), 1),
        "runs": runs,
        "requests_needed": needed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    return 0


def show(runs: list[dict], needed: dict) -> None:
    def fmt(q: dict | None) -> str:
        return "–" if q is None else f"{q['median']:.0f} [{q['p10']:.0f}, {q['p90']:.0f}]"

    table = Table(
        title="rollouts on recorded NLL streams: how they end, requests median \\[p10, p90]"
    )
    columns = ("config", "scenario", "interval", "Δ nats/tok", "promoted", "complete", "rollback")
    for column in (*columns, "hold", "to 1st promotion", "to decision", "to rollback", "replay"):
        table.add_column(column, justify="right")
    for r in runs:
        n, ends = r["rollouts"], r["ends"]
        table.add_row(
            r["config"], r["scenario"], r["interval"], f"{r['true_difference']:+.4f}",
            f"{r['promoted_rate']:.1%}", f"{ends['complete'] / n:.1%}",
            f"{ends['rollback'] / n:.1%}", f"{ends['hold'] / n:.1%}",
            fmt(r["requests_to_first_promotion"]), fmt(r["requests_to_final_decision"]),
            fmt(r["requests_to_rollback"]),
            f"{r['policy_check']['agree']}/{r['policy_check']['replayed']}",
        )  # fmt: skip
    console = Console()
    console.print(table)
    table = Table(title="requests until the sequence's radius (population variance) < |Δ|")
    for column in ("observation", "sd", *next(iter(needed.values())).keys()):
        table.add_column(column.replace("requests_for_", "Δ "), justify="right")
    for name, row in needed.items():
        cells = [f"{v:,}" if isinstance(v, int) else "–" for k, v in row.items() if k != "variance"]
        table.add_row(name, f"{math.sqrt(row['variance']):.3f}", f"{row['variance']:.4f}", *cells)
    console.print(table)


if __name__ == "__main__":
    raise SystemExit(main())
