"""What a PoC run is asked to do: the corpus, the time it may take, and the prices to quote.

A frozen dataclass with a docstring per field, validated on construction (each mistake names
the field and what it accepts), written resolved into ``poc.json`` so the run can be repeated.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields

from ttmm.assets import DEFAULT_BASE_MODEL, DEFAULT_ENCODER

POC_CORPORA = ("wiki@480", "stdlib@120")
"""The default corpora of a PoC: more documents than ``ttmm build``'s default so that each
domain holds enough held-out documents for an interval (the token budget, not the corpus,
limits training)."""


class PocError(ValueError):
    """A PoC setting or input that cannot be used: what is wrong and what to do."""


@dataclass(frozen=True)
class PocConfig:
    """Everything a ``ttmm poc`` run is asked for."""

    corpora: tuple[str, ...] = POC_CORPORA
    """Corpus spec strings, as ``ttmm build --corpus`` takes them."""
    bank: str | None = None
    """An existing bank to evaluate instead of building one (its own corpus and split)."""
    budget_minutes: float = 20.0
    """Wall time of the whole run (measurement, build, evaluation, timing, report) on this
    machine; the plan sizes the training budget, K and the evaluated documents to fit it."""
    price_per_hour: float | None = None
    """What an hour of this machine costs (any currency): turns seconds into cost per million
    tokens. None reports machine-hours only."""
    tokens_per_day: int = 1_000_000
    """Tokens generated a day, for the daily cost."""
    experts: int | None = None
    """K; None lets the plan choose it from the training budget."""
    base_model: str = DEFAULT_BASE_MODEL
    """Base model: the default alias, a local folder, a .gguf or a hub id."""
    encoder: str = DEFAULT_ENCODER
    """Sentence encoder that routes prompts."""
    max_docs: int = 60
    """Most held-out documents scored per domain (the evaluation protocol's 60)."""
    seed: int = 0
    """Seed of the split, the clustering, the document order and the bootstrap."""
    device: str = "auto"
    """Where the models run (see ``ttmm build --device``)."""
    dtype: str = "auto"
    """The base model's dtype (see ``ttmm build --dtype``)."""

    def __post_init__(self) -> None:
        checks = {
            "corpora": bool(self.corpora) or self.bank is not None,
            "budget_minutes": math.isfinite(self.budget_minutes) and self.budget_minutes > 0,
            "price_per_hour": self.price_per_hour is None
            or (math.isfinite(self.price_per_hour) and self.price_per_hour >= 0),
            "tokens_per_day": self.tokens_per_day >= 0,
            "experts": self.experts is None or self.experts >= 1,
            "max_docs": self.max_docs >= 1,
        }
        wanted = {
            "corpora": "at least one corpus spec (or a --bank)",
            "budget_minutes": "a number of minutes > 0",
            "price_per_hour": "a price >= 0, or none",
            "tokens_per_day": "a count >= 0",
            "experts": "K >= 1, or none to let the plan choose",
            "max_docs": "a count >= 1",
        }
        for name, ok in checks.items():
            if not ok:
                raise PocError(f"PocConfig.{name}: got {getattr(self, name)!r}; {wanted[name]}")

    def to_dict(self) -> dict:
        return asdict(self) | {"corpora": list(self.corpora)}

    @classmethod
    def from_dict(cls, data: dict) -> PocConfig:
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise PocError(f"unknown PoC setting(s) {unknown}; known: {sorted(known)}")
        return cls(**(data | {"corpora": tuple(data.get("corpora", POC_CORPORA))}))

    def content_hash(self) -> str:
        """Identity of the run: a folder holding another run's results is not resumed."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]
