"""The merged model users call: a base model, an encoder and a bank (design notes §2, test time).

Every prompt of a batch is routed on its own first P tokens and may get its own merge.
``generate`` and ``score`` return the routing with the output. One lock serialises calls
on the shared model, so concurrent threads never see each other's merges; a batch whose
rows share one merge folds it into the weights (fastest decoding), a batch of different
merges runs in low-rank mode.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ttmm.adapter import LoraAdapter
from ttmm.assets import load_base_model
from ttmm.bank import Bank
from ttmm.centroid_index import CentroidIndex
from ttmm.cost import Workload, choose_mode, measured_costs
from ttmm.device import (
    DEFAULT_DEVICE,
    model_device,
    resolve_device,
    resolve_dtype,
    resolve_lora_dtype,
)
from ttmm.embed import Encoder
from ttmm.expert_cache import MB, CacheBudgetError
from ttmm.expert_source import ExpertSource
from ttmm.generation import (
    Sampling,
    TokenLogprobs,
    continuation_nll,
    cut_at_eos,
    decode,
    prefill_scored,
)
from ttmm.merge import ExpertMerger, MergeError
from ttmm.routing import PREFIX_TOKENS, RoutingConfig, RoutingPlan, route_enabled, route_nearest

logger = logging.getLogger(__name__)

MODES = ("auto", "fold", "lowrank")


class InputError(ValueError):
    """A prompt, text or option that cannot be used, with what to do instead."""


@dataclass(frozen=True)
class Generation:
    text: str
    plan: RoutingPlan
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length"
    token_ids: tuple[int, ...] = ()
    logprobs: TokenLogprobs | None = None  # this row's, cut to its tokens, when asked for
    prompt_nll: tuple[float, int] | None = None
    """(total NLL, scored tokens) of the prompt after the routing prefix, when asked for."""
    prompt_ids: tuple[int, ...] = ()
    """The prompt's tokens, when its log-probabilities were asked for."""
    prompt_logprobs: TokenLogprobs | None = None
    """Log-probabilities of ``prompt_ids[1:]`` (the first has no context), when asked for."""


@dataclass(frozen=True)
class Score:
    nll: float
    """Total negative log-likelihood (nats) of the scored tokens."""
    n_tokens: int
    """Tokens scored: those after the routing prefix."""
    plan: RoutingPlan

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.n_tokens) if self.n_tokens else float("nan")


