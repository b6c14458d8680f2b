"""The one LoRA trainer: experts, the fine-tuning baseline and test-time training (design §2).

``train_lora`` wraps a frozen base model with PEFT, minimises the next-token loss on a list of
token chunks with AdamW, and returns the factors as a :class:`~ttmm.adapter.LoraAdapter`. It
leaves the caller's model exactly as it found it (PEFT wrapper unloaded in ``finally``, base
weights untouched, ``requires_grad`` and train/eval mode restored), because test-time training
calls it on the live model. The same seed, data and thread count give the same adapter.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch

from ttmm.adapter import LoraAdapter
from ttmm.build.faults import checkpoint
from ttmm.device import model_device

logger = logging.getLogger(__name__)


SCHEDULES = ("constant", "cosine", "linear")


class TrainConfigError(ValueError):
    """A training setting out of range; the message names the field."""


@dataclass(frozen=True)
class LoraTrainConfig:
    """How one LoRA adapter is trained. Defaults fit a 2-core CPU (about 100 tokens/s at r=8).

    The default recipe (lr 1e-3, constant, batch 1, rank 8, 1 epoch) is the one the recorded
    sweep ``benchmarks/recipe_sweep.py`` (results/recipe_sweep.json: SmolLM2-135M, default
    corpora, about 4k training tokens per run, one factor at a time) found best or tied for
    both the fine-tuning adapter and an expert, on validation loss (mean NLL per token):
    lr 3e-4 and 3e-3 both did worse (+0.03 to +0.07 nats), warm-up + cosine did worse
    (+0.015, +0.024), batch 4 did worse (+0.019, +0.026) and trained slower per token, a
    second epoch over the same 4k tokens did worse (+0.056, +0.021), and rank 16 tied on the
    fine-tuning adapter (+0.001) and gained 0.015 on the expert: too little for twice the
    adapter size and merge cost. One seed and 9-12 validation chunks per adapter: differences
    under about 0.02 nats are within noise.
    """

    rank: int = 8
    """LoRA rank r of every adapted layer."""
    alpha: float = 16.0
    """LoRA alpha; the scale is alpha / r (alpha / sqrt(r) with ``use_rslora``)."""
    target_modules: str | tuple[str, ...] = "all-linear"
    """Layers to adapt: PEFT's ``"all-linear"`` (every linear layer but the output head) or
    module name suffixes such as ``("q_proj", "v_proj")``."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scale alpha / sqrt(r)."""
    learning_rate: float = 1e-3
    """AdamW peak learning rate (after warm-up; see ``schedule``)."""
    schedule: str = "constant"
    """Learning-rate schedule after warm-up: ``constant``, ``cosine`` or ``linear`` decay to
    ``min_lr_ratio`` × ``learning_rate`` at the last step."""
    warmup_fraction: float = 0.0
    """Share of the steps over which the rate ramps linearly from 0 to ``learning_rate``."""
    min_lr_ratio: float = 0.1
    """Floor of the decaying schedules, as a share of ``learning_rate``."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    epochs: int = 1
    """Passes over the chunks (the token budget may stop training earlier)."""
    max_tokens: int | None = None
    """Token budget: stop once this many tokens have been trained on; None = ``epochs`` passes."""
    batch_size: int = 1
    """Chunks per optimiser step (right-padded to the longest). On 2 CPU cores batch 1 trains
    fastest (about 105 tokens/s for SmolLM2-135M at r=8, against 75 at batch 4)."""
    max_seq_len: int = 256
    """Chunks longer than this are cut to their first ``max_seq_len`` tokens."""
    max_grad_norm: float | None = 1.0
    """Gradient clipping norm; None disables clipping."""
    num_threads: int | None = None
    """Torch intra-op threads while training; pin it so that results do not depend on the
    machine or executor. None keeps the process setting."""
    shuffle: bool = True
    """Seeded shuffle of the chunks in every epoch; False keeps the given order (TTT-NN trains
    nearest neighbour first)."""

    # Fields added after the first banks, with the value those banks were trained with: left
    # out of ``hash_dict`` at that value, so older banks keep their hashes and still resume.
    _ADDED_DEFAULTS = {
        "schedule": "constant",
        "warmup_fraction": 0.0,
        "min_lr_ratio": 0.1,
        "shuffle": True,
    }

    def __post_init__(self) -> None:
        checks = {
            "rank": self.rank >= 1,
            "alpha": self.alpha > 0,
            "learning_rate": self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "epochs": self.epochs >= 1,
            "max_tokens": self.max_tokens is None or self.max_tokens >= 1,
            "batch_size": self.batch_size >= 1,
            "max_seq_len": self.max_seq_len >= 2,
            "max_grad_norm": self.max_grad_norm is None or self.max_grad_norm > 0,
            "num_threads": self.num_threads is None or self.num_threads >= 1,
            "target_modules": bool(self.target_modules),
            "schedule": self.schedule in SCHEDULES,
            "warmup_fraction": 0.0 <= self.warmup_fraction < 1.0,
            "min_lr_ratio": 0.0 <= self.min_lr_ratio <= 1.0,
        }
        for name, ok in checks.items():
            if not ok:
                raise TrainConfigError(
                    f"LoraTrainConfig.{name} = {getattr(self, name)!r} is out of range"
                )
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict:
        data = asdict(self)
        if isinstance(self.target_modules, tuple):
            data["target_modules"] = list(self.target_modules)
        if self.shuffle:  # added later: left out at its default, so bank hashes hold
            del data["shuffle"]
        return data

    def hash_dict(self, legacy: bool = False) -> dict:
        """``to_dict`` without added fields at the value older banks were trained with, and
        without ``num_threads``: where the work runs is not what it computes. ``legacy``:
        with ``num_threads``, as hashes were before (read to resume older builds)."""
        added = self._ADDED_DEFAULTS
        data = {k: v for k, v in self.to_dict().items() if k not in added or added[k] != v}
        if not legacy:
            del data["num_threads"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> LoraTrainConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class TrainResult:
    """A trained adapter and how it got there."""

    adapter: LoraAdapter
    losses: list[float]  # mean next-token loss of each optimiser step
    n_tokens: int  # tokens trained on, all epochs together
    seconds: float  # everything: wrapping, validation and training
    train_seconds: float = 0.0  # the optimiser steps alone (throughput = n_tokens / this)
    val_before: float | None = None  # mean NLL per token on the validation chunks, at start
    val_after: float | None = None  # the same after the last step

    @property
    def tokens_per_second(self) -> float:
        seconds = self.train_seconds or self.seconds
        return self.n_tokens / seconds if seconds > 0 else 0.0


def _batches(
    chunks: Sequence[Sequence[int]], config: LoraTrainConfig, seed: int
) -> list[list[list[int]]]:
    """The fixed sequence of batches: a seeded shuffle per epoch, cut at the token budget."""
    rng = random.Random(seed)
    batches, used = [], 0
    for _ in range(config.epochs):
        order = list(range(len(chunks)))
        if config.shuffle:
            rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = [
                list(chunks[i][: config.max_seq_len])
                for i in order[start : start + config.batch_size]
            ]
            if config.max_tokens is not None:
                room = config.max_tokens - used
                if room <= 0:
                    return batches
                kept = []
                for ids in batch:
                    if room < 2:
                        break
                    kept.append(ids[:room])
                    room -= len(kept[-1])
                batch = kept
            if batch:
                batches.append(batch)
                used += sum(len(ids) for ids in batch)
    return batches


def planned_tokens(
    chunks_token_ids: Sequence[Sequence[int]], config: LoraTrainConfig, seed: int = 0
) -> int:
    """Tokens :func:`train_lora` will train on for these chunks and settings (budget planning)."""
    chunks = [ids for ids in chunks_token_ids if len(ids) >= 2]
    return sum(len(ids) for batch in _batches(chunks, config, seed) for ids in batch)


def _collate(batch: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # (b, T)
    labels = torch.full((len(batch), length), -100, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def _peft_config(config: LoraTrainConfig):
    from peft import LoraConfig

    targets = config.target_modules
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=targets if isinstance(targets, str) else list(targets),
        lora_dropout=0.0,
        bias="none",
        use_rslora=config.use_rslora,
        task_type="CAUSAL_LM",
    )


def _json_config(peft_config) -> dict:
    """PEFT's config as plain JSON types (sets become sorted lists), as adapter_config.json."""

    def plain(value):
        if isinstance(value, set | frozenset):
            return sorted(value)
        return str(value)

    return json.loads(json.dumps(peft_config.to_dict(), default=plain))


