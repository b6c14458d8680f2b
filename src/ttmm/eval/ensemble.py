"""Ensembling experts: mix next-token probabilities, p = Σ_k w_k p_k (design notes §2, baselines).

The paper's comparison point for merging: the same experts with the same weights as a merge
plan, but each run as its own model (one forward per expert, so n times the cost of a merge)
and their predictive distributions mixed. The mixture is computed in log space,
log p = logsumexp_k(log w_k + log p_k), and returned as normalised log-probabilities; feeding
them to :func:`ttmm.model.continuation_nll` (which applies ``log_softmax``, the identity on
normalised log-probabilities) scores exactly like a single model. An ensemble of one expert is
the merge of that one expert.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ttmm.model import TTMM, InputError, Score, continuation_nll, right_pad
from ttmm.routing import RoutingPlan


def members(plan: RoutingPlan) -> list[tuple[RoutingPlan, float]]:
    """The single-expert plans of an ensemble and their normalised weights w_k / Σ_j w_j."""
    if plan.is_base:
        return [(RoutingPlan.base(), 1.0)]
    total = sum(plan.weights)
    if not total > 0:
        raise InputError(f"ensemble weights must sum to a positive number, got {plan.weights}")
    return [
        (RoutingPlan.explicit({k: 1.0}), w / total)
        for k, w in zip(plan.expert_ids, plan.weights)
        if w > 0
    ]


def mixture_log_probs(per_member: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """log Σ_k w_k softmax(logits_k) over the last axis; inputs (…, V) logits, same shape out."""
    stacked = torch.stack(
        [
            torch.log_softmax(logits.float(), dim=-1) + math.log(w)
            for logits, w in zip(per_member, weights)
        ]
    )  # (n, …, V)
    return torch.logsumexp(stacked, dim=0)


@torch.no_grad()
def ensemble_score(
    engine: TTMM,
    texts: Sequence[str],
    plans: Sequence[RoutingPlan] | None = None,
    prefix_tokens: int = 50,
    max_tokens: int = 1024,
) -> list[Score]:
    """NLL of each text's continuation under the ensemble of its plan's experts.

    Routing (when ``plans`` is None) uses the engine's rule on the first ``prefix_tokens``
    tokens; those tokens are not scored, as in :meth:`TTMM.score`. Texts run one at a time,
    experts one forward each (folded into the weights, then restored).
    """
    texts = list(texts)
    if plans is None:
        plans = engine.route(texts, engine.routing.replace(prefix_tokens=prefix_tokens))
    if len(plans) != len(texts):
        raise InputError(f"got {len(plans)} plans for {len(texts)} texts; give one per text")
    results = []
    for text, plan in zip(texts, plans):
        ids = engine.tokenizer([text], add_special_tokens=False)["input_ids"][0][:max_tokens]
        if len(ids) <= prefix_tokens:
            raise InputError(
                f"a text has {len(ids)} tokens, at most prefix_tokens={prefix_tokens}: "
                "nothing is left to score"
            )
        input_ids, attention = right_pad([ids], engine.tokenizer.pad_token_id, engine.device)
        parts = members(plan)
        logits = []
        for member, _ in parts:
            with engine.merged([member]):
                logits.append(engine.model(input_ids=input_ids, attention_mask=attention).logits)
        mixed = mixture_log_probs(logits, [w for _, w in parts])  # (1, s, V)
        ((nll, n),) = continuation_nll(mixed, input_ids, attention, prefix_tokens)
        results.append(Score(nll=nll, n_tokens=n, plan=plan))
    return results


@torch.no_grad()
def ensemble_generate(
    engine: TTMM,
    prompt: str,
    plan: RoutingPlan | None = None,
    max_new_tokens: int = 100,
    stop: bool = True,
) -> str:
    """Greedy continuation of one prompt from the ensemble of ``plan``'s experts.

    The n members run as the n rows of one batch in low-rank mode (each row its own expert),
    with a shared KV-cache loop: each step is one batched forward, the mixture picks the token.
    ``stop=False`` ignores end of sequence and always generates ``max_new_tokens`` (timing).
    """
    if plan is None:
        plan = engine.route([prompt])[0]
    parts = members(plan)
    device = engine.device
    log_w = torch.tensor([math.log(w) for _, w in parts], device=device).unsqueeze(-1)  # (n, 1)
    ids = torch.tensor(
        [engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=device
    )
    batch = ids.repeat(len(parts), 1)  # (n, s)
    eos = engine.tokenizer.eos_token_id
    new: list[int] = []
    mode = "auto" if len(parts) == 1 else "lowrank"
    with engine.merged([member for member, _ in parts], mode=mode):
        output = engine.model(input_ids=batch, use_cache=True)
        for _ in range(max_new_tokens):
            step = torch.log_softmax(output.logits[:, -1].float(), dim=-1) + log_w  # (n, V)
            token = int(torch.logsumexp(step, dim=0).argmax())
            if stop and token == eos:
                break
            new.append(token)
            output = engine.model(
                input_ids=torch.full((len(parts), 1), token, dtype=torch.long, device=device),
                past_key_values=output.past_key_values,
                use_cache=True,
            )
    return engine.tokenizer.decode(new, skip_special_tokens=True)


__all__ = ["members", "mixture_log_probs", "ensemble_score", "ensemble_generate"]
