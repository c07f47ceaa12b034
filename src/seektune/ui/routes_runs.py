"""Pages of runs and jobs: the run list, a run with live curves and its reports, launch form, jobs."""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Any

import yaml
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from seektune.errors import UserError
from seektune.ui.app import PageError, render
from seektune.ui.forms import config_form, config_from_form
from seektune.ui.jobs import COMMANDS, job_view
from seektune.ui.runs import list_runs, run_detail, run_path

router = APIRouter()

# What a run's files route serves (reports and their plots, never checkpoints or weights).
SERVED_SUFFIXES = {".html", ".md", ".png", ".svg", ".json", ".yaml", ".csv", ".txt", ".jsonl"}


def _ui(request: Request) -> Any:
    return request.app.state.ui


def _run(request: Request, run_id: str) -> Path:
    try:
        return run_path(_ui(request).settings.runs_dir, run_id)
    except UserError as exc:
        raise PageError(str(exc), 404, "This run is not there") from None


# -- runs -----------------------------------------------------------------------------------------------


@router.get("/runs", response_class=HTMLResponse)
async def runs_page(request: Request) -> HTMLResponse:
    runs_dir = _ui(request).settings.runs_dir
    return render(request, "runs.html", runs=list_runs(runs_dir), runs_dir=runs_dir)


@router.get("/api/runs")
async def runs_api(request: Request) -> JSONResponse:
    return JSONResponse(list_runs(_ui(request).settings.runs_dir))


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(request: Request, run_id: str) -> HTMLResponse:
    path = _run(request, run_id)
    detail = run_detail(path)
    reports = {
        kind: _markdown(path, rel, run_id) for kind, rel in detail["reports"].items() if rel.endswith(".md")
    }
    return render(request, "run.html", run=detail, reports=reports)


@router.get("/api/runs/{run_id}/curves")
async def curves_api(request: Request, run_id: str) -> JSONResponse:
    path = _run(request, run_id)
    detail = run_detail(path)
    return JSONResponse(
        {
            "state": detail["state"],
            "stage": detail["stage"],
            "error": detail["error"],
            "curves": _ui(request).curves.curves(path),
        }
    )


@router.get("/runs/{run_id}/files/{rel:path}")
async def run_file(request: Request, run_id: str, rel: str) -> Response:
    root = _run(request, run_id).resolve()
    target = (root / rel).resolve()
    if (
        not target.is_relative_to(root)
        or target.suffix.lower() not in SERVED_SUFFIXES
        or not target.is_file()
    ):
        raise PageError(f"the run {run_id} has no report file {rel}", 404, "Not found")
    media = mimetypes.guess_type(target.name)[0] or "text/plain"
    if target.suffix in (".md", ".yaml", ".jsonl", ".csv", ".txt"):
        media = "text/plain; charset=utf-8"
    return FileResponse(target, media_type=media)


def _markdown(run_dir: Path, rel: str, run_id: str) -> str:
    """A report.md of the run as HTML (raw HTML in it is escaped); its relative links point into the run."""
    from markdown_it import MarkdownIt

    text = (run_dir / rel).read_text(encoding="utf-8")
    html = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    base = "/".join(["", "runs", run_id, "files", *Path(rel).parent.parts])

    def point(match: re.Match) -> str:
        attr, target = match.group(1), match.group(2)
        if re.match(r"^([a-z]+:|/|#)", target):
            return match.group(0)
        return f'{attr}="{base}/{target}"'

    return re.sub(r'(src|href)="([^"]*)"', point, html)


# -- launch and jobs -----------------------------------------------------------------------------------


def _start_values(request: Request, source: str | None) -> tuple[dict[str, Any], str]:
    """The raw config the form starts from: a config file named in the page, else the dashboard's."""
    settings = _ui(request).settings
    if not source:
        return settings.base_config, str(settings.config_path or "the defaults")
    path = Path(source).expanduser()
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PageError(f"cannot read the config file {path}: {exc.strerror}: give another path") from None
    except yaml.YAMLError as exc:
        raise PageError(f"{path} is not valid YAML ({exc}): fix it or give another file") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise PageError(f"{path} does not hold a mapping of config sections: give a seektune config file")
    return loaded or {}, str(path)


@router.get("/launch", response_class=HTMLResponse)
async def launch_page(request: Request, source: str | None = None, command: str = "train") -> HTMLResponse:
    raw, shown = _start_values(request, source)
    try:
        form = config_form(raw)
    except UserError as exc:
        raise PageError(str(exc)) from None
    return render(
        request,
        "launch.html",
        form=form,
        commands=list(COMMANDS),
        command=command,
        source=source or "",
        source_shown=shown,
        message=None,
        submitted={},
    )


@router.post("/launch", response_class=HTMLResponse)
async def launch(request: Request) -> Response:
    form_data = await request.form()
    values = {k: str(v) for k, v in form_data.items()}
    command = values.pop("_command", "train")
    source = values.pop("_source", "") or None
    raw, shown = _start_values(request, source)
    try:
        cfg, _changed = config_from_form(raw, values)
        job = _ui(request).jobs.start(command, cfg)
    except UserError as exc:
        return render(
            request,
            "launch.html",
            400,
            form=config_form(raw),
            commands=list(COMMANDS),
            command=command,
            source=source or "",
            source_shown=shown,
            message=str(exc),
            submitted=values,
        )
    return RedirectResponse(f"/jobs/{job.id}", status_code=303)


@router.get("/jobs", response_class=HTMLResponse)
async def jobs_page(request: Request) -> HTMLResponse:
    return render(request, "jobs.html", jobs=[job_view(j) for j in _ui(request).jobs.list()])


def _job(request: Request, job_id: str) -> dict[str, Any]:
    ui = _ui(request)
    try:
        view = job_view(ui.jobs.get(job_id))
    except UserError as exc:
        raise PageError(str(exc), 404, "This job is not there") from None
    run_dir = Path(view["run_dir"]) if view["run_dir"] else None
    view["run_listed"] = bool(run_dir and run_dir.parent.resolve() == ui.settings.runs_dir.resolve())
    return view


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
async def job_page(request: Request, job_id: str) -> HTMLResponse:
    job = _job(request, job_id)
    return render(request, "job.html", job=job, log=_ui(request).jobs.log_tail(job_id))


@router.get("/api/jobs/{job_id}")
async def job_api(request: Request, job_id: str) -> JSONResponse:
    job = _job(request, job_id)
    return JSONResponse({**job, "log": _ui(request).jobs.log_tail(job_id)})


@router.post("/jobs/{job_id}/stop")
async def stop_job(request: Request, job_id: str) -> Response:
    _job(request, job_id)
    _ui(request).jobs.stop(job_id)
    return RedirectResponse(f"/jobs/{job_id}", status_code=303)