def lr_factor(step: int, total: int, config: LoraTrainConfig) -> float:
    """Multiplier of ``learning_rate`` at optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up over the first ``warmup_fraction`` of the steps (from 1/(warm-up steps), so
    the first step moves), then constant, or a cosine or linear decay to ``min_lr_ratio``.
    """
    warmup = int(round(config.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup - 1)  # 0 at the first, 1 at the last
    floor = config.min_lr_ratio
    if config.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def wrap_model(model: torch.nn.Module, config: LoraTrainConfig, seed: int, init=None):
    """PEFT-wrap ``model`` with a fresh LoRA (A drawn from ``seed``) or one that starts at the
    factors of ``init`` (a :class:`LoraAdapter` of the same shape: branched experts). The
    caller must :func:`unwrap_model` in ``finally``."""
    from peft import get_peft_model, set_peft_model_state_dict

    torch.manual_seed(seed)  # LoRA's A initialisation draws from torch's global generator
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        peft_model = get_peft_model(model, _peft_config(config))
    peft_model.eval()  # no dropout anywhere: training is a deterministic function of seed
    if init is not None:
        expected = set(_state_keys(peft_model))
        state = init.state_dict()
        if set(state) != expected or init.rank != config.rank:
            unwrap_model(model, peft_model)
            raise TrainConfigError(
                f"cannot start from an adapter of rank {init.rank} on {len(state) // 2} layers: "
                f"the training config asks for rank {config.rank} on {len(expected) // 2} "
                "(branch with the same rank, alpha and target modules)"
            )
        device = model_device(model)
        set_peft_model_state_dict(
            peft_model, {k: v.to(device, torch.float32) for k, v in state.items()}
        )
    return peft_model


def _state_keys(peft_model) -> list[str]:
    from peft import get_peft_model_state_dict

    return list(get_peft_model_state_dict(peft_model))


def adapter_of(peft_model) -> LoraAdapter:
    """The wrapped model's current LoRA factors, as float32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = {
        key: tensor.detach().to("cpu", torch.float32).clone()
        for key, tensor in get_peft_model_state_dict(peft_model).items()
    }
    return LoraAdapter.from_state_dict(
        state, _json_config(peft_model.peft_config["default"]), source="train_lora"
    )


def unwrap_model(model: torch.nn.Module, peft_model) -> None:
    """Undo :func:`wrap_model`: original linear modules back, weights untouched."""
    if peft_model is not None:
        peft_model.unload()
    _strip_peft_markers(model)


@torch.no_grad()
def mean_nll(
    model: torch.nn.Module,
    chunks_token_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    max_seq_len: int = 256,
    batch_size: int = 4,
) -> float | None:
    """Mean next-token negative log-likelihood per predicted token (nats) of ``model`` on the
    chunks (each cut to ``max_seq_len``); None when no chunk has two tokens."""
    chunks = [list(ids[:max_seq_len]) for ids in chunks_token_ids if len(ids) >= 2]
    if not chunks:
        return None
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(chunks), batch_size):
        inputs = _collate(chunks[start : start + batch_size], pad_token_id)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        logits = logits.logits[:, :-1].float()  # (b, T-1, vocab)
        targets = inputs["labels"][:, 1:]  # (b, T-1)
        total += float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
        )
        count += int((targets != -100).sum())
    return total / count


def train_lora(
    model: torch.nn.Module,
    chunks_token_ids: Sequence[Sequence[int]],
    config: LoraTrainConfig | None = None,
    seed: int = 0,
    progress: bool | str = False,
    pad_token_id: int | None = None,
    init: LoraAdapter | None = None,
    validation: Sequence[Sequence[int]] = (),
) -> TrainResult:
    """Train a LoRA on ``chunks_token_ids`` (lists of token ids) from the frozen ``model``.

    The LoRA starts fresh, or at the factors of ``init`` (branched experts). ``validation``
    chunks are scored (mean NLL per token) before the first step and after the last.
    ``progress`` shows a tqdm bar (a string becomes its description). ``pad_token_id`` fills
    padding positions (they are masked out of attention and loss; default: the model's pad or
    eos id, else 0).
    """
    config = config or LoraTrainConfig()
    chunks = [ids for ids in chunks_token_ids if len(ids) >= 2]
    if not chunks:
        raise TrainConfigError("train_lora needs at least one chunk of 2 or more tokens")
    if pad_token_id is None:
        pad_token_id = _default_pad_id(model)
    batches = _batches(chunks, config, seed)

    started = time.perf_counter()
    with _restored(model, config.num_threads):
        peft_model = wrap_model(model, config, seed, init)
        try:
            val_before = mean_nll(peft_model, validation, pad_token_id, config.max_seq_len)
            train_started = time.perf_counter()
            fp16 = model.dtype == torch.float16
            losses, n_tokens = _optimise(peft_model, batches, config, pad_token_id, progress, fp16)
            train_seconds = time.perf_counter() - train_started
            val_after = mean_nll(peft_model, validation, pad_token_id, config.max_seq_len)
            adapter = adapter_of(peft_model)
        finally:
            unwrap_model(model, peft_model)
    seconds = time.perf_counter() - started
    logger.info(
        "trained LoRA r=%d on %d tokens in %.1f s (%.0f tok/s), loss %.3f -> %.3f",
        config.rank,
        n_tokens,
        train_seconds,
        n_tokens / max(train_seconds, 1e-9),
        losses[0],
        losses[-1],
    )
    return TrainResult(
        adapter=adapter,
        losses=losses,
        n_tokens=n_tokens,
        seconds=seconds,
        train_seconds=train_seconds,
        val_before=val_before,
        val_after=val_after,
    )


@contextlib.contextmanager
def _restored(model: torch.nn.Module, num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch threads, then put back the model's
    ``requires_grad`` flags, its train/eval mode and the thread count, whatever happened."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    threads = torch.get_num_threads()
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        yield
    finally:
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, False))
        model.train(was_training)
        torch.set_num_threads(threads)


def _optimise(
    peft_model,
    batches: list,
    config: LoraTrainConfig,
    pad_token_id: int,
    progress: bool | str,
    scale_loss: bool,
) -> tuple[list[float], int]:
    """AdamW over the LoRA parameters, one step per batch; the losses and tokens seen."""
    from tqdm.auto import tqdm

    device = model_device(peft_model)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, len(batches), config)
    )
    # float16 activations underflow small gradients: scale the loss (a no-op otherwise;
    # the LoRA weights themselves stay float32 under PEFT's adapter autocast).
    scaler = torch.amp.GradScaler(device.type, enabled=scale_loss)
    losses: list[float] = []
    n_tokens = 0
    bar = tqdm(
        batches,
        desc=progress if isinstance(progress, str) else "train LoRA",
        disable=not progress,
        unit="step",
        leave=False,
    )
    for batch in bar:
        inputs = {k: v.to(device) for k, v in _collate(batch, pad_token_id).items()}
        loss = peft_model(**inputs).loss
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if config.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses.append(float(loss.detach()))
        n_tokens += int(inputs["attention_mask"].sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        checkpoint("train_step")
    return losses, n_tokens


def _default_pad_id(model) -> int:
    config = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _strip_peft_markers(model) -> None:
    """Remove attributes PEFT sets on the wrapped model, so it reads as never wrapped."""
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(model):
            delattr(model, attribute)
