"""Which method a domain should use, read off the paired intervals (no interval, no claim).

TTMM here is the bank's default routing rule (``ttmm``), the one a server runs. Its
perplexity is compared with fine-tuning's and the base model's on the same documents (paired
95 % intervals of ppl / ppl_ref − 1, :mod:`ttmm.eval.intervals`):

- TTMM below both, intervals under zero: **adopt TTMM**;
- TTMM above fine-tuning, interval over zero: **do not adopt TTMM**: fine-tuning if it beats
  the base model, else the base model;
- otherwise TTMM and fine-tuning cannot be told apart on these documents: **fine-tuning for
  now** (simpler and no slower), with the staged rollout in shadow mode to decide on traffic;
  and if neither beats the base model, the base model.

Fewer than :data:`MIN_VERDICT_DOCS` documents give no verdict at all.
"""

from __future__ import annotations

MIN_VERDICT_DOCS = 5
"""Documents a domain needs before its interval decides anything."""
NARROW_DOCS = 20
"""Below this many documents the report warns that the intervals are wide."""


def _below(c: dict | None) -> bool:
    return c is not None and c["rel_ci_high"] < 0


def _above(c: dict | None) -> bool:
    return c is not None and c["rel_ci_low"] > 0


def domain_verdict(domain: str, methods: dict[str, dict]) -> dict:
    """The verdict of one domain from its rows (method -> the evaluation's result row)."""
    ttmm = methods.get("ttmm")
    n = ttmm["n_docs"] if ttmm else 0
    vs_finetune = ttmm["comparisons"].get("finetune") if ttmm else None
    vs_base = ttmm["comparisons"].get("base") if ttmm else None
    finetune = methods.get("finetune")
    finetune_vs_base = finetune["comparisons"].get("base") if finetune else None
    verdict = {"domain": domain, "n_docs": n, "pick": None, "adopt_ttmm": None, "warnings": []}
    if ttmm is None or vs_finetune is None or vs_base is None:
        verdict["reason"] = "no verdict: TTMM, fine-tuning and the base model were not all scored"
        return verdict
    if n < MIN_VERDICT_DOCS:
        verdict["reason"] = (
            f"no verdict: {n} held-out document(s), fewer than {MIN_VERDICT_DOCS}; "
            "add documents of this domain"
        )
        verdict["warnings"].append(verdict["reason"])
        return verdict
    if n < NARROW_DOCS:
        verdict["warnings"].append(
            f"{n} documents only: the intervals are wide and a small difference cannot show"
        )
    if _below(vs_finetune) and _below(vs_base):
        verdict |= {
            "pick": "ttmm",
            "adopt_ttmm": True,
            "reason": "adopt TTMM: its perplexity is below fine-tuning's and the base model's, "
            "with both intervals under zero",
        }
    elif _above(vs_finetune):
        fallback = "finetune" if _below(finetune_vs_base) else "base"
        verdict |= {
            "pick": fallback,
            "adopt_ttmm": False,
            "reason": "do not adopt TTMM: its perplexity is above fine-tuning's, interval over "
            "zero; "
            + (
                "keep fine-tuning"
                if fallback == "finetune"
                else "fine-tuning does not beat the base model either: keep the base model"
            ),
        }
    elif _below(vs_base) or _below(finetune_vs_base):
        verdict |= {
            "pick": "finetune",
            "reason": "undecided: TTMM and fine-tuning cannot be told apart on these documents; "
            "fine-tuning is simpler and costs no more, so use it for now and let a staged "
            "rollout in shadow mode decide on live traffic",
        }
    else:
        verdict |= {
            "pick": "base",
            "adopt_ttmm": False,
            "reason": "do not adopt: neither TTMM nor fine-tuning beats the base model here",
        }
    return verdict
