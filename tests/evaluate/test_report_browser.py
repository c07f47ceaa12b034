"""The HTML evaluation report in a real browser: it loads nothing, logs no error, decodes every image, and
shows its headline and tables; once for a hand-built evaluation dict with every section, once for one made
by the real producers. A full-page screenshot of each is kept as a test artefact."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from test_eval_report import full_evaluation, produced_evaluation

from seektune.evaluate.report import write_eval_report
from seektune.report import _fmt_num
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


@dataclass
class Rendered:
    """What the browser saw of one report page."""

    problems: list[str]  # console errors, page errors, failed or outside requests
    images: list[list[Any]]  # [complete, naturalWidth] of each <img>
    headline: str
    headline_visible: bool
    visible: dict[str, bool]  # text asked for -> whether an element holding it is visible
    classes: dict[str, str]  # text asked for -> the class of the first element holding it
    screenshot: Path


def _render(page_path: Path, screenshot: Path, texts: dict[str, str]) -> Rendered:
    """Open `page_path` in headless Chromium; `texts`: {text: CSS selector} of elements to look for."""
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
            visible, classes = {}, {}
            for text, selector in texts.items():
                found = page.locator(selector, has_text=text).first
                visible[text] = found.count() > 0 and found.is_visible()
                classes[text] = (found.get_attribute("class") if found.count() else None) or ""
            rendered = Rendered(
                problems, images, headline.inner_text(), headline.is_visible(), visible, classes, screenshot
            )
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    artefacts = os.environ.get("SEEKTUNE_TEST_ARTIFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artefacts) / screenshot.name)
    return rendered


def _assert_sound(rendered: Rendered, run: RunDir, evaluation: dict[str, Any]) -> None:
    """No error, nothing fetched, every plot drawn is shown and decodes, the headline is the summary."""
    assert rendered.problems == []
    plots = list((run.path / "eval" / "plots").glob("*.png"))
    assert len(rendered.images) == len(plots) > 0, (rendered.images, plots)
    assert all(complete and width > 0 for complete, width in rendered.images), rendered.images
    assert rendered.headline_visible and rendered.headline == evaluation["comparison"]["summary"]
    assert rendered.screenshot.read_bytes().startswith(b"\x89PNG")


def test_html_report_in_headless_chromium(tmp_path: Path) -> None:
    run = RunDir.create_at(tmp_path / "demo-run")
    evaluation = full_evaluation()
    page_path = write_eval_report(run, evaluation)["html"]
    verdict = "+0.091 (95% CI +0.05..+0.13) tuned better"
    rendered = _render(page_path, tmp_path / "eval-report.png", {verdict: "td"})
    _assert_sound(rendered, run, evaluation)
    assert len(rendered.images) == 4  # metrics, scorecard, robustness, latency
    assert rendered.visible[verdict] and "better" in rendered.classes[verdict]


def test_html_report_of_the_real_producers_in_headless_chromium(tmp_path: Path) -> None:
    # the evaluation dict comes from compare_models, measure_robustness and build_scorecard, so a key one
    # writes and the report no longer reads (or the other way round) shows up here
    run = RunDir.create_at(tmp_path / "produced-run")
    evaluation = produced_evaluation()
    page_path = write_eval_report(run, evaluation)["html"]
    comparison = evaluation["comparison"]
    first = comparison["examples"][0]
    title = f"Example {first['index']}, ROUGE-L: base {_fmt_num(first['a_score'])}"
    rouge = comparison["metrics"]["rouge_l"]
    verdict = f"(95% CI +{_fmt_num(rouge['ci_low'])}..+{_fmt_num(rouge['ci_high'])}) tuned better"
    texts = {title: ".example h4", verdict: "td", "Robustness": "h2", "Scorecard": "h2"}
    rendered = _render(page_path, tmp_path / "eval-report-produced.png", texts)
    _assert_sound(rendered, run, evaluation)
    assert len(rendered.images) == 3  # metrics, scorecard, robustness (no efficiency without a model)
    assert all(rendered.visible.values()), rendered.visible
    assert "better" in rendered.classes[verdict]
