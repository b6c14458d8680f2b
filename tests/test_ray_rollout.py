"""A rollout on Ray Serve (issue 19): two replicas, one rollout state in one actor.

Each replica loads the tiny model and both arms from disk; the rollout's controller runs as
one Ray actor. Requests served by either replica count in the one state; an operator's
promotion through one replica changes the share both serve; a hot swap through one replica
reaches the other, which loads the new candidate before it serves it.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import save_tiny_llama, write_random_bank
from test_ray_serve import ENGINE, PROMPTS, free_port

from ttmm.serve.app import ServerSettings
from ttmm.serve.ray import REPLICA_HEADER, RayServeConfig
from ttmm.serve.rollout.config import RolloutConfig

ADMIN = {"Authorization": "Bearer root"}
LONG = [p + ". " + " ".join(PROMPTS) * 3 for p in PROMPTS]  # longer than the routing prefix


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, smol_tokenizer, encoder):
    import ray
    from ray import serve

    from ttmm.serve.ray import connect, deploy

    root = tmp_path_factory.mktemp("ray-rollout")
    model = save_tiny_llama(root / "base", smol_tokenizer)
    bank = write_random_bank(
        root / "bank", model, encoder.dim, with_finetune=True, base_model_name=str(root / "base")
    )
    shutil.copytree(bank, root / "bank-v2")
    rollout = RolloutConfig.from_dict(
        {
            "candidate": {"bank": str(bank)},
            "control": {"kind": "finetune"},
            "mode": "shadow",
            "steps": [0, 50, 100],
            "min_requests": 10_000,
            "state_dir": str(root / "state"),
        }
    )
    config = RayServeConfig(replicas=2, ray_actor_options={"num_cpus": 0.5}, port=free_port())
    settings = ServerSettings(admin_key="root", batch_window_ms=5)
    assert connect(num_cpus=2)
    try:
        # each replica holds its experts in a bounded cache (the CLI's --adapter-cache-mb)
        options = {"base_model": str(root / "base"), "adapter_cache_mb": 8.0, **ENGINE}
        url = deploy(bank, options, settings, config, rollout)
        yield url, root
    finally:
        serve.shutdown()
        ray.shutdown()


def send(url: str, n: int, tag: str) -> list[tuple[str, str]]:
    """``n`` completions, 4 at a time; (replica, arm) of each."""

    def one(i: int) -> tuple[str, str]:
        body = {"prompt": LONG[i % len(LONG)], "max_tokens": 2, "temperature": 0,
                "user": f"{tag}-{i}"}  # fmt: skip
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        return answer.headers[REPLICA_HEADER], answer.json()["ttmm"]["arm"]

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, range(n)))


def status(url: str) -> dict:
    return httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN, timeout=60).json()


def test_replicas_share_one_rollout_its_promotions_and_its_hot_swaps(deployed):
    url, root = deployed
    served = send(url, 12, "a")
    assert len({replica for replica, _ in served}) == 2, "one replica served everything"
    assert {arm for _, arm in served} == {"control"}  # step 0: the candidate only shadows
    before = status(url)
    totals = before["evidence"]["total"]
    assert totals["control"]["requests"] == 12  # both replicas reported to the one state
    assert before["evidence"]["quality"]["n"] == 12  # every request paired in shadow mode

    # feedback on a response reaches the one state, whichever replica takes it
    body = {"prompt": LONG[0], "max_tokens": 2, "temperature": 0, "user": "f"}
    answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
    for _ in range(4):
        scored = httpx.post(f"{url}/v1/ttmm/feedback", json={"id": answer["id"], "score": 1.0})
        assert scored.status_code == 200 and scored.json()["arm"] == "control"
    assert status(url)["evidence"]["total"]["control"]["feedback"]["count"] == 4

    promoted = httpx.post(f"{url}/v1/ttmm/rollout/promote", headers=ADMIN, timeout=60)
    assert promoted.status_code == 200 and promoted.json()["decision"]["to_share"] == 50.0
    served = send(url, 16, "b")
    assert {arm for _, arm in served} == {"control", "candidate"}  # both replicas at 50 %

    swap = httpx.post(
        f"{url}/v1/ttmm/rollout/candidate", headers=ADMIN, json={"bank": str(root / "bank-v2")},
        timeout=120,
    )  # fmt: skip
    assert swap.status_code == 200 and swap.json()["decision"]["action"] == "start"
    served = send(url, 12, "c")
    assert len({replica for replica, _ in served}) == 2
    for _ in range(6):  # each replica, asked in turn, shows the new candidate
        now = status(url)
        assert now["arms"]["candidate"]["bank"] == str(root / "bank-v2")
        assert now["rollout_id"] != before["rollout_id"] and now["step"] == 0
    assert now["evidence"]["total"]["control"]["requests"] == 12  # the new rollout's
    logged = [d["action"] for d in now["decisions"]]
    assert logged == ["start", "promote", "start"]
