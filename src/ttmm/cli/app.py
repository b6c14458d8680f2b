"""The ``ttmm`` command line: one table of thin typed verbs over the library."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from ttmm.cli.bank import bank_app
from ttmm.cli.build import build, info
from ttmm.cli.engine import generate, import_bank, route, score
from ttmm.cli.eval import demo, eval_command
from ttmm.cli.export import export
from ttmm.cli.poc import poc
from ttmm.cli.rollout import rollout_app
from ttmm.cli.serve import serve
from ttmm.cli.ui import ui
from ttmm.cli.update import diff, update

app = typer.Typer(
    help="Test-Time Model Merging: route each prompt to LoRA experts and merge them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


# The verb table: name -> function. Each function is a thin typed wrapper over the library.
VERBS = {
    "build": build,
    "update": update,
    "diff": diff,
    "info": info,
    "route": route,
    "generate": generate,
    "score": score,
    "import-bank": import_bank,
    "export": export,
    "eval": eval_command,
    "demo": demo,
    "poc": poc,
    "serve": serve,
    "ui": ui,
}
for _name, _verb in VERBS.items():
    app.command(_name)(_verb)
app.add_typer(rollout_app, name="rollout")
app.add_typer(bank_app, name="bank")
