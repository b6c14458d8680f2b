"""A staged rollout over real HTTP (issue 19): tiny real models, a bank built by ``run_build``.

The candidate bank (its experts trained on the traffic's corpora) against the base model is
promoted through every step; a candidate whose experts are noise is rolled back before its
second step. A server killed with SIGKILL resumes the same step with the same counts; 200
requests from 16 clients across a step change and a hot swap are each answered 200 by exactly
one arm, with the base weights bitwise intact; bad input gets one clear error each.
"""

# ruff: noqa: F811  (the evalbank fixtures are imported, then requested by name)
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import write_random_bank
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)
from test_merge import assert_bitwise_unchanged, snapshot
from test_server import free_port, running
from typer.testing import CliRunner

from ttmm.adapter import save_adapter
from ttmm.bank import Bank
from ttmm.cli import app as cli_app
from ttmm.eval.documents import held_out_documents
from ttmm.serve.app import ServerSettings, create_app
from ttmm.serve.rollout.config import RolloutConfig
from ttmm.serve.rollout.service import RolloutService

ADMIN = {"Authorization": "Bearer root"}
PREFIX = 50


@pytest.fixture(scope="module")
def traffic(eval_bank_path):
    """Prompts from the bank's held-out documents, long enough to score after the prefix."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(eval_bank_path.parent / "tiny-llama")
    texts = []
    for doc in held_out_documents(Bank.load(eval_bank_path)):
        ids = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
        if len(ids) > PREFIX + 20:
            texts.append(tokenizer.decode(ids[:160]))
    assert len(texts) >= 5
    return texts


@pytest.fixture(scope="module")
def trained_bank(tmp_path_factory, eval_engine, traffic):
    """A bank for the eval bank's base model whose two experts were trained on the traffic
    (held-out prose) long enough to lower its NLL clearly; the first also sits alone, as a
    PEFT adapter folder, in ``adapter`` beside the bank."""
    from ttmm.build.train import LoraTrainConfig, train_lora

    tokenizer = eval_engine.tokenizer
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in traffic]
    config = LoraTrainConfig(rank=4, alpha=8.0, learning_rate=1e-2, epochs=4, num_threads=1)
    adapters = [train_lora(eval_engine.model, ids[k::2], config, seed=k).adapter for k in range(2)]
    root = tmp_path_factory.mktemp("trained")
    save_adapter(adapters[0], root / "adapter")  # a fine-tuned model in use today
    return write_random_bank(
        root / "bank", eval_engine.model, eval_engine.encoder.dim, adapters=adapters,
        base_model_name=eval_engine.bank.manifest.base_model["name"],
    )  # fmt: skip


def rollout_config(root: Path, candidate: Path, **changes) -> RolloutConfig:
    data = {
        "candidate": {"bank": str(candidate)},
        "control": {"kind": "base"},
        "mode": "shadow",
        "steps": [0, 50, 100],
        "min_requests": 6,
        "state_dir": str(root / "state"),
        "guardrails": {
            "min_evidence": 10,
            "min_latency_samples": 2,
            "tuning_requests": 20,
            "max_latency_ratio": 50.0,
        },
    } | changes
    return RolloutConfig.from_dict(data, root=root)


def rollout_app(engine, config: RolloutConfig, **settings):
    service = RolloutService.over(config, engine.model, engine.tokenizer, engine.encoder)
    return create_app(None, ServerSettings(admin_key="root", **settings), service), service


def complete(client: httpx.Client, prompt: str, user: str) -> dict:
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "user": user}
    response = client.post("/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def drive(url: str, traffic: list[str], until, limit: int = 200) -> list[dict]:
    """Send requests (new user each, cycling over the traffic) until ``until(status)``."""
    answers = []
    with httpx.Client(base_url=url) as client:
        for i in range(limit):
            answers.append(complete(client, traffic[i % len(traffic)], f"user-{i}"))
            status = client.get("/v1/ttmm/rollout", headers=ADMIN).json()
            if until(status):
                return answers
    raise AssertionError(f"no decision after {limit} requests: {status['evidence']}")


def test_a_better_candidate_is_promoted_through_every_step(
    tmp_path,
    eval_engine,
    trained_bank,
    traffic,
):
    config = rollout_config(tmp_path, trained_bank)
    app, service = rollout_app(eval_engine, config)
    before = snapshot(eval_engine.model)
    with running(app) as url:
        answers = drive(url, traffic, lambda s: s["status"] in ("complete", "rolled_back"))
        status = httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN).json()
    assert status["status"] == "complete", status["reason"]
    actions = [d["action"] for d in status["decisions"]]
    assert actions == ["start", "promote", "complete"]
    assert [d["to_share"] for d in status["decisions"]] == [0.0, 50.0, 100.0]
    assert all(d["by"] == "policy" for d in status["decisions"][1:])
    assert status["evidence"]["quality"]["upper"] < 0  # the candidate's NLL is lower
    arms = {a["ttmm"]["arm"] for a in answers}
    assert arms == {"control", "candidate"}  # step 0 all control, step 50 % both
    assert_bitwise_unchanged(eval_engine.model, before)
    # the decision log on disk holds the same decisions, one JSON line each
    logged = (tmp_path / "state" / "decisions.jsonl").read_text().splitlines()
    assert [json.loads(line)["action"] for line in logged] == actions


def test_a_worse_candidate_is_rolled_back_before_its_second_step(
    tmp_path,
    eval_engine,
    eval_bank_path,
    trained_bank,
    traffic,
):
    """Control: an adapter fine-tuned on the traffic (a PEFT folder); candidate: the eval
    bank, whose experts barely trained, so it is far worse on this traffic."""
    adapter = {"kind": "adapter", "path": str(trained_bank.parent / "adapter")}
    config = rollout_config(tmp_path, eval_bank_path, control=adapter)
    app, _ = rollout_app(eval_engine, config)
    with running(app) as url:
        answers = drive(url, traffic, lambda s: s["status"] in ("complete", "rolled_back"))
        status = httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN).json()
    assert status["status"] == "rolled_back"
    assert [d["action"] for d in status["decisions"]] == ["start", "rollback"]
    assert status["decisions"][-1]["reason"].startswith("quality")
    assert status["evidence"]["quality"]["lower"] > 0
    assert all(a["ttmm"]["arm"] == "control" for a in answers)  # never served at step 0
    assert all(a["ttmm"]["adapter"] == adapter["path"] for a in answers)
    # rolled back: the candidate serves nothing, and requests are still answered
    with running(app) as url, httpx.Client(base_url=url) as client:
        assert complete(client, traffic[0], "late")["ttmm"]["arm"] == "control"


def test_canary_mode_serves_both_arms_by_share_and_sticks_to_users(
    tmp_path,
    eval_engine,
    eval_bank_path,
    traffic,
):
    config = rollout_config(
        tmp_path, eval_bank_path, mode="canary", steps=[50, 100], min_requests=10_000
    )
    app, _ = rollout_app(eval_engine, config)
    with running(app) as url, httpx.Client(base_url=url) as client:
        first = {u: complete(client, traffic[0], u)["ttmm"]["arm"] for u in ("a", "b", "c", "d")}
        again = {u: complete(client, traffic[1], u)["ttmm"]["arm"] for u in first}
        metrics = client.get("/metrics").text
    assert first == again  # sticky per user
    for name in (
        "ttmm_time_to_first_token_seconds_count",
        "ttmm_e2e_request_latency_seconds_count",
        "ttmm_online_nll_per_token_count",
        "ttmm_compute_seconds_per_1k_tokens",
        "ttmm_arm_requests_total",
    ):
        arms = {line.split('arm="')[1].split('"')[0] for line in metrics.splitlines()
                if line.startswith(name + "{")}  # fmt: skip
        assert arms == set(first.values()), name
    assert 'ttmm_rollout_traffic_share{arm="candidate"} 50.0' in metrics


def test_feedback_is_stored_for_the_arm_that_served(
    tmp_path,
    eval_engine,
    eval_bank_path,
    traffic,
):
    app, service = rollout_app(eval_engine, rollout_config(tmp_path, eval_bank_path))
    with running(app) as url, httpx.Client(base_url=url) as client:
        answer = complete(client, traffic[0], "u")
        ok = client.post("/v1/ttmm/feedback", json={"id": answer["id"], "score": 1.0})
        unknown = client.post("/v1/ttmm/feedback", json={"id": "cmpl-nope", "score": 1.0})
        status = client.get("/v1/ttmm/rollout").json()
    assert ok.status_code == 200 and ok.json()["arm"] == answer["ttmm"]["arm"] == "control"
    assert unknown.status_code == 404
    assert status["evidence"]["total"]["control"]["feedback"] == {"count": 1, "mean": 1.0}


def test_operator_actions_need_the_admin_key_and_leave_state_alone_when_refused(
    tmp_path,
    eval_engine,
    eval_bank_path,
    traffic,
):
    app, service = rollout_app(
        eval_engine, rollout_config(tmp_path, eval_bank_path), api_key="users"
    )
    user = {"Authorization": "Bearer users"}
    with running(app) as url, httpx.Client(base_url=url) as client:
        before = client.get("/v1/ttmm/rollout", headers=user).json()
        refused = [
            client.post("/v1/ttmm/rollout/promote"),  # no key
            client.post("/v1/ttmm/rollout/promote", headers=user),  # the users' key
            client.post("/v1/ttmm/rollout/candidate", headers=user, json={"bank": "x"}),
        ]
        bad_bank = client.post(
            "/v1/ttmm/rollout/candidate", headers=ADMIN, json={"bank": str(tmp_path / "none")}
        )
        after = client.get("/v1/ttmm/rollout", headers=ADMIN).json()
        assert client.post("/v1/ttmm/rollout/resume", headers=ADMIN).status_code == 409
        paused = client.post("/v1/ttmm/rollout/pause", headers=ADMIN, json={"reason": "look"})
    assert [r.status_code for r in refused] == [401, 401, 401]
    assert all(r.json()["error"]["code"] == "invalid_admin_key" for r in refused)
    assert bad_bank.status_code == 400 and "candidate.bank" in bad_bank.json()["error"]["message"]
    assert after["rollout_id"] == before["rollout_id"] and after["step"] == before["step"]
    assert after["decisions"] == before["decisions"]
    assert paused.json()["decision"]["reason"] == "look"
    # a server without an admin key refuses operator calls outright
    no_admin = create_app(None, ServerSettings(), service)
    with running(no_admin) as url:
        answer = httpx.post(f"{url}/v1/ttmm/rollout/promote", headers=ADMIN)
    assert answer.status_code == 403 and answer.json()["error"]["code"] == "admin_disabled"


def test_a_candidate_for_another_base_model_is_refused_by_name(
    tmp_path,
    eval_engine,
    eval_bank_path,
    tiny_gpt2,
):
    other = write_random_bank(tmp_path / "other", tiny_gpt2, eval_engine.encoder.dim)
    app, _ = rollout_app(eval_engine, rollout_config(tmp_path, eval_bank_path))
    with running(app) as url:
        answer = httpx.post(
            f"{url}/v1/ttmm/rollout/candidate", headers=ADMIN, json={"bank": str(other)}
        )
        status = httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN).json()
    assert answer.status_code == 400
    assert "candidate.bank" in answer.json()["error"]["message"]
    assert "base model" in answer.json()["error"]["message"]
    assert [d["action"] for d in status["decisions"]] == ["start"]


@pytest.mark.parametrize(
    "text, named",
    [
        ("candidate: [", "not valid YAML"),
        ("control: {kind: prod}\ncandidate: {bank: b}", "control.kind"),
        ("candidate: {bank: b}\nsteps: [50, 25]", "steps"),
        ("candidate: {bank: b}\ncolour: red", "colour"),
        ("control: {kind: base}", "candidate"),
    ],
)
def test_a_bad_rollout_file_is_one_clear_error_and_exit_2(tmp_path, text, named):
    path = tmp_path / "rollout.yaml"
    path.write_text(text)
    result = CliRunner().invoke(cli_app, ["serve", "--rollout", str(path)])
    assert result.exit_code == 2, result.output
    assert named in result.output and "Traceback" not in result.output


def test_the_cli_reports_a_refused_action_and_exits_2(tmp_path, eval_engine, eval_bank_path):
    app, _ = rollout_app(eval_engine, rollout_config(tmp_path, eval_bank_path))
    runner = CliRunner()
    with running(app) as url:
        status = runner.invoke(cli_app, ["rollout", "status", "--server", url])
        wrong = runner.invoke(cli_app, ["rollout", "promote", "--server", url, "--admin-key", "x"])
        promoted = runner.invoke(
            cli_app, ["rollout", "promote", "--server", url, "--admin-key", "root"]
        )
    assert status.exit_code == 0 and "step 1 of 3" in status.output, status.output
    assert wrong.exit_code == 2 and "401" in wrong.output
    assert promoted.exit_code == 0 and "0 → 50" in promoted.output


def test_200_requests_from_16_clients_across_a_step_change_and_a_hot_swap(
    tmp_path,
    eval_engine,
    eval_bank_path,
    traffic,
):
    swapped_in = tmp_path / "v2"
    import shutil

    shutil.copytree(eval_bank_path, swapped_in)
    config = rollout_config(
        tmp_path, eval_bank_path, mode="canary", steps=[25, 50, 100], min_requests=10_000
    )
    app, service = rollout_app(eval_engine, config, max_batch_size=8)
    before = snapshot(eval_engine.model)
    answers: list[dict] = []

    async def client_loop(client: httpx.AsyncClient, index: int) -> None:
        for j in range(200 // 16 + 1):
            n = index * 13 + j
            if n >= 200:
                return
            body = {"prompt": traffic[n % len(traffic)], "max_tokens": 3, "temperature": 0,
                    "user": f"u{n % 40}", "stream": n % 5 == 0}  # fmt: skip
            response = await client.post("/v1/completions", json=body, timeout=300)
            assert response.status_code == 200, response.text
            if body["stream"]:
                events = [json.loads(line[6:]) for line in response.text.splitlines()
                          if line.startswith("data: {")]  # fmt: skip
                arms = {e["ttmm"]["arm"] for e in events if "ttmm" in e}
                assert len(arms) == 1
                answers.append({"arm": arms.pop(), "n": n})
            else:
                answers.append({"arm": response.json()["ttmm"]["arm"], "n": n})

    async def operator(client: httpx.AsyncClient) -> list[int]:
        codes = []
        while len(answers) < 60:
            await asyncio.sleep(0.05)
        codes.append((await client.post("/v1/ttmm/rollout/promote", headers=ADMIN)).status_code)
        while len(answers) < 120:
            await asyncio.sleep(0.05)
        swap = await client.post(
            "/v1/ttmm/rollout/candidate", headers=ADMIN, json={"bank": str(swapped_in)},
            timeout=300,
        )  # fmt: skip
        codes.append(swap.status_code)
        return codes

    async def main(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url) as client:
            results = await asyncio.gather(
                operator(client), *(client_loop(client, i) for i in range(16))
            )
        return results[0]

    with running(app) as url:
        codes = asyncio.run(main(url))
        status = httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN).json()
        metrics = httpx.get(f"{url}/metrics").text
    counted = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("ttmm_arm_requests_total{")]  # fmt: skip
    assert sum(counted) == 200  # every request counted once, by the arm that served it
    assert 'outcome="error"' not in metrics
    assert codes == [200, 200]
    assert sorted(a["n"] for a in answers) == list(range(200))  # every request answered once
    assert {a["arm"] for a in answers} <= {"control", "candidate"}
    assert [d["action"] for d in service.controller.store.decisions()] == [
        "start", "promote", "start",
    ]  # fmt: skip
    assert status["arms"]["candidate"]["bank"] == str(swapped_in)
    assert_bitwise_unchanged(eval_engine.model, before)
    for engine in (service.arms.engine,):  # the swapped-in engine merges over the same model
        assert engine.model is eval_engine.model


def test_a_server_killed_mid_rollout_resumes_the_same_step_with_the_same_counts(
    tmp_path,
    eval_bank_path,
    traffic,
):
    path = tmp_path / "rollout.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "candidate": {"bank": str(eval_bank_path)},
                "control": {"kind": "finetune"},
                "mode": "canary",
                "steps": [20, 60, 100],
                "min_requests": 10_000,
                "state_dir": "state",
            }
        )
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("ttmm")), "serve", "--rollout", str(path),
        "--port", str(port), "--admin-key", "root", "--device", "cpu",
    ]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}

    def start() -> subprocess.Popen:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return process
            except httpx.HTTPError:
                time.sleep(0.3)
        process.kill()
        raise AssertionError("the server did not start")

    server = start()
    try:
        with httpx.Client(base_url=url) as client:
            for i in range(4):
                complete(client, traffic[i % len(traffic)], f"k{i}")
            client.post("/v1/ttmm/rollout/promote", headers=ADMIN, json={"reason": "day 2"})
            for i in range(3):
                complete(client, traffic[i % len(traffic)], f"m{i}")
            before = client.get("/v1/ttmm/rollout", headers=ADMIN).json()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    server = start()
    try:
        after = httpx.get(f"{url}/v1/ttmm/rollout", headers=ADMIN).json()
    finally:
        server.send_signal(signal.SIGKILL)
        server.wait()
    assert before["step"] == after["step"] == 1
    assert after["rollout_id"] == before["rollout_id"]
    assert after["evidence"]["total"] == before["evidence"]["total"]
    assert after["evidence"]["quality"] == before["evidence"]["quality"]
    assert after["decisions"] == before["decisions"]
    assert [d["action"] for d in after["decisions"]] == ["start", "promote"]
    total = sum(arm["requests"] for arm in after["evidence"]["total"].values())
    assert total == 7
