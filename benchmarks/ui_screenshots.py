"""Screenshots of the web page for the README (issue 14), taken in headless chromium.

    python benchmarks/ui_screenshots.py [--bank BANK] [--out docs/img]

Serves BANK (default: the newest demo bank under ~/.cache/ttmm/demo/*/bank) on a free port,
opens the page, runs a prompt and scores a held-out document; then serves a shadow rollout of
BANK against its fine-tuning adapter, sends it held-out documents and promotes it once. Saves
five PNGs (docs/img/ui-*.png).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from serve_load import LiveServer  # noqa: E402  (uvicorn on a free port, in a thread)
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the tests' browser)

PROMPT = "The Roman Republic was governed by two consuls elected every year, and the Senate"


def default_bank() -> Path:
    from ttmm.assets import ttmm_home

    manifests = (ttmm_home() / "demo").glob("*/bank/manifest.json")
    banks = sorted(manifests, key=lambda p: p.stat().st_mtime)
    if not banks:
        raise SystemExit("no demo bank under ~/.cache/ttmm/demo: run `ttmm demo` or pass --bank")
    return banks[-1].parent


def held_out_texts(bank: Path, n: int = 1, words: int = 220) -> list[str]:
    """The first ``words`` words of the ``n`` longest held-out prose documents."""
    from ttmm.build.chunks import read_test_documents

    documents = sorted(read_test_documents(bank), key=lambda d: -len(d.text.split()))
    prose = [d for d in documents if d.domain == "wiki"] or documents
    return [" ".join(d.text.split()[:words]) for d in prose[:n]]


def rollout_screenshot(browser, bank: Path, control: str, out: Path, requests: int) -> None:
    """The Rollout section: a shadow rollout of ``bank`` against ``control`` (finetune or
    base), ``requests`` held-out documents sent to it and one operator promotion halfway."""
    import tempfile

    import httpx

    from ttmm.serve.app import ServerSettings, create_app
    from ttmm.serve.rollout.config import RolloutConfig
    from ttmm.serve.rollout.service import start_rollout

    user, admin = {"Authorization": "Bearer demo-key"}, {"Authorization": "Bearer demo-admin"}
    with tempfile.TemporaryDirectory() as state:
        config = RolloutConfig.from_dict(
            {
                "candidate": {"bank": str(bank)},
                "control": {"kind": control},
                "mode": "shadow",
                "steps": [0, 10, 50, 100],
                "state_dir": state,
            }
        )
        settings = ServerSettings(api_key="demo-key", admin_key="demo-admin")
        with LiveServer(create_app(None, settings, start_rollout(config))) as url:
            for i, text in enumerate(held_out_texts(bank, requests, words=150)):
                body = {"prompt": text, "max_tokens": 1, "temperature": 0, "user": f"user-{i}"}
                httpx.post(f"{url}/v1/completions", json=body, headers=user, timeout=600)
                if i == requests // 2:  # refused (409) if the policy rolled back already
                    reason = {"reason": "a first look at the candidate's traffic"}
                    httpx.post(f"{url}/v1/ttmm/rollout/promote", json=reason, headers=admin)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{url}/#key=demo-key")
            page.wait_for_selector("#rollout-section", state="visible")
            page.locator("#rollout-section").screenshot(path=out / "ui-rollout.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--rollout-requests", type=int, default=16)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    from ttmm.model import TTMM
    from ttmm.serve.app import ServerSettings, create_app

    bank = args.bank or default_bank()
    engine = TTMM.from_bank(bank)
    args.out.mkdir(parents=True, exist_ok=True)
    with LiveServer(create_app(engine, ServerSettings(api_key="demo-key"))) as url:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(600_000)
            page.goto(f"{url}/#key=demo-key")
            page.wait_for_selector("#main", state="visible")
            page.hover("#map .chunk >> nth=40")  # a tooltip with its first words
            page.locator("#bank-section").screenshot(path=args.out / "ui-bank.png")

            page.fill("#prompt", PROMPT)
            page.fill("#max-tokens", str(args.new_tokens))
            page.click("#run")
            for method in ("base", "ttmm"):
                page.wait_for_selector(f"#out-{method}.done")
            if page.locator('.column[data-method="finetune"]').is_visible():
                page.wait_for_selector("#out-finetune.done")
            page.mouse.move(0, 0)
            page.locator("#playground").screenshot(path=args.out / "ui-playground.png")
            page.locator("#map").screenshot(path=args.out / "ui-map-prompt.png")

            page.fill("#score-text", held_out_texts(bank)[0])
            page.click("#score-run")
            page.wait_for_selector(".scores tr[data-method='ttmm']")
            page.locator("#scoring").screenshot(path=args.out / "ui-score.png")
            control = "finetune" if engine.bank.manifest.finetune else "base"
            rollout_screenshot(browser, bank, control, args.out, args.rollout_requests)
            browser.close()
    for path in sorted(args.out.glob("ui-*.png")):
        print(f"{path}: {path.stat().st_size / 1000:.0f} kB")


if __name__ == "__main__":
    main()
