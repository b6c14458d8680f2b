"""How a PoC fits its time budget: rates measured on this machine, then a plan from them.

:func:`measure_rates` times, on the base model as the build and the evaluation will run it,
one short LoRA training run (tokens/s), one scoring forward (tokens/s), a greedy decode
(seconds/token) and the encoder (seconds/chunk). :func:`plan_run` (pure, tested on made-up
rates) then shares the budget left after the fixed costs (loading models, embedding, the
inference measurement, the report):

    seconds(eval)   = docs · domains · Σ_methods (tokens_doc / R_score + merge overhead)
                    + ttt_docs · domains · (neighbours · window / R_train + tokens_doc / R_score)
    seconds(timing) = prompts · domains · methods · (new_tokens · s_token + overhead)
    seconds(train)  = 2 · B / R_train                 (the experts and the fine-tuning baseline
                                                       each train on B tokens)

Evaluation and timing get up to :data:`EVAL_SHARE` of what is left, training the rest (and
whatever the evaluation cannot use because the corpus holds fewer held-out documents); K is
the number of experts that gives each about :data:`TOKENS_PER_EXPERT` tokens. The evaluation
is planned again from the time actually left once the build is done (:func:`plan_evaluation`),
so a build that ran slower than predicted shortens the evaluation, not the deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields, replace

import torch

from ttmm.poc.config import PocError
from ttmm.poc.inference import BATCH, BATCH_METHODS, BATCH_TOKENS, REPEATS
from ttmm.routing import PREFIX_TOKENS

EVAL_SHARE = 0.45
"""Most of the budget (after fixed costs) that evaluation and timing take."""
TTT_SHARE = 0.3
"""Most of the evaluation's time that TTT takes (it costs ~10 cheap methods a document)."""
TOKENS_PER_EXPERT = 4096
"""Training tokens each expert should get when the plan chooses K (16 chunks of 256)."""
MIN_EXPERT_TOKENS = 256
"""Fewer training tokens than this per expert is no expert: the budget is too small."""
MAX_EXPERTS = 64
"""Largest K the plan chooses (larger banks are issue 21's)."""
MAX_EPOCHS = 2
"""Training past this many passes over the data buys nothing; the budget is capped there."""
MERGE_OVERHEAD_SECONDS = 0.15
"""Routing + merge + restore of one scored document (measured: 0.1-0.3 s for 1-10 experts)."""
MIN_EVAL_DOCS = 2
"""Fewer held-out documents a domain than this leaves no interval at all."""
CHEAP_METHODS = ("base", "finetune", "top1", "top3", "top10", "ttmm")
"""Methods scored on every evaluated document (one forward each)."""
TIMED_METHODS = CHEAP_METHODS
"""Methods timed generating ``new_tokens``; TTT's cost comes from its scoring runs (its
adaptation time is measured there; timing it again would train it twice more)."""
TTT_NEIGHBOURS = (20, 10, 5)
"""Neighbours TTT-NN retrieves: Hardt & Sun's 20 when the budget allows, else fewer."""
NEW_TOKENS = 100
"""Tokens generated per timed prompt (the protocol's seconds per 100 tokens)."""
VALIDATION_FRACTION = 0.05
"""``BuildConfig.validation_fraction``: the share of training documents kept to validate."""
REPORT_SECONDS = 10.0
"""Writing poc.json, the plots and both reports."""
SAFETY = 0.9
"""Share of the budget the plan fills: the rest absorbs the noise of a shared machine."""


