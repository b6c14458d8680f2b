"""The one LoRA trainer: experts, the fine-tuning baseline and test-time training (design §2).

``train_lora`` wraps a frozen base model with PEFT, minimises the next-token loss on a list of
token chunks with AdamW, and returns the factors as a :class:`~ttmm.adapter.LoraAdapter`. It
leaves the caller's model exactly as it found it (PEFT wrapper unloaded in ``finally``, base
weights untouched, ``requires_grad`` and train/eval mode restored), because test-time training
calls it on the live model. The same seed, data and thread count give the same adapter.
"""

from __future__ import annotations

import json
import logging
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ttmm.adapter import LoraAdapter
from ttmm.device import model_device

logger = logging.getLogger(__name__)


class TrainConfigError(ValueError):
    """A training setting out of range; the message names the field."""


@dataclass(frozen=True)
class LoraTrainConfig:
    """How one LoRA adapter is trained. Defaults fit a 2-core CPU (about 100 tokens/s at r=8)."""

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
    """AdamW learning rate (constant)."""
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
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


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


def train_lora(
    model: torch.nn.Module,
    chunks_token_ids: Sequence[Sequence[int]],
    config: LoraTrainConfig | None = None,
    seed: int = 0,
    progress: bool | str = False,
    pad_token_id: int | None = None,
) -> TrainResult:
    """Train a fresh LoRA on ``chunks_token_ids`` (lists of token ids) from the frozen ``model``.

    ``progress`` shows a tqdm bar (a string becomes its description). ``pad_token_id`` fills
    padding positions (they are masked out of attention and loss; default: the model's pad or
    eos id, else 0).
    """
    from peft import get_peft_model, get_peft_model_state_dict
    from tqdm.auto import tqdm

    config = config or LoraTrainConfig()
    chunks = [ids for ids in chunks_token_ids if len(ids) >= 2]
    if not chunks:
        raise TrainConfigError("train_lora needs at least one chunk of 2 or more tokens")
    if pad_token_id is None:
        pad_token_id = _default_pad_id(model)
    batches = _batches(chunks, config, seed)
    device = model_device(model)

    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    threads = torch.get_num_threads()
    peft_model = None
    started = time.perf_counter()
    try:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        torch.manual_seed(seed)  # LoRA's A initialisation draws from torch's global generator
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
            )
            peft_model = get_peft_model(model, _peft_config(config))
        peft_model.eval()  # no dropout anywhere: training is a deterministic function of seed
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=config.learning_rate, weight_decay=config.weight_decay
        )
        # float16 activations underflow small gradients: scale the loss (a no-op otherwise;
        # the LoRA weights themselves stay float32 under PEFT's adapter autocast).
        scaler = torch.amp.GradScaler(device.type, enabled=model.dtype == torch.float16)
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
            losses.append(float(loss.detach()))
            n_tokens += int(inputs["attention_mask"].sum())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        state = {
            key: tensor.detach().to("cpu", torch.float32).clone()
            for key, tensor in get_peft_model_state_dict(peft_model).items()
        }
        adapter = LoraAdapter.from_state_dict(
            state, _json_config(peft_model.peft_config["default"]), source="train_lora"
        )
    finally:
        if peft_model is not None:
            peft_model.unload()  # puts the original linear modules back, weights untouched
        _strip_peft_markers(model)
        for name, param in model.named_parameters():
            param.requires_grad_(requires_grad.get(name, False))
        model.train(was_training)
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    logger.info(
        "trained LoRA r=%d on %d tokens in %.1f s (%.0f tok/s), loss %.3f -> %.3f",
        config.rank,
        n_tokens,
        seconds,
        n_tokens / max(seconds, 1e-9),
        losses[0],
        losses[-1],
    )
    return TrainResult(adapter=adapter, losses=losses, n_tokens=n_tokens, seconds=seconds)


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
