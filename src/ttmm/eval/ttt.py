"""Test-time training baseline: TTT-NN of Hardt & Sun (design notes §2, baselines).

For each prompt: embed its first P tokens (the same query the router sees), retrieve the N
nearest *training* chunks from the bank's chunk index (inner product of unit vectors, i.e.
cosine), train a fresh LoRA on them with the project's one trainer
(:func:`ttmm.build.train.train_lora`: by default batch size 1 and one epoch, so one gradient
step per neighbour), then run the base model with that adapter folded in. The base weights are
bitwise unchanged afterwards: ``train_lora`` unloads its PEFT wrapper and the fold restores by copy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ttmm.adapter import LoraAdapter
from ttmm.build.chunks import ChunkIndex
from ttmm.build.train import LoraTrainConfig, train_lora
from ttmm.merge import ExpertMerger
from ttmm.model import TTMM, Generation, Score
from ttmm.routing import RoutingPlan

logger = logging.getLogger(__name__)


class TTTConfigError(ValueError):
    """A test-time training setting out of range; the message names the field."""


@dataclass(frozen=True)
class TTTConfig:
    """How test-time training adapts the base model to one prompt."""

    neighbours: int = 20
    """N: training chunks retrieved per prompt (Hardt & Sun use 20)."""
    prefix_tokens: int = 50
    """Retrieve on the first P tokens of the prompt, decoded back to text (as routing does)."""
    train: LoraTrainConfig = field(
        default_factory=lambda: LoraTrainConfig(batch_size=1, epochs=1, learning_rate=1e-3)
    )
    """The LoRA trained per prompt; batch 1 and one epoch is one gradient step per neighbour."""
    seed: int = 0
    """Seed of the LoRA initialisation and the neighbour order."""

    def __post_init__(self) -> None:
        if not (isinstance(self.neighbours, int) and self.neighbours >= 1):
            raise TTTConfigError(f"TTTConfig.neighbours must be >= 1, got {self.neighbours!r}")
        if not (isinstance(self.prefix_tokens, int) and self.prefix_tokens >= 1):
            raise TTTConfigError(
                f"TTTConfig.prefix_tokens must be >= 1, got {self.prefix_tokens!r}"
            )

    def to_dict(self) -> dict:
        return {
            "neighbours": self.neighbours,
            "prefix_tokens": self.prefix_tokens,
            "train": self.train.to_dict(),
            "seed": self.seed,
        }


@dataclass
class Adaptation:
    """The adapter trained for one prompt, and what went into it."""

    adapter: LoraAdapter
    chunk_ids: list[int]
    """Rows of the chunk index that were retrieved, nearest first."""
    doc_ids: list[str]
    """The training documents those chunks came from."""
    similarities: list[float]
    losses: list[float]
    retrieve_seconds: float
    train_seconds: float

    @property
    def seconds(self) -> float:
        return self.retrieve_seconds + self.train_seconds


class TestTimeTrainer:
    """TTT-NN over an engine's base model, tokenizer and encoder, and a training-chunk index."""

    __test__ = False  # not a pytest class, despite the name

    def __init__(self, engine: TTMM, index: ChunkIndex, config: TTTConfig | None = None):
        self.engine = engine
        self.index = index
        self.config = config or TTTConfig()

    def retrieve(self, text: str) -> tuple[list[int], list[float]]:
        """Rows of the N training chunks nearest to the text's first P tokens, nearest first."""
        routing = self.engine.routing.replace(prefix_tokens=self.config.prefix_tokens)
        (query,) = self.engine.query_texts([text], routing)
        q = self.engine.encoder.encode([query])  # (1, dim), unit rows
        return self.index.search(q, self.config.neighbours)

    def adapt(self, text: str, progress: bool | str = False) -> Adaptation:
        """Retrieve the neighbours of ``text`` and train a fresh LoRA on them."""
        started = time.perf_counter()
        rows, sims = self.retrieve(text)
        retrieved = time.perf_counter()
        with self.engine.lock:  # train_lora wraps the shared model for a while
            result = train_lora(
                self.engine.model,
                [self.index.token_ids[i] for i in rows],
                self.config.train,
                seed=self.config.seed,
                progress=progress,
                pad_token_id=self.engine.tokenizer.pad_token_id,
            )
        trained = time.perf_counter()
        return Adaptation(
            adapter=result.adapter,
            chunk_ids=rows,
            doc_ids=[self.index.doc_ids[i] for i in rows],
            similarities=sims,
            losses=result.losses,
            retrieve_seconds=retrieved - started,
            train_seconds=trained - retrieved,
        )

    @contextlib.contextmanager
    def applied(self, adaptation: Adaptation) -> Iterator[None]:
        """Hold the engine's lock with the adaptation's LoRA folded into the base weights."""
        merger = ExpertMerger(self.engine.model, [adaptation.adapter])
        with self.engine.lock, merger.fold(RoutingPlan.explicit({0: 1.0})):
            yield

    def score(
        self, texts: Sequence[str], prefix_tokens: int = 50, max_tokens: int = 1024
    ) -> list[tuple[Score, Adaptation]]:
        """Adapt to each text's first ``prefix_tokens`` tokens, then score the rest of it."""
        if prefix_tokens != self.config.prefix_tokens:
            logger.warning(
                "TTT retrieves on %d tokens but scoring skips %d",
                self.config.prefix_tokens,
                prefix_tokens,
            )
        out = []
        for text in texts:
            adaptation = self.adapt(text)
            with self.applied(adaptation):
                (score,) = self.engine.score(
                    [text], prefix_tokens, max_tokens, plans=[RoutingPlan.base()]
                )
            out.append((score, adaptation))
        return out

    def generate(self, prompt: str, max_new_tokens: int = 100) -> tuple[Generation, Adaptation]:
        """Adapt to the prompt, then continue it greedily with the adapted model."""
        adaptation = self.adapt(prompt)
        with self.applied(adaptation):
            (generation,) = self.engine.generate(
                [prompt], max_new_tokens, plans=[RoutingPlan.base()]
            )
        return generation, adaptation


__all__ = ["TTTConfig", "Adaptation", "TestTimeTrainer"]
