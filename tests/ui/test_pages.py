"""The dashboard's pages and JSON API without a browser: what each page shows, and a clear message (never a
traceback) for a deleted run, a wrong form value, a server that is down, a missing login."""

from __future__ import annotations

import html
import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from conftest import write_run
from registry_runs import make_run
from seektune.config import RegistryConfig, SeektuneConfig, validate_config
from seektune.ui.forms import config_form


def test_run_list_shows_state_method_model_and_key_metrics(ui_client):
    write_run(ui_client.runs, "legal-20261201-100000")
    write_run(ui_client.runs, "draft-20261201-110000", state="running")
    page = ui_client.get("/runs")
    assert page.status_code == 200
    html = page.text
    assert "legal-20261201-100000" in html and "draft-20261201-110000" in html
    assert 'class="state running"' in html and 'class="state completed"' in html
    assert "tiny-deepseek-v3" in html and "lora" in html
    assert "train_loss <b>2.5</b>" in html
    listed = ui_client.get("/api/runs").json()
    assert [r["id"] for r in listed] == ["legal-20261201-100000", "draft-20261201-110000"] or len(listed) == 2


def test_run_page_renders_reports_and_curves_come_from_the_event_log(ui_client):
    write_run(ui_client.runs, "legal-20261201-100000")
    page = ui_client.get("/runs/legal-20261201-100000")
    assert page.status_code == 200
    html = page.text
    assert 'id="chart-loss"' in html and 'data-series="loss,eval_loss"' in html
    assert "<table>" in html and "<td>64</td>" in html  # the data report's Markdown table
    assert 'src="/runs/legal-20261201-100000/files/data/plots/lengths.png"' in html
    assert "<script>alert(1)</script>" not in html  # raw HTML in a report is escaped
    image = ui_client.get("/runs/legal-20261201-100000/files/data/plots/lengths.png")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"

    curves = ui_client.get("/api/runs/legal-20261201-100000/curves").json()
    assert curves["state"] == "completed"
    assert [p[0] for p in curves["curves"]["loss"]] == [1, 2, 3, 4, 5, 6]
    assert curves["curves"]["loss"][-1][1] == pytest.approx(2.5)
    assert curves["curves"]["eval_loss"] == [[3, pytest.approx(3.3)], [6, pytest.approx(2.7)]]
    assert len(curves["curves"]["learning_rate"]) == 6 and len(curves["curves"]["tokens_per_s"]) == 6


def test_curves_grow_while_the_run_writes_and_a_half_written_line_waits(ui_client):
    run = write_run(ui_client.runs, "live-20261201-100000", state="running", steps=2)
    url = "/api/runs/live-20261201-100000/curves"
    assert len(ui_client.get(url).json()["curves"]["loss"]) == 2
    events = run / "logs" / "events.jsonl"
    line = json.dumps({"event": "train_log", "step": 3, "loss": 3.0})
    with events.open("a") as handle:
        handle.write(line[:10])  # the writer is mid-line
    assert len(ui_client.get(url).json()["curves"]["loss"]) == 2
    with events.open("a") as handle:
        handle.write(line[10:] + "\n")
    assert ui_client.get(url).json()["curves"]["loss"][-1] == [3, 3.0]


def test_a_deleted_run_gets_a_page_that_says_so(ui_client):
    run = write_run(ui_client.runs, "gone-20261201-100000")
    assert ui_client.get("/runs/gone-20261201-100000").status_code == 200
    shutil.rmtree(run)
    page = ui_client.get("/runs/gone-20261201-100000")
    assert page.status_code == 404
    assert "does not exist (deleted or moved?)" in page.text and "Traceback" not in page.text
    assert 'href="/runs"' in page.text
    api = ui_client.get("/api/runs/gone-20261201-100000/curves")
    assert api.status_code == 404 and "deleted or moved" in api.json()["error"]["message"]
    assert ui_client.get("/runs/..%2F..%2Fetc").status_code in (400, 404)


def test_run_files_stay_inside_the_run_and_never_serve_weights(ui_client):
    run = write_run(ui_client.runs, "legal-20261201-100000")
    (run / "model").mkdir()
    (run / "model" / "adapter_model.safetensors").write_bytes(b"weights")
    assert (
        ui_client.get("/runs/legal-20261201-100000/files/model/adapter_model.safetensors").status_code == 404
    )
    assert ui_client.get("/runs/legal-20261201-100000/files/../../jobs/x.json").status_code == 404
    assert ui_client.get("/runs/legal-20261201-100000/files/config.yaml").status_code == 200