class TTMM:
    """Test-time model merging over a base model, a sentence encoder and an expert bank."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        encoder: Encoder,
        bank: Bank,
        routing: RoutingConfig | None = None,
        memory: str = "auto",
        lora_dtype: str | torch.dtype | None = "auto",
        extra_adapters: Sequence[LoraAdapter] | ExpertSource = (),
        adapter_cache_mb: float | None = None,
    ):
        """``memory`` is the fold's memory policy: ``"buffer"``, ``"swap"`` or ``"auto"``
        (see :mod:`ttmm.fold`); ``lora_dtype`` the dtype the experts' factors are kept and
        multiplied in, ``"auto"`` for the base model's (see :mod:`ttmm.merge`).
        ``extra_adapters`` join the merger after the bank's K experts, as ids K, K + 1, ...:
        adapters that explicit plans may apply beside the bank's (a rollout's control arm),
        so that rows of both run in one batch over the one model; held in memory, or an
        :class:`~ttmm.expert_source.ExpertSource` (another bank's experts, read through the
        same cache).
        ``adapter_cache_mb`` bounds the experts held in memory (:mod:`ttmm.expert_cache`):
        the others stay on disk until a merge uses them. None reads and holds every expert
        now; a budget smaller than the routing's largest merge is refused with the smallest
        that works."""
        bank.check_compatible(model, encoder.dim)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.encoder = encoder
        self.bank = bank
        self.routing = routing or bank.routing
        self.index = CentroidIndex(bank.centroids)
        """The centroids, searched by product or (``top_n`` over many experts) by faiss."""
        cache_bytes = _cache_bytes(adapter_cache_mb)
        self.merger = ExpertMerger(
            model,
            ExpertSource.concat(ExpertSource.from_bank(bank), ExpertSource.of(extra_adapters)),
            memory=memory,
            lora_dtype=resolve_lora_dtype(lora_dtype),
            cache_bytes=cache_bytes,
        )
        if cache_bytes is not None:
            needed = self.merger.smallest_cache_bytes(self.routing.max_active)
            if needed > cache_bytes:
                raise CacheBudgetError(
                    f"--adapter-cache-mb {adapter_cache_mb:g} cannot hold one merge: routing "
                    f"merges up to {self.routing.max_active} experts, "
                    f"{needed / MB:.1f} MB laid out; the smallest budget that works is "
                    f"--adapter-cache-mb {-(-needed // MB)}"
                )
        self.mode_costs = measured_costs(self.device, model.dtype, self.merger.lora_dtype)
        """The constants ``mode="auto"`` weighs fold against low-rank with (:mod:`ttmm.cost`)."""

    @classmethod
    def from_bank(
        cls,
        bank: str | os.PathLike | Bank,
        base_model: str | os.PathLike | None = None,
        encoder: str | os.PathLike | Encoder | None = None,
        routing: RoutingConfig | None = None,
        device: str | torch.device | None = DEFAULT_DEVICE,
        dtype: str | torch.dtype | None = None,
        memory: str = "auto",
        lora_dtype: str | torch.dtype | None = "auto",
        adapter_cache_mb: float | None = None,
    ) -> TTMM:
        """Load the bank, then its base model and encoder (the ones it names, unless given).

        ``device`` and ``dtype`` place the base model and the encoder (see :mod:`ttmm.device`);
        ``memory`` is the fold's memory policy (see :mod:`ttmm.fold`); ``lora_dtype`` the
        experts' factors' dtype (``"auto"``: the base model's; see :mod:`ttmm.merge`);
        ``adapter_cache_mb`` the experts' memory budget (None: every expert, read now).
        """
        bank = bank if isinstance(bank, Bank) else Bank.load(bank)
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)  # all checked before the bank's adapters load
        resolve_lora_dtype(lora_dtype)
        _cache_bytes(adapter_cache_mb)
        model, tokenizer = load_base_model(
            base_model or bank.manifest.base_model["name"], dtype=dtype, device=device
        )
        if not isinstance(encoder, Encoder):
            encoder = Encoder(encoder or bank.manifest.encoder["name"], device=device)
        return cls(
            model, tokenizer, encoder, bank, routing, memory, lora_dtype,
            adapter_cache_mb=adapter_cache_mb,
        )  # fmt: skip

    @classmethod
    def from_banks(
        cls,
        banks: Sequence[str | os.PathLike | Bank],
        base_model: str | os.PathLike | None = None,
        encoder: str | os.PathLike | Encoder | None = None,
        routing: RoutingConfig | None = None,
        device: str | torch.device | None = DEFAULT_DEVICE,
        dtype: str | torch.dtype | None = None,
        lora_dtype: str | torch.dtype | None = "auto",
        adapter_cache_mb: float | None = None,
    ) -> list[TTMM]:
        """Engines over several banks built on one base model, sharing that model and the
        encoder (loaded once, the first bank's unless given); e.g. banks of several K."""
        if not banks:
            raise InputError("no banks given")
        loaded = [bank if isinstance(bank, Bank) else Bank.load(bank) for bank in banks]
        cache = {"lora_dtype": lora_dtype, "adapter_cache_mb": adapter_cache_mb}
        first = cls.from_bank(loaded[0], base_model, encoder, routing, device, dtype, **cache)
        rest = [
            cls(first.model, first.tokenizer, first.encoder, b, routing, **cache)
            for b in loaded[1:]
        ]
        return [first, *rest]

    @property
    def device(self) -> torch.device:
        """Where the base model runs, and so where its inputs go."""
        return model_device(self.model)

    @property
    def lock(self) -> threading.RLock:
        """The base model's lock (see :func:`model_lock`): every engine, TTT run or evaluation
        over the same model holds the same one while it runs or changes that model."""
        return model_lock(self.model)

    # -- experts in memory -------------------------------------------------------------------

    def pin_experts(self, expert_ids: Sequence[int]) -> None:
        """Keep these experts in memory whatever the cache's use (read now)."""
        plan = RoutingPlan.explicit(dict.fromkeys(expert_ids, 1.0))
        self.merger.check_plan(plan)
        self.merger.experts.pin(plan.expert_ids)

    def prefetch(self, plans: Sequence[RoutingPlan]) -> None:
        """Read the plans' experts from disk ahead of their merge, without the model's lock
        (the server does it for queued requests while a batch runs)."""
        self.merger.prefetch(plans)

    # -- routing ---------------------------------------------------------------------------

    def routing_for(self, routing: RoutingConfig | None = None, **changes) -> RoutingConfig:
        """The routing to use: ``routing`` or this engine's default, with ``changes`` applied
        (None values leave a field as it is)."""
        return (routing or self.routing).replace(**changes)

    def query_texts(self, texts: Sequence[str], routing: RoutingConfig | None = None) -> list[str]:
        """The routing query of each text: its first P tokens, decoded (design notes §2)."""
        P = self.routing_for(routing).prefix_tokens
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [self.tokenizer.decode(row[:P], skip_special_tokens=True) for row in ids]

    def similarities(
        self, texts: Sequence[str], routing: RoutingConfig | None = None
    ) -> torch.Tensor:
        """z = C q for each text, shape (n, K)."""
        return self.index.scores(self._queries(texts, routing))  # (n, K)

    def _queries(self, texts: Sequence[str], routing: RoutingConfig | None) -> torch.Tensor:
        """The embeddings of the texts' routing queries, (n, dim)."""
        return torch.from_numpy(self.encoder.encode(self.query_texts(texts, routing)))

    def route(
        self, texts: Sequence[str], routing: RoutingConfig | None = None
    ) -> list[RoutingPlan]:
        texts = _check_texts(texts)
        routing = self.routing_for(routing)
        disabled = self.bank.disabled
        if routing.rule == "top_n" and not disabled and self.index.uses_index(len(texts)):
            scores, ids = self.index.nearest(self._queries(texts, routing), routing.max_active)
            return [route_nearest(i, z, routing) for i, z in zip(ids, scores)]
        return [route_enabled(z, routing, disabled) for z in self.similarities(texts, routing)]

    def _plans(self, texts, routing, plans) -> list[RoutingPlan]:
        if plans is None:
            return self.route(texts, routing)
        plans = list(plans)
        if len(plans) != len(texts):
            raise InputError(
                f"got {len(plans)} plans for {len(texts)} prompts; give one per prompt"
            )
        disabled = self.bank.disabled
        for plan in plans:
            self.merger.check_plan(plan)
            if chosen := sorted(disabled.intersection(plan.expert_ids)):
                raise InputError(
                    f"expert {chosen[0]} is disabled ("
                    f"{self.bank.manifest.experts[chosen[0]].disabled['reason']}); leave it "
                    "out, or enable it with `ttmm bank enable`"
                )
        return plans

    # -- running merges --------------------------------------------------------------------

    @contextlib.contextmanager
    def merged(
        self, plans: Sequence[RoutingPlan], mode: str = "auto", work: Workload | None = None
    ) -> Iterator[None]:
        """Hold the lock and run the block with the given per-row merges applied.

        ``auto`` folds one shared merge, unless ``work`` (what the block will run) makes
        low-rank cheaper by :func:`ttmm.cost.choose_mode`; a batch of different merges runs
        low-rank.
        """
        if mode not in MODES:
            raise InputError(f"mode={mode!r} is unknown; choose one of {MODES}")
        plans = list(plans)
        same = len({p.key() for p in plans}) == 1
        if mode == "fold" and not same:
            raise InputError("mode='fold' needs one merge for the whole batch; use 'lowrank'")
        with self.lock:
            if same and plans[0].is_base:
                yield
            elif mode == "fold" or (
                mode == "auto" and same and not self.merger.tied_layers and self._folds(plans, work)
            ):
                with self.merger.fold(plans[0]):
                    yield
            else:
                with self.merger.lowrank(plans):
                    yield

    def _folds(self, plans: list[RoutingPlan], work: Workload | None) -> bool:
        """Whether ``auto`` folds the batch's one merge: by predicted cost, and never when the
        fold would round the update away (half-precision weights, tiny updates)."""
        if not self.merger.fold_keeps_update(plans[0]):
            return False
        rank = self.merger.plan_rank(plans[0])
        shape = self.merger.adapted_shape
        return choose_mode(1, rank, work, shape, self.mode_costs) == "fold"

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 100,
        routing: RoutingConfig | None = None,
        plans: Sequence[RoutingPlan] | None = None,
        mode: str = "auto",
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        min_new_tokens: int = 0,
        top_logprobs: int | None = None,
        score_prefix: int | Sequence[int] | None = None,
        prompt_logprobs: int | None = None,
        **extra,
    ) -> list[Generation]:
        """Continue each prompt with its own merge; returns the text and the routing used.

        ``min_new_tokens`` suppresses the end-of-sequence token until that many tokens exist
        (timing runs set it to ``max_new_tokens`` so every method decodes the same length).
        ``score_prefix`` (P, or one per prompt) also scores each prompt's tokens after its
        first P under the row's merge, from the prefill itself (the server's online quality).
        ``prompt_logprobs`` (k) returns each prompt token's log-probability and the k most
        likely tokens there, from that same prefill (completions with ``echo``).
        ``top_logprobs`` and ``extra`` (a streamer, stopping criteria) go to ``decode``.
        """
        prompts = _check_texts(prompts)
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        plans = self._plans(prompts, routing, plans)
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        batch = batch.to(self.device)
        if not (isinstance(min_new_tokens, int) and 0 <= min_new_tokens <= max_new_tokens):
            raise InputError(
                f"min_new_tokens must lie in [0, max_new_tokens], got {min_new_tokens!r}"
            )
        sampling = Sampling(do_sample=do_sample, temperature=temperature, top_p=top_p, seed=seed)
        work = Workload.generation(len(plans), batch["input_ids"].shape[1], max_new_tokens)
        with self.merged(plans, mode, work):
            decoded = decode(
                self.model, self.tokenizer, batch, max_new_tokens, sampling, min_new_tokens,
                top_logprobs, score_prefix, prompt_logprobs, **extra,
            )  # fmt: skip
        results, scored_prompt = [], decoded.prompt_logprobs
        rows = zip(decoded.tokens, plans, batch["attention_mask"], batch["input_ids"])
        for i, (row, plan, mask, row_ids) in enumerate(rows):
            tokens, finish_reason = cut_at_eos(row.tolist(), self.tokenizer.eos_token_id)
            results.append(
                Generation(
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    plan=plan,
                    prompt_tokens=int(mask.sum()),
                    completion_tokens=len(tokens),
                    finish_reason=finish_reason,
                    token_ids=tuple(tokens),
                    logprobs=decoded.logprobs and decoded.logprobs.row(i, len(tokens)),
                    prompt_nll=decoded.prompt_nll and decoded.prompt_nll[i],
                    prompt_ids=tuple(row_ids[mask.bool()].tolist()) if scored_prompt else (),
                    prompt_logprobs=scored_prompt and scored_prompt[i],
                )
            )
        return results

    @torch.no_grad()
    def prompt_nll(
        self,
        prompts: Sequence[str],
        plans: Sequence[RoutingPlan],
        score_prefix: int | Sequence[int],
    ) -> list[tuple[float, int]]:
        """(total NLL, scored tokens) of each prompt after its first ``score_prefix`` tokens,
        under its own plan, tokenised exactly as :meth:`generate` tokenises it: the same
        numbers ``generate(score_prefix=...)`` reports, for a plan that did not generate
        (the server's shadow scoring)."""
        prompts = _check_texts(prompts)
        plans = self._plans(prompts, None, plans)
        batch = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        batch = batch.to(self.device)
        work = Workload.scoring(len(plans), batch["input_ids"].shape[1])
        if batch["input_ids"].shape[1] < 2:
            return [(0.0, 0)] * len(prompts)
        with self.merged(plans, "auto", work):
            scores, _ = prefill_scored(self.model, batch, score_prefix)
        return scores

    @torch.no_grad()
    def score(
        self,
        texts: Sequence[str],
        prefix_tokens: int = PREFIX_TOKENS,
        max_tokens: int = 1024,
        routing: RoutingConfig | None = None,
        plans: Sequence[RoutingPlan] | None = None,
        mode: str = "auto",
    ) -> list[Score]:
        """NLL of the tokens after the first ``prefix_tokens``; the routed prefix is not scored."""
        texts = _check_texts(texts)
        ids = [
            row[:max_tokens] for row in self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ]
        short = [i for i, row in enumerate(ids) if len(row) <= prefix_tokens]
        if short:
            raise InputError(
                f"text(s) {short} have at most {prefix_tokens} tokens: nothing is left to score "
                "after the routing prefix; give longer texts or a smaller prefix_tokens"
            )
        routing = self.routing_for(routing, prefix_tokens=prefix_tokens)
        plans = self._plans(texts, routing, plans)
        input_ids, attention = right_pad(ids, self.tokenizer.pad_token_id, self.device)
        work = Workload.scoring(len(plans), input_ids.shape[1])
        with self.merged(plans, mode, work):
            logits = self.model(input_ids=input_ids, attention_mask=attention).logits
        return [
            Score(nll=nll, n_tokens=n, plan=plan)
            for (nll, n), plan in zip(
                continuation_nll(logits, input_ids, attention, prefix_tokens), plans
            )
        ]


def _cache_bytes(adapter_cache_mb: float | None) -> int | None:
    if adapter_cache_mb is None:
        return None
    if not (isinstance(adapter_cache_mb, int | float) and math.isfinite(adapter_cache_mb)):
        raise InputError(f"adapter_cache_mb must be a number of MB, got {adapter_cache_mb!r}")
    if adapter_cache_mb <= 0:
        raise InputError(
            f"adapter_cache_mb must be > 0, got {adapter_cache_mb:g}; leave it unset to hold "
            "every expert in memory"
        )
    return int(adapter_cache_mb * MB)


def right_pad(
    rows: list[list[int]], pad_id: int, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


_MODEL_LOCKS: weakref.WeakKeyDictionary[torch.nn.Module, threading.RLock] = (
    weakref.WeakKeyDictionary()
)
_MODEL_LOCKS_GUARD = threading.Lock()


def model_lock(model: torch.nn.Module) -> threading.RLock:
    """The one lock of a model, shared by everything that wraps it.

    A fold changes the model's weights in place and puts the originals back on exit; two
    engines over one model that folded at once would restore each other's merged weights as
    "originals". So the lock belongs to the model, not to an engine.
    """
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InputError("pass a list of prompts, not a single string")
    texts = list(texts)
    if not texts:
        raise InputError("no prompts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"prompt {i} is a {type(text).__name__}, not a string")
        if not text.strip():
            raise InputError(f"prompt {i} is empty; routing needs some text to embed")
    return texts


__all__ = [
    "TTMM",
    "Generation",
    "Score",
    "InputError",
    "MergeError",
    "continuation_nll",
    "model_lock",
    "right_pad",
]