@dataclass(frozen=True)
class Rates:
    """What this machine does per second with this model (measured by :func:`measure_rates`)."""

    train_tokens_per_second: float
    """LoRA training, the build's recipe."""
    score_tokens_per_second: float
    """A no-gradient forward over a long document (scoring)."""
    decode_seconds_per_token: float
    """Greedy decoding of one token from a short prompt."""
    embed_seconds_per_chunk: float
    """The encoder on one training chunk."""
    load_seconds: float
    """Loading the base model and the encoder once."""

    def to_dict(self) -> dict:
        return {k: round(v, 6) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Rates:
        return cls(**data)


@dataclass(frozen=True)
class CorpusFacts:
    """What the plan needs to know of the corpus before the build (or of the bank)."""

    domains: tuple[str, ...]
    documents: dict[str, int]
    """Documents a domain."""
    held_out: dict[str, int]
    """Held-out documents a domain usable for scoring (long enough), at ``test_fraction``."""
    train_chunks: int
    train_tokens: int
    window: int
    test_fraction: float
    """Share of documents held out (chosen so that every domain can give ``max_docs``)."""
    doc_tokens: float
    """Mean tokens read of a held-out document (capped at the evaluation's 512)."""

    def to_dict(self) -> dict:
        return asdict(self) | {"domains": list(self.domains)}

    @classmethod
    def from_dict(cls, data: dict) -> CorpusFacts:
        return cls(**(data | {"domains": tuple(data["domains"])}))


@dataclass(frozen=True)
class EvalPlan:
    """How much the evaluation measures."""

    docs: int
    """Held-out documents scored per domain by the cheap methods (a domain holding fewer
    scores all it has)."""
    ttt_docs: int
    """Of those, scored by TTT (0: no TTT)."""
    neighbours: int
    """TTT's retrieved training chunks (one gradient step each)."""
    timing_prompts: int
    """Prompts a domain every timed method generates ``new_tokens`` from."""
    new_tokens: int
    seconds: float
    """Predicted seconds of the evaluation and the timing together."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> EvalPlan:
        """From :meth:`to_dict`'s keys; others beside them (notes) are left out."""
        return cls(**{f.name: data[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Plan:
    """What the run will build and measure, with the reasons."""

    budget_seconds: float
    fixed_seconds: float
    """Loading, embedding, clustering, the inference measurement and the report."""
    experts: int
    budget_tokens: int
    """Training tokens of all experts together (the fine-tuning baseline trains as many)."""
    train_seconds: float
    test_fraction: float
    evaluation: EvalPlan
    reasons: tuple[str, ...]
    shared_seconds: float = 0.0
    """What was left to share between training and evaluation after the fixed costs."""
    tokens_per_expert: int = TOKENS_PER_EXPERT
    max_experts: int = MAX_EXPERTS

    def to_dict(self) -> dict:
        return asdict(self) | {
            "evaluation": self.evaluation.to_dict(),
            "reasons": list(self.reasons),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(
            **(
                data
                | {
                    "evaluation": EvalPlan.from_dict(data["evaluation"]),
                    "reasons": tuple(data["reasons"]),
                }
            )
        )


def fixed_seconds(rates: Rates, facts: CorpusFacts, build: bool = True) -> float:
    """Costs that do not depend on the plan: loading the model and the encoder again (for the
    build, then for the inference measurement), the build's embedding of the chunks and its
    validation losses (when it builds), clustering, the inference measurement and the report."""
    if not build:
        return rates.load_seconds + 5.0 + inference_seconds(rates)
    return (
        2 * rates.load_seconds
        + facts.train_chunks * rates.embed_seconds_per_chunk
        + validation_seconds(rates, facts)
        + 5.0
        + inference_seconds(rates)
    )


def validation_seconds(rates: Rates, facts: CorpusFacts) -> float:
    """The build's validation losses: every adapter scores its validation chunks before and
    after training, and the experts' chunks together are all of them, as are the fine-tuning
    baseline's (4 forwards a validation chunk)."""
    chunks = VALIDATION_FRACTION * facts.train_chunks
    return 4 * chunks * facts.window / rates.score_tokens_per_second


def inference_seconds(rates: Rates) -> float:
    """The inference measurement (a fresh process loads the engine, then 3 methods generate a
    batch of 8 prompts, 32 tokens each, twice) and writing the report."""
    batch = (
        BATCH_TOKENS * rates.decode_seconds_per_token * 1.5  # a batch's step: 1.5 × a token's
        + BATCH * PREFIX_TOKENS / rates.score_tokens_per_second
    )
    return rates.load_seconds + len(BATCH_METHODS) * REPEATS * batch + REPORT_SECONDS


def seconds_per_doc(rates: Rates, doc_tokens: float) -> float:
    """Every cheap method on one held-out document."""
    forward = doc_tokens / rates.score_tokens_per_second
    return len(CHEAP_METHODS) * forward + (len(CHEAP_METHODS) - 2) * MERGE_OVERHEAD_SECONDS


def ttt_seconds_per_doc(rates: Rates, doc_tokens: float, neighbours: int, window: int) -> float:
    """TTT-NN on one document: a gradient step per neighbour, then the scoring forward."""
    return (
        neighbours * window / rates.train_tokens_per_second
        + doc_tokens / rates.score_tokens_per_second
    )


def timing_seconds(
    rates: Rates, prompts: int, domains: int = 1, new_tokens: int = NEW_TOKENS
) -> float:
    """Every timed method generating ``new_tokens`` from ``prompts`` prompts a domain."""
    per_run = new_tokens * rates.decode_seconds_per_token + MERGE_OVERHEAD_SECONDS
    return prompts * domains * len(TIMED_METHODS) * per_run


def eval_documents(facts: CorpusFacts, docs: int) -> int:
    """Documents scored over all domains when each scores up to ``docs``."""
    return sum(min(docs, n) for n in facts.held_out.values())


def plan_evaluation(rates: Rates, facts: CorpusFacts, seconds: float, max_docs: int) -> EvalPlan:
    """The most the evaluation can measure in ``seconds``: timing first (3 prompts a domain
    when they take under 15 % of it, else 2, else 1), TTT on a few documents a domain (with
    the most neighbours that let it score 2), then as many documents a domain as fit for
    every other method."""
    n_domains = max(1, len(facts.domains))
    usable = min(max(facts.held_out.values(), default=0), max_docs)
    timing = {n: timing_seconds(rates, n, n_domains) for n in (1, 2, 3)}
    prompts = 0 if usable <= 0 else next((n for n in (3, 2) if timing[n] < 0.15 * seconds), 1)
    left = max(0.0, seconds - timing.get(prompts, 0.0))
    per_doc = seconds_per_doc(rates, facts.doc_tokens)
    ttt_docs, neighbours = 0, TTT_NEIGHBOURS[-1]
    for n in TTT_NEIGHBOURS:
        per_ttt = ttt_seconds_per_doc(rates, facts.doc_tokens, n, facts.window)
        fit = min(10, int(TTT_SHARE * left / (n_domains * per_ttt)))
        if fit >= 2 or n == TTT_NEIGHBOURS[-1]:
            ttt_docs, neighbours = fit, n
            break
    ttt_cost = ttt_seconds_per_doc(rates, facts.doc_tokens, neighbours, facts.window)
    docs = 0
    while docs < usable:
        ttt = eval_documents(facts, min(ttt_docs, docs + 1)) * ttt_cost
        if eval_documents(facts, docs + 1) * per_doc + ttt > left:
            break
        docs += 1
    ttt_docs = min(ttt_docs, docs)
    predicted = (
        timing.get(prompts, 0.0)
        + eval_documents(facts, docs) * per_doc
        + eval_documents(facts, ttt_docs) * ttt_cost
    )
    return EvalPlan(docs, ttt_docs, neighbours, prompts, NEW_TOKENS, round(predicted, 1))


def _minutes(seconds: float) -> int:
    """Whole minutes of a budget whose planned share (SAFETY) covers ``seconds``."""
    return math.ceil(seconds / SAFETY / 60)


def plan_run(
    rates: Rates,
    facts: CorpusFacts,
    budget_minutes: float,
    elapsed_seconds: float = 0.0,
    experts: int | None = None,
    max_docs: int = 60,
    build: bool = True,
) -> Plan:
    """Share ``budget_minutes`` (of which ``elapsed_seconds`` are already spent measuring)
    between the build and the evaluation. Raises :class:`PocError` when no expert fits."""
    budget = budget_minutes * 60.0
    fixed = round(fixed_seconds(rates, facts, build), 1)
    free = round(SAFETY * budget - elapsed_seconds - fixed, 1)
    reasons = [
        f"measured: {rates.train_tokens_per_second:.0f} training tokens/s, "
        f"{rates.score_tokens_per_second:.0f} scored tokens/s, "
        f"{rates.decode_seconds_per_token * 1000:.0f} ms a generated token, "
        f"{rates.load_seconds:.0f} s to load the models",
        f"fixed costs (loading {3 if build else 2} times, embedding, the inference measurement, "
        f"the report): {fixed:.0f} s; {max(free, 0):.0f} s left to share",
    ]
    if free <= 0:
        raise PocError(
            f"a {budget_minutes:g}-minute budget does not cover the fixed costs on this machine "
            f"({elapsed_seconds + fixed:.0f} s: loading the models, embedding the corpus, "
            f"timing); give --budget-minutes {_minutes(elapsed_seconds + fixed) + 2} or more"
        )
    if not build:
        reasons.append(f"evaluating the given bank: the whole {free:.0f} s go to the evaluation")
        evaluation = plan_evaluation(rates, facts, free, max_docs)
        return Plan(
            round(budget, 1),
            fixed,
            experts or 0,
            0,
            0.0,
            facts.test_fraction,
            evaluation,
            tuple(reasons),
            shared_seconds=free,
        )
    evaluation = plan_evaluation(rates, facts, EVAL_SHARE * free, max_docs)
    # the evaluation is planned again from the time left after the build; training keeps at
    # least its share even where one timed prompt a domain alone overruns the evaluation's
    train_seconds = round(max(free - evaluation.seconds, (1 - EVAL_SHARE) * free), 1)
    data_cap = MAX_EPOCHS * facts.train_tokens
    budget_tokens = int(train_seconds * rates.train_tokens_per_second / 2)
    if budget_tokens > data_cap:
        reasons.append(
            f"training capped at {MAX_EPOCHS} passes over the corpus's {facts.train_tokens} "
            "training tokens; the run will end early"
        )
        budget_tokens = data_cap
        train_seconds = round(2 * budget_tokens / rates.train_tokens_per_second, 1)
    if experts is None:
        experts = max(
            2, min(MAX_EXPERTS, facts.train_chunks // 4, budget_tokens // TOKENS_PER_EXPERT)
        )
        reasons.append(
            f"K = {experts}: about {TOKENS_PER_EXPERT} training tokens an expert "
            f"({budget_tokens} tokens, {facts.train_chunks} training chunks; 2 to {MAX_EXPERTS})"
        )
    if budget_tokens < experts * MIN_EXPERT_TOKENS:
        train = experts * MIN_EXPERT_TOKENS * 2 / rates.train_tokens_per_second
        needed = elapsed_seconds + fixed + evaluation.seconds + train
        raise PocError(
            f"a {budget_minutes:g}-minute budget leaves {budget_tokens} training tokens, fewer "
            f"than {MIN_EXPERT_TOKENS} for each of {experts} experts; give --budget-minutes "
            f"{_minutes(needed) + 1} or more (or fewer --experts)"
        )
    reasons.append(
        f"training: {budget_tokens} tokens for the experts and as many for the fine-tuning "
        f"baseline, {train_seconds / 60:.1f} min"
    )
    reasons.append(
        f"evaluation: {evaluation.docs} held-out documents a domain for every method, TTT "
        f"({evaluation.neighbours} neighbours) on {evaluation.ttt_docs} of them, "
        f"{evaluation.timing_prompts} timed prompt(s) a domain of {evaluation.new_tokens} tokens: "
        f"{evaluation.seconds / 60:.1f} min predicted (planned again after the build)"
    )
    return Plan(
        budget_seconds=round(budget, 1),
        fixed_seconds=fixed,
        experts=int(experts),
        budget_tokens=int(budget_tokens),
        train_seconds=round(train_seconds, 1),
        test_fraction=facts.test_fraction,
        evaluation=evaluation,
        reasons=tuple(reasons),
        shared_seconds=free,
    )


def choose_test_fraction(documents: dict[str, int], max_docs: int) -> float:
    """Hold out enough documents that the smallest domain can give ``max_docs`` (with a
    quarter more for the ones too short to score), between 10 % and 25 %."""
    smallest = min(documents.values(), default=0)
    if smallest <= 0:
        return 0.15
    return round(min(0.25, max(0.10, 1.25 * max_docs / smallest)), 3)


def measure_rates(
    model, tokenizer, encoder, texts: list[str], train_config, load_seconds: float
) -> Rates:
    """Time the four rates on ``texts`` (training chunks spread over the corpus: short and long
    ones) with this model."""
    from ttmm.build.train import train_lora
    from ttmm.device import model_device, synchronize
    from ttmm.generation import GREEDY, decode

    device = model_device(model)
    window = train_config.max_seq_len
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"][:window] for t in texts]
    ids = [row for row in ids if len(row) >= 2]
    if not ids:
        raise PocError("the corpus gives no text to measure this machine's speed on")
    once = replace(train_config, epochs=1, max_tokens=None)
    train_lora(model, ids[:1], once)  # warm-up: the first steps allocate and are slow
    train_rate = train_lora(model, ids[1:4] or ids[:1], once).tokens_per_second

    long_ids = [t for row in ids for t in row][:512]
    batch = torch.tensor([long_ids], device=device)
    with torch.no_grad():
        model(batch[:, :64])  # warm-up
        synchronize(device)
        started = time.perf_counter()
        model(batch)
        synchronize(device)
    score_rate = batch.shape[1] / max(time.perf_counter() - started, 1e-6)

    prompt = {"input_ids": batch[:, :50], "attention_mask": torch.ones_like(batch[:, :50])}
    steps = 16
    decode(model, tokenizer, prompt, 2, GREEDY, min_new_tokens=2)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    decode(model, tokenizer, prompt, steps, GREEDY, min_new_tokens=steps)
    synchronize(device)
    decode_rate = (time.perf_counter() - started) / steps

    started = time.perf_counter()
    encoder.encode(texts[:16])
    embed_rate = (time.perf_counter() - started) / len(texts[:16])
    return Rates(train_rate, score_rate, decode_rate, embed_rate, load_seconds)
