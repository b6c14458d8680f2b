"""One rollout for many replicas: the controller in a Ray actor (``ttmm serve --ray``).

Every replica of a Ray Serve deployment holds its own engine and arms, but a rollout must
have one state: one share, one confidence sequence over every replica's requests, one
decision log. The driver starts one :class:`~ttmm.serve.rollout.store.RolloutController` as a
Ray actor on its own node (so ``state_dir`` is the driver's folder, as without Ray), and each
replica talks to it through :class:`RemoteController`, which has the controller's methods.
Replicas report every finished request to it, so its status (and the web page's Rollout
section) counts them all; each replica's ``/metrics`` keeps its own series. A hot swap asked
of one replica restarts the rollout in the actor; the others see the new configuration in
their next assignment and load the new candidate before serving it
(:meth:`~ttmm.serve.rollout.service.RolloutService.assign`).
"""

from __future__ import annotations

from typing import Any

from ttmm.serve.rollout.config import RolloutConfig
from ttmm.serve.rollout.policy import Decision, Observation
from ttmm.serve.rollout.store import RolloutController, Ticket


def start_actor(config: RolloutConfig, name: str) -> Any:
    """The controller of ``config`` as a named Ray actor pinned to this node (its files are
    this node's); one that already runs under ``name`` is reused."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(RolloutController).options(
        name=name, get_if_exists=True, num_cpus=0, max_concurrency=1, scheduling_strategy=here
    )
    return actor.remote(config)


class RemoteController:
    """:class:`RolloutController`'s methods, run by the actor (each call waits for it)."""

    def __init__(self, actor: Any):
        self.actor = actor

    def _call(self, method: str, *args):
        import ray

        return ray.get(getattr(self.actor, method).remote(*args))

    def assign(self, key: str | None) -> Ticket:
        return self._call("assign", key)

    def current_config(self) -> RolloutConfig:
        return self._call("current_config")

    def snapshot(self) -> dict:
        return self._call("snapshot")

    def observe(self, obs: Observation, response_id: str | None = None) -> Decision | None:
        return self._call("observe", obs, response_id)

    def feedback(self, response_id: str, score: float) -> str | None:
        return self._call("feedback", response_id, score)

    def act(self, action: str, reason: str | None = None) -> Decision:
        return self._call("act", action, reason)

    def restart(self, config: RolloutConfig, reason: str) -> Decision:
        return self._call("restart", config, reason)

    def status(self, decisions: int = 50) -> dict:
        return self._call("status", decisions)
