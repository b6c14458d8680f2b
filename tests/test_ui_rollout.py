"""The page's Rollout section (issues 14 and 19), in headless chromium as in test_ui_browser.

A shadow rollout of a random 4-expert bank against its fine-tuning adapter, over the tiny Llama,
steps 0 → 50 → 100 %, users' key 'sesame' and admin key 'root'. A few completions give it
evidence before the page opens; the section shows the rollout, an operator promotes it, and a
server without a rollout keeps the section hidden.
"""

from __future__ import annotations

import httpx
import pytest
from conftest import build_tiny_llama, write_random_bank
from fastapi.testclient import TestClient
from test_server import running
from test_ui_browser import browser, page  # noqa: F401  (fixtures)

from ttmm.serve.app import ServerSettings, create_app

USER_KEY, ADMIN_KEY = "sesame", "root"
TEXT = (
    "The history of the Roman empire spans many centuries of conquest, law and building. "
    "Its roads, aqueducts and cities shaped Europe, and its language lives on in the Romance "
    "languages spoken today by hundreds of millions of people across several continents. "
)  # twice over: longer than the 50-token routing prefix, so every request is scored
NETWORK_ERROR = "Failed to load resource"
"""What chromium logs for any 4xx answer to fetch(): here the admin key's refusals."""


def complete(url: str, user: str) -> None:
    body = {"prompt": TEXT * 2, "max_tokens": 2, "temperature": 0, "user": user}
    headers = {"Authorization": f"Bearer {USER_KEY}"}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
    assert response.status_code == 200, response.text


@pytest.fixture(scope="module")
def rollout_server(tmp_path_factory, smol_tokenizer, encoder):
    from ttmm.serve.rollout.config import RolloutConfig
    from ttmm.serve.rollout.service import RolloutService

    tmp = tmp_path_factory.mktemp("rollout")
    model = build_tiny_llama(len(smol_tokenizer))
    write_random_bank(tmp / "bank", model, encoder.dim, with_finetune=True)
    config = RolloutConfig.from_dict(
        {
            "candidate": {"bank": "bank"},
            "control": {"kind": "finetune"},
            "mode": "shadow",
            "steps": [0, 50, 100],
            "min_requests": 3,
            "state_dir": "state",
            "guardrails": {"min_latency_samples": 1},
        },
        root=tmp,
    )

    service = RolloutService.over(config, model, smol_tokenizer, encoder)
    settings = ServerSettings(api_key=USER_KEY, admin_key=ADMIN_KEY)
    with running(create_app(None, settings, service)) as url:
        for i in range(3):  # evidence: at step 0 (0 %) control serves, the candidate shadows
            complete(url, f"user-{i}")
        yield url


def open_rollout(tab, url: str) -> None:
    tab.goto(f"{url}/#key={USER_KEY}")
    tab.wait_for_selector("#rollout-section:not([hidden]), #error:not([hidden])")
    assert tab.locator("#rollout-section").is_visible(), (tab.inner_text("#error"), tab.errors)


def counts(tab, scope: str, arm: str) -> list[str]:
    """The per-arm table's row: requests, errors, scored, mean NLL, p95 latency, feedback."""
    return tab.locator(
        f"#rollout-counts tr[data-scope={scope}][data-arm={arm}] td.num"
    ).all_inner_texts()


