"""The ``ttmm`` command line (``ttmm.cli:app``); the library never imports it."""

from ttmm.cli.app import app

__all__ = ["app"]