def _leaf_keys(section) -> list[str]:
    keys = [f.key for f in section.fields]
    for sub in section.sections:
        keys += _leaf_keys(sub)
    return keys


def test_launch_form_has_every_config_field_with_default_and_description(ui_client):
    page = ui_client.get("/launch")
    assert page.status_code == 200
    html = page.text
    keys = _leaf_keys(config_form({}))
    assert len(keys) > 150
    for key in keys:
        assert f'name="{key}"' in html, key
    for key in ("train.learning_rate", "method.lora.r", "model.base.hidden_size", "serve.feedback.enabled"):
        assert f'name="{key}"' in html
    described = SeektuneConfig.model_fields["seed"].description
    assert described in html
    assert "default: <code>42</code>" in html
    for command in ("data", "train", "tune", "eval", "run"):
        assert f'value="{command}"' in html


def test_a_wrong_form_value_gets_the_cli_message_and_keeps_what_was_typed(ui_client):
    page = ui_client.post("/launch", data={"_command": "train", "train.max_steps": "abc", "seed": "7"})
    assert page.status_code == 400
    html = page.text
    assert "train.max_steps" in html and "valid integer" in html
    assert 'class="field bad"' in html and 'value="abc"' in html and 'value="7"' in html
    assert "Traceback" not in html
    assert not (ui_client.runs.parent / "jobs").exists() or not list(
        (ui_client.runs.parent / "jobs").iterdir()
    )
    bad_yaml = ui_client.post("/launch", data={"_command": "train", "data.sources": "[unclosed"})
    assert bad_yaml.status_code == 400 and "data.sources: not valid YAML" in bad_yaml.text
    bad_choice = ui_client.post("/launch", data={"_command": "train", "method.name": "magic"})
    assert bad_choice.status_code == 400 and "method.name" in bad_choice.text


def test_form_values_become_the_config_only_where_changed():
    from seektune.ui.forms import config_from_form

    base = {"name": "t", "train": {"learning_rate": 3e-3}}
    form = {f.key: f.value for f in _all_fields(config_form(base))}
    form["train.max_steps"] = "12"
    form["train.learning_rate"] = "1e-4"
    form["method.lora.target_modules"] = "[q_b_proj, o_proj]"
    form["train.bf16"] = "true" if "train.bf16" in form else None
    form = {k: v for k, v in form.items() if v is not None}
    cfg, changed = config_from_form(base, form)
    assert cfg.train.max_steps == 12 and cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.method.lora.target_modules == ["q_b_proj", "o_proj"]
    assert "train.max_steps" in changed and "name" not in changed
    assert cfg.name == "t"


def test_the_form_sent_back_unchanged_changes_nothing(tmp_path):
    """Every input as the page fills it, as a browser sends it back (CRLF in text areas): no change, and it
    validates, for the defaults and for a config with sources and nested sections."""
    from seektune.ui.forms import config_from_form
    from support import tiny_run_config

    raw = tiny_run_config(tmp_path, tmp_path / "cache")
    raw["data"]["sources"] = [{"path": "docs/*.md", "text_unit": "paragraph"}]
    for base in ({}, raw):
        form = {f.key: _as_sent(f) for f in _all_fields(config_form(base))}
        cfg, changed = config_from_form(base, form)
        assert changed == []
        assert cfg.model_dump() == validate_config(base).model_dump()


def _as_sent(formfield) -> str:
    """What a browser sends of a field the launch page filled: a text area (long YAML) with CRLF new
    lines, a one-line input with its new lines dropped (HTML's value sanitisation)."""
    if formfield.kind == "yaml" and len(formfield.value) > 60:
        return formfield.value.replace("\n", "\r\n")
    return formfield.value.replace("\n", "")


def _all_fields(section):
    out = list(section.fields)
    for sub in section.sections:
        out += _all_fields(sub)
    return out