def test_the_section_shows_the_rollout_and_an_operator_promotes_it(page, rollout_server):  # noqa: F811
    open_rollout(page, rollout_server)
    assert page.inner_text("#rollout-status") == "running"
    assert page.inner_text("#rollout-step") == "step 1 of 3"
    assert page.locator("#rollout-steps li").all_inner_texts() == ["0%", "50%", "100%"]
    assert page.locator("#rollout-steps li.current").inner_text() == "0%"
    assert page.inner_text("#rollout-share").strip() == "candidate 0% · control 100%"
    arms = page.inner_text("#rollout-arms")
    assert "finetune: fine-tuning adapter of" in arms  # the file's candidate, kept on swaps
    assert "4 experts" in arms and "/bank" in arms and "shadow" in arms
    assert "Rollout running: step 1 of 3" in page.inner_text("#rollout-link")
    # the evidence: three requests served by control, each scored by both arms
    assert counts(page, "total", "control")[:3] == ["3", "0 (0%)", "3"]
    assert counts(page, "total", "candidate")[0] == "0"
    assert "over 3 paired requests" in page.inner_text("#rollout-quality")
    assert page.locator("#rollout-quality-plot .chart-band").count() == 1
    assert page.locator("#rollout-quality-plot .chart-hline.zero").count() == 1
    assert page.locator("#rollout-quality-plot .chart-dots.now").count() == 1  # the current value
    assert page.locator("#rollout-share-plot path.chart-step").count() == 1
    log = page.locator("#rollout-log tbody tr")
    assert log.count() == 1
    assert (log.get_attribute("data-action"), log.get_attribute("data-by")) == ("start", "operator")

    page.fill("#admin-key", ADMIN_KEY)
    page.fill("#rollout-why", "looks fine on the dashboard")
    page.click("#rollout-actions button[data-action=promote]")
    page.wait_for_selector("#rollout-answer .answer")
    assert "promote by operator: candidate 0% → 50%" in page.inner_text("#rollout-answer")
    page.wait_for_function(
        "document.getElementById('rollout-share').textContent.includes('candidate 50%')"
    )
    assert page.inner_text("#rollout-step") == "step 2 of 3"
    assert page.locator("#rollout-steps li.done").all_inner_texts() == ["0%"]
    newest = page.locator("#rollout-log tbody tr").first
    assert (newest.get_attribute("data-action"), newest.get_attribute("data-by")) == (
        "promote",
        "operator",
    )
    assert (
        "0% → 50%" in newest.inner_text() and "looks fine on the dashboard" in newest.inner_text()
    )
    assert page.locator("#rollout-share-plot .chart-dots").count() == 2  # start, promote
    assert counts(page, "step", "control")[0] == "0"  # a new step counts anew

    complete(rollout_server, "user-9")  # the page refreshes itself every few seconds
    requests = (  # both arms, in total
        "[...document.querySelectorAll('#rollout-counts tr[data-scope=total]')]"
        ".reduce((n, row) => n + Number(row.querySelector('td.num').textContent), 0)"
    )
    page.wait_for_function(f"{requests} === 4", timeout=15_000)
    # the admin key lives in its field only: not in the address, nor in the browser's storage
    stored = page.evaluate("JSON.stringify([localStorage, sessionStorage, document.cookie])")
    assert ADMIN_KEY not in stored and ADMIN_KEY not in page.url
    assert page.locator("#error").is_hidden() and page.locator("#key-form").is_hidden()
    assert page.errors == []


def test_a_refused_action_shows_the_servers_message(page, rollout_server):  # noqa: F811
    open_rollout(page, rollout_server)
    page.click("#rollout-actions button[data-action=pause]")  # no key yet: asked for, not sent
    assert page.inner_text("#rollout-answer") == "enter the admin key first"
    page.fill("#admin-key", "wrong")
    page.click("#rollout-actions button[data-action=pause]")
    # the first message is an .error too: wait for the server's answer to replace it
    page.wait_for_function(
        "() => !document.querySelector('#rollout-answer').innerText.includes('first')"
    )
    assert "missing or wrong admin key" in page.inner_text("#rollout-answer")
    page.fill("#admin-key", ADMIN_KEY)  # resume a running rollout: refused by its state
    page.click("#rollout-actions button[data-action=resume]")
    page.wait_for_function(
        "document.getElementById('rollout-answer').textContent.includes('only a paused')"
    )
    assert page.locator("#rollout-answer .error").count() == 1
    # the page's own key is fine: no API key form, nothing in the page's error box
    assert page.locator("#key-form").is_hidden() and page.locator("#error").is_hidden()
    assert [e for e in page.errors if NETWORK_ERROR not in e] == []


def test_a_server_without_a_rollout_keeps_the_section_hidden(page, tiny_engine):  # noqa: F811
    with running(create_app(tiny_engine, ServerSettings(api_key=USER_KEY))) as url:
        asked = []
        page.on("response", lambda r: asked.append((r.url.removeprefix(url), r.status)))
        page.goto(f"{url}/#key={USER_KEY}")
        page.wait_for_selector("#main:not([hidden])")
        page.wait_for_load_state("networkidle")
    # the bank says there is no rollout, so the page never asks /v1/ttmm/rollout: a 404 there
    # would be a console error in every page of a server without a rollout
    assert ("/v1/ttmm/bank", 200) in asked
    assert not [path for path, _ in asked if path.startswith("/v1/ttmm/rollout")]
    assert page.locator("#rollout-section").is_hidden()
    assert page.locator("#rollout-link").is_hidden()
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_the_page_and_its_scripts_are_served(tiny_engine):
    with TestClient(create_app(tiny_engine, ServerSettings(api_key=USER_KEY))) as client:
        page = client.get("/")
        assert page.status_code == 200 and 'id="rollout-section"' in page.text
        bank = client.get("/v1/ttmm/bank", headers={"Authorization": f"Bearer {USER_KEY}"})
        assert bank.json()["rollout"] is False  # the page shows no Rollout section
        scripts = ("plot.js", "rollout.js", "app.js")  # rollout.js before app.js, which starts it
        positions = [page.text.index(f'src="/static/{name}"') for name in scripts]
        assert positions == sorted(positions)
        for name in scripts:
            response = client.get(f"/static/{name}")
            assert response.status_code == 200 and "javascript" in response.headers["content-type"]
        assert "window.rollout = { start }" in client.get("/static/rollout.js").text
        rollout = client.get("/v1/ttmm/rollout", headers={"Authorization": f"Bearer {USER_KEY}"})
        assert rollout.status_code == 404  # what hides the section
