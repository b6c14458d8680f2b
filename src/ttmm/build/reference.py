"""Import a bank in the paper's reference-code layout (``ttmerge``) into ours.

The reference layout is a folder of numbered PEFT adapter folders ``0/ … K-1/`` plus a
tensor of expert embeddings (K, dim) kept elsewhere. We validate every adapter against the
base model and the embeddings against the encoder *before* writing, then write the new bank
in a staging folder that is renamed into place only when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ttmm.adapter import load_adapter
from ttmm.assets import base_model_name, load_base_model
from ttmm.atomic import atomic_directory
from ttmm.bank import (
    Bank,
    BankError,
    BankManifest,
    ExpertInfo,
    base_model_record,
    expert_dir,
    write_centroids,
    write_manifest,
)
from ttmm.embed import Encoder
from ttmm.merge import ExpertMerger
from ttmm.routing import RoutingConfig

logger = logging.getLogger(__name__)
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy")


def load_embedding_tensor(path: Path) -> torch.Tensor:
    """A (K, dim) tensor from .safetensors (one tensor), .pt/.pth or .npy."""
    if not path.is_file():
        raise BankError(f"embeddings file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
            if len(tensors) != 1:
                raise BankError(f"{path} holds {sorted(tensors)}; expected exactly one tensor")
            tensor = next(iter(tensors.values()))
        elif path.suffix in (".pt", ".pth"):
            tensor = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".npy":
            tensor = torch.from_numpy(np.load(path, allow_pickle=False))
        else:
            raise BankError(f"{path}: unknown tensor format; use one of {TENSOR_SUFFIXES}")
    except BankError:
        raise
    except Exception as err:  # torch/numpy/safetensors each raise their own types
        raise BankError(f"cannot read embeddings from {path}: {err}") from err
    if not isinstance(tensor, torch.Tensor) or tensor.ndim != 2:
        raise BankError(f"{path}: expected a (K, dim) tensor")
    return tensor.to(torch.float32)


def _numbered_folders(src: Path) -> list[Path]:
    numbered = sorted((int(p.name), p) for p in src.iterdir() if p.is_dir() and p.name.isdigit())
    if not numbered:
        raise BankError(f"{src} has no numbered adapter folders 0/ … K-1/")
    ids = [i for i, _ in numbered]
    if ids != list(range(len(ids))):
        raise BankError(f"{src}: adapter folders must be numbered 0..K-1 without gaps, found {ids}")
    return [p for _, p in numbered]


def _find_embeddings(src: Path) -> Path:
    found = [p for p in src.iterdir() if p.is_file() and p.suffix in TENSOR_SUFFIXES]
    if len(found) != 1:
        raise BankError(
            f"{src}: found {len(found)} tensor files ({[p.name for p in found]}); "
            "name the expert embeddings with --embeddings"
        )
    return found[0]


def import_reference_bank(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    embeddings: str | os.PathLike | None = None,
    base_model: str | None = None,
    encoder: str | Encoder | None = None,
    routing: RoutingConfig | None = None,
    model: torch.nn.Module | None = None,
) -> Bank:
    """Convert ``src`` (reference layout) into a validated ttmm bank at ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise BankError(f"source folder {src} does not exist")
    if dst.exists() and any(dst.iterdir()):
        raise BankError(f"{dst} exists and is not empty; choose a new folder for the bank")
    folders = _numbered_folders(src)
    adapters = [load_adapter(folder) for folder in folders]
    centroids = load_embedding_tensor(Path(embeddings) if embeddings else _find_embeddings(src))
    if centroids.shape[0] != len(adapters):
        raise BankError(
            f"the embeddings have {centroids.shape[0]} rows, {src} holds {len(adapters)} adapters"
        )
    if not torch.isfinite(centroids).all() or (centroids.norm(dim=1) == 0).any():
        raise BankError("the embeddings hold NaN, infinite or all-zero rows")
    centroids = torch.nn.functional.normalize(centroids, dim=1)
    if model is None:
        model, _ = load_base_model(base_model)
    ExpertMerger(model, adapters)  # raises MergeError if any adapter does not fit the model
    encoder = encoder if isinstance(encoder, Encoder) else Encoder(encoder)
    if encoder.dim != centroids.shape[1]:
        raise BankError(
            f"the embeddings are {centroids.shape[1]}-dim but encoder {encoder.name!r} gives "
            f"{encoder.dim}-dim vectors; pass the encoder that made them with --encoder"
        )
    if dst.exists():
        dst.rmdir()  # empty, checked above
    with atomic_directory(dst) as staging:
        experts = []
        for k, (folder, adapter) in enumerate(zip(folders, adapters)):
            shutil.copytree(folder, staging / expert_dir(k))
            experts.append(
                ExpertInfo.describe(k, expert_dir(k), adapter, staging, label=f"expert {k}")
            )
        write_centroids(staging, centroids)
        write_manifest(
            staging,
            BankManifest(
                base_model=base_model_record(base_model_name(base_model), model),
                encoder={"name": encoder.name, "dim": encoder.dim},
                routing=(routing or RoutingConfig.from_reference()).to_dict(),
                experts=experts,
                data={"imported_from": str(src.resolve())},
            ),
        )
    return Bank.load(dst)
