"""What every ``ttmm`` verb shares: consoles, the error policy, and the option types.

Errors that come from user input (a bad bank, an empty prompt, a wrong option) print one
clear line and exit with status 2; nothing else is caught.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ttmm.adapter import AdapterError
from ttmm.assets import AssetError
from ttmm.bank import BankError
from ttmm.device import DEFAULT_DEVICE, DEFAULT_DTYPE, DEVICE_HELP, DTYPE_HELP
from ttmm.merge import MergeError
from ttmm.routing import RULES, RoutingError

console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (AdapterError, AssetError, BankError, MergeError, RoutingError, ValueError, OSError)

BankOption = Annotated[Path, typer.Option("--bank", "-b", help="Expert bank folder.")]
BaseModelOption = Annotated[
    str | None, typer.Option(help="Base model folder or hub id (default: the bank's).")
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
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]
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
    "ApiKeyOption",
    "BankOption",
    "BaseModelOption",
    "BetaOption",
    "DeviceOption",
    "DtypeOption",
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
