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

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ttmm.routing import RULES

Text = Annotated[str, Field(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RoutingOverride(_Strict):
    """Routing settings for one request; a missing field keeps the server's default."""

    rule: Literal[tuple(RULES)] | None = None  # the names ttmm.routing registers
    beta: float | None = Field(default=None, gt=0)
    tau: float | None = Field(default=None, ge=0, lt=1)
    max_active: int | None = Field(default=None, ge=1)


class TTMMControl(_Strict):
    """The ``ttmm`` field of a request: how to choose the merge for it."""

    routing: RoutingOverride | None = None
    experts: dict[int, float] | None = None
    base: bool = False
    timing: bool = False
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

    include_usage: bool = False


class GenerationRequest(BaseModel):
    """Options shared by both generation endpoints (OpenAI's names and defaults)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
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

    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=16)]
    """One prompt or a list of up to 16; each is routed on its own."""
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    """Return the log-probability of each token and this many most likely alternatives."""

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def logprob_count(self) -> int | None:
        """Alternatives to list per token; None = no log-probabilities."""
        return self.logprobs


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
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
    input: str = Field(min_length=1)
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
