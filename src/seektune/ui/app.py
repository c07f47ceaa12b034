"""The dashboard's web app: pages served by FastAPI from Jinja2 templates, with a small script per page.

The pages: runs (list, one run with live curves and its reports), launch (a form built from the config
schema) and jobs, the registry (versions, lineage, compare, promotion) and the playground (chat through
the seektune server). `create_ui_app` builds the app on `UiSettings`; `seektune ui` runs it with uvicorn.

Access: on a loopback address anyone on the machine may use it (as with `seektune serve`). Bound anywhere
else, every browser first logs in with one of the server's API keys (serve.api_keys); the session is a
random token in an HTTP-only, same-site cookie. Every form post must come from the dashboard's own pages
(Origin check), so another site cannot start jobs or promote versions from a visitor's browser.

Errors users can cause (a deleted run, a wrong form value, a server that is down) are pages or JSON
messages with a 4xx/5xx status, never a traceback.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from seektune.errors import UserError
from seektune.ui.jobs import JobRunner
from seektune.ui.playground import ServerClient
from seektune.ui.runs import CurveReader

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "seektune_ui"
OPEN_PATHS = ("/login", "/static/")


@dataclass
class UiSettings:
    """What the dashboard works on (from the config's ui:, serve: and registry: sections)."""

    runs_dir: Path
    jobs_dir: Path
    server_url: str
    server_api_key: str | None = None
    login_keys: list[str] = field(default_factory=list)  # non-empty: browsers must log in with one
    base_config: dict[str, Any] = field(default_factory=dict)  # the launch form's starting values
    config_path: Path | None = None
    registry_url: str | None = None
    registry_artefact_dir: Path | None = None
    max_jobs: int = 2


class PageError(Exception):
    """A message for the page, with its HTTP status (404: something is gone, 400: bad input)."""

    def __init__(self, message: str, status: int = 400, title: str = "Something is not right") -> None:
        super().__init__(message)
        self.status = status
        self.title = title


templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals["quote"] = lambda s: quote(str(s), safe="")


def fmt(value: Any) -> str:
    """A number as a table shows it: 4 significant digits, thousands as k."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e6):
        return f"{value:.3e}"
    return f"{value:.4g}"


templates.env.filters["fmt"] = fmt


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    """The page `template` with `context`, plus what every page uses (settings, login state)."""
    ui = request.app.state.ui
    return templates.TemplateResponse(
        request,
        template,
        {"settings": ui.settings, "logged_in": ui.logged_in(request), **context},
        status_code=status,
    )


class UiState:
    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        self.curves = CurveReader()
        self.jobs = JobRunner(settings.jobs_dir, settings.max_jobs)
        self.server = ServerClient(settings.server_url, settings.server_api_key)
        self._sessions: dict[str, str] = {}  # token -> the key it logged in with
        self._registry: Any = None

    def login(self, key: str) -> str | None:
        """A new session token when `key` is one of the login keys."""
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.settings.login_keys):
            return None
        token = secrets.token_urlsafe(32)
        self._sessions[token] = key
        return token

    def session_key(self, request: Request) -> str | None:
        """The API key the browser logged in with (None when not logged in, or when no login is asked)."""
        return self._sessions.get(request.cookies.get(SESSION_COOKIE, ""))

    def logged_in(self, request: Request) -> bool:
        return not self.settings.login_keys or self.session_key(request) is not None

    def registry(self) -> Any:
        """The registry store, opened on first use (a UserError when its database cannot be used)."""
        if self._registry is None:
            from seektune.registry.store import open_store

            self._registry = open_store(self.settings.registry_url, self.settings.registry_artefact_dir)
        return self._registry


def create_ui_app(settings: UiSettings) -> FastAPI:
    """The dashboard on `settings`."""
    from seektune.ui import routes_playground, routes_registry, routes_runs

    app = FastAPI(title="seektune dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = UiState(settings)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    _guard(app)
    _errors(app)

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/runs", status_code=303)

    @app.get("/login", response_class=HTMLResponse)
    async def login_page(request: Request, next: str = "/runs") -> HTMLResponse:
        return render(request, "login.html", next=_local(next), message=None)

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = await request.form()
        target = _local(str(form.get("next") or "/runs"))
        token = app.state.ui.login(str(form.get("key") or ""))
        if token is None:
            return render(
                request,
                "login.html",
                401,
                next=target,
                message="that key is not one of this server's API keys (serve.api_keys): try again",
            )
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict")
        return response

    app.include_router(routes_runs.router)
    app.include_router(routes_registry.router)
    app.include_router(routes_playground.router)
    return app


def _local(target: str) -> str:
    """`target` when it is a path of this site, else the run list (no open redirect after login)."""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return "/runs"
    return target


def _guard(app: FastAPI) -> None:
    @app.middleware("http")
    async def access(request: Request, call_next: Any) -> Response:
        ui: UiState = request.app.state.ui
        path = request.url.path
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            origin = request.headers.get("origin")
            if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
                return JSONResponse(
                    {"error": {"message": f"a form from {origin} may not post to the dashboard"}},
                    status_code=403,
                )
        if ui.logged_in(request) or path.startswith(OPEN_PATHS):
            return await call_next(request)
        if path.startswith("/api/"):
            return JSONResponse(
                {"error": {"message": "log in first: the dashboard asks for one of serve.api_keys"}},
                status_code=401,
            )
        return RedirectResponse(f"/login?next={quote(str(request.url.path))}", status_code=303)


def _errors(app: FastAPI) -> None:
    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/")

    def answer(request: Request, status: int, title: str, message: str) -> Response:
        if wants_json(request):
            return JSONResponse({"error": {"message": message}}, status_code=status)
        return render(request, "error.html", status, title=title, message=message)

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        return answer(request, exc.status, exc.title, str(exc))

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError) -> Response:
        return answer(request, 400, "Something is not right", str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'request'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return answer(request, 400, "Something is not right", problems or "the request is not valid")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"there is no page {request.url.path}: go back to the run list"
            return answer(request, 404, "Not found", message)
        return answer(request, exc.status_code, "Something is not right", str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> Response:
        logger.exception("dashboard error on %s", request.url.path)
        return answer(
            request,
            500,
            "The dashboard hit an error",
            f"{type(exc).__name__}: {exc} (the details are in the terminal that runs `seektune ui`)",
        )
