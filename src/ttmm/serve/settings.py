"""The settings of one server: limits, keys and behaviour, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServerSettings:
    """Limits and behaviour of one server; validated on construction."""

    model_id: str = "ttmm"
    """Model name listed by /v1/models; requests naming another model get a 404."""
    max_prompt_tokens: int = 2048
    """Longest prompt accepted, in tokens (after the chat template, for chat requests)."""
    max_tokens_limit: int = 512
    """Largest ``max_tokens`` (new tokens) a request may ask for."""
    default_max_tokens: int = 128
    """Tokens generated when a request does not say."""
    max_concurrent_requests: int = 64
    """Generation and routing requests served at once; one more gets a 429."""
    request_timeout_s: float = 600.0
    """Seconds a request may wait and run before it is answered with a 504."""
    max_batch_size: int = 8
    """Most prompts generated together in one batch."""
    batch_window_ms: float = 50.0
    """How long the first request of a batch waits for others to join it, in milliseconds.
    At 10 ms, 8 closed-loop clients drifted apart into batches of ~5 rows; 50 ms kept them
    at 8 (benchmarks/serve_load.py), a small cost next to seconds of decoding."""
    merge_cache_mb: float = 1024.0
    """Memory budget of the LRU cache of merged factors (per plan), in MiB; 0 disables it."""
    api_key: str | None = field(default=None, repr=False)
    """If set, every endpoint but /health needs ``Authorization: Bearer <api_key>``."""
    max_body_bytes: int = 1 << 20
    """Largest request body, in bytes; a larger one gets a 413 before it is parsed."""
    max_concurrent_streams: int = 16
    """Streamed completions served at once (each holds rows in the batches while it
    decodes, and an open connection); more get a 429."""
    rate_limit_per_minute: int | None = None
    """Requests a minute per API key (or per client address without a key), bursts up to as
    many; None = no limit. More get a 429 with Retry-After."""
    admin_key: str | None = field(default=None, repr=False)
    """If set, the rollout's operator endpoints need ``Authorization: Bearer <admin_key>``;
    it must differ from ``api_key``. None = those endpoints answer 403."""
    export_dir: str | None = None
    """Folder where /v1/ttmm/export writes adapters and answers their path; None = answer
    the files themselves (base64) and write nothing."""

    def __post_init__(self) -> None:
        positive_ints = ("max_prompt_tokens", "max_tokens_limit", "default_max_tokens")
        counts = ("max_concurrent_requests", "max_batch_size", "max_body_bytes")
        for name in (*positive_ints, *counts, "max_concurrent_streams"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"ServerSettings.{name} must be an integer >= 1, got {value!r}")
        for name in ("request_timeout_s",):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServerSettings.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("batch_window_ms", "merge_cache_mb"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"ServerSettings.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"ServerSettings.default_max_tokens ({self.default_max_tokens}) exceeds "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        if not self.model_id:
            raise ValueError("ServerSettings.model_id must not be empty")
        for name in ("api_key", "admin_key"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ValueError(f"ServerSettings.{name} must be None or a non-empty string")
        if self.admin_key is not None and self.admin_key == self.api_key:
            raise ValueError(
                "ServerSettings.admin_key must differ from api_key: users must not be able to "
                "promote or roll back"
            )
        limit = self.rate_limit_per_minute
        if limit is not None and not (isinstance(limit, int) and limit >= 1):
            raise ValueError(
                f"ServerSettings.rate_limit_per_minute must be None or an integer >= 1, "
                f"got {limit!r}"
            )
