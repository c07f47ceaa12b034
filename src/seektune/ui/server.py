"""`seektune ui`: the dashboard's settings from the config, the bind rule, and uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from seektune.config import SeektuneConfig
from seektune.errors import UserError
from seektune.serve.server import is_loopback
from seektune.ui.app import UiSettings
from seektune.ui.jobs import default_jobs_dir

logger = logging.getLogger(__name__)


def ui_settings(
    cfg: SeektuneConfig, raw: dict[str, Any] | None = None, config_path: Path | None = None
) -> UiSettings:
    """The dashboard's settings: `cfg`'s ui: section over its serve: and registry: sections. `raw` (the
    config file's contents) is where the launch form starts."""
    ui = cfg.ui
    if not is_loopback(ui.host) and not cfg.serve.api_keys:
        raise UserError(
            f"ui.host {ui.host!r} is reachable from other machines, and no serve.api_keys are set, so "
            "anyone could start jobs and promote versions: set serve.api_keys (the dashboard asks for one "
            "of them), or bind to 127.0.0.1"
        )
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::", "") else cfg.serve.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    keys = list(cfg.serve.api_keys)
    return UiSettings(
        runs_dir=(ui.runs_dir or cfg.output_dir).resolve(),
        jobs_dir=(ui.jobs_dir or default_jobs_dir()).resolve(),
        server_url=ui.server_url or f"http://{host}:{cfg.serve.port}",
        server_api_key=ui.server_api_key or (keys[0] if keys and is_loopback(ui.host) else None),
        login_keys=[] if is_loopback(ui.host) else keys,
        base_config=raw or {},
        config_path=config_path,
        registry_url=cfg.registry.url,
        registry_artefact_dir=cfg.registry.artefact_dir,
        max_jobs=ui.max_jobs,
    )


def run_ui(cfg: SeektuneConfig, settings: UiSettings) -> None:
    """Serve the dashboard on ui.host:ui.port until Ctrl-C."""
    import uvicorn

    from seektune.ui.app import create_ui_app

    app = create_ui_app(settings)
    shown_host = f"[{cfg.ui.host}]" if ":" in cfg.ui.host else cfg.ui.host
    logger.info(
        "dashboard on http://%s:%d (runs in %s, playground through %s)",
        shown_host,
        cfg.ui.port,
        settings.runs_dir,
        settings.server_url,
    )
    config = uvicorn.Config(
        app, host=cfg.ui.host, port=cfg.ui.port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind, after logging why
        raise UserError(
            f"the dashboard could not listen on {cfg.ui.host}:{cfg.ui.port} (see the log above): pass "
            "another --port, or stop what uses it"
        ) from None
