"""The web page in a real headless browser: Debian's chromium driven by Playwright (issue 14).

The real app runs under uvicorn in a thread, over the tiny built bank, with API key 'sesame'.
(`make install` puts /usr/bin/chromium in place; never `playwright install`.)
"""

from __future__ import annotations

import pytest
from evalbank import eval_bank_path, eval_engine  # noqa: F401  (fixtures)
from test_server import running

from ttmm.serve.app import ServerSettings, create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "The history of the Roman empire spans many centuries of conquest and law"
NEW_TOKENS = 6
WAIT_MS = 30_000


@pytest.fixture(scope="module")
def server(eval_engine):  # noqa: F811
    with running(create_app(eval_engine, ServerSettings(api_key="sesame"))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    """A fresh page that records console errors and uncaught exceptions in ``page.errors``."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    page.errors = []
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    yield page
    context.close()


def open_with_key(page, server: str) -> None:
    page.goto(f"{server}/#key=sesame")
    page.wait_for_selector("#main:not([hidden]), #error:not([hidden])")
    assert page.locator("#main").is_visible(), (page.inner_text("#error"), page.errors)


def test_page_loads_the_bank_and_its_map_without_console_errors(page, server, eval_engine):  # noqa: F811
    open_with_key(page, server)
    K = eval_engine.bank.num_experts
    assert page.locator("#map .centroid").count() == K
    colours = page.eval_on_selector_all(
        "#map .chunk", "dots => dots.map(d => d.getAttribute('fill'))"
    )
    assert len(colours) > K and len(set(colours)) == K
    centroid_colours = page.eval_on_selector_all(
        "#map .centroid", "marks => marks.map(m => m.getAttribute('fill'))"
    )
    assert set(centroid_colours) == set(colours)
    assert page.locator("#experts tbody tr").count() == K + 1  # and the fine-tuning adapter
    assert page.locator("#experts svg.spark").count() == K + 1  # one loss curve each
    labels = page.locator("#experts td.label").all_inner_texts()
    assert labels[:K] == [e.label for e in eval_engine.bank.manifest.experts]
    config = page.eval_on_selector_all(  # the build configuration (in a closed <details>)
        "#config tr", "rows => rows.map(r => [r.cells[0].textContent, r.cells[1].textContent])"
    )
    assert ["experts", str(K)] in config and len(config) > 10
    page.hover("#map .chunk >> nth=0")
    assert page.locator("#tip").is_visible() and page.locator("#tip").inner_text()
    assert "key=" not in page.url  # the key left the address bar
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_a_prompt_shows_its_routing_and_streamed_continuations(page, server, eval_engine):  # noqa: F811
    from ttmm.routing import RoutingPlan

    open_with_key(page, server)
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(NEW_TOKENS))
    page.click("#run")
    for method in ("base", "ttmm", "finetune"):
        page.wait_for_selector(f"#out-{method}.done")
    [plan] = eval_engine.route([PROMPT])
    K = eval_engine.bank.num_experts
    assert page.locator("#routing .route-row:not(.head)").count() == K
    active = page.eval_on_selector_all(
        "#routing .route-row.active", "rows => rows.map(r => Number(r.dataset.expert))"
    )
    assert sorted(active) == sorted(plan.expert_ids)
    assert page.locator("#map .query").count() == 1
    assert page.locator("#map .link").count() == len(plan.expert_ids)
    texts = {m: page.inner_text(f"#out-{m} .gen") for m in ("base", "ttmm", "finetune")}
    for method, expected_plan in (("base", RoutingPlan.base()), ("ttmm", plan)):
        [expected] = eval_engine.generate([PROMPT], NEW_TOKENS, plans=[expected_plan])
        assert texts[method] == expected.text
    assert all(texts.values())

    page.fill("#max-active", "1")  # a routing control changes: the prompt is routed again
    page.wait_for_function("document.querySelectorAll('#routing .route-row.active').length == 1")
    assert page.locator("#map .link").count() == 1
    assert page.locator("#error").is_hidden()
    assert page.errors == []


def test_scoring_a_text_shows_base_ttmm_and_finetuning(page, server):
    open_with_key(page, server)
    page.fill("#score-text", " ".join([PROMPT] * 6))
    page.fill("#prefix-tokens", "20")
    page.click("#score-run")
    page.wait_for_selector(".scores tr[data-method='ttmm']")
    methods = page.eval_on_selector_all(
        ".scores tr[data-method]", "rows => rows.map(r => r.dataset.method)"
    )
    assert methods == ["base", "ttmm", "finetune"]
    assert all(float(p) > 1 for p in page.locator(".scores td.ppl").all_inner_texts())
    page.fill("#score-text", "Too short.")  # nothing after the prefix: the page says so
    page.click("#score-run")
    page.wait_for_selector("#error:not([hidden])")
    assert "smaller prefix_tokens" in page.inner_text("#error")


def test_a_bad_api_key_shows_an_error_in_the_page(page, server):
    page.goto(server)
    page.wait_for_selector("#key-form", state="visible")
    assert "missing API key" in page.inner_text("#error")
    page.fill("#key", "wrong")
    page.click("#key-form button")
    page.wait_for_function(
        "document.getElementById('error').textContent.includes('incorrect API key')"
    )
    assert page.locator("#error").is_visible() and page.locator("#main").is_hidden()
    page.fill("#key", "sesame")
    page.click("#key-form button")
    page.wait_for_selector("#main", state="visible")
    assert page.locator("#error").is_hidden() and page.locator("#key-form").is_hidden()
