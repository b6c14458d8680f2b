"""The training plan of a build: one job per adapter, and how the token budget is shared.

With a budget B (``BuildConfig.budget_tokens``, or ``budget_minutes`` converted once by
:func:`measure_throughput`), expert k trains on

    B_k = B · T_k / Σ_j T_j        (T_k = tokens of cluster k's chunks; largest remainders,
                                    so Σ_k B_k = B exactly)

tokens: ceil(B_k / T_k) epochs cut at B_k, so an expert whose share exceeds its data sees it
more than once, and one whose share is smaller sees a seeded subset (the first B_k tokens of
its seeded shuffle). The fine-tuning baseline gets B on all chunks. Without a budget each
adapter trains ``train.epochs`` passes (the baseline capped at the experts' total), as before.

Branched experts start from the fine-tuning adapter (design §7); the equal-compute control
continues the fine-tuning adapter on all chunks for as many tokens as the experts planned.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ttmm.adapter import LoraAdapter
from ttmm.build.config import BuildConfig, BuildError
from ttmm.build.corpus import Chunk
from ttmm.build.executors import CONTINUED_JOB, FINETUNE_JOB, TrainJob
from ttmm.build.train import LoraTrainConfig, planned_tokens, train_lora

CALIBRATION_CHUNKS = 6  # chunks of the throughput measurement behind budget_minutes
FINETUNE_SEED = 16
"""The fine-tuning adapter trains with seed + 16 (its continuation + 17) whatever K is, so that
every bank of a sweep over K shares one fine-tuning job (16: the offset K = 16 banks had when
the seed followed K, so theirs keep their digests)."""


def budget_shares(data_tokens: Sequence[int], budget: int) -> list[int]:
    """B_k = B · T_k / Σ T_j rounded by largest remainders (ties to the lower k): sums to B."""
    total = sum(data_tokens)
    if total <= 0:
        raise BuildError("no training tokens to share a budget over")
    exact = [budget * t / total for t in data_tokens]
    shares = [math.floor(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda k: (-(exact[k] - shares[k]), k))
    for k in order[: budget - sum(shares)]:
        shares[k] += 1
    return shares


def budgeted(train: LoraTrainConfig, share: int, data_tokens: int) -> LoraTrainConfig:
    """``train`` set to train on exactly ``share`` tokens of data holding ``data_tokens``."""
    if share < 2:
        raise BuildError(f"the token budget leaves an adapter {share} token(s); raise --budget")
    return replace(train, max_tokens=share, epochs=max(1, math.ceil(share / max(data_tokens, 1))))


def data_tokens(token_ids: Sequence[Sequence[int]], train: LoraTrainConfig) -> int:
    """Tokens one pass over these chunks trains on (each cut to ``max_seq_len``)."""
    return sum(min(len(ids), train.max_seq_len) for ids in token_ids if len(ids) >= 2)


def train_job(config: BuildConfig, job_id, ids, seed, train, pad_id, init=None, validation=()):
    """A :class:`TrainJob` of ``config``'s model, device and dtype."""
    return TrainJob(
        job_id,
        tuple(ids),
        seed,
        train,
        config.base_model,
        pad_id,
        config.device,
        config.dtype,
        init=init,
        validation=tuple(validation),
    )


def expert_jobs(
    config: BuildConfig,
    chunks: list[Chunk],
    assignments: np.ndarray,
    validation: list[Chunk],
    val_assignments: np.ndarray,
    pad_id: int,
    budget: int | None,
    init: LoraAdapter | None = None,
) -> list[TrainJob]:
    """One job per expert; validation chunks go to the expert of their nearest centroid."""
    members = [
        [chunks[i].token_ids for i in np.flatnonzero(assignments == k)]
        for k in range(config.experts)
    ]
    configs = [config.train] * config.experts
    if budget is not None:
        sizes = [data_tokens(ids, config.train) for ids in members]
        configs = [
            budgeted(config.train, share, size)
            for share, size in zip(budget_shares(sizes, budget), sizes, strict=True)
        ]
    return [
        train_job(
            config,
            k,
            members[k],
            config.seed + k,
            configs[k],
            pad_id,
            init,
            [validation[i].token_ids for i in np.flatnonzero(val_assignments == k)],
        )
        for k in range(config.experts)
    ]


def planned(job: TrainJob) -> int:
    """Tokens ``job`` will train on."""
    return planned_tokens(job.token_ids, job.config, job.seed)


def finetune_job(
    config: BuildConfig,
    chunks: list[Chunk],
    validation: list[Chunk],
    pad_id: int,
    budget: int,
    init: LoraAdapter | None = None,
    job_id: int = FINETUNE_JOB,
) -> TrainJob:
    """The fine-tuning baseline on all chunks for ``budget`` tokens (or, with ``init`` and
    ``CONTINUED_JOB``, its continuation: the equal-compute control)."""
    ids = [c.token_ids for c in chunks]
    train = budgeted(config.train, budget, data_tokens(ids, config.train))
    seed = config.seed + FINETUNE_SEED + (1 if job_id == CONTINUED_JOB else 0)
    return train_job(
        config, job_id, ids, seed, train, pad_id, init, [c.token_ids for c in validation]
    )


def job_digest(job: TrainJob, legacy: bool = False) -> str:
    """Identity of a job's result: a finished adapter with this digest is reused on resume.
    ``legacy``: the digest as it was when the thread count was part of it."""
    identity = [job.id, job.seed, job.config.hash_dict(legacy)]
    if job.dtype != "float32":  # float32 adapters keep the digest they had before dtypes
        identity.append(job.dtype)
    digest = hashlib.sha256(json.dumps(identity).encode())
    for ids in job.token_ids:
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(b"|")
    if job.validation:  # absent before validation splits: old digests unchanged
        digest.update(b"validation")
        for ids in job.validation:
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
    if job.init is not None:
        digest.update(b"init")
        for name, tensor in sorted(job.init.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def measure_throughput(model, config: BuildConfig, chunks: list[Chunk], pad_id: int) -> float:
    """Training tokens per second of this model, device and recipe (a short seeded run on
    the first chunks; its adapter is thrown away)."""
    ids = [c.token_ids for c in chunks[:CALIBRATION_CHUNKS]]
    train = replace(config.train, epochs=1, max_tokens=None)
    result = train_lora(model, ids, train, seed=config.seed, pad_token_id=pad_id)
    return result.tokens_per_second