def _fake_program(tmp_path: Path, seconds: float) -> list[str]:
    """A stand-in for the seektune CLI: prints, makes a run directory, sleeps, says where it wrote."""
    script = tmp_path / "fake_cli.py"
    script.write_text(
        "import sys, time, json, pathlib, yaml\n"
        "cfg = yaml.safe_load(open(sys.argv[-1]))\n"
        "run = pathlib.Path(cfg['output_dir']) / (cfg['name'] + '-20261201-120000')\n"
        "run.mkdir(parents=True)\n"
        "(run / 'status.json').write_text(json.dumps({'state': 'running'}))\n"
        "print('training', sys.argv[1:-1], flush=True)\n"
        f"time.sleep({seconds})\n"
        "(run / 'status.json').write_text(json.dumps({'state': 'completed'}))\n"
        "print('run directory:', run)\n"
    )
    return [sys.executable, str(script)]


def _wait(client, job_id: str, state: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] == state:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} is {job['state']}, not {state}: {job}")


def test_a_launched_job_runs_its_command_and_links_its_run(ui_client, tmp_path):
    runner = ui_client.app.state.ui.jobs
    runner.program = _fake_program(tmp_path, 0.5)
    response = ui_client.post("/launch", data={"_command": "train", "name": "tiny"}, follow_redirects=False)
    assert response.status_code == 303
    job_id = response.headers["location"].rsplit("/", 1)[-1]
    job = _wait(ui_client, job_id, "completed")
    assert job["exit_code"] == 0 and job["command_line"].startswith("seektune train ")
    assert job["run_id"] == "tiny-20261201-120000" and job["run_listed"]
    assert "training ['train']" in job["log"]
    saved = Path(job["command_line"].split()[-1])
    assert "name: tiny" in saved.read_text()
    page = ui_client.get(f"/jobs/{job_id}")
    assert 'href="/runs/tiny-20261201-120000"' in page.text
    assert job_id in ui_client.get("/jobs").text


def test_stop_ends_a_running_job(ui_client, tmp_path):
    runner = ui_client.app.state.ui.jobs
    runner.program = _fake_program(tmp_path, 60)
    response = ui_client.post("/launch", data={"_command": "tune", "name": "long"}, follow_redirects=False)
    job_id = response.headers["location"].rsplit("/", 1)[-1]
    _wait(ui_client, job_id, "running")
    assert ui_client.post(f"/jobs/{job_id}/stop", follow_redirects=False).status_code == 303
    job = _wait(ui_client, job_id, "stopped", timeout=20)
    assert job["exit_code"] != 0
    assert ui_client.get("/jobs/no-such-job").status_code == 404


def test_max_jobs_refuses_one_more(ui_client, tmp_path):
    runner = ui_client.app.state.ui.jobs
    runner.program = _fake_program(tmp_path, 60)
    runner.max_jobs = 1
    first = ui_client.post("/launch", data={"_command": "train", "name": "a"}, follow_redirects=False)
    second = ui_client.post("/launch", data={"_command": "train", "name": "b"})
    assert second.status_code == 400 and "ui.max_jobs is 1" in second.text
    runner.stop(first.headers["location"].rsplit("/", 1)[-1])


