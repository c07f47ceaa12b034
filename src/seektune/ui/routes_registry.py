"""Registry pages: every version, one name's lineage graph, one version, compare, promote (confirmed)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from seektune.errors import UserError
from seektune.registry.models import STAGES
from seektune.ui.app import PageError, render
from seektune.ui.lineage import BOX_H, BOX_W, layout_lineage

router = APIRouter()


def _store(request: Request) -> Any:
    return request.app.state.ui.registry()


async def _call(fn: Any, *args: Any) -> Any:
    """A registry call off the event loop; its UserError ("no version ...") becomes the page's message."""
    try:
        return await asyncio.to_thread(fn, *args)
    except UserError as exc:
        missing = re.search(r"^no model named|has no version", str(exc))
        raise PageError(str(exc), 404 if missing else 400) from None


@router.get("/registry", response_class=HTMLResponse)
async def registry_page(request: Request) -> HTMLResponse:
    from seektune.registry.catalog import list_versions

    store = await _call(_store, request)
    rows = await _call(list_versions, store)
    return render(
        request, "registry.html", versions=rows, names=sorted({r["name"] for r in rows}), url=store.shown_url
    )


@router.get("/registry/lineage/{name}", response_class=HTMLResponse)
async def lineage_page(request: Request, name: str) -> HTMLResponse:
    from seektune.registry.catalog import lineage, list_versions

    store = await _call(_store, request)
    found = await _call(lineage, store, name)
    rows = await _call(list_versions, store, name)
    graph = layout_lineage(found)
    return render(request, "lineage.html", name=name, graph=graph, box_w=BOX_W, box_h=BOX_H, versions=rows)


@router.get("/registry/version", response_class=HTMLResponse)
async def version_page(request: Request, ref: str) -> HTMLResponse:
    from seektune.registry.catalog import lineage, show_version

    store = await _call(_store, request)
    view = await _call(show_version, store, ref)
    graph = layout_lineage(await _call(lineage, store, view["ref"]))
    return render(request, "version.html", v=view, stages=STAGES, graph=graph, box_w=BOX_W, box_h=BOX_H)


@router.get("/registry/compare", response_class=HTMLResponse)
async def compare_page(request: Request, a: str = "", b: str = "") -> HTMLResponse:
    from seektune.registry.catalog import compare_versions

    if not a or not b:
        raise PageError("pick two versions to compare (A and B) in the registry list", 400)
    store = await _call(_store, request)
    comparison = await _call(compare_versions, store, a, b)
    return render(request, "compare.html", c=comparison)


@router.get("/registry/promote", response_class=HTMLResponse)
async def promote_confirm(request: Request, ref: str, stage: str, reason: str = "") -> HTMLResponse:
    """What the promotion will do, and a button that does it."""
    from seektune.registry.catalog import list_versions, show_version

    if stage not in STAGES:
        raise PageError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    store = await _call(_store, request)
    view = await _call(show_version, store, ref)
    replaced = None
    if stage == "production":
        current = await _call(list_versions, store, view["name"], "production")
        replaced = next((r["ref"] for r in current if r["ref"] != view["ref"]), None)
    return render(
        request, "promote.html", v=view, stage=stage, replaced=replaced, reason=reason, message=None
    )


@router.post("/registry/promote", response_class=HTMLResponse)
async def promote(request: Request) -> Response:
    from seektune.registry.catalog import promote_version, show_version

    form = await request.form()
    ref, stage = str(form.get("ref") or ""), str(form.get("stage") or "")
    reason = str(form.get("reason") or "").strip() or None
    if form.get("confirm") != "yes":
        raise PageError("the promotion was not confirmed: use the Promote button of the confirmation page")
    store = await _call(_store, request)
    try:
        result = await asyncio.to_thread(promote_version, store, ref, stage, reason)
    except UserError as exc:
        view = await _call(show_version, store, ref)
        return render(
            request,
            "promote.html",
            400,
            v=view,
            stage=stage,
            replaced=None,
            reason=reason or "",
            message=str(exc),
        )
    return RedirectResponse(f"/registry/version?ref={result['ref']}&promoted={stage}", status_code=303)
