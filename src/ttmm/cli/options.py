"""What every ``ttmm`` verb shares: consoles, the error policy, and the option types.

Errors that come from user input (a bad bank, an empty prompt, a wrong option) print one
clear line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ttmm.adapter import AdapterError
from ttmm.assets import AssetError
from ttmm.bank import BankError
from ttmm.device import DEFAULT_DEVICE, DEFAULT_DTYPE, DEVICE_HELP, DTYPE_HELP, LORA_DTYPE_HELP
from ttmm.merge import MergeError
from ttmm.routing import RULES, RoutingConfig, RoutingError

console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (AdapterError, AssetError, BankError, MergeError, RoutingError, ValueError, OSError)

BankOption = Annotated[Path, typer.Option("--bank", "-b", help="Expert bank folder.")]
BaseModelOption = Annotated[
    str | None, typer.Option(help="Base model folder, .gguf file or hub id (default: the bank's).")
]
EncoderOption = Annotated[
    str | None, typer.Option(help="Sentence encoder folder or hub id (default: the bank's).")
]
RuleOption = Annotated[str | None, typer.Option(help=f"Routing rule: {', '.join(RULES)}.")]
BetaOption = Annotated[float | None, typer.Option(help="Softmax temperature β (paper scale).")]
TauOption = Annotated[float | None, typer.Option(help="Threshold τ on routing probabilities.")]
MaxActiveOption = Annotated[int | None, typer.Option(help="Most experts merged at once.")]
DeviceOption = Annotated[str, typer.Option(help=f"Where the models run: {DEVICE_HELP}.")]
DtypeOption = Annotated[str, typer.Option(help=f"Base model weights: {DTYPE_HELP}.")]
LoraDtypeOption = Annotated[
    str,
    typer.Option(
        help=f"Experts' LoRA factors, kept and multiplied in: {LORA_DTYPE_HELP}. bfloat16 "
        "over float32 weights halves the factors' memory and speeds merges."
    ),
]
AdapterCacheOption = Annotated[
    float | None,
    typer.Option(
        help="Memory for experts' factors, in MiB: the rest stay on disk until a merge uses "
        "them (least recently used evicted). Default: every expert, read at start.",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _progress(show: bool) -> bool:
    if not show:  # transformers and huggingface_hub draw their own bars (loading weights)
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
        disable_progress_bars()
    return show


ProgressOption = Annotated[
    bool,
    typer.Option(
        "--progress/--no-progress",
        callback=_progress,
        help="Show progress bars (--no-progress: none, transformers' included).",
    ),
]
HostOption = Annotated[
    str, typer.Option(help="Interface to bind; 0.0.0.0 exposes the server to the network.")
]
PortOption = Annotated[int, typer.Option(help="TCP port.")]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        envvar="TTMM_API_KEY",
        help="Require 'Authorization: Bearer <key>' on every endpoint but /health and the page.",
        show_default=False,
    ),
]

__all__ = [
    "DEFAULT_DEVICE",
    "DEFAULT_DTYPE",
    "EngineArgs",
    "engine_options",
    "ApiKeyOption",
    "BankOption",
    "BaseModelOption",
    "BetaOption",
    "DeviceOption",
    "DtypeOption",
    "LoraDtypeOption",
    "AdapterCacheOption",
    "EncoderOption",
    "HostOption",
    "JsonOption",
    "MaxActiveOption",
    "PortOption",
    "RuleOption",
    "TauOption",
    "console",
    "err_console",
    "user_errors",
]


def user_errors(command):
    """Turn input errors into one line on stderr and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except USER_ERRORS as err:
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@dataclass(frozen=True)
class EngineArgs:
    """The options every verb over a loaded engine shares (``--bank`` ... ``--max-active``)."""

    bank: Path
    base_model: str | None = None
    encoder: str | None = None
    device: str = DEFAULT_DEVICE
    dtype: str = DEFAULT_DTYPE
    lora_dtype: str = "auto"
    adapter_cache_mb: float | None = None
    rule: str | None = None
    beta: float | None = None
    tau: float | None = None
    max_active: int | None = None

    def engine(self):
        """Load the bank, its base model and its encoder (with a spinner)."""
        from ttmm.model import TTMM  # deferred: `ttmm --help` should not load torch

        with console.status("loading base model, encoder and bank"):
            return TTMM.from_bank(
                self.bank,
                base_model=self.base_model,
                encoder=self.encoder,
                device=self.device,
                dtype=self.dtype,
                lora_dtype=self.lora_dtype,
                adapter_cache_mb=self.adapter_cache_mb,
            )

    def routing(self, engine) -> RoutingConfig:
        """The engine's routing with the options given on the command line."""
        return engine.routing_for(
            rule=self.rule, beta=self.beta, tau=self.tau, max_active=self.max_active
        )


_ENGINE_OPTIONS = {
    "bank": (BankOption, inspect.Parameter.empty),
    "base_model": (BaseModelOption, None),
    "encoder": (EncoderOption, None),
    "device": (DeviceOption, DEFAULT_DEVICE),
    "dtype": (DtypeOption, DEFAULT_DTYPE),
    "lora_dtype": (LoraDtypeOption, "auto"),
    "adapter_cache_mb": (AdapterCacheOption, None),
    "rule": (RuleOption, None),
    "beta": (BetaOption, None),
    "tau": (TauOption, None),
    "max_active": (MaxActiveOption, None),
}


def engine_options(verb):
    """Give ``verb`` the shared engine options; it receives them as ``engine_args: EngineArgs``.

    Typer reads a verb's options from its signature, so the wrapper's signature is the verb's
    own parameters (less ``engine_args``) followed by the shared ones.
    """
    own = [
        p
        for p in inspect.signature(verb, eval_str=True).parameters.values()
        if p.name != "engine_args"
    ]
    shared = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
        for name, (kind, default) in _ENGINE_OPTIONS.items()
    ]

    @functools.wraps(verb)
    def wrapper(*args, **kwargs):
        engine_args = EngineArgs(**{name: kwargs.pop(name) for name in _ENGINE_OPTIONS})
        return verb(*args, engine_args=engine_args, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + shared
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    return wrapper
