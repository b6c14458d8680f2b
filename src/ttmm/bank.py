"""The expert bank on disk: manifest, centroids, one PEFT adapter folder per expert.

Layout::

    BANK/
      manifest.json            format version, base model and encoder identity, routing
                               defaults, per-expert metadata; written last, atomically
      centroids.safetensors    {"centroids": (K, dim) float32, unit rows}
      experts/000/ …           adapter_config.json + adapter_model.safetensors (PEFT layout)
      finetune/                optional fine-tuning baseline adapter (same layout)
      finetune_continued/      optional equal-compute control: the baseline continued for as
                               many tokens as the experts took together

A folder without ``manifest.json`` is not a bank. :meth:`Bank.load` validates the manifest,
the centroids and every file but the experts' against their checksums; an expert's files are
checked when it is first read (:meth:`Bank.read_expert`), so that a bank of 10,000 experts
opens in a second and a merge reads and checks only its own experts.
:meth:`Bank.check_compatible` checks the bank against a base model and an encoder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ttmm.adapter import (
    WEIGHTS_NAME,
    AdapterError,
    LoraAdapter,
    adapter_layer_ranks,
    load_adapter,
)
from ttmm.atomic import atomic_file, atomic_write_json
from ttmm.bank_files import MANIFEST_NAME, FileCheck, check_files, file_checksums, sha256_file
from ttmm.routing import RoutingConfig, RoutingError, RoutingPlan

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CENTROIDS_NAME = "centroids.safetensors"
FINETUNE_DIR = "finetune"
FINETUNE_CONTINUED_DIR = "finetune_continued"
CENTROID_NORM_TOLERANCE = 1e-3


class BankError(ValueError):
    """A bank that cannot be used: what is wrong and what to do."""


def expert_dir(expert_id: int) -> str:
    """Relative folder of expert ``expert_id`` inside a bank."""
    return f"experts/{expert_id:03d}"


def ttmm_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ttmm")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class ExpertInfo:
    """Manifest entry of one adapter in the bank."""

    id: int
    path: str
    """Folder relative to the bank root."""
    label: str = ""
    """Human label, e.g. the top TF-IDF terms of the expert's training chunks."""
    rank: int = 0
    alpha: float = 0.0
    n_parameters: int = 0
    size_bytes: int = 0
    n_chunks: int = 0
    n_tokens: int = 0
    loss_curve: list[float] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    """Validation losses on its own cluster (:class:`ttmm.quality_gate.ExpertHealth`)."""
    disabled: dict | None = None
    """``{"by", "reason", "at"}`` when routing must not select it (:mod:`ttmm.quality_gate`)."""

    @classmethod
    def describe(
        cls, id: int, path: str, adapter: LoraAdapter, bank_dir: str | os.PathLike, **fields_
    ) -> ExpertInfo:
        """An entry for ``adapter`` saved at ``bank_dir/path``, sizes filled in."""
        weights = Path(bank_dir) / path / WEIGHTS_NAME
        return cls(
            id=id,
            path=path,
            rank=adapter.rank,
            alpha=float(adapter.config.get("lora_alpha", 0.0)),
            n_parameters=adapter.n_parameters,
            size_bytes=weights.stat().st_size if weights.exists() else 0,
            **fields_,
        )

    @classmethod
    def from_dict(cls, data: dict, where: str) -> ExpertInfo:
        missing = {"id", "path"} - set(data)
        if missing:
            raise BankError(f"{where}: expert entry lacks {sorted(missing)}; rebuild the bank")
        known = {f.name for f in fields(cls)}
        data = {"n_parameters": data.get("num_parameters", 0), **data}  # its name until 0.2
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class BankManifest:
    """Everything a bank says about itself; ``manifest.json`` is this, as JSON."""

    base_model: dict
    """``{"name", "architecture", "fingerprint"}`` of the base model the experts were trained on."""
    encoder: dict
    """``{"name", "dim"}`` of the sentence encoder that made the centroids."""
    routing: dict
    """Default :class:`RoutingConfig` fields for this bank."""
    experts: list[ExpertInfo]
    finetune: ExpertInfo | None = None
    finetune_continued: ExpertInfo | None = None
    """The equal-compute control (``finetune_continued/``), when the build made one."""
    branch_from: str | None = None
    """``"finetune"`` when every expert started from the fine-tuning adapter (branched
    experts): routing that keeps no expert should then fall back to that adapter."""
    data: dict = field(default_factory=dict)
    """Where the bank's data lives (split, chunk index); written by the build."""
    build: dict = field(default_factory=dict)
    """The resolved build configuration, stage timings and cluster quality."""
    files: dict[str, str] = field(default_factory=dict)
    """sha256 of every file of the bank but the manifest, by path relative to the bank;
    filled in by :func:`write_manifest` and checked by :meth:`Bank.load` (an expert's files
    on its first read)."""
    adapted_layers: dict[str, int] = field(default_factory=dict)
    """Every layer some expert adapts, with the largest rank any expert gives it; filled in
    by :func:`write_manifest`, so that a merger can lay out a large bank without reading
    every expert (empty in banks written before it: then they are read once)."""
    history: list[dict] = field(default_factory=list)
    """Changes to the bank after its build (experts disabled or enabled, updates), oldest
    first."""
    lineage: dict = field(default_factory=dict)
    """For a bank made by ``ttmm update``: its parent (folder and manifest digest), the corpora
    added and what changed (:mod:`ttmm.build.update`); empty for a bank built from scratch."""
    format_version: int = FORMAT_VERSION
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    ttmm_version: str = field(default_factory=ttmm_version)
    _by_folder: dict[str, list[str]] | None = field(default=None, repr=False, compare=False)
    """``files`` by folder, built on first use (not written)."""

    def to_dict(self) -> dict:
        data = asdict(self)
        del data["_by_folder"]
        return data

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> BankManifest:
        required = ("format_version", "base_model", "encoder", "routing", "experts")
        missing = [key for key in required if key not in data]
        if missing:
            raise BankError(f"{where}: missing field(s) {missing}; the manifest is incomplete")
        if data["format_version"] != FORMAT_VERSION:
            raise BankError(
                f"{where}: format_version {data['format_version']!r}, this ttmm reads "
                f"{FORMAT_VERSION}; rebuild the bank or upgrade ttmm"
            )
        for key, subkeys in (("base_model", ("name", "fingerprint")), ("encoder", ("name", "dim"))):
            if not isinstance(data[key], dict) or any(s not in data[key] for s in subkeys):
                raise BankError(f"{where}: {key} must be an object with fields {list(subkeys)}")
        if not isinstance(data["experts"], list) or not data["experts"]:
            raise BankError(f"{where}: 'experts' must be a non-empty list")
        experts = [ExpertInfo.from_dict(e, where) for e in data["experts"]]
        if [e.id for e in experts] != list(range(len(experts))):
            raise BankError(f"{where}: expert ids must be 0..K-1 in order")
        adapters = ("experts", "finetune", "finetune_continued")
        known = {f.name for f in fields(cls)}
        return cls(
            **{k: v for k, v in data.items() if k in known and k not in adapters},
            experts=experts,
            **{
                key: ExpertInfo.from_dict(data[key], where) if data.get(key) else None
                for key in adapters[1:]
            },
        )


