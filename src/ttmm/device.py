"""Where the models run: ``--device`` and ``--dtype`` names, checked once with clear errors.

``auto`` picks CUDA, then Apple's MPS, then the CPU. The dtype ``auto`` is float32 on a CPU
(where bfloat16 matmuls are slower and SmolLM2's decoding is memory-bound anyway) and bfloat16
on a GPU that supports it (float16 on one that does not). Everything else in ttmm takes the
device from the model it is given, so a model moved here is all it takes.
"""

from __future__ import annotations

import torch

DEFAULT_DEVICE = "auto"
"""The device every loader and verb uses unless told otherwise."""
DEFAULT_DTYPE = "auto"
"""The weights' dtype unless told otherwise (float32 on a CPU, bfloat16 on a GPU)."""
DEVICE_HELP = "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_HELP = "auto (float32 on a CPU, bfloat16 on a GPU), float32, bfloat16 or float16"


class DeviceError(ValueError):
    """A device or dtype that this machine or this torch build cannot use."""


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """The torch device for a name (None = ``auto``), or a DeviceError saying what to use."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is unknown; use {DEVICE_HELP}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA support"
            raise DeviceError(
                f"device {name!r}: no CUDA GPU is usable here (torch {torch.__version__} has "
                f"{build}); use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(
                f"device {name!r}: this machine has {count} CUDA device(s), "
                f"numbered 0 to {count - 1}"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise DeviceError(f"device {name!r}: Apple MPS is not available; use --device cpu")
        return device
    raise DeviceError(f"device {name!r} is not supported; use {DEVICE_HELP}")


def resolve_dtype(
    name: str | torch.dtype | None = None, device: torch.device | str | None = None
) -> torch.dtype:
    """The weights' dtype for a name (None = ``auto``, which depends on ``device``)."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise DeviceError(f"dtype {name} is not supported; use {DTYPE_HELP}")
        return name
    name = (name or "auto").strip().lower().removeprefix("torch.")
    if name == "auto":
        device = resolve_device(device) if not isinstance(device, torch.device) else device
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if name not in DTYPES:
        raise DeviceError(f"dtype {name!r} is unknown; use {DTYPE_HELP}")
    return DTYPES[name]


LORA_DTYPE_HELP = "auto (the base model's dtype), float32, bfloat16 or float16"


def resolve_lora_dtype(name: str | torch.dtype | None = None) -> torch.dtype | None:
    """The dtype the experts' factors are kept in, for a name (``auto``/None: the weights')."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "auto")):
        return None
    try:
        return resolve_dtype(name)
    except DeviceError:
        raise DeviceError(f"LoRA dtype {name!r} is unknown; use {LORA_DTYPE_HELP}") from None


def device_type(name: str) -> str:
    """``cuda`` for any CUDA device name (the driver need not have one), else the type that
    the name resolves to on this machine (``auto`` becomes ``cuda``, ``mps`` or ``cpu``)."""
    return "cuda" if name.startswith("cuda") else resolve_device(name).type


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name written into configs and reports."""
    return str(dtype).removeprefix("torch.")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's (first) parameter: where its inputs must go."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def describe(device: torch.device) -> str:
    """The accelerator in words, for reports: ``NVIDIA H200`` or ``cpu``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
