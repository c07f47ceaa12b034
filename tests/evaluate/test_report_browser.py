"""The HTML evaluation report in a real browser: it loads nothing, logs no error, decodes every image, and
shows its headline and tables. A full-page screenshot is kept as a test artefact."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_eval_report import full_evaluation

from seektune.evaluate.report import write_eval_report
from seektune.rundir import RunDir

playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).is_file(),
    reason="no Chromium browser (install Debian's chromium, e.g. `bash scripts/setup.sh --dev` as root)",
)


def test_html_report_in_headless_chromium(tmp_path: Path) -> None:
    run = RunDir.create_at(tmp_path / "demo-run")
    evaluation = full_evaluation()
    page_path = write_eval_report(run, evaluation)["html"]
    problems: list[str] = []
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on(
                "console",
                lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None,
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
            page.on(
                "request",
                lambda r: (
                    None if r.url.startswith(("data:", "file:")) else problems.append(f"request: {r.url}")
                ),
            )
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
            headline = page.locator("p.headline")
            headline_text = headline.inner_text()
            headline_visible = headline.is_visible()
            cell = page.locator("td", has_text="+0.091 (95% CI +0.05..+0.13) tuned better")
            cell_visible = cell.is_visible()
            cell_class = cell.get_attribute("class")
            screenshot = tmp_path / "eval-report.png"
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()

    artefacts = os.environ.get("SEEKTUNE_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artefacts) / "eval-report.png")

    assert problems == []
    assert len(images) == 4 and all(complete and width > 0 for complete, width in images), images
    assert headline_visible and headline_text == evaluation["comparison"]["summary"]
    assert cell_visible and "better" in (cell_class or "")
    assert screenshot.read_bytes().startswith(b"\x89PNG")
