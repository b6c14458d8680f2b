"""The web page's JSON endpoints and static files (issue 14), over a real built tiny bank."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ATOL
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)
from fastapi.testclient import TestClient
from test_merge import assert_bitwise_unchanged, snapshot

from ttmm.build.chunks import ChunkIndex
from ttmm.merge import ExpertMerger
from ttmm.routing import RoutingPlan
from ttmm.serve.app import ServerSettings, create_app
from ttmm.serve.bankmap import build_map, fit_pca, preview

KEY = {"Authorization": "Bearer sesame"}
TEXT = (
    "The history of the Roman empire spans many centuries of conquest, law and building. "
    "Its roads, aqueducts and cities shaped Europe, and its language lives on in the Romance "
    "languages spoken today by hundreds of millions of people across several continents."
)


@pytest.fixture(scope="module")
def client(eval_engine):  # noqa: F811
    app = create_app(eval_engine, ServerSettings(api_key="sesame", max_prompt_tokens=256))
    with TestClient(app) as c:
        yield c


def test_page_and_static_files_are_public_and_hold_no_bank_data(client, eval_engine):  # noqa: F811
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="map"' in page.text and "/static/app.js" in page.text
    for name, kind in (("app.js", "javascript"), ("plot.js", "javascript"), ("style.css", "css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"]
    public = page.text + "".join(client.get(f"/static/{n}").text for n in ("app.js", "plot.js"))
    for info in eval_engine.bank.manifest.experts:
        assert info.label not in public
    assert client.get("/static/missing.js").json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("get", "/v1/ttmm/bank", None),
        ("post", "/v1/ttmm/locate", {"input": TEXT}),
        ("post", "/v1/ttmm/score", {"text": TEXT}),
        ("post", "/v1/ttmm/finetune/completions", {"prompt": TEXT}),
    ],
)
def test_ui_endpoints_need_the_api_key(client, method, path, body):
    kwargs = {} if body is None else {"json": body}
    missing = getattr(client, method)(path, **kwargs)
    wrong = getattr(client, method)(path, headers={"Authorization": "Bearer nope"}, **kwargs)
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "incorrect API key"


def test_bank_lists_experts_and_projects_chunks_and_centroids_with_one_pca(client, eval_engine):  # noqa: F811
    body = client.get("/v1/ttmm/bank", headers=KEY).json()
    manifest = eval_engine.bank.manifest
    K = eval_engine.bank.num_experts
    assert [e["label"] for e in body["experts"]] == [e.label for e in manifest.experts]
    assert [e["n_tokens"] for e in body["experts"]] == [e.n_tokens for e in manifest.experts]
    assert all(len(e["loss_curve"]) >= 2 for e in body["experts"])
    assert body["finetune"]["n_tokens"] == manifest.finetune.n_tokens
    assert body["build"]["config"]["experts"] == K
    assert body["routing"] == eval_engine.routing.to_dict()

    index = ChunkIndex.load(eval_engine.bank.path)
    bank_map = body["map"]
    assert bank_map["source"] == "chunks" and bank_map["n_chunks"] == len(index)
    points = np.array([p[:2] for p in bank_map["points"]])
    assert [p[2] for p in bank_map["points"]] == index.experts.tolist()
    assert [p[3] for p in bank_map["points"]] == [preview(t) for t in index.texts]
    # the same PCA as scikit-learn's on the chunk embeddings, up to the sign of each axis
    from sklearn.decomposition import PCA

    reference = PCA(n_components=2, svd_solver="full").fit(index.embeddings.astype(np.float64))
    signs = np.sign(np.sum(points * reference.transform(index.embeddings), axis=0))
    np.testing.assert_allclose(points * signs, reference.transform(index.embeddings), atol=ATOL)
    centroids = np.array(bank_map["centroids"])
    assert centroids.shape == (K, 2)
    np.testing.assert_allclose(
        centroids * signs, reference.transform(eval_engine.bank.centroids.numpy()), atol=ATOL
    )


def test_map_samples_large_indices_and_survives_tiny_data(eval_engine):  # noqa: F811
    sampled = build_map(eval_engine.bank, max_points=5)
    assert len(sampled.points) == len(sampled.previews) == 5
    assert sampled.n_chunks > 5
    mean, components, explained = fit_pca(np.ones((1, 4)))
    assert np.all(components == 0) and explained == (0.0, 0.0)
    _, components, explained = fit_pca(np.array([[0.0, 0.0, 1.0], [0.0, 2.0, 1.0]]))
    assert np.allclose(np.abs(components[0]), [0, 1, 0]) and np.all(components[1] == 0)
    assert explained == pytest.approx((1.0, 0.0))


def test_locate_returns_every_similarity_and_the_projected_query(client, eval_engine):  # noqa: F811
    body = client.post("/v1/ttmm/locate", headers=KEY, json={"input": TEXT}).json()
    [z] = eval_engine.similarities([TEXT]).tolist()
    assert body["similarities"] == pytest.approx(z, abs=ATOL)
    [query] = eval_engine.query_texts([TEXT])
    assert body["query"] == query
    q = eval_engine.encoder.encode([query])
    [[x, y]] = build_map(eval_engine.bank).project(q).tolist()
    assert (body["x"], body["y"]) == pytest.approx((x, y), abs=ATOL)
    blank = client.post("/v1/ttmm/locate", headers=KEY, json={"input": "   "})
    assert blank.status_code == 400 and "blank" in blank.json()["error"]["message"]


def test_score_compares_base_ttmm_and_finetuning_as_the_engine_does(client, eval_engine):  # noqa: F811
    routing = {"rule": "top_n", "max_active": 2}
    body = client.post(
        "/v1/ttmm/score", headers=KEY, json={"text": TEXT, "prefix_tokens": 20, "routing": routing}
    ).json()
    by_method = {m["method"]: m for m in body["methods"]}
    assert list(by_method) == ["base", "ttmm", "finetune"]
    config = eval_engine.routing.replace(**routing)
    [routed] = eval_engine.score([TEXT], 20, 256, routing=config)
    [base] = eval_engine.score([TEXT], 20, 256, plans=[RoutingPlan.base()])
    merger = ExpertMerger(eval_engine.model, [eval_engine.bank.finetune_adapter()])
    with merger.fold(RoutingPlan.explicit({0: 1.0})):
        [tuned] = eval_engine.score([TEXT], 20, 256, plans=[RoutingPlan.base()])
    for name, expected in (("base", base), ("ttmm", routed), ("finetune", tuned)):
        assert by_method[name]["perplexity"] == pytest.approx(expected.perplexity, rel=ATOL)
    assert len({by_method[m]["perplexity"] for m in by_method}) == 3  # three different models
    assert [e["id"] for e in by_method["ttmm"]["ttmm"]["experts"]] == list(routed.plan.expert_ids)
    assert by_method["ttmm"]["ttmm"]["rule"] == "top_n"
    assert body["scored_tokens"] == routed.n_tokens and not body["truncated"]
    assert body["prefix"] == eval_engine.query_texts([TEXT], config.replace(prefix_tokens=20))[0]

    short = client.post(
        "/v1/ttmm/score", headers=KEY, json={"text": "Too short.", "prefix_tokens": 50}
    )
    assert short.status_code == 200  # valid, with nothing after the prefix: said, not refused
    assert short.json()["methods"] == [] and short.json()["scored_tokens"] == 0
    assert "smaller prefix_tokens" in short.json()["message"]
    big = client.post("/v1/ttmm/score", headers=KEY, json={"text": TEXT, "max_tokens": 10_000})
    assert big.status_code == 400 and big.json()["error"]["param"] == "max_tokens"
    bad = client.post("/v1/ttmm/score", headers=KEY, json={"text": TEXT, "routing": {"tau": 2}})
    assert bad.status_code == 400


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_finetune_completions_generate_with_the_adapter_and_restore_weights(
    client,
    eval_engine,  # noqa: F811
    stream,
):
    before = snapshot(eval_engine.model)
    # sampled with a seed: the tiny models agree on their greedy tokens, not their distributions
    request = {"prompt": TEXT, "max_tokens": 8, "temperature": 1.0, "seed": 0, "stream": stream}
    response = client.post("/v1/ttmm/finetune/completions", headers=KEY, json=request)
    if stream:
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    else:
        text = response.json()["choices"][0]["text"]
    merger = ExpertMerger(eval_engine.model, [eval_engine.bank.finetune_adapter()])
    base_plan = RoutingPlan.base()
    with merger.fold(RoutingPlan.explicit({0: 1.0})):
        [expected] = eval_engine.generate([TEXT], 8, plans=[base_plan], do_sample=True, seed=0)
    [base] = eval_engine.generate([TEXT], 8, plans=[base_plan], do_sample=True, seed=0)
    assert text == expected.text != base.text
    assert_bitwise_unchanged(eval_engine.model, before)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_finetune_completion_past_its_time_limit_frees_the_engine(
    eval_engine,  # noqa: F811
    stream,
):
    from test_server_limits import steps_after_timeout

    before = snapshot(eval_engine.model)
    body = {"prompt": TEXT, "max_tokens": 400, "temperature": 0, "stream": stream}
    calls, after = steps_after_timeout(eval_engine, "/v1/ttmm/finetune/completions", body)
    assert 5 <= calls < 400 and after <= 2, (calls, after)
    assert_bitwise_unchanged(eval_engine.model, before)  # the adapter was unfolded


def test_finetune_completions_say_when_the_bank_has_no_adapter(tiny_engine):
    with TestClient(create_app(tiny_engine)) as c:
        response = c.post("/v1/ttmm/finetune/completions", json={"prompt": TEXT})
        assert response.status_code == 404
        assert "--with-finetune" in response.json()["error"]["message"]
        bank = c.get("/v1/ttmm/bank").json()  # no chunk index: the map holds centroids only
    assert bank["finetune"] is None and bank["map"]["source"] == "centroids"
    assert bank["map"]["points"] == [] and len(bank["map"]["centroids"]) == 4


def test_ui_verb_serves_the_bank_and_opens_the_page_with_the_key(monkeypatch, tmp_path):
    import threading

    from typer.testing import CliRunner

    import ttmm.cli.ui as ui_verb
    from ttmm.cli.app import app

    served, opened = {}, threading.Event()
    monkeypatch.setattr(ui_verb, "serve", lambda **kwargs: served.update(kwargs))
    calls = []
    monkeypatch.setattr(ui_verb, "open_when_ready", lambda *a: calls.append(a) or opened.set())
    args = ["ui", "--bank", str(tmp_path), "--port", "8123", "--api-key", "s e/same"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert served["bank"] == tmp_path and served["port"] == 8123
    assert served["api_key"] == "s e/same" and served["host"] == "127.0.0.1"
    assert opened.wait(10)
    assert calls == [("http://127.0.0.1:8123/#key=s%20e%2Fsame", "http://127.0.0.1:8123/health")]
    served.clear()
    result = CliRunner().invoke(app, ["ui", "--bank", str(tmp_path), "--no-open"])
    assert result.exit_code == 0 and served["port"] == 8000 and len(calls) == 1


def test_open_when_ready_waits_for_the_server_then_opens_the_page(tiny_engine):
    from test_server import free_port, running

    from ttmm.cli.ui import open_when_ready, page_url

    assert page_url("0.0.0.0", 80) == "http://127.0.0.1:80/"
    assert page_url("::1", 80) == "http://[::1]:80/"
    opened = []

    def browser(url: str) -> bool:
        opened.append(url)
        return True

    with running(create_app(tiny_engine)) as url:
        assert open_when_ready(url + "/#key=x", url + "/health", opener=browser)
    assert opened == [url + "/#key=x"]
    dead = f"http://127.0.0.1:{free_port()}/health"
    assert not open_when_ready("x", dead, opener=browser, timeout_s=0.3, poll_s=0.05)
    assert len(opened) == 1
