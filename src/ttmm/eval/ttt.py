"""Test-time training baseline: TTT-NN of Hardt & Sun (ICLR 2024), design notes §2 and §7.

For each prompt: embed its first P tokens (the routing prefix, exactly the query the router sees,
and nothing after it), retrieve the N = 20 nearest *training* chunks from the bank's chunk index
(inner product of unit vectors, i.e. cosine), and take one gradient step per neighbour, from the
nearest to the farthest, then score or generate with the adapted model.

What is trained (``TTTConfig.weights``):

- ``lora`` (default): a fresh LoRA trained with the project's one trainer
  (:func:`ttmm.build.train.train_lora`, batch 1, one epoch, no shuffle), then folded into the
  base weights. The paper fine-tunes all weights; a LoRA keeps the baseline comparable with the
  experts (same adapter shape and trainer) and is what the tables call "TTT".
- ``all``: one optimiser step per neighbour on every parameter of the base model (the paper's
  recipe, method ``ttt_full``); the weights are set aside and put back bitwise afterwards.

The hybrid TTMM->TTT (§7) is the same procedure started from a folded routed merge: pass its
plan as ``start``. Either way the engine's lock is held from training to restoring, and the base
weights are bitwise unchanged afterwards.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ttmm.adapter import LoraAdapter
from ttmm.build.chunks import ChunkIndex
from ttmm.build.train import LoraTrainConfig, train_lora
from ttmm.eval.methods import EvalError
from ttmm.merge import ExpertMerger
from ttmm.model import TTMM, Generation, Score
from ttmm.routing import RoutingPlan

logger = logging.getLogger(__name__)

WEIGHTS = ("lora", "all")
OPTIMIZERS = ("adam", "sgd")


class TTTConfigError(ValueError):
    """A test-time training setting out of range; the message names the field."""


@dataclass(frozen=True)
class TTTConfig:
    """How test-time training adapts the base model to one prompt. The query is always the
    routing prefix (the engine routing's P tokens), so it has no setting of its own."""

    neighbours: int = 20
    """N: training chunks retrieved per prompt, one gradient step each (Hardt & Sun use 20)."""
    weights: str = "lora"
    """What is trained: ``lora`` (a fresh LoRA, ``train``) or ``all`` (every base parameter)."""
    train: LoraTrainConfig = field(
        default_factory=lambda: LoraTrainConfig(
            batch_size=1, epochs=1, learning_rate=1e-3, shuffle=False
        )
    )
    """The LoRA trained per prompt: batch 1, one epoch, no shuffle is one step per neighbour,
    nearest first. Its ``max_seq_len`` and ``max_grad_norm`` also apply to ``weights="all"``."""
    full_optimizer: str = "adam"
    """``weights="all"``: ``adam`` or ``sgd``, fresh for each prompt."""
    full_learning_rate: float = 2e-5
    """``weights="all"``: learning rate of that optimiser."""
    seed: int = 0
    """Seed of the LoRA initialisation."""

    def __post_init__(self) -> None:
        if not (isinstance(self.neighbours, int) and self.neighbours >= 1):
            raise TTTConfigError(f"TTTConfig.neighbours must be >= 1, got {self.neighbours!r}")
        if self.weights not in WEIGHTS:
            raise TTTConfigError(
                f"TTTConfig.weights must be one of {WEIGHTS}, got {self.weights!r}"
            )
        if self.full_optimizer not in OPTIMIZERS:
            raise TTTConfigError(
                f"TTTConfig.full_optimizer must be one of {OPTIMIZERS}, got {self.full_optimizer!r}"
            )
        if not self.full_learning_rate > 0:
            raise TTTConfigError(
                f"TTTConfig.full_learning_rate must be > 0, got {self.full_learning_rate!r}"
            )
        if self.train.shuffle or self.train.batch_size != 1 or self.train.epochs != 1:
            raise TTTConfigError(
                "TTTConfig.train must train one step per neighbour, nearest first: "
                "batch_size=1, epochs=1, shuffle=False"
            )

    def to_dict(self) -> dict:
        return {
            "neighbours": self.neighbours,
            "weights": self.weights,
            "train": self.train.to_dict(),
            "full_optimizer": self.full_optimizer,
            "full_learning_rate": self.full_learning_rate,
            "seed": self.seed,
        }

    def replace(self, **changes) -> TTTConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class Adaptation:
    """What one prompt's test-time training used and produced."""

    adapter: LoraAdapter | None
    """The trained LoRA (``weights="lora"``); None when all weights were trained in place."""
    chunk_ids: list[int]
    """Rows of the chunk index that were retrieved, nearest first (the training order)."""
    doc_ids: list[str]
    """The training documents those chunks came from."""
    similarities: list[float]
    losses: list[float]
    """Loss of each gradient step, one per neighbour."""
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

    @property
    def prefix_tokens(self) -> int:
        """P: the engine routing's prefix length, the only part of a prompt retrieved on."""
        return self.engine.routing.prefix_tokens

    def retrieve(self, text: str, neighbours: int | None = None) -> tuple[list[int], list[float]]:
        """Rows of the N training chunks nearest to the text's first P tokens, nearest first.
        The text is cut here: nothing after the routing prefix can reach the query."""
        (query,) = self.engine.query_texts([text])  # the first P tokens, decoded
        q = self.engine.encoder.encode([query])  # (1, dim), unit rows
        return self.index.search(q, neighbours or self.config.neighbours)

    @contextlib.contextmanager
    def adapted(
        self,
        text: str,
        start: RoutingPlan | None = None,
        neighbours: int | None = None,
        progress: bool | str = False,
    ) -> Iterator[Adaptation]:
        """Hold the engine's lock with the model adapted to ``text``; restore it on exit.

        ``start`` folds a routed merge in first and trains from that model (hybrid TTMM->TTT).
        """
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.engine.lock)
            if start is not None:
                stack.enter_context(self.engine.merger.fold(start))
            started = time.perf_counter()
            rows, sims = self.retrieve(text, neighbours)
            retrieved = time.perf_counter()
            chunks = [self.index.token_ids[i] for i in rows]  # nearest first
            if self.config.weights == "lora":
                result = train_lora(
                    self.engine.model,
                    chunks,
                    self.config.train,
                    seed=self.config.seed,
                    progress=progress,
                    pad_token_id=self.engine.tokenizer.pad_token_id,
                )
                adapter, losses = result.adapter, result.losses
                merger = ExpertMerger(self.engine.model, [adapter])
                stack.enter_context(merger.fold(RoutingPlan.explicit({0: 1.0})))
            else:
                adapter = None
                losses = stack.enter_context(self._all_weights(chunks))
            trained = time.perf_counter()
            yield Adaptation(
                adapter=adapter,
                chunk_ids=rows,
                doc_ids=[self.index.doc_ids[i] for i in rows],
                similarities=sims,
                losses=losses,
                retrieve_seconds=retrieved - started,
                train_seconds=trained - retrieved,
            )

    @contextlib.contextmanager
    def _all_weights(self, chunks: Sequence[Sequence[int]]) -> Iterator[list[float]]:
        """One optimiser step per chunk, in order, on every parameter; weights set aside first
        and put back (the very tensors, so bitwise) on exit, whatever happens."""
        model, config = self.engine.model, self.config
        params = list(model.parameters())  # tied weights appear once
        saved = [(p, p.data, p.requires_grad) for p in params]
        was_training = model.training
        try:
            for p in params:
                p.data = p.data.clone()  # train a copy; the original tensor is never written
                p.requires_grad_(True)
            model.eval()  # no dropout: one deterministic step per neighbour
            if config.full_optimizer == "adam":
                optimizer = torch.optim.Adam(params, lr=config.full_learning_rate)
            else:
                optimizer = torch.optim.SGD(params, lr=config.full_learning_rate)
            losses = []
            with torch.enable_grad():
                for ids in chunks:
                    input_ids = torch.tensor([list(ids[: config.train.max_seq_len])])  # (1, T)
                    input_ids = input_ids.to(self.engine.device)
                    loss = model(input_ids=input_ids, labels=input_ids).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.train.max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, config.train.max_grad_norm)
                    optimizer.step()
                    losses.append(float(loss.detach()))
            del optimizer
            for p in params:
                p.grad = None
            yield losses
        finally:
            for p, original, requires_grad in saved:
                p.data = original
                p.grad = None
                p.requires_grad_(requires_grad)
            model.train(was_training)

    def score(
        self,
        texts: Sequence[str],
        prefix_tokens: int,
        max_tokens: int = 1024,
        start: RoutingPlan | None = None,
        neighbours: int | None = None,
    ) -> list[tuple[Score, Adaptation]]:
        """Adapt to each text's routing prefix, then score the rest of it. ``prefix_tokens``
        must be the engine routing's P: retrieving on one prefix and scoring after another
        would either leak scored tokens into the query or leave some unscored."""
        if prefix_tokens != self.prefix_tokens:
            raise EvalError(
                f"TTT retrieves on the routing prefix of {self.prefix_tokens} tokens but "
                f"prefix_tokens={prefix_tokens} was asked to be skipped; give the engine a "
                "routing with that prefix length"
            )
        out = []
        for text in texts:
            with self.adapted(text, start, neighbours) as adaptation:
                (score,) = self.engine.score(
                    [text], prefix_tokens, max_tokens, plans=[RoutingPlan.base()]
                )
            out.append((score, adaptation))
        return out

    def generate(self, prompt: str, max_new_tokens: int = 100) -> tuple[Generation, Adaptation]:
        """Adapt to the prompt's routing prefix, then continue it greedily."""
        with self.adapted(prompt) as adaptation:
            (generation,) = self.engine.generate(
                [prompt], max_new_tokens, plans=[RoutingPlan.base()]
            )
        return generation, adaptation


__all__ = ["TTTConfig", "TTTConfigError", "Adaptation", "TestTimeTrainer"]
