"""``POST /v1/ttmm/export``: a request's merge as one PEFT LoRA (design notes §7, "Export").

The body names the merge as the other endpoints do, by a text to route (with optional routing
overrides) or by explicit experts and weights; the answer carries the routing and the adapter:
``adapter_config`` (the JSON of ``adapter_config.json``) and ``adapter_model`` (the bytes of
``adapter_model.safetensors``, base64). A server started with an export folder
(``ServerSettings.export_dir``) writes the folder there instead, under a name derived from the
bank and the plan, and answers its path. A request never names a file-system path.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, FastAPI
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ttmm.export import merged_adapter
from ttmm.model import TTMM
from ttmm.routing import RoutingError, RoutingPlan
from ttmm.serve.completions import explicit_plan
from ttmm.serve.errors import APIError, error_responses
from ttmm.serve.limits import Slots
from ttmm.serve.schemas import OBJECT, ExpertWeights, NonBlank, RoutingOverride

EXPORT_ERRORS = error_responses(400, 401, 404, 413, 429, 504)


class ExportRequest(BaseModel):
    """POST /v1/ttmm/export: exactly one of ``input`` (routed) or ``experts``."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # what _one_choice checks, for clients and fuzzers
            "oneOf": [
                {"properties": {"input": {"type": "string"}}, "required": ["input"]},
                {"properties": {"experts": OBJECT}, "required": ["experts"]},
            ],
            "not": {
                "properties": {"routing": OBJECT, "experts": OBJECT},
                "required": ["routing", "experts"],
            },  # fmt: skip
        },
    )

    input: NonBlank | None = None
    """A text to route on its first P tokens, as /v1/route does."""
    routing: RoutingOverride | None = None
    """Routing settings for ``input``; missing fields keep the server's defaults."""
    experts: Annotated[ExpertWeights, Field(min_length=1)] | None = None
    """``{"3": 0.7, "5": 0.3}``: export these experts with these weights, no routing."""

    @model_validator(mode="after")
    def _one_choice(self) -> ExportRequest:
        if (self.input is None) == (self.experts is None):
            raise ValueError("give exactly one of input (to route) or experts")
        if self.routing is not None and self.input is None:
            raise ValueError("routing applies to input only; experts are not routed")
        return self


def export_folder_name(engine: TTMM, plan: RoutingPlan) -> str:
    """The export folder of a plan: a digest of the bank (its path, creation time and file
    checksums, so a rebuilt bank gets new folders) and the exact ids and weights."""
    manifest = engine.bank.manifest
    identity = [
        str(engine.bank.path),
        manifest.created,
        sorted(manifest.files.items()),
        list(plan.expert_ids),
        list(plan.weights),
    ]
    return "merge-" + hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def _plan(engine: TTMM, body: ExportRequest) -> RoutingPlan:
    """The request's plan (routing its input in the calling thread)."""
    if body.experts is not None:
        plan = explicit_plan(engine, body.experts, "experts")
    else:
        try:
            routing = engine.routing_for(**(body.routing.model_dump() if body.routing else {}))
        except RoutingError as err:
            raise APIError(400, str(err), param="routing") from None
        if not body.input.strip():
            raise APIError(400, "input is blank: routing needs some text", param="input")
        [plan] = engine.route([body.input], routing)
    if plan.is_base:
        raise APIError(
            400,
            "the merge keeps no expert (the base model alone), so there is no adapter to export; "
            "name experts or loosen the routing (tau, max_active)",
            param="experts" if body.experts is not None else "input",
            code="no_experts",
        )
    return plan


def install_export(app: FastAPI, dependencies: Sequence, slots: Slots) -> None:
    """Add ``POST /v1/ttmm/export`` guarded by ``dependencies``, counted in ``slots``."""
    router = APIRouter(prefix="/v1/ttmm", dependencies=list(dependencies))

    @router.post("/export", responses=EXPORT_ERRORS)
    async def export(body: ExportRequest) -> dict:
        engine, settings = app.state.engine, app.state.settings

        def work() -> dict:
            plan = _plan(engine, body)
            exported = merged_adapter(engine.bank, plan)
            answer = {
                "object": "ttmm.export",
                "ttmm": engine.bank.describe_plan(plan),
                "rank": exported.rank,
            }
            if settings.export_dir is not None:
                folder = Path(settings.export_dir) / export_folder_name(engine, plan)
                exported.save(folder, replace=False)  # same name, same bytes: first one wins
                return answer | {"path": str(folder.resolve())}
            return answer | {
                "adapter_config": exported.adapter.config,
                "adapter_model": base64.b64encode(exported.safetensors_bytes()).decode("ascii"),
            }

        return await slots.run(work, settings.request_timeout_s)

    app.include_router(router)
