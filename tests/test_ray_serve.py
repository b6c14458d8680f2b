"""``ttmm serve --ray``: the app on a real local Ray Serve with two replicas (no mocks of Ray).

Each replica loads the tiny model, the tokenizer and the bank from disk, as on a cluster. The
official ``openai`` client talks to Ray's HTTP proxy; answers are compared with the same
engine loaded in this process (greedy decoding), and the ``x-ttmm-replica`` header shows
that both replicas served.
"""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import build_tiny_llama, save_tiny_llama, write_random_bank

from ttmm.model import TTMM, InputError
from ttmm.routing import RoutingPlan
from ttmm.serve.app import ServerSettings
from ttmm.serve.ray import REPLICA_HEADER, RayServeConfig

PROMPTS = [
    "The history of the Roman empire spans many centuries",
    "Photosynthesis turns light into chemical energy",
    "A binary search halves the interval at every step",
    "The orchestra tuned to the oboe before the concert",
    "Interest rates rose for the third quarter in a row",
]
NEW = 6
ENGINE = {"device": "cpu", "dtype": "float32"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_autoscaling_options_pass_through_to_ray_serve():
    settings = ServerSettings(max_concurrent_requests=12)
    fixed = RayServeConfig(replicas=3).deployment_options(settings)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 12
    scaling = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    config = RayServeConfig.from_options(
        2,
        "auto",
        '{"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}',
        "cpu",
        "0.0.0.0",
        9000,
    )
    options = config.deployment_options(settings)
    assert options["num_replicas"] == "auto" and options["autoscaling_config"] == scaling
    assert options["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 0}
    assert RayServeConfig.from_options(1, None, None, "cuda", "h", 1).ray_actor_options == {
        "num_cpus": 1,
        "num_gpus": 1,
    }


@pytest.mark.parametrize(
    "scaling, message",
    [
        ("{min_replicas: 1}", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"min_replicas": 5, "max_replicas": 2}', "not a Ray Serve autoscaling config"),
    ],
)
def test_bad_autoscaling_options_are_one_line_errors(scaling, message):
    with pytest.raises(InputError, match=message) as caught:
        RayServeConfig.from_options(1, None, scaling, "cpu", "h", 1).deployment_options(
            ServerSettings()
        )
    assert "\n" not in str(caught.value)


def test_replica_count_is_validated():
    with pytest.raises(ValueError, match="RayServeConfig.replicas"):
        RayServeConfig(replicas=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--replicas", "2"], "need --ray"),
        (["--ray", "--pin-experts", "0"], "leave it out with --ray"),
        (["--ray", "--autoscaling-config", "{min_replicas"], "not valid JSON"),
        (["--ray", "--autoscaling-config", '{"max_replicas": 0}'], "autoscaling config"),
        (["--ray", "--replicas", "0"], "RayServeConfig.replicas"),
    ],
)
def test_cli_refuses_bad_ray_options_before_starting_ray(tmp_path, args, message):
    import ray
    from typer.testing import CliRunner

    from ttmm.cli import app

    bank = write_random_bank(tmp_path / "bank", build_tiny_llama(64))
    result = CliRunner().invoke(app, ["serve", "--bank", str(bank), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not ray.is_initialized()


def test_local_ray_gets_proxy_timeouts_a_busy_machine_survives(monkeypatch):
    """Serve killed its proxy after three 5 s readiness checks on a loaded machine: the Ray
    connect starts carries longer ones to its processes, and a value the user set wins."""
    import ray

    from ttmm.serve.ray import LOCAL_PROXY_TIMEOUTS, connect

    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: started.update(kwargs))
    monkeypatch.setenv("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "90")
    monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", raising=False)
    assert connect(num_cpus=2)
    env_vars = started["runtime_env"]["env_vars"]
    assert env_vars["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"
    assert env_vars["RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S"] == "90"
    assert float(LOCAL_PROXY_TIMEOUTS["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"]) > 5
    assert os.environ["RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"] == "60"  # inherited by raylet
    started.clear()
    assert connect(address="auto")  # a cluster we join keeps its own settings
    assert "env_vars" not in started["runtime_env"]


# Last in the file: the module-scoped Ray starts here, after the tests that check it is not.


@pytest.fixture(scope="module")
def bank_on_disk(tmp_path_factory, smol_tokenizer, encoder):
    """A tiny Llama and its tokenizer saved as a model folder, and a bank naming it."""
    root = tmp_path_factory.mktemp("ray")
    model = save_tiny_llama(root / "base", smol_tokenizer)
    write_random_bank(root / "bank", model, encoder.dim, base_model_name=str(root / "base"))
    return root / "bank", str(root / "base")


@pytest.fixture(scope="module")
def ray_app(bank_on_disk):
    """The app deployed on a local Ray (2 CPUs) as 2 replicas of half a CPU; its URL."""
    import ray
    from ray import serve

    from ttmm.serve.ray import connect, deploy

    bank, base = bank_on_disk
    config = RayServeConfig(replicas=2, ray_actor_options={"num_cpus": 0.5}, port=free_port())
    settings = ServerSettings(api_key="sesame", batch_window_ms=5)
    assert connect(num_cpus=2)
    try:
        yield deploy(bank, {"base_model": base, **ENGINE}, settings, config)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_openai_client_through_ray_serve_reaches_both_replicas(ray_app, bank_on_disk, encoder):
    import openai

    bank, base = bank_on_disk
    local = TTMM.from_bank(bank, base_model=base, encoder=encoder, **ENGINE)
    client = openai.OpenAI(base_url=f"{ray_app}/v1", api_key="sesame", max_retries=0)
    assert [m.id for m in client.models.list()] == ["ttmm"]

    def complete(prompt: str):
        raw = client.completions.with_raw_response.create(
            model="ttmm", prompt=prompt, max_tokens=NEW, temperature=0
        )
        return raw.headers[REPLICA_HEADER], raw.parse()

    requests = PROMPTS * 2  # 10 requests, 4 at a time
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(complete, requests))
    replicas = {replica for replica, _ in answers}
    assert len(replicas) == 2, f"all requests went to {replicas}"
    plans = local.route(requests)
    results = local.generate(requests, max_new_tokens=NEW, plans=plans)
    for (_, completion), plan, result in zip(answers, plans, results, strict=True):
        experts = completion.model_extra["ttmm"]["experts"]
        served = RoutingPlan.explicit({e["id"]: e["weight"] for e in experts})
        assert served.key() == plan.key()
        assert completion.choices[0].text == result.text

    messages = [{"role": "user", "content": PROMPTS[0]}]
    stream = client.chat.completions.create(
        model="ttmm",
        messages=messages,
        max_tokens=NEW,
        temperature=0,
        stream=True,
        extra_body={"ttmm": {"experts": {"2": 1.0}}},
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    chat = client.chat.completions.create(
        model="ttmm",
        messages=messages,
        max_tokens=NEW,
        temperature=0,
        extra_body={"ttmm": {"experts": {"2": 1.0}}},
    )
    assert streamed == chat.choices[0].message.content
    assert [e["id"] for e in chat.model_extra["ttmm"]["experts"]] == [2]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{ray_app}/v1", api_key="guess", max_retries=0).models.list()
