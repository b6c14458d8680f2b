"""A screenshot of a ``ttmm poc`` report for the README (issue 20), taken in headless chromium.

    python benchmarks/poc_screenshot.py POC_DIR [--out docs/img/poc-report.png]

Opens POC_DIR/report.html from disk with the network cut off (the page must stand alone),
checks that its three answers are poc.json's, and saves the first screen and the whole page.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_ui_browser import CHROMIUM, CHROMIUM_ARGS  # noqa: E402  (the tests' browser)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("poc", type=Path, help="a ttmm poc output folder")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "poc-report.png")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    poc = json.loads((args.poc / "poc.json").read_text())
    page_url = (args.poc / "report.html").resolve().as_uri()
    requested = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1200, "height": 1000})
        page.on("request", lambda r: requested.append(r.url))
        page.route("http*://**", lambda route: route.abort())  # offline: nothing may load
        page.goto(page_url)
        text = page.inner_text("body")
        for answer in poc["answers"].values():
            if html.unescape(answer) not in text:
                raise SystemExit(f"the page does not show poc.json's answer: {answer}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out))
        page.screenshot(path=str(args.out.with_name(args.out.stem + "-full.png")), full_page=True)
        browser.close()
    remote = [u for u in requested if u.startswith("http")]
    if remote:
        raise SystemExit(f"the report asked for {remote}: it must stand alone")
    print(f"wrote {args.out} and its full-page twin; the page requested nothing remote")


if __name__ == "__main__":
    main()
