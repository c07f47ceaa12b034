"""The dashboard end to end in headless Chromium (Debian's chromium through Playwright): a finished run's
page and its curves, a tiny training launched from the form and watched until it finishes, a chat with a
served tiny model (two side by side, with feedback). A screenshot of each page is kept as a test artefact
(in $SEEKTUNE_TEST_ARTIFACTS, else build/test-artifacts/ui)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from seektune.config import validate_config
from support import load_tiny_base, running_server, save_lora, tiny_run_config

playwright_sync = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = (
    Path(os.environ.get("SEEKTUNE_TEST_ARTIFACTS") or Path(__file__).parents[2] / "build" / "test-artifacts")
    / "ui"
)
NO_SERVER = "http://127.0.0.1:9"  # nothing listens on the discard port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason="no Chromium browser (install Debian's chromium, e.g. `bash scripts/setup.sh --dev` as root)",
    ),
]


@contextmanager
def dashboard(**settings: Any) -> Iterator[str]:
    """The dashboard on `settings` (UiSettings fields), served on a free loopback port; yields its URL."""
    from seektune.ui.app import UiSettings, create_ui_app

    with running_server(create_ui_app(UiSettings(**settings))) as running:
        yield running.url


@contextmanager
def browser_page() -> Iterator[tuple[Any, list[str]]]:
    """A Chromium page, and the console errors and page errors it logs (a test asserts there are none)."""
    problems: list[str] = []
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            yield page, problems
        finally:
            browser.close()


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes().startswith(b"\x89PNG")
    return path


def points(page: Any, series: str) -> int:
    """How many points the chart's line of `series` has now (0 when it is not drawn)."""
    line = page.locator(f'polyline[data-series="{series}"]')
    return int(line.first.get_attribute("data-points")) if line.count() else 0


