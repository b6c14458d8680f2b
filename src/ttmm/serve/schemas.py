"""Request bodies of the OpenAI-compatible server, and the ``ttmm`` extension field.

The bodies follow OpenAI's completions and chat-completions APIs. Unknown fields are
ignored, as OpenAI clients send options this server has no use for; fields whose value
would change the output in a way the server cannot honour are rejected by name.
Per-request routing control lives in the extra ``ttmm`` field, exactly one of:

- ``{"routing": {"rule": ..., "beta": ..., "tau": ..., "max_active": ...}}``: route the
  prompt with these settings (missing ones keep the server's defaults);
- ``{"experts": {"3": 0.7, "5": 0.3}}``: merge these experts with these weights, no routing;
- ``{"base": true}``: the base model alone.

and, with any of them, ``{"timing": true}``: report the request's seconds of routing,
merging, prefill and decoding in the response's ``ttmm`` field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, model_validator

from ttmm.routing import RULES


def _not_a_bool(value):
    if isinstance(value, bool):  # JSON true/false are not numbers (pydantic would take 1/0)
        raise ValueError("expected a number, not a boolean")
    return value


NO_BOOL = BeforeValidator(_not_a_bool)  # after a Field's constraints, or they leave the schema
Int = Annotated[int, NO_BOOL]
Float = Annotated[float, NO_BOOL]
Bool = StrictBool
"""JSON types as the OpenAPI document states them: no booleans taken as numbers, no 0/1 or
"true" taken as booleans (so what the document calls invalid is refused)."""
WEIGHT_LIMIT = 1000.0
Weight = Annotated[float, Field(ge=-WEIGHT_LIMIT, le=WEIGHT_LIMIT), NO_BOOL]
"""A merge weight: within ±1000 (larger ones overflow the factors' float32)."""
ExpertWeights = Annotated[
    dict[int, Weight],
    Field(json_schema_extra={"propertyNames": {"pattern": "^(0|[1-9][0-9]*)$"}}),
]
"""``{"3": 0.7}``: expert ids (the keys, as JSON requires, decimal) and weights."""

NonBlank = Annotated[str, Field(min_length=1, pattern=r"\S")]
"""Text with something to route on (the pattern, unanchored: one character not a space)."""
Text = NonBlank


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoutingOverride(_Strict):
    """Routing settings for one request; a missing field keeps the server's default."""

    rule: Literal[tuple(RULES)] | None = None  # the names ttmm.routing registers
    beta: Annotated[float, Field(gt=0), NO_BOOL] | None = None
    tau: Annotated[float, Field(ge=0, lt=1), NO_BOOL] | None = None
    max_active: Annotated[int, Field(ge=1), NO_BOOL] | None = None


def _at_most_one(*pairs: tuple[str, dict]) -> dict:
    """JSON schema: not two of these fields set at once (``pairs``: name, schema when set)."""
    both = []
    for i, (a, when_a) in enumerate(pairs):
        for b, when_b in pairs[i + 1 :]:
            both.append({"properties": {a: when_a, b: when_b}, "required": [a, b]})
    return {"not": {"anyOf": both}}


OBJECT = {"type": "object"}


class TTMMControl(_Strict):
    """The ``ttmm`` field of a request: how to choose the merge for it."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra=_at_most_one(
            ("routing", OBJECT), ("experts", OBJECT), ("base", {"const": True})
        ),
    )

    routing: RoutingOverride | None = None
    experts: ExpertWeights | None = None
    base: Bool = False
    timing: Bool = False
    """Report route, merge, prefill and decode seconds in the response's ``ttmm`` field."""

    @model_validator(mode="after")
    def _one_choice(self) -> TTMMControl:
        chosen = [name for name in ("routing", "experts") if getattr(self, name) is not None]
        if self.base:
            chosen.append("base")
        if len(chosen) > 1:
            raise ValueError(f"give one of routing, experts or base, not {' and '.join(chosen)}")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Bool = False


class GenerationRequest(BaseModel):
    """Options shared by both generation endpoints (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1), NO_BOOL] | None = None
    temperature: Float = Field(default=1.0, ge=0, le=2)
    top_p: Float = Field(default=1.0, gt=0, le=1)
    n: Int = Field(default=1, ge=1, le=16)
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**53), le=2**53), NO_BOOL] | None = None
    """Within ±2^53 (exact as a JSON number anywhere); sample j of a request draws with
    seed + j."""
    user: str | None = Field(default=None, max_length=256)
    """OpenAI's end-user id; a rollout keeps one user on one arm by it."""
    ttmm: TTMMControl | None = None

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return [s for s in stops if s]


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    model_config = ConfigDict(extra="ignore")

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=16)]
    """One prompt or a list of up to 16; each is routed on its own."""
    echo: Bool = False
    logprobs: Annotated[int, Field(ge=0, le=20), NO_BOOL] | None = None
    """Return the log-probability of each token and this many most likely alternatives
    (with ``echo``, the prompt's tokens too: the first has none, as in vLLM)."""

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def logprob_count(self) -> int | None:
        """Alternatives to list per token; None = no log-probabilities."""
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: NonBlank


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: NonBlank | Annotated[list[TextPart], Field(min_length=1)]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), NO_BOOL] | None = None
    logprobs: Bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), NO_BOOL] | None = None
    """With ``logprobs``: this many most likely alternatives of each token."""

    @property
    def logprob_count(self) -> int | None:
        """Alternatives to list per token; None = no log-probabilities."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class RouteRequest(_Strict):
    """POST /v1/route: the experts and weights a text would get, without generating."""

    model: str | None = None
    input: NonBlank
    ttmm: TTMMControl | None = None


class ErrorDetail(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    error: ErrorDetail
