"""`seektune serve`: load the model, build engine and app, run uvicorn until SIGTERM/SIGINT.

uvicorn runs the app; what is ours is the order of a graceful shutdown: on the signal, /ready turns 503 and
the engine takes no new requests (so a load balancer stops sending), uvicorn stops accepting connections
and waits up to serve.shutdown_timeout_s for the running requests to finish, then the app's lifespan stops
the engine (aborting only what is still running after that time). And a safety rule: without API keys the
server binds to a loopback address only.

Model loading sits in `build_app`, which `run_server` calls; tests build the app on an in-memory model with
`seektune.serve.app.create_app` instead.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from seektune.config import SeektuneConfig, ServeConfig
from seektune.errors import UserError
from seektune.serve.adapters import AdapterSet, resolve_served_model
from seektune.serve.app import ServedModels, create_app
from seektune.serve.engine import Engine
from seektune.serve.routing import validate_routes

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(serve: ServeConfig) -> None:
    """Refuse to bind beyond loopback without API keys (UserError)."""
    if not serve.api_keys and not is_loopback(serve.host):
        raise UserError(
            f"serve.host {serve.host!r} is reachable from other machines, and no serve.api_keys are set: "
            "set serve.api_keys (clients send them as 'Authorization: Bearer KEY'), or bind to 127.0.0.1"
        )


def build_app(cfg: SeektuneConfig, model_or_run: str, adapters: dict[str, str]) -> FastAPI:
    """Load the model MODEL_OR_RUN names (a run serves its compressed model, else its trained one), its
    adapters (serve.adapters, then `adapters`), and build the engine and the app on them."""
    from seektune.models.load import load_model  # lazy: torch and transformers
    from seektune.serve.versions import resolve_served_versions

    registered = resolve_served_versions(cfg, model_or_run, adapters)
    cfg, model_or_run, adapters = registered.cfg, registered.model_or_run, registered.adapters
    serve = cfg.serve
    source = resolve_served_model(model_or_run)
    for note in [*registered.notes, *source.notes]:
        logger.info("%s", note)
    base_name = serve.served_model_name or source.base.rstrip("/").split("/")[-1]
    if registered.served_name is not None:  # a registered version is served under its registered name
        if source.adapter is not None:
            source.name = registered.served_name
        elif not serve.served_model_name:
            base_name = registered.served_name
    wanted = {**serve.adapters, **adapters}
    if source.adapter is not None:  # MODEL_OR_RUN is an adapter: served beside its base, under its name
        if source.name in wanted or source.name == base_name:
            raise UserError(
                f"the adapter {model_or_run} would be served as {source.name!r}, a name already taken: "
                "set serve.served_model_name or rename the --adapter"
            )
        wanted = {source.name: source.adapter, **wanted}
    validate_routes(base_name, list(wanted), serve.ab)  # before the (slow) load

    loaded = load_model(cfg.model.model_copy(update={"name_or_path": source.base}))
    _set_cpu_threads(loaded.model, serve.cpu_threads)
    engine = Engine(loaded.model, loaded.tokenizer, serve.limits, version=base_name)
    adapter_set = AdapterSet(engine, base_name, serve.adapter_dir)
    for name, path in wanted.items():
        adapter_set.load(name, Path(path))
    logger.info("serving %s%s", base_name, f" with adapters {', '.join(adapter_set.names)}" if wanted else "")
    return create_app(engine, loaded.tokenizer, serve, ServedModels(base_name, adapter_set), seed=cfg.seed)


def _set_cpu_threads(model: Any, wanted: int | None) -> None:
    """serve.cpu_threads: torch's intra-op threads when the model is on the CPU (None: torch's default)."""
    import torch

    if wanted is None or next(model.parameters()).device.type != "cpu":
        return
    torch.set_num_threads(wanted)
    logger.info("computing with %d CPU thread%s", wanted, "s" if wanted > 1 else "")


class DrainingServer(uvicorn.Server):
    """uvicorn's server that marks the app as draining the moment shutdown starts."""

    async def shutdown(self, sockets: Any = None) -> None:
        app = self.config.app
        state = getattr(getattr(app, "state", None), "server", None)
        if state is not None:
            state.draining = True
            state.engine.drain()
        await super().shutdown(sockets=sockets)


def make_server(app: FastAPI, host: str, port: int, shutdown_timeout_s: float) -> DrainingServer:
    """The uvicorn server for `app` (its own logging is left to seektune's)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_graceful_shutdown=shutdown_timeout_s,  # type: ignore[arg-type]  # uvicorn: int | None
        log_config=None,
        access_log=False,
        lifespan="on",
    )
    return DrainingServer(config)


def run_server(cfg: SeektuneConfig, model_or_run: str, adapters: dict[str, str]) -> None:
    """Serve MODEL_OR_RUN on serve.host:serve.port until SIGTERM/SIGINT (then a graceful shutdown).

    The engine computes on the main thread and uvicorn runs on a second one (Engine.run says why); the
    signals reach the main thread, which hands them to uvicorn's own handler (a second Ctrl-C forces the
    exit, as with uvicorn alone)."""
    check_bind(cfg.serve)
    app = build_app(cfg, model_or_run, adapters)
    engine: Engine = app.state.server.engine
    server = make_server(app, cfg.serve.host, cfg.serve.port, cfg.serve.shutdown_timeout_s)
    failure: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as exc:  # uvicorn exits with SystemExit when it cannot bind
            failure.append(exc)
        finally:
            engine.stop(timeout_s=0)  # a server that never started, or ended: the engine ends with it

    engine.claim_current_thread()
    previous = {sig: signal.signal(sig, server.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=serve, name="uvicorn")
    try:
        thread.start()
        logger.info("listening on http://%s:%d/v1", cfg.serve.host, cfg.serve.port)
        engine.run()
        thread.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure and not isinstance(failure[0], SystemExit):
        raise failure[0]
    if failure:
        raise UserError(
            f"the server could not listen on {cfg.serve.host}:{cfg.serve.port} (see the log above): choose "
            "another --port, or stop what uses it"
        )