@pytest.fixture(scope="module")
def finished_run(base_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole run (data, base evaluation, LoRA training with validation, evaluation, report) on the tiny
    base, run once for the module."""
    from seektune.pipeline import run_pipeline

    root = tmp_path_factory.mktemp("ui-run")
    raw = tiny_run_config(
        root, base_cache, train={"max_steps": 8, "logging_steps": 1, "eval_steps": 4}, name="shown"
    )
    return run_pipeline(validate_config(raw)).path


def test_a_finished_run_shows_its_curves_and_reports(finished_run: Path, tmp_path: Path):
    with (
        dashboard(runs_dir=finished_run.parent, jobs_dir=tmp_path / "jobs", server_url=NO_SERVER) as url,
        browser_page() as (page, problems),
    ):
        page.goto(f"{url}/runs")
        row = page.locator(f'tr[data-run="{finished_run.name}"]')
        assert row.locator(".state").inner_text() == "completed"
        assert "lora" in row.inner_text() and "tiny-deepseek-v3" in row.inner_text()
        screenshot(page, "runs")

        row.locator("a").click()
        page.wait_for_selector('polyline[data-series="loss"]')
        assert points(page, "loss") == 8
        history = json.loads((finished_run / "train" / "history.json").read_text())
        assert points(page, "eval_loss") == sum("eval_loss" in entry for entry in history) >= 2
        assert points(page, "learning_rate") == 8
        assert points(page, "grad_norm") == 8
        assert page.locator("#state").inner_text() == "completed"
        assert page.locator("#report-data table").count() >= 1
        frame = page.frame_locator("iframe.eval")
        assert frame.locator("p.headline").inner_text()
        screenshot(page, "run")
        assert problems == []


def test_launch_a_tiny_training_and_watch_it_finish(base_cache: Path, tmp_path: Path):
    raw = tiny_run_config(
        tmp_path, base_cache, name="launched", train={"max_steps": 60, "logging_steps": 3, "eval_steps": 30}
    )
    config_file = tmp_path / "start.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    runs = Path(raw["output_dir"])
    settings = dict(runs_dir=runs, jobs_dir=tmp_path / "jobs", server_url=NO_SERVER, base_config=raw)
    with dashboard(**settings, config_path=config_file) as url, browser_page() as (page, problems):
        page.goto(f"{url}/launch")
        page.check('input[name="_command"][value="train"]')
        assert page.input_value('[name="train.max_steps"]') == "60"
        page.fill('[name="train.max_steps"]', "abc")
        page.click("#start")
        assert "valid integer" in page.locator("#form-error").inner_text()
        assert page.locator(".field.bad").count() == 1, (
            page.locator("#form-error").inner_text(),
            page.eval_on_selector_all(".field.bad label", "els => els.map(e => e.textContent)"),
        )
        screenshot(page, "launch-error")

        page.fill('[name="train.max_steps"]', "48")
        screenshot(page, "launch")
        page.click("#start")
        page.wait_for_url("**/jobs/*")
        job_url = page.url
        assert page.locator("#job-state").inner_text() == "running"
        page.wait_for_selector("#job-run-link", timeout=120_000)
        screenshot(page, "job")
        page.click("#job-run-link")

        page.wait_for_selector('polyline[data-series="loss"]', timeout=120_000)
        first_seen, state = points(page, "loss"), page.locator("#state").inner_text()
        screenshot(page, "run-live")
        deadline = time.monotonic() + 240
        while (now := page.locator("#state").inner_text()) != "completed":
            assert now == "running", page.locator("#run-error").inner_text()
            assert time.monotonic() < deadline, "the launched run did not finish in 4 minutes"
            page.wait_for_timeout(500)
        page.wait_for_selector('#run-state[data-watch="done"]')  # after the page's reload at the end
        assert points(page, "loss") == 16  # 48 steps, logged every 3
        if state == "running":
            assert points(page, "loss") > first_seen  # it grew while the page watched
        screenshot(page, "run-finished")

        page.goto(job_url)  # the run is complete; the job ends when its process exits
        page.wait_for_selector("#job-state.completed", timeout=60_000)
        assert page.locator("#job-exit").inner_text() == "exit code 0"
        assert "run directory:" in page.locator("#job-log").inner_text()
        page.goto(f"{url}/jobs")
        assert page.locator(".state").first.inner_text() == "completed"
        assert len(problems) == 1 and "400" in problems[0]  # the refused form, nothing else
    saved = validate_config(yaml.safe_load(next((tmp_path / "jobs").glob("*/config.yaml")).read_text()))
    assert saved.train.max_steps == 48 and saved.name == "launched"


def test_chat_with_a_served_tiny_model_side_by_side_with_feedback(base_cache: Path, tmp_path: Path):
    from seektune.config import ServeConfig
    from seektune.serve.adapters import AdapterSet
    from seektune.serve.app import ServedModels, create_app
    from seektune.serve.engine import Engine
    from seektune.serve.feedback import read_store

    store = tmp_path / "feedback.db"
    cfg = ServeConfig(feedback={"enabled": True, "store": store})
    loaded = load_tiny_base(base_cache)
    engine = Engine(loaded.model, loaded.tokenizer, cfg.limits, version="tiny")
    adapters = AdapterSet(engine, "tiny", None)
    adapters.load("candidate", save_lora(base_cache, tmp_path / "candidate"))
    server_app = create_app(engine, loaded.tokenizer, cfg, ServedModels("tiny", adapters), seed=0)
    with running_server(server_app) as served:
        settings = dict(runs_dir=tmp_path / "runs", jobs_dir=tmp_path / "jobs", server_url=served.url)
        with dashboard(**settings) as url, browser_page() as (page, problems):
            page.goto(f"{url}/playground")
            assert page.locator("#model-a option").all_inner_texts() == ["tiny", "candidate"]
            page.check("#side-by-side")
            page.select_option("#model-b", "candidate")
            page.fill("#prompt", "What does the os module do?")
            page.click("#send")
            for pane in ("a", "b"):
                page.wait_for_selector(f'#pane-{pane} .turn.assistant[data-done="true"]', timeout=60_000)
            answers = [page.locator(f"#pane-{p} .turn.assistant .text").inner_text() for p in ("a", "b")]
            assert all(answers), answers
            assert answers[0] != answers[1]  # two versions, two answers

            page.locator("#pane-a .turn.assistant button.up").click()
            page.wait_for_selector("#pane-a .note:has-text('recorded as fb-')")
            page.locator("#pane-b .turn.assistant button.fix").click()
            page.fill(
                "#pane-b textarea.correction", "It talks to the operating system: files, paths, processes."
            )
            page.locator("#pane-b button.save-correction").click()
            page.wait_for_selector("#pane-b .note:has-text('recorded as fb-')")
            screenshot(page, "playground")
            assert problems == []
    responses, feedback = read_store(store)  # the server flushed it when it stopped
    assert sorted((f["rating"], bool(f["correction"])) for f in feedback) == [(-1, True), (1, False)]
    assert {r["model"] for r in responses} == {"tiny", "candidate"}


def test_the_playground_says_so_when_the_server_is_down(tmp_path: Path):
    settings = dict(runs_dir=tmp_path, jobs_dir=tmp_path / "jobs", server_url=NO_SERVER)
    with dashboard(**settings) as url, browser_page() as (page, problems):
        page.goto(f"{url}/playground")
        assert "does not answer" in page.locator("#server-problem").inner_text()
        screenshot(page, "playground-server-down")
        page.goto(f"{url}/runs/deleted-run")
        assert "does not exist (deleted or moved?)" in page.locator(".message").inner_text()
        screenshot(page, "deleted-run")
        assert problems == [
            "console: Failed to load resource: the server responded with a status of 404 (Not Found)"
        ]
