"""``ttmm rollout``: watch and steer a running server's rollout over HTTP (issue 19).

``status`` reads with the users' key or the admin key; ``promote``, ``pause``, ``resume``,
``rollback`` and ``candidate`` need the admin key. Every server answer that is an error
prints its message and exits with status 2, and nothing changes on the server.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Annotated

import typer
from rich.table import Table

from ttmm.cli.options import JsonOption, console, user_errors
from ttmm.serve.rollout.store import ACTIONS

rollout_app = typer.Typer(
    help="Watch and steer a server's staged rollout (ttmm serve --rollout).",
    no_args_is_help=True,
)

ServerOption = Annotated[str, typer.Option(help="The server's address.", envvar="TTMM_SERVER")]
AdminKeyOption = Annotated[
    str | None,
    typer.Option(envvar="TTMM_ADMIN_KEY", help="The server's admin key.", show_default=False),
]
ReasonOption = Annotated[str | None, typer.Option(help="Why, for the decision log.")]


class ServerError(ValueError):
    """The server refused (its message), or could not be reached."""


def call(server: str, path: str, key: str | None, body: dict | None = None) -> dict:
    """GET (or POST ``body``) ``path`` on ``server``; the JSON answer."""
    url = server.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.reason
        raise ServerError(f"the server answered {err.code}: {message}") from None
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ServerError(f"cannot reach {server}: {reason}; is `ttmm serve` running?") from None


def _number(value, fmt: str = "{:+.4f}") -> str:
    return "–" if value is None else fmt.format(value)


def print_status(status: dict) -> None:
    q = status["evidence"]["quality"]
    share = status["share"]["candidate"]
    steps = " → ".join(f"{s:g}" for s in status["steps"])
    console.print(
        f"rollout [bold]{status['rollout_id']}[/] ({status['mode']}): [bold]{status['status']}[/]"
        f", step {status['step'] + 1} of {len(status['steps'])} ({steps} %), candidate at "
        f"{share:g} %"
    )
    if status.get("reason"):
        console.print(f"  {status['reason']}")
    console.print(
        f"  quality (NLL/token, candidate − control): {_number(q['estimate'])} "
        f"[{_number(q['lower'])}, {_number(q['upper'])}] over {q['n']} requests"
        f"{' (paired)' if q['paired'] else ''}; {status['evidence']['step_scored']} scored "
        f"in this step, {status['min_requests']} needed"
    )
    table = Table("arm", "requests", "errors", "mean NLL/token", "p95 latency (s)", "feedback")
    for arm, c in status["evidence"]["step"].items():
        table.add_row(
            arm,
            str(c["requests"]),
            str(c["errors"]),
            _number(c["mean_nll_per_token"], "{:.4f}"),
            _number(c["p95_latency_s"], "{:.3f}"),
            _number(c["feedback"]["mean"], "{:.2f}"),
        )
    console.print(table)
    for d in status["decisions"][-10:]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["time"]))
        console.print(
            f"  {when}  {d['action']:<9} by {d['by']:<8} {d['from_share']:g} → "
            f"{d['to_share']:g} %  {d['reason']}"
        )


@rollout_app.command("status")
@user_errors
def status(
    server: ServerOption = "http://127.0.0.1:8000",
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="TTMM_API_KEY", help="The users' key (or give --admin-key).", show_default=False
        ),
    ] = None,
    admin_key: AdminKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Where the rollout stands: step, shares, evidence per arm, the latest decisions."""
    answer = call(server, "/v1/ttmm/rollout", admin_key or api_key)
    if as_json:
        console.print_json(data=answer)
    else:
        print_status(answer)


def _action(action: str):
    def command(
        server: ServerOption = "http://127.0.0.1:8000",
        admin_key: AdminKeyOption = None,
        reason: ReasonOption = None,
    ) -> None:
        body = {"reason": reason} if reason else {}
        decision = call(server, f"/v1/ttmm/rollout/{action}", admin_key, body)["decision"]
        console.print(
            f"{decision['action']}: candidate {decision['from_share']:g} → "
            f"{decision['to_share']:g} % ({decision['reason']})"
        )

    command.__name__ = action
    command.__doc__ = {
        "promote": "Move the candidate to the next step now.",
        "pause": "Hold the current share; count evidence, decide nothing.",
        "resume": "Let the policy decide again.",
        "rollback": "Send all traffic back to control.",
    }[action]
    return user_errors(command)


for _name in ACTIONS:
    rollout_app.command(_name)(_action(_name))


@rollout_app.command("candidate")
@user_errors
def candidate(
    bank: Annotated[str, typer.Argument(help="The new candidate bank's folder on the server.")],
    server: ServerOption = "http://127.0.0.1:8000",
    admin_key: AdminKeyOption = None,
) -> None:
    """Load a new candidate bank into the running server and start its rollout anew."""
    decision = call(server, "/v1/ttmm/rollout/candidate", admin_key, {"bank": bank})["decision"]
    console.print(f"{decision['action']}: {decision['reason']}")
