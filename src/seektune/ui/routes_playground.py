"""The playground: chat with what the seektune server serves, two models side by side, feedback."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from seektune.ui.app import render
from seektune.ui.playground import ServerProblem

router = APIRouter()


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(pattern="^(system|user|assistant)$")
    content: str


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.7, ge=0, le=2)
    user: str | None = None


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    response_id: str = Field(min_length=1)
    rating: int | None = Field(None, ge=-1, le=1)
    correction: str | None = None
    comment: str | None = None


def _error(exc: ServerProblem) -> JSONResponse:
    return JSONResponse({"error": {"message": str(exc)}}, status_code=exc.status)


@router.get("/playground", response_class=HTMLResponse)
async def playground_page(request: Request) -> HTMLResponse:
    ui = request.app.state.ui
    try:
        models, problem = await ui.server.models(ui.session_key(request)), None
    except ServerProblem as exc:
        models, problem = [], str(exc)
    return render(request, "playground.html", models=models, problem=problem, server_url=ui.server.url)


@router.post("/api/chat")
async def chat(request: Request, body: ChatBody) -> Response:
    """The server's SSE stream of the answer, relayed as it comes."""
    ui = request.app.state.ui
    payload: dict[str, Any] = body.model_dump(exclude_none=True)
    payload["messages"] = [m.model_dump() for m in body.messages]
    try:
        stream = await ui.server.chat_stream(payload, ui.session_key(request))
    except ServerProblem as exc:
        return _error(exc)
    return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.post("/api/feedback")
async def feedback(request: Request, body: FeedbackBody) -> JSONResponse:
    ui = request.app.state.ui
    if body.rating is None and not (body.correction or "").strip() and not (body.comment or "").strip():
        return JSONResponse(
            {"error": {"message": "give a thumbs up or down, or type a corrected answer"}}, status_code=400
        )
    payload = body.model_dump(exclude_none=True)
    if "correction" in payload and not payload["correction"].strip():
        payload.pop("correction")
    try:
        recorded = await ui.server.feedback(payload, ui.session_key(request))
    except ServerProblem as exc:
        return _error(exc)
    return JSONResponse(recorded, status_code=201)
