"""The rollout's HTTP face: status, operator actions, hot swap and feedback (issue 19).

- ``GET /v1/ttmm/rollout``: arms, shares, step, the quality difference with its confidence
  sequence, latency and errors per arm, and the latest decisions (the users' key or the
  admin key);
- ``POST /v1/ttmm/rollout/{promote,rollback,pause,resume}`` (``{"reason": ...}``, optional):
  an operator's decision, logged like the policy's;
- ``POST /v1/ttmm/rollout/candidate`` (``{"bank": path, "routing": {...}}``): load a new
  candidate bank without a restart and start its rollout from the first step;
- ``POST /v1/ttmm/feedback`` (``{"id": response id, "score": 0..1}``): explicit feedback,
  stored per arm (the users' key).

Operator endpoints need ``Authorization: Bearer <admin key>``, a key distinct from the users'
(``ttmm serve --admin-key``); without one configured they answer 403. A server without a
rollout answers 404 on all of them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field

from ttmm.serve.auth import bearer_token, is_key
from ttmm.serve.errors import APIError, error_responses
from ttmm.serve.rollout.config import RolloutConfigError
from ttmm.serve.rollout.policy import RolloutStateError
from ttmm.serve.rollout.service import RolloutService
from ttmm.serve.rollout.store import ACTIONS
from ttmm.serve.schemas import Float
from ttmm.serve.settings import ServerSettings


class ActionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)
    """Why, for the decision log."""


class CandidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    bank: str = Field(min_length=1, max_length=4096)
    """The new candidate bank's folder, on the server's machine."""
    routing: dict[str, float | int | str] | None = None
    """Routing settings over the bank's own (rule, beta, tau, max_active)."""


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=200)
    """The ``id`` of a completion this server returned."""
    score: Float = Field(ge=0, le=1)
    """0 (bad) to 1 (good)."""


def request_key(rollout: RolloutService | None, request: Request, user: str | None) -> str | None:
    """The sticky key of a request under the rollout's assignment (None: drawn anew)."""
    if rollout is None:
        return None
    source = rollout.config.assignment.key
    if source == "user":
        return user or None
    if source == "api_key":
        return bearer_token(request) or None
    if source.startswith("header:"):
        return request.headers.get(source.removeprefix("header:")) or None
    return None


def _admin(settings: ServerSettings) -> Callable[[Request], None]:
    def authorize(request: Request) -> None:
        if settings.admin_key is None:
            raise APIError(
                403,
                "the admin endpoints are off: start the server with --admin-key "
                "(or TTMM_ADMIN_KEY)",
                type="permission_error",
                code="admin_disabled",
            )
        if not is_key(bearer_token(request), settings.admin_key):
            raise APIError(
                401, "missing or wrong admin key: send 'Authorization: Bearer <admin key>'",
                code="invalid_admin_key",
            )  # fmt: skip

    return authorize


def _reader(settings: ServerSettings, user_guard: Callable) -> Callable[[Request], None]:
    """The users' key check, or the admin key."""

    def authorize(request: Request) -> None:
        if is_key(bearer_token(request), settings.admin_key):
            return
        user_guard(request)

    return authorize


def install_rollout(
    app: FastAPI, user_guard, settings: ServerSettings, rollout: RolloutService | None
) -> None:
    """Add the endpoints above; ``user_guard`` is the users' key dependency."""
    router = APIRouter(prefix="/v1/ttmm")
    admin = [Depends(_admin(settings))]
    reader = [Depends(_reader(settings, user_guard.dependency))]

    def running() -> RolloutService:
        if rollout is None:
            raise APIError(
                404, "this server runs no rollout; start it with ttmm serve --rollout FILE",
                type="not_found_error", code="no_rollout",
            )  # fmt: skip
        return rollout

    @router.get("/rollout", dependencies=reader, responses=error_responses(400, 401, 404, 413, 429))
    async def status(decisions: int = 50) -> dict:
        service = running()
        limit = max(0, min(decisions, 10_000))
        await service.follow()  # the arms shown are the rollout's, if another replica swapped
        status = await asyncio.to_thread(service.controller.status, limit)
        return status | {"arms": _arms(service)}

    actions = error_responses(400, 401, 403, 404, 409, 413)

    @router.post("/rollout/candidate", dependencies=admin, responses=actions)
    async def candidate(body: CandidateRequest) -> dict:
        service = running()
        try:
            decision = await service.swap(body.bank, body.routing)
        except RolloutConfigError as err:
            raise APIError(400, str(err), param="bank", code="invalid_candidate") from None
        return {"object": "ttmm.rollout.decision", "decision": decision.to_dict()}

    def action_endpoint(action: str):
        async def act(body: ActionRequest | None = None) -> dict:
            service = running()
            try:
                decision = await asyncio.to_thread(
                    service.act, action, body.reason if body else None
                )
            except RolloutStateError as err:
                raise APIError(409, str(err), code="rollout_state") from None
            return {"object": "ttmm.rollout.decision", "decision": decision.to_dict()}

        act.__name__ = f"rollout_{action}"
        return act

    for action in ACTIONS:
        router.add_api_route(
            f"/rollout/{action}",
            action_endpoint(action),
            methods=["POST"],
            dependencies=admin,
            responses=actions,
            summary=f"Rollout: {action}",
        )

    @router.post(
        "/feedback", dependencies=[user_guard], responses=error_responses(400, 401, 404, 413, 429)
    )
    async def feedback(body: FeedbackRequest) -> dict:
        service = running()
        if not math.isfinite(body.score):
            raise APIError(400, "score must be a number in [0, 1]", param="score")
        arm = await asyncio.to_thread(service.feedback, body.id, body.score)
        if arm is None:
            raise APIError(
                404, f"no recent completion of this rollout has the id {body.id!r}",
                type="not_found_error", param="id", code="unknown_id",
            )  # fmt: skip
        return {"object": "ttmm.feedback", "id": body.id, "arm": arm}

    app.include_router(router)


def _arms(service: RolloutService) -> dict:
    config = service.config
    control = {k: v for k, v in vars(config.control).items() if v is not None}
    candidate = {
        "bank": config.candidate.bank,
        "experts": service.arms.engine.bank.num_experts,
        "routing": service.arms.engine.routing.to_dict(),
    }
    return {"control": control, "candidate": candidate}
