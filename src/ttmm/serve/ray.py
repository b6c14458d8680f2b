"""The OpenAI-compatible server on Ray Serve: one deployment whose replicas each hold an engine.

Every replica loads its own base model, encoder and bank (``TTMM.from_bank``) in its
constructor and serves :func:`ttmm.serve.app.create_app` through Ray Serve's ingress, so the
routes, limits and errors are those of ``ttmm serve``; Ray's proxy spreads requests over the
replicas. Each response names the replica that served it in an ``x-ttmm-replica`` header.
Replicas read the bank (and a local base model) from the same path on every machine; the
driver ships its own ``ttmm`` package to them (Ray's ``py_modules``), so the code they run is
the driver's. Ray is imported inside functions: ``import ttmm.serve`` stays light.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ttmm.device import device_type
from ttmm.model import InputError
from ttmm.serve.app import ServerSettings
from ttmm.serve.rollout.config import RolloutConfig

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-ttmm-replica"

LOCAL_PROXY_TIMEOUTS = {
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
}
"""Ray Serve's proxy checks for a Ray that ``connect`` starts on this machine (Ray's defaults:
5 and 10 s). Serve kills a proxy that fails its check three times; on a machine busy with
other work (a build, the tests) the default 5 s readiness check failed that way and the
deployment never came up. A value set in the environment wins."""


@dataclass(frozen=True)
class RayServeConfig:
    """Where and how the deployment runs; validated on construction."""

    replicas: int = 1
    """Replicas of the deployment, each with its own engine; unused with autoscaling."""
    address: str | None = None
    """Ray cluster to join (``auto``: the one ``ray start`` runs on this machine; or
    ``ray://host:10001``); None = start a local Ray for this process."""
    autoscaling_config: dict[str, Any] | None = None
    """Ray Serve's autoscaling options (``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests``, ...), passed through; set, the replica count is ``auto``."""
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})
    """Resources of each replica's actor (``num_cpus``, ``num_gpus``, ...), passed to Ray."""
    host: str = "127.0.0.1"
    """Address Ray Serve's HTTP proxy listens on."""
    port: int = 8000
    """Port of Ray Serve's HTTP proxy."""
    app_name: str = "ttmm"
    """Name of the Ray Serve application (and of its deployment)."""

    def __post_init__(self) -> None:
        if not (isinstance(self.replicas, int) and self.replicas >= 1):
            raise ValueError(
                f"RayServeConfig.replicas must be an integer >= 1, got {self.replicas!r}"
            )
        for name in ("autoscaling_config", "ray_actor_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"RayServeConfig.{name} must be a JSON object, got {value!r}")
        if not (isinstance(self.port, int) and 0 < self.port < 65536):
            raise ValueError(f"RayServeConfig.port must be a port number, got {self.port!r}")
        if not self.app_name:
            raise ValueError("RayServeConfig.app_name must not be empty")

    @classmethod
    def from_options(
        cls,
        replicas: int,
        address: str | None,
        autoscaling_json: str | None,
        device: str,
        host: str,
        port: int,
    ) -> RayServeConfig:
        """The config of ``ttmm serve --ray``: ``autoscaling_json`` parsed, and one GPU per
        replica when ``device`` is CUDA (Ray hides GPUs from actors that asked for none)."""
        autoscaling = None
        if autoscaling_json is not None:
            try:
                autoscaling = json.loads(autoscaling_json)
            except json.JSONDecodeError as err:
                raise InputError(f"--autoscaling-config is not valid JSON: {err}") from None
            if not isinstance(autoscaling, dict):
                raise InputError(
                    "--autoscaling-config must be a JSON object, e.g. "
                    '\'{"min_replicas": 1, "max_replicas": 4}\''
                )
        gpus = 1 if device_type(device) == "cuda" else 0
        return cls(
            replicas=replicas,
            address=address,
            autoscaling_config=autoscaling,
            ray_actor_options={"num_cpus": 1, "num_gpus": gpus},
            host=host,
            port=port,
        )

    def deployment_options(self, settings: ServerSettings) -> dict[str, Any]:
        """Options of ``serve.deployment``: a fixed count or ``auto`` with the autoscaling
        options; a replica takes as many requests at once as the app itself admits (it
        answers more with a 429), so Ray never queues requests the replica would batch."""
        options: dict[str, Any] = {
            "name": self.app_name,
            "ray_actor_options": dict(self.ray_actor_options),
            "max_ongoing_requests": settings.max_concurrent_requests,
        }
        if self.autoscaling_config is None:
            return options | {"num_replicas": self.replicas}
        from pydantic import ValidationError
        from ray.serve.config import AutoscalingConfig

        try:
            AutoscalingConfig(**self.autoscaling_config)
        except (ValidationError, TypeError, ValueError) as err:
            problem = str(err).splitlines()
            raise InputError(
                f"--autoscaling-config is not a Ray Serve autoscaling config: {' '.join(problem)}"
            ) from None
        return options | {"num_replicas": "auto", "autoscaling_config": self.autoscaling_config}


class ReplicaHeader:
    """ASGI middleware adding ``x-ttmm-replica: <id>`` to every HTTP response."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER.encode(), self.value)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_header)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` (None: start a local Ray with ``num_cpus``) unless
    this process already did; ship this ``ttmm`` to its workers. True if connected here."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = {"py_modules": [str(Path(__file__).resolve().parents[1])]}
    if address is not None:
        ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
    else:  # our own Ray: its processes inherit this environment, and the job's env_vars
        timeouts = {
            name: os.environ.get(name, value) for name, value in LOCAL_PROXY_TIMEOUTS.items()
        }
        os.environ.update(timeouts)
        runtime_env["env_vars"] = timeouts
        ray.init(
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            include_dashboard=False,
            logging_level=logging.WARNING,
        )
    return True


def deploy(
    bank: str | os.PathLike,
    engine_options: dict[str, Any],
    settings: ServerSettings,
    config: RayServeConfig,
    rollout: RolloutConfig | None = None,
) -> str:
    """Deploy the app on the connected Ray and wait until every replica is up; the URL.

    ``engine_options`` are ``TTMM.from_bank``'s (``base_model``, ``encoder``, ``device``,
    ``dtype``, ``lora_dtype``); paths among them are made absolute, as replicas do not share
    our directory. With ``rollout`` (whose candidate is ``bank``), the rollout's controller
    runs as one actor on this node that every replica reads and reports to
    (:mod:`ttmm.serve.rollout.remote`).
    """
    from ray import serve

    bank, options = _checked(bank, settings, config)
    controller = None
    if rollout is not None:
        from ttmm.serve.rollout.remote import start_actor

        controller = start_actor(rollout, f"{config.app_name}-rollout")
    engine_options = {
        name: _absolute(value) if name in ("base_model", "encoder") else value
        for name, value in engine_options.items()
    }
    deployment = serve.deployment(_replica_class(), **options)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(
        deployment.bind(bank, engine_options, settings, controller),
        name=config.app_name,
        route_prefix="/",
    )
    return f"http://{config.host}:{config.port}"


def serve_until_interrupted(
    bank: str | os.PathLike,
    engine_options: dict[str, Any],
    settings: ServerSettings,
    config: RayServeConfig,
    rollout: RolloutConfig | None = None,
) -> None:
    """Connect, deploy and serve until Ctrl-C; then remove the app (and stop a local Ray)."""
    import ray
    from ray import serve

    _checked(bank, settings, config)  # before Ray starts: a typo should not take a minute
    started_here = connect(config.address)
    try:
        url = deploy(bank, engine_options, settings, config, rollout)
        logger.info("Ray Serve is serving %r on %s", settings.model_id, url)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        if started_here and config.address is None:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(config.app_name)


def _checked(bank, settings: ServerSettings, config: RayServeConfig) -> tuple[str, dict]:
    """The bank's absolute path and the deployment's options, or a one-line InputError."""
    bank = _absolute(bank)
    if not Path(bank, "manifest.json").exists():
        raise InputError(f"{bank} is not a bank (no manifest.json); pass the bank's folder")
    return bank, config.deployment_options(settings)


def _absolute(value):
    """A path that exists here, made absolute; anything else (a hub id, None) as it is."""
    if value is None or not Path(value).exists():
        return value
    return str(Path(value).resolve())


def _replica_class():
    """The deployment's class, built on first use so that Ray is imported only then."""
    from ray import serve

    @serve.ingress()
    class TTMMReplica:
        """One replica: its own engine over the bank, and the app serving it."""

        def __init__(
            self,
            bank: str,
            engine_options: dict[str, Any],
            settings: ServerSettings,
            controller: Any = None,
        ):
            from ttmm.model import TTMM
            from ttmm.serve.app import create_app

            self.replica_id = serve.get_replica_context().replica_tag
            if controller is None:
                self.asgi_app = create_app(TTMM.from_bank(bank, **engine_options), settings)
            else:  # the rollout's arms here, its state in the one actor
                from ttmm.serve.rollout.remote import RemoteController
                from ttmm.serve.rollout.service import start_rollout

                remote = RemoteController(controller)
                rollout = start_rollout(
                    remote.current_config(), controller=remote, **engine_options
                )
                self.asgi_app = create_app(None, settings, rollout)
            self.asgi_app.add_middleware(ReplicaHeader, replica=self.replica_id)
            logger.info("replica %s serves %s", self.replica_id, bank)

        def __serve_build_asgi_app__(self):
            return self.asgi_app

    return TTMMReplica
