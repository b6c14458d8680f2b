"""LoRA adapters in memory and in PEFT's on-disk layout.

One :class:`LoraAdapter` holds, for every adapted linear layer, the factors
A (r × d_in) and B (d_out × r) and the scale s = alpha / r (alpha / sqrt(r) with
rsLoRA), as in design notes §2. Experts, the fine-tuning baseline and TTT all
produce and consume this one type; on disk it is a PEFT folder
(``adapter_config.json`` + ``adapter_model.safetensors``) that PEFT itself loads.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load, save_file

from ttmm.atomic import atomic_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# PEFT writes every key under the wrapper it puts around the model; this is the
# file format's prefix, not an architecture's module name.
PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter folder or state dict that cannot be used, with the reason and the fix."""


@dataclass(frozen=True)
class LoraLayer:
    """The LoRA factors of one adapted linear layer."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float  # s = alpha / r, or alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """ΔW = s · B A, shape (d_out, d_in)."""
        return self.scale * (self.B @ self.A)


@dataclass
class LoraAdapter:
    """A LoRA adapter: module path → factors, plus the PEFT config it came with."""

    layers: dict[str, LoraLayer]
    config: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(layer.rank for layer in self.layers.values())

    @property
    def n_parameters(self) -> int:
        return sum(layer.A.numel() + layer.B.numel() for layer in self.layers.values())

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        config: dict,
        source: str = "adapter",
        finite_checked: bool = False,
    ):
        """Build from a PEFT state dict (``...q_proj.lora_A.weight`` keys) and its config.
        ``finite_checked``: the caller has checked every value is finite (as
        :func:`load_adapter` does over a file's bytes in one pass)."""
        _check_supported(config, source)
        factors: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _LORA_KEY.match(key)
            if match is None:
                raise AdapterError(
                    f"{source}: unexpected tensor {key!r}; only LoRA factors of linear layers "
                    "(lora_A / lora_B) are supported (no modules_to_save, biases or embeddings)"
                )
            module = match["module"].removeprefix(PEFT_PREFIX)
            factors.setdefault(module, {})[match["factor"]] = tensor
        if not factors:
            raise AdapterError(f"{source}: holds no LoRA tensors")
        layers = {}
        for module, pair in factors.items():
            if set(pair) != {"A", "B"}:
                missing = ({"A", "B"} - set(pair)).pop()
                raise AdapterError(f"{source}: layer {module} has no lora_{missing} tensor")
            A, B = pair["A"], pair["B"]
            if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
                raise AdapterError(
                    f"{source}: layer {module} has lora_A {tuple(A.shape)} and lora_B "
                    f"{tuple(B.shape)}; expected (r, d_in) and (d_out, r)"
                )
            if not finite_checked and not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise AdapterError(f"{source}: layer {module} holds NaN or infinite values")
            layers[module] = LoraLayer(A=A, B=B, scale=_scale(config, module, A.shape[0]))
        return cls(layers=layers, config=dict(config))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT-layout tensors, as ``adapter_model.safetensors`` holds them."""
        state = {}
        for module, layer in self.layers.items():
            state[f"{PEFT_PREFIX}{module}.lora_A.weight"] = layer.A.contiguous()
            state[f"{PEFT_PREFIX}{module}.lora_B.weight"] = layer.B.contiguous()
        return state


def _check_supported(config: dict, source: str) -> None:
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{source}: adapter config has no {key!r} field")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(
            f"{source}: peft_type is {config['peft_type']!r}; only LORA is supported"
        )
    if config.get("use_dora"):
        raise AdapterError(
            f"{source}: DoRA adapters cannot be merged as ΔW = s·BA; retrain without DoRA"
        )
    if config.get("bias", "none") != "none":
        raise AdapterError(
            f"{source}: bias={config['bias']!r} is not supported; train with bias='none'"
        )


def _pattern_value(patterns: dict, module: str):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _scale(config: dict, module: str, rank: int) -> float:
    alpha = _pattern_value(config.get("alpha_pattern"), module)
    alpha = config["lora_alpha"] if alpha is None else alpha
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank


def load_adapter(
    path: str | os.PathLike,
    dtype: torch.dtype | None = torch.float32,
    contents: dict[str, bytes] | None = None,
) -> LoraAdapter:
    """Read a PEFT LoRA folder, with a clear error for anything missing or corrupt.
    ``contents`` holds files of the folder already read, by name (a bank that checked their
    checksums): they are not read again."""
    path = Path(path)
    contents = contents or {}
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for required in (config_path, weights_path):
        if required.name not in contents and not required.is_file():
            raise AdapterError(f"{path}: missing {required.name}; is this a PEFT adapter folder?")
    try:
        config = json.loads(contents.get(CONFIG_NAME) or config_path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err}); rewrite or retrain it") from err
    try:
        weights = contents.get(WEIGHTS_NAME) or weights_path.read_bytes()
        state = load(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(
            f"{weights_path}: corrupt or truncated safetensors file ({err}); retrain or re-copy it"
        ) from err
    if dtype is not None:
        state = {key: tensor.to(dtype) for key, tensor in state.items()}
    # one pass over the file's values; where it finds a NaN or infinity (or cannot tell),
    # the per-layer check names the layer
    finite = _all_finite(weights)
    return LoraAdapter.from_state_dict(state, config, source=str(path), finite_checked=finite)


# the exponent bits of IEEE floats (and bfloat16): all ones means infinity or NaN
_EXPONENT_BITS = {
    "F32": (np.uint32, 0x7F800000),
    "F16": (np.uint16, 0x7C00),
    "BF16": (np.uint16, 0x7F80),
}


def _all_finite(weights: bytes) -> bool:
    """Whether every value in a safetensors file is finite, read from its bytes in one pass
    (~1 ms for an expert's 420 tensors, where a check per tensor takes ~30 ms). False where
    its tensors are not all of one floating dtype laid end to end: then check per tensor."""
    try:
        header_len = int.from_bytes(weights[:8], "little")
        header = json.loads(weights[8 : 8 + header_len])
        entries = [v for k, v in header.items() if k != "__metadata__"]
        (dtype,) = {entry["dtype"] for entry in entries}
        end = max(entry["data_offsets"][1] for entry in entries)
        size = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in entries)
    except (ValueError, KeyError, TypeError):  # also: no tensors, or several dtypes
        return False
    if dtype not in _EXPONENT_BITS or size != end:
        return False
    kind, exponent = _EXPONENT_BITS[dtype]
    count, rest = divmod(end, np.dtype(kind).itemsize)
    if rest or 8 + header_len + end > len(weights):
        return False
    values = np.frombuffer(weights, dtype=kind, count=count, offset=8 + header_len)
    return not np.any((values & kind(exponent)) == kind(exponent))


def adapter_layer_ranks(weights_path: str | os.PathLike) -> dict[str, int]:
    """``{layer path: rank}`` of a PEFT weight file, from its header alone (no tensor read)."""
    try:
        with safe_open(weights_path, framework="pt") as handle:
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterError(
            f"{weights_path}: corrupt or truncated safetensors file ({err}); retrain or re-copy it"
        ) from err
    ranks = {}
    for key, shape in shapes.items():
        match = _LORA_KEY.match(key)
        if match is not None and match["factor"] == "A" and len(shape) == 2:
            ranks[match["module"].removeprefix(PEFT_PREFIX)] = int(shape[0])
    return ranks


def save_adapter(adapter: LoraAdapter, path: str | os.PathLike) -> Path:
    """Write a PEFT LoRA folder atomically: readers see the old folder or the new, never half."""
    path = Path(path)
    with atomic_directory(path) as staging:
        save_file(adapter.state_dict(), staging / WEIGHTS_NAME, metadata={"format": "pt"})
        (staging / CONFIG_NAME).write_text(json.dumps(adapter.config, indent=2, default=str))
    return path