def model_fingerprint(model: torch.nn.Module) -> str:
    """Hash of the architecture and every parameter's name and shape (not the values)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    for name, param in model.state_dict().items():
        digest.update(f"{name}:{tuple(param.shape)};".encode())
    return digest.hexdigest()[:16]


def base_model_record(name: str, model: torch.nn.Module) -> dict:
    return {
        "name": name,
        "architecture": type(model).__name__,
        "fingerprint": model_fingerprint(model),
    }


def write_centroids(bank_dir: str | os.PathLike, centroids) -> None:
    """Write the (K, dim) centroid matrix atomically."""
    tensor = torch.as_tensor(centroids, dtype=torch.float32).contiguous()
    if tensor.ndim != 2:
        raise BankError(f"centroids must be a (K, dim) matrix, got shape {tuple(tensor.shape)}")
    path = Path(bank_dir) / CENTROIDS_NAME
    with atomic_file(path) as staging:
        save_file({"centroids": tensor}, staging)


def write_manifest(
    bank_dir: str | os.PathLike, manifest: BankManifest, known: dict[str, str] | None = None
) -> None:
    """Write ``manifest.json`` atomically, with the checksum of every other file of the bank
    and the layers its experts adapt; call it last: it is what makes the folder a bank.
    ``known``: checksums already known by relative path (files hard-linked from a parent
    bank), not read again."""
    manifest.files = file_checksums(bank_dir, known)
    manifest._by_folder = None
    if not manifest.adapted_layers:
        manifest.adapted_layers = adapted_layers(
            Path(bank_dir) / info.path / WEIGHTS_NAME for info in manifest.experts
        )
    atomic_write_json(Path(bank_dir) / MANIFEST_NAME, manifest.to_dict())


def adapted_layers(weight_files) -> dict[str, int]:
    """``{layer path: largest rank}`` over PEFT weight files, from their headers only."""
    layers: dict[str, int] = {}
    for path in weight_files:
        for layer, rank in adapter_layer_ranks(path).items():
            layers[layer] = max(rank, layers.get(layer, 0))
    return dict(sorted(layers.items()))


def manifest_digest(bank_dir: str | os.PathLike) -> str:
    """sha256 of a bank's ``manifest.json``: it holds every other file's checksum, so it names
    the whole bank (a version)."""
    return sha256_file(Path(bank_dir) / MANIFEST_NAME)


class Bank:
    """A validated expert bank; an expert's adapter is read (and its files checked) on use."""

    def __init__(self, path: Path, manifest: BankManifest, centroids: torch.Tensor):
        self.path = path
        self.manifest = manifest
        self.centroids = centroids  # (K, dim), unit rows
        self.verify = True
        """Check an expert's files against the manifest's sha256 when first read."""
        self._verified: set[int] = set()
        self._verified_lock = threading.Lock()

    @property
    def num_experts(self) -> int:
        return len(self.manifest.experts)

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig.from_dict(self.manifest.routing)

    def label(self, expert_id: int) -> str:
        return self.manifest.experts[expert_id].label

    @property
    def disabled(self) -> frozenset[int]:
        """Experts routing must not select (the quality gate's, or an operator's)."""
        return frozenset(e.id for e in self.manifest.experts if e.disabled is not None)

    def describe_plan(self, plan: RoutingPlan) -> dict:
        """The plan as JSON with each expert's label: what the CLI and the server show."""
        data = plan.to_dict()
        for entry in data["experts"]:
            entry["label"] = self.label(entry["id"])
        for entry in data.get("skipped_disabled", []):
            entry["reason"] = self.manifest.experts[entry["id"]].disabled["reason"]
        return data

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> Bank:
        """Open and validate a bank: manifest fields, the checksum of every file but the
        experts' (theirs are checked on each expert's first read), centroids. ``verify=False``
        skips the checksums (for a trusted bank); banks written before checksums existed load
        with a warning."""
        path = Path(path)
        if not path.is_dir():
            raise BankError(f"bank folder {path} does not exist")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BankError(
                f"{path} has no {MANIFEST_NAME}: it is not a ttmm bank (or its build did not "
                "finish; rerun `ttmm build` with the same --out to resume it)"
            )
        try:
            raw = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BankError(f"{manifest_path}: not valid JSON ({err}); rebuild the bank") from err
        if not isinstance(raw, dict):
            raise BankError(f"{manifest_path}: must hold a JSON object")
        manifest = BankManifest.from_dict(raw, str(manifest_path))
        if verify:
            experts = {p for info in manifest.experts for p in _folder_files(manifest, info.path)}
            _verify_files(path, manifest, [p for p in manifest.files if p not in experts])
        try:
            RoutingConfig.from_dict(manifest.routing)
        except (RoutingError, TypeError) as err:
            raise BankError(f"{manifest_path}: bad routing defaults: {err}") from err
        centroids = _load_centroids(path, len(manifest.experts), int(manifest.encoder["dim"]))
        bank = cls(path, manifest, centroids)
        bank.verify = verify
        return bank

    def read_expert(self, expert_id: int, dtype: torch.dtype | None = torch.float32) -> LoraAdapter:
        """Expert ``expert_id``'s adapter, read from disk (its files checked on the first
        read by this bank object, unless it was loaded with ``verify=False``)."""
        info = self.manifest.experts[expert_id]
        folder = self.path / info.path
        contents = None
        if self.verify and self.manifest.files and expert_id not in self._verified:
            contents = self._read_checked(_folder_files(self.manifest, info.path))
            with self._verified_lock:
                self._verified.add(expert_id)
        try:
            return load_adapter(folder, dtype, contents)
        except AdapterError as err:
            raise BankError(f"expert {expert_id}: {err}") from err

    def _read_checked(self, paths: list[str]) -> dict[str, bytes]:
        """The bytes of the bank's files at ``paths`` by file name, each checked against its
        sha256 as read (one read per file: the adapter then loads from these bytes)."""
        contents, checks = {}, []
        for rel in paths:
            expected = self.manifest.files[rel]
            try:
                data = (self.path / rel).read_bytes()
            except FileNotFoundError:
                checks.append(FileCheck(rel, "missing", expected))
                continue
            actual = hashlib.sha256(data).hexdigest()
            checks.append(
                FileCheck(rel, "ok" if actual == expected else "changed", expected, actual)
            )
            contents[rel.rpartition("/")[2]] = data
        _raise_for_bad(self.path, checks)
        return contents

    def adapters(self) -> list[LoraAdapter]:
        """All expert adapters in id order, read from disk (for export, import and tests;
        an engine reads them through its merger's cache)."""
        return [self.read_expert(k) for k in range(self.num_experts)]

    def layer_ranks(self) -> dict[str, int]:
        """Every layer some expert adapts, with its largest rank: from the manifest, or read
        from every expert's header (banks written before the manifest recorded them)."""
        if self.manifest.adapted_layers:
            return dict(self.manifest.adapted_layers)
        return adapted_layers(
            self.path / info.path / WEIGHTS_NAME for info in self.manifest.experts
        )

    def finetune_adapter(self, continued: bool = False) -> LoraAdapter | None:
        """The fine-tuning baseline, or (``continued``) its equal-compute continuation."""
        info = self.manifest.finetune_continued if continued else self.manifest.finetune
        if info is None:
            return None
        try:
            return load_adapter(self.path / info.path)
        except AdapterError as err:
            raise BankError(f"fine-tuning adapter: {err}") from err

    def check_compatible(self, model: torch.nn.Module, encoder_dim: int | None = None) -> None:
        """Raise :class:`BankError` if the bank was made for another base model or encoder."""
        expected = self.manifest.base_model
        actual = model_fingerprint(model)
        if expected["fingerprint"] != actual:
            raise BankError(
                f"bank {self.path} was built for base model {expected['name']!r} "
                f"({expected.get('architecture', '?')}, fingerprint {expected['fingerprint']}), "
                f"but the loaded model is {type(model).__name__} with fingerprint {actual}; "
                "load the bank's base model (--base-model) or rebuild the bank"
            )
        if encoder_dim is not None and encoder_dim != self.centroids.shape[1]:
            raise BankError(
                f"bank {self.path} has {self.centroids.shape[1]}-dim centroids but the encoder "
                f"gives {encoder_dim}-dim embeddings; use the bank's encoder "
                f"{self.manifest.encoder['name']!r}"
            )