def test_the_playground_says_when_the_server_is_down(ui_client):
    page = ui_client.get("/playground")
    assert page.status_code == 200
    assert "does not answer" in page.text and "seektune serve" in page.text
    assert "Traceback" not in page.text
    chat = ui_client.post(
        "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert chat.status_code == 503 and "does not answer" in chat.json()["error"]["message"]
    feedback = ui_client.post("/api/feedback", json={"response_id": "chatcmpl-1", "rating": 1})
    assert feedback.status_code == 503
    empty = ui_client.post("/api/feedback", json={"response_id": "chatcmpl-1"})
    assert empty.status_code == 400 and "thumbs" in empty.json()["error"]["message"]
    wrong = ui_client.post("/api/chat", json={"model": "tiny", "messages": []})
    assert wrong.status_code == 400 and "messages" in wrong.json()["error"]["message"]


def test_registry_pages_list_draw_lineage_compare_and_promote_with_confirmation(ui_client, tmp_path):
    from seektune.registry.register import register_run

    store = ui_client.app.state.ui.registry()
    register_run(store, RegistryConfig(), make_run(tmp_path / "made", seed=0))
    register_run(store, RegistryConfig(), make_run(tmp_path / "made", seed=1, compress_steps=()))
    register_run(store, RegistryConfig(), make_run(tmp_path / "made", name="bare", evaluated=False, seed=2))

    listing = ui_client.get("/registry").text
    for ref in ("legal@1.0.0", "legal@1.1.0", "legal@1.0.0+merged", "bare@1.0.0"):
        assert ref in listing
    graph = ui_client.get("/registry/lineage/legal").text
    assert graph.count('class="node v') == 4 and graph.count('class="node base') == 2
    assert graph.count('class="edge"') == 4  # base→1.0.0→merged→int8, base→1.1.0

    compare = ui_client.get("/registry/compare", params={"a": "legal@1.0.0", "b": "legal@1.1.0"})
    assert compare.status_code == 200 and "perplexity" in compare.text and "Config diff" in compare.text
    assert "-1" in compare.text  # B − A of the perplexity (20 → 19)
    missing = ui_client.get("/registry/compare", params={"a": "legal@1.0.0", "b": "legal@9.9.9"})
    assert missing.status_code == 404 and "no version or tag" in missing.text

    confirm = ui_client.get("/registry/promote", params={"ref": "legal@1.0.0", "stage": "production"})
    assert confirm.status_code == 200 and "Promote legal@1.0.0 to production?" in confirm.text
    unconfirmed = ui_client.post("/registry/promote", data={"ref": "legal@1.0.0", "stage": "production"})
    assert unconfirmed.status_code == 400 and "not confirmed" in unconfirmed.text
    done = ui_client.post(
        "/registry/promote",
        data={"ref": "legal@1.0.0", "stage": "production", "confirm": "yes", "reason": "ok"},
    )
    assert done.status_code == 200 and "legal@1.0.0 is now in production" in done.text
    second = ui_client.get("/registry/promote", params={"ref": "legal@1.1.0", "stage": "production"})
    assert "legal@1.0.0</b>, in production now, will be archived" in second.text
    refused = ui_client.post(
        "/registry/promote", data={"ref": "bare@1.0.0", "stage": "production", "confirm": "yes"}
    )
    assert refused.status_code == 400 and "has no evaluation" in refused.text
    assert store.shown_url  # the same store the pages use


def test_registry_page_of_an_unknown_name_says_what_is_registered(ui_client):
    page = ui_client.get("/registry/lineage/nobody")
    assert page.status_code == 404 and "no model named 'nobody'" in html.unescape(page.text)


def test_bound_beyond_loopback_it_asks_for_a_server_key(tmp_path):
    from fastapi.testclient import TestClient

    from seektune.errors import UserError
    from seektune.ui.app import create_ui_app
    from seektune.ui.server import ui_settings

    cfg = SeektuneConfig(output_dir=tmp_path / "runs", ui={"host": "0.0.0.0", "jobs_dir": tmp_path / "jobs"})
    with pytest.raises(UserError, match=r"set serve\.api_keys"):
        ui_settings(cfg)
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_keys": ["sekrit-key"]})})
    settings = ui_settings(cfg)
    assert settings.login_keys == ["sekrit-key"] and settings.server_api_key is None
    with TestClient(create_ui_app(settings)) as client:
        first = client.get("/runs", follow_redirects=False)
        assert first.status_code == 303 and first.headers["location"].startswith("/login")
        assert client.get("/api/runs").status_code == 401
        wrong = client.post("/login", data={"key": "guess", "next": "/runs"})
        assert wrong.status_code == 401 and "not one of this server's API keys" in html.unescape(wrong.text)
        right = client.post("/login", data={"key": "sekrit-key", "next": "https://evil.example/"})
        assert right.status_code == 200 and right.url.path == "/runs"  # no redirect off the site
        assert client.get("/api/runs").status_code == 200
    assert ui_settings(SeektuneConfig()).login_keys == []  # loopback: no login


def test_a_post_from_another_site_is_refused(ui_client):
    response = ui_client.post(
        "/launch", data={"_command": "train"}, headers={"Origin": "http://evil.example"}
    )
    assert response.status_code == 403


def test_unknown_pages_get_a_page_not_a_traceback(ui_client):
    page = ui_client.get("/nowhere")
    assert page.status_code == 404 and "Not found" in page.text
    assert ui_client.get("/").status_code == 200  # redirected to the run list
