"""One way to decode: sampling arguments, seeding and end-of-sequence handling.

The engine's ``generate``, the server's streams and the evaluation's timed decoding all call
:func:`decode` with a :class:`Sampling`, so greedy decoding means the same thing everywhere and
a continuation is cut at the end-of-sequence token the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

GREEDY_BELOW_TEMPERATURE = 1e-4
"""Temperatures below this decode greedily. At 1e-4 a logit gap of 0.01 already makes the
runner-up e^-100 times less likely, so sampling is greedy but for exact ties; far below it the
scaled logits overflow float32 to inf and sampling fails on NaN probabilities (a fuzzer found
temperature 1e-290)."""


class SamplingError(ValueError):
    """A sampling setting out of range; the message names the field."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. The default is greedy decoding."""

    do_sample: bool = False
    """Sample from the distribution (True) or take the most likely token (False)."""
    temperature: float = 1.0
    """Divides the logits before sampling; ignored when greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens with this much probability."""
    seed: int | None = None
    """Seeds torch before decoding, so a sampled continuation can be repeated."""

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)):
            raise SamplingError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.do_sample and self.temperature <= 0:
            raise SamplingError("temperature must be > 0 when sampling; use greedy decoding")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise SamplingError(f"top_p must lie in (0, 1], got {self.top_p!r}")

    @classmethod
    def from_openai(cls, temperature: float, top_p: float, seed: int | None) -> Sampling:
        """OpenAI's semantics: temperature 0 is greedy decoding, where the rest does not matter
        (as is any temperature below :data:`GREEDY_BELOW_TEMPERATURE`)."""
        if temperature < GREEDY_BELOW_TEMPERATURE:
            return cls()
        return cls(do_sample=True, temperature=temperature, top_p=top_p, seed=seed)

    def generate_kwargs(self) -> dict:
        """The arguments of transformers' ``generate`` that choose tokens."""
        if self.do_sample and self.temperature >= GREEDY_BELOW_TEMPERATURE:
            return {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
        # None, not 1.0: transformers warns about sampling settings under greedy decoding
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


GREEDY = Sampling()


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities of the generated tokens under the model's (merged) distribution:
    log-softmax of the raw logits at each step, before temperature or nucleus cut."""

    chosen: torch.Tensor
    """(batch, new): log-probability of each generated token."""
    top_ids: torch.Tensor
    """(batch, new, k): the k most likely tokens at each step, most likely first."""
    top_logprobs: torch.Tensor
    """(batch, new, k): their log-probabilities."""

    def row(self, i: int, length: int) -> TokenLogprobs:
        """Row ``i``'s first ``length`` steps, as (1, length[, k]) tensors."""
        return TokenLogprobs(
            self.chosen[i : i + 1, :length],
            self.top_ids[i : i + 1, :length],
            self.top_logprobs[i : i + 1, :length],
        )


@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor
    """(batch, new): the new tokens only."""
    logprobs: TokenLogprobs | None = None
    """Present when ``decode`` was asked for ``top_logprobs``."""
    prompt_nll: list[tuple[float, int]] | None = None
    """(total NLL, scored tokens) of each row's prompt after its first ``score_prefix``
    tokens, present when ``decode`` was asked for it."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Each row's prompt tokens' log-probabilities (:func:`prompt_logprobs`), when asked."""


def continuation_nll(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention: torch.Tensor,
    prefix_tokens: int | Sequence[int],
) -> list[tuple[float, int]]:
    """(total NLL, scored tokens) per row, over the tokens after each row's first
    ``prefix_tokens`` real ones (design notes §3: the routed prefix is never scored); one
    prefix for every row, or one per row.

    ``logits`` (b, s or s − 1, V) are the model's outputs at the positions of ``input_ids``
    (b, s); padding may sit on either side (``attention`` marks the real tokens). Rows are
    scored one at a time, so at most one row's logits are held in float32 at once.
    """
    length = input_ids.shape[1]
    targets = input_ids[:, 1:]  # (b, s-1)
    positions = (attention.cumsum(-1) - 1)[:, 1:]  # each target's index among its row's tokens
    prefix = torch.as_tensor(prefix_tokens, device=input_ids.device).reshape(-1, 1)  # (b|1, 1)
    scored = (positions >= prefix) & attention[:, 1:].bool()  # (b, s-1)
    token_nll = torch.stack(
        [
            -torch.log_softmax(logits[i, : length - 1].float(), dim=-1)  # predicts t=1..s-1
            .gather(-1, targets[i].unsqueeze(-1))
            .squeeze(-1)
            for i in range(input_ids.shape[0])
        ]
    )  # (b, s-1)
    return [
        (float(token_nll[i][scored[i]].sum()), int(scored[i].sum()))
        for i in range(input_ids.shape[0])
    ]


def prefill(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, object]:
    """Run the prompt but its last token, as ``generate``'s prefill would, keeping the logits
    of every position (b, s − 1, V) and the key-value cache that ``generate`` continues from
    (it then runs only the last prompt token): prompt scores cost no second pass."""
    from transformers import DynamicCache

    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: count real tokens only
    cache = DynamicCache(config=model.config)
    output = model(
        input_ids=ids[:, :-1],
        attention_mask=mask[:, :-1],
        position_ids=positions[:, :-1],
        past_key_values=cache,
        use_cache=True,
    )
    return output.logits, output.past_key_values


def prefill_scored(
    model: torch.nn.Module, batch: dict, score_prefix: int | Sequence[int]
) -> tuple[list[tuple[float, int]], object]:
    """The prompt's NLL after ``score_prefix`` tokens from :func:`prefill`, and its cache."""
    logits, cache = prefill(model, batch)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    return continuation_nll(logits, ids, mask, score_prefix), cache


def prompt_logprobs(logits: torch.Tensor, batch: dict, k: int) -> list[TokenLogprobs]:
    """Per row, the log-probability of each real prompt token after the first (which has no
    context) and the ``k`` most likely tokens at its position, as (1, n − 1[, k]) tensors:
    what vLLM returns as ``prompt_logprobs`` (and OpenAI completions with ``echo``)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = []
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        n = int(real.sum())
        start = ids.shape[1] - n  # left padding
        if n < 2:
            none = torch.zeros(1, 0, k)  # no token has a context
            rows.append(TokenLogprobs(torch.zeros(1, 0), none.long(), none))
            continue
        log_probs = torch.log_softmax(logits[i, start:].float(), dim=-1)  # (n - 1, V)
        targets = ids[i, start + 1 :]
        chosen = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (n - 1,)
        top = log_probs.topk(k, dim=-1) if k else None
        top_ids = top.indices if top else torch.zeros(n - 1, 0, dtype=torch.long)
        top_values = top.values if top else torch.zeros(n - 1, 0)
        rows.append(TokenLogprobs(chosen[None], top_ids[None], top_values[None]))
    return rows


def decode(
    model: torch.nn.Module,
    tokenizer,
    batch: dict,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    min_new_tokens: int = 0,
    top_logprobs: int | None = None,
    score_prefix: int | Sequence[int] | None = None,
    prompt_top_logprobs: int | None = None,
    **extra,
) -> Decoded:
    """Run ``model.generate`` on a tokenised batch with the model as it stands (merged or not).

    Returns only the new tokens, (batch, new). ``min_new_tokens`` suppresses the
    end-of-sequence token until that many exist (timing runs decode a fixed length);
    ``top_logprobs`` (k >= 0) also returns each new token's log-probability and the k most
    likely tokens at each step; ``score_prefix`` (P) also returns the NLL of each prompt's
    tokens after its first P, and ``prompt_top_logprobs`` (k >= 0) each prompt token's
    log-probability with the k most likely tokens there, both from one prefill
    (:func:`prefill`; a streamer with a ``prompt_scored`` method is handed the latter before
    the first new token); ``extra`` goes to ``generate`` as is (a streamer, stopping criteria).
    """
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    prompt_nll = prompt_scores = None
    rows = batch["input_ids"].shape[0]
    if score_prefix is not None or prompt_top_logprobs is not None:
        if batch["input_ids"].shape[1] >= 2:
            logits, extra["past_key_values"] = prefill(model, batch)
        else:  # one-token prompts: nothing to score
            logits = torch.zeros(rows, 0, 1)
        if score_prefix is not None:
            prompt_nll = (
                continuation_nll(logits, batch["input_ids"], batch["attention_mask"], score_prefix)
                if logits.shape[1]
                else [(0.0, 0)] * rows
            )
        if prompt_top_logprobs is not None:
            prompt_scores = prompt_logprobs(logits, batch, prompt_top_logprobs)
            if hasattr(extra.get("streamer"), "prompt_scored"):
                extra["streamer"].prompt_scored(prompt_scores)
        del logits
    scored = top_logprobs is not None
    output = model.generate(
        **batch,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling.generate_kwargs(),
        **({"output_logits": True, "return_dict_in_generate": True} if scored else {}),
        **extra,
    )
    sequences = output.sequences if scored else output
    tokens = sequences[:, batch["input_ids"].shape[1] :]
    if not scored:
        return Decoded(tokens, prompt_nll=prompt_nll, prompt_logprobs=prompt_scores)
    log_probs = torch.log_softmax(torch.stack(output.logits, dim=1).float(), dim=-1)  # (b, new, V)
    log_probs = log_probs[:, : tokens.shape[1]]
    chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (b, new)
    top = log_probs.topk(top_logprobs, dim=-1)  # (b, new, k)
    new_scores = TokenLogprobs(chosen, top.indices, top.values)
    return Decoded(tokens, new_scores, prompt_nll, prompt_scores)


def cut_at_eos(tokens: Sequence[int], eos_token_id: int | None) -> tuple[list[int], str]:
    """The tokens before the first end-of-sequence token, and the OpenAI finish reason."""
    tokens = list(tokens)
    if eos_token_id is not None and eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id)], "stop"
    return tokens, "length"