def _folder_files(manifest: BankManifest, folder: str) -> list[str]:
    """The recorded files directly inside ``folder`` (an adapter's folder), by relative path."""
    if manifest._by_folder is None:
        by_folder: dict[str, list[str]] = {}
        for rel in manifest.files:
            by_folder.setdefault(rel.rpartition("/")[0], []).append(rel)
        manifest._by_folder = by_folder
    return manifest._by_folder.get(folder.rstrip("/"), [])


def _verify_files(path: Path, manifest: BankManifest, paths: Iterable[str] | None = None) -> None:
    """Check the bank's files (or those of ``paths``); the first bad one is named in the
    error."""
    if not manifest.files:
        logger.warning(
            "bank %s records no file checksums (written by ttmm before 0.2): its files cannot "
            "be verified; rebuild it to add them",
            path,
        )
        return
    _raise_for_bad(path, check_files(path, manifest.files, paths))


def _raise_for_bad(path: Path, checks: list[FileCheck]) -> None:
    """Raise :class:`BankError` naming the first file of ``checks`` that is not ok."""
    bad = [check for check in checks if check.status != "ok"]
    if bad:
        first = bad[0]
        what = (
            "is missing"
            if first.status == "missing"
            else f"has sha256 {first.actual[:12]}..., not the {first.expected[:12]}... the "
            "manifest records: it is corrupt or was changed"
        )
        more = f" ({len(bad) - 1} more file(s) too)" if len(bad) > 1 else ""
        raise BankError(
            f"{path / first.path} {what}{more}; re-copy the bank or rebuild it "
            "(`ttmm info --verify` lists every file)"
        )


def _load_centroids(path: Path, num_experts: int, dim: int) -> torch.Tensor:
    centroids_path = path / CENTROIDS_NAME
    if not centroids_path.is_file():
        raise BankError(f"{path} has no {CENTROIDS_NAME}; rebuild the bank")
    try:
        tensors = load_file(centroids_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise BankError(
            f"{centroids_path}: corrupt or truncated ({err}); rebuild the bank"
        ) from err
    if "centroids" not in tensors:
        raise BankError(f"{centroids_path}: no 'centroids' tensor (found {sorted(tensors)})")
    centroids = tensors["centroids"].to(torch.float32)
    if tuple(centroids.shape) != (num_experts, dim):
        raise BankError(
            f"{centroids_path}: shape {tuple(centroids.shape)}, but the manifest lists "
            f"{num_experts} experts and a {dim}-dim encoder"
        )
    norms = centroids.norm(dim=1)
    if not torch.isfinite(centroids).all() or (norms - 1).abs().max() > CENTROID_NORM_TOLERANCE:
        raise BankError(
            f"{centroids_path}: centroids must be finite unit vectors; rebuild the bank"
        )
    return centroids
