"""``ttmm ui``: serve a bank and open its web page (issue 14) in the default browser."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from collections.abc import Callable
from typing import Annotated
from urllib.parse import quote

import typer

from ttmm.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_DTYPE,
    ApiKeyOption,
    BankOption,
    BaseModelOption,
    DeviceOption,
    DtypeOption,
    EncoderOption,
    HostOption,
    PortOption,
    console,
)
from ttmm.cli.serve import serve

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 600.0
"""How long to wait for the server (loading the base model and the bank) before giving up."""


def page_url(host: str, port: int, api_key: str | None = None) -> str:
    """The page's address; the key travels in the fragment, which never reaches the server."""
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    local = f"[{local}]" if ":" in local else local
    return f"http://{local}:{port}/" + (f"#key={quote(api_key, safe='')}" if api_key else "")


def open_when_ready(
    url: str,
    health: str,
    opener: Callable[[str], bool] = webbrowser.open,
    timeout_s: float = READY_TIMEOUT_S,
    poll_s: float = 0.25,
) -> bool:
    """Wait until ``health`` answers, then open ``url``; whether a browser was opened."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(health, timeout=5) as response:
                if response.status == 200:
                    return bool(opener(url))
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(poll_s)
    logger.warning(
        "the server did not answer %s within %.0f s; no browser opened", health, timeout_s
    )
    return False


def ui(
    bank: BankOption,
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    base_model: BaseModelOption = None,
    encoder: EncoderOption = None,
    device: DeviceOption = DEFAULT_DEVICE,
    dtype: DtypeOption = DEFAULT_DTYPE,
    api_key: ApiKeyOption = None,
    open_browser: Annotated[
        bool, typer.Option("--open/--no-open", help="Open the page in the default browser.")
    ] = True,
) -> None:
    """Serve the bank and open its web page: the experts, a map of the clusters, a playground."""
    url = page_url(host, port, api_key)
    if open_browser:
        health = page_url(host, port) + "health"
        threading.Thread(
            target=open_when_ready, args=(url, health), name="ttmm-open-browser", daemon=True
        ).start()
    console.print(f"the page will be at {page_url(host, port)} once the server is up")
    serve(
        bank=bank,
        host=host,
        port=port,
        base_model=base_model,
        encoder=encoder,
        device=device,
        dtype=dtype,
        api_key=api_key,
    )
