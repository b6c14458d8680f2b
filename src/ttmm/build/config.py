"""The build configuration: every setting that determines a bank, from a file or the CLI.

A frozen dataclass with a docstring per field, loadable from TOML or YAML with the same keys as
the ``build_config.yaml`` that every build writes into its bank, so a bank can be rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from ttmm.assets import DEFAULT_BASE_MODEL, DEFAULT_ENCODER
from ttmm.build.corpus import CorpusSpec
from ttmm.build.train import LoraTrainConfig
from ttmm.device import DeviceError, dtype_name, resolve_device, resolve_dtype

DEFAULT_CORPORA = ("wiki@240", "stdlib@24")  # sized so K=16 with the baseline fits ~45 min


class BuildError(ValueError):
    """A build that cannot start or continue: what is wrong and what to do."""


def _known_dtype(name: str) -> bool:
    try:
        resolve_dtype(name, "cpu")  # the name only: availability is checked by resolved()
    except DeviceError:
        return False
    return True


@dataclass(frozen=True)
class BuildConfig:
    """Everything that determines a bank. Written, resolved, into the bank as build_config.yaml."""

    corpora: tuple[str, ...] = DEFAULT_CORPORA
    """Corpus spec strings (see :mod:`ttmm.build.corpus`), e.g. ``wiki@480``,
    ``dir:./docs:**/*.md``."""
    experts: int = 16
    """K, the number of clusters and so of LoRA experts."""
    base_model: str = DEFAULT_BASE_MODEL
    """Base model: the default alias, a local save_pretrained folder, a .gguf file (dequantised
    once, cached by its hash) or a hub id."""
    encoder: str = DEFAULT_ENCODER
    """Sentence encoder φ that embeds chunks (and, at test time, prompts)."""
    test_fraction: float = 0.15
    """Share of documents held out for evaluation (never chunked, clustered or trained on)."""
    split_seed: int = 0
    """Seed of the document-level train/test split."""
    window: int = 256
    """Chunk length in base-model tokens."""
    stride: int | None = None
    """Tokens between chunk starts; None = ``window`` (no overlap)."""
    min_tokens: int = 32
    """Shorter tails and documents are dropped."""
    max_chunks_per_document: int | None = 2
    """Keep at most this many chunks of a document (long source files would fill clusters
    alone); None keeps all."""
    seed: int = 0
    """Seed of clustering; expert k trains with seed + k, the baseline with seed + K."""
    with_finetune: bool = False
    """Also train the fine-tuning baseline: one LoRA on all training chunks, same total tokens."""
    near_duplicate_threshold: float | None = 0.8
    """Drop a held-out document whose word-shingle Jaccard similarity to some training document
    is at least this (MinHash LSH, then an exact check; :mod:`ttmm.build.dedup`); None keeps
    all held-out documents."""
    validation_fraction: float = 0.05
    """Share of the training documents (a seeded hash of split_seed and id) whose chunks train
    no adapter but measure every adapter's validation loss before and after training. Never
    the held-out evaluation documents."""
    budget_tokens: int | None = None
    """Training tokens of all experts together; each expert gets a share proportional to its
    cluster's tokens (more epochs when the share exceeds its data, a seeded subset when it is
    smaller). The fine-tuning baseline gets the same total. None: ``train`` decides (epochs,
    max_tokens) per adapter."""
    budget_minutes: float | None = None
    """Alternative to ``budget_tokens``: minutes of expert training, converted once to tokens
    at the start of the build from a measured throughput (a short calibration run on this
    build's model and device, with the training settings); the converted budget is kept in the
    build's state file so a resumed build uses the same one. With Ray, the minutes are those of
    one worker (divide the wall time by the number of workers)."""
    branch_from: str | None = None
    """``finetune``: train the fine-tuning baseline first, then start every expert from its
    factors (Branch-Train-Merge's seed phase; implies ``with_finetune``). None: experts start
    fresh from the base model."""
    continue_finetune: bool = False
    """Equal-compute control: also continue the fine-tuning adapter on all training chunks for
    as many tokens as the experts took together, saved as ``finetune_continued/``."""
    train: LoraTrainConfig = field(default_factory=LoraTrainConfig)
    """How each adapter is trained."""
    embed_batch_size: int = 64
    """Chunks per encoder batch."""
    label_terms: int = 4
    """TF-IDF terms in each expert's label."""
    executor: str = "sequential"
    """Where training runs: ``sequential`` or ``ray`` (does not change the adapters)."""
    ray_address: str | None = None
    """Address of a running Ray cluster; None starts a local Ray."""
    ray_num_cpus: int | None = None
    """CPUs of the local Ray (None: all); each task takes ``train.num_threads`` of them."""
    ray_max_retries: int = 2
    """Retries of a failed Ray task."""
    ray_gpus_per_task: float = 1.0
    """GPUs each Ray task asks for when ``device`` is CUDA (a fraction shares a GPU)."""
    device: str = "auto"
    """Where the base model and the encoder run: auto (CUDA, then MPS, then CPU), cpu, cuda,
    cuda:N or mps. Kept as given in the written config (the bank's manifest records the
    device the build found), so the config can rebuild the bank on another machine."""
    dtype: str = "auto"
    """The base model's dtype while training: auto (float32 on a CPU, bfloat16 on a GPU),
    float32, bfloat16 or float16. Adapters are saved in float32 whatever it is."""
    adapter_store: str | None = None
    """A folder where fine-tuning adapters are kept by their job's digest: a build whose
    fine-tuning job (same chunks, budget, recipe and seed) is already there links it instead
    of training it, so the banks of a sweep over K share one (placement: not in the hash)."""

    # Fields that choose where the work runs, not what it computes: left out of the hash, so a
    # build started sequentially may be resumed on Ray and the other way round.
    _PLACEMENT = (
        "executor",
        "ray_address",
        "ray_num_cpus",
        "ray_max_retries",
        "ray_gpus_per_task",
        "device",
        "adapter_store",
    )
    # Fields added after the first banks, with the value those banks were built with: left out
    # of the hash at that value, so older banks keep their hash and still resume.
    _ADDED_DEFAULTS = {
        "dtype": "float32",
        "near_duplicate_threshold": None,
        "validation_fraction": 0.0,
        "budget_tokens": None,
        "budget_minutes": None,
        "branch_from": None,
        "continue_finetune": False,
    }

    def __post_init__(self) -> None:
        if isinstance(self.corpora, str):
            object.__setattr__(self, "corpora", (self.corpora,))
        object.__setattr__(self, "corpora", tuple(self.corpora))
        if isinstance(self.train, dict):
            object.__setattr__(self, "train", LoraTrainConfig.from_dict(self.train))
        checks = {
            "corpora": len(self.corpora) >= 1,
            "experts": isinstance(self.experts, int) and self.experts >= 1,
            "test_fraction": 0.0 <= self.test_fraction < 1.0,
            "window": self.window >= 2,
            "stride": self.stride is None or 1 <= self.stride <= self.window,
            "min_tokens": 1 <= self.min_tokens <= self.window,
            "max_chunks_per_document": self.max_chunks_per_document is None
            or self.max_chunks_per_document >= 1,
            "embed_batch_size": self.embed_batch_size >= 1,
            "label_terms": self.label_terms >= 1,
            "ray_max_retries": self.ray_max_retries >= 0,
            "ray_gpus_per_task": self.ray_gpus_per_task > 0,
            "dtype": _known_dtype(self.dtype),
            "near_duplicate_threshold": self.near_duplicate_threshold is None
            or 0.0 < self.near_duplicate_threshold <= 1.0,
            "validation_fraction": 0.0 <= self.validation_fraction < 1.0,
            "budget_tokens": self.budget_tokens is None or self.budget_tokens >= 1,
            "budget_minutes": self.budget_minutes is None or self.budget_minutes > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise BuildError(f"BuildConfig.{name} = {getattr(self, name)!r} is out of range")
        if self.executor not in ("sequential", "ray"):
            raise BuildError(f"BuildConfig.executor = {self.executor!r}; use sequential or ray")
        if self.budget_tokens is not None and self.budget_minutes is not None:
            raise BuildError("give BuildConfig.budget_tokens or budget_minutes, not both")
        if self.branch_from not in (None, "finetune"):
            raise BuildError(
                f"BuildConfig.branch_from = {self.branch_from!r}; use finetune or leave it unset"
            )
        if (self.branch_from or self.continue_finetune) and not self.with_finetune:
            object.__setattr__(self, "with_finetune", True)  # both need the baseline
        for spec in self.corpora:
            CorpusSpec.parse(spec)  # fail on a bad spec before any work

    def to_dict(self) -> dict:
        data = asdict(self)
        data["corpora"] = list(self.corpora)
        data["train"] = self.train.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BuildConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise BuildError(
                f"unknown build setting(s): {', '.join(sorted(unknown))}; known: {sorted(known)}"
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BuildConfig:
        """Read a TOML (``.toml``) or YAML (``.yaml``/``.yml``) build configuration."""
        path = Path(path)
        if not path.is_file():
            raise BuildError(f"build config file {path} does not exist")
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(path.read_text())
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.safe_load(path.read_text()) or {}
            else:
                raise BuildError(f"{path}: use a .toml, .yaml or .yml build config")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as err:
            raise BuildError(f"{path}: cannot parse ({err})") from err
        if not isinstance(data, dict):
            raise BuildError(f"{path}: must hold a mapping of build settings")
        return cls.from_dict(data)

    def with_overrides(self, **overrides) -> BuildConfig:
        """A copy with the given (non-None) fields replaced; ``train_*`` keys go to ``train``."""
        train = {k[6:]: v for k, v in overrides.items() if k.startswith("train_") and v is not None}
        top = {k: v for k, v in overrides.items() if not k.startswith("train_") and v is not None}
        if train:
            top["train"] = LoraTrainConfig.from_dict({**self.train.to_dict(), **train})
        return replace(self, **top)

    def resolved(self) -> BuildConfig:
        """Pin what the defaults leave open (dtype, training threads), so the written config
        is exact. Raises :class:`~ttmm.device.DeviceError` for a device not usable here.

        ``dtype="auto"`` becomes the dtype this machine's device gets, so a bank built with
        ``auto`` on a GPU (bfloat16) differs in its hash from one built on a CPU (float32).

        Training threads default to half the CPUs: on a 2-core machine that other work shares,
        two torch threads per process thrash (SmolLM2-135M, r=8: two threads gave 106 tokens/s
        on a quiet machine but 7 under a load of 4, where one thread kept 36), and a local Ray
        then runs one single-threaded expert per core.
        """
        dtype = resolve_dtype(self.dtype, resolve_device(self.device))
        config = replace(self, dtype=dtype_name(dtype))
        if self.train.num_threads is not None:
            return config
        threads = max(1, (os.cpu_count() or 2) // 2)
        return replace(config, train=replace(self.train, num_threads=threads))

    def content_hash(self, legacy: bool = False) -> str:
        """Hash of the fields that determine the bank's contents (placement fields and the
        training thread count excluded). ``legacy``: the hash as it was before thread counts
        left it, which a build started then holds in its state file."""
        data = {
            k: v
            for k, v in self.to_dict().items()
            if k not in self._PLACEMENT and self._ADDED_DEFAULTS.get(k, object()) != v
        }
        data["train"] = self.train.hash_dict(legacy)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]
