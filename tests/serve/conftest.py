"""Fixtures of the serving tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import load_tiny_base, running_server, save_lora

# =========================================================================================================
# HTTP app fixtures (helper "app"): the tiny DeepSeek-V3 base served by a real uvicorn in a thread.
# =========================================================================================================

API_KEY = "test-key"
ADMIN_KEY = "admin-key"
BASE_NAME = "tiny"
ADAPTER_NAME = "candidate"
AB_NAME = "tiny-ab"


@pytest.fixture(scope="session")
def serve_helpers() -> Any:
    """The helpers above for tests that build their own app: load(base_cache), save_lora(...)."""
    from types import SimpleNamespace

    return SimpleNamespace(load=load_tiny_base, save_lora=save_lora)


@pytest.fixture(scope="session")
def serve_app():
    """`running_server` for tests that start their own app."""
    return running_server


@dataclass
class LiveServer:
    url: str  # http://127.0.0.1:PORT
    app: Any
    engine: Any
    tokenizer: Any
    adapter_dir: Path
    outside_adapter: Path  # a valid adapter outside adapter_dir
    api_key: str = API_KEY
    admin_key: str = ADMIN_KEY
    base_name: str = BASE_NAME
    adapter_name: str = ADAPTER_NAME
    ab_name: str = AB_NAME

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def state(self) -> Any:
        return self.app.state.server

    def client(self, **kwargs: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.base_url, api_key=API_KEY, max_retries=0, **kwargs)


@pytest.fixture(scope="session")
def live_server(base_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The tiny base as `tiny`, a LoRA adapter `candidate` beside it, an A/B split `tiny-ab` (90/10) of the
    two; keys on (API and admin), small limits, adapters loadable from a temporary adapter_dir."""
    from seektune.config import ServeConfig
    from seektune.serve.adapters import AdapterSet
    from seektune.serve.app import ServedModels, create_app
    from seektune.serve.engine import Engine

    root = tmp_path_factory.mktemp("serve-adapters")
    adapter_dir = root / "allowed"
    adapter_dir.mkdir()
    candidate = save_lora(base_cache, adapter_dir / ADAPTER_NAME, seed=1)
    outside = save_lora(base_cache, root / "outside", seed=2)
    cfg = ServeConfig(
        api_keys=[API_KEY],
        admin_keys=[ADMIN_KEY],
        adapter_dir=adapter_dir,
        ab=[{"name": AB_NAME, "versions": {BASE_NAME: 0.9, ADAPTER_NAME: 0.1}}],
        limits={
            "max_prompt_tokens": 200,
            "max_tokens": 256,
            "default_max_tokens": 32,
            "max_n": 4,
            "max_queue": 64,
            "max_body_bytes": 20_000,
        },
    )
    loaded = load_tiny_base(base_cache)
    engine = Engine(loaded.model, loaded.tokenizer, cfg.limits, version=BASE_NAME)
    adapters = AdapterSet(engine, BASE_NAME, cfg.adapter_dir)
    adapters.load(ADAPTER_NAME, candidate)
    app = create_app(engine, loaded.tokenizer, cfg, ServedModels(BASE_NAME, adapters), seed=0)
    with running_server(app) as running:
        yield LiveServer(running.url, app, engine, loaded.tokenizer, adapter_dir, outside)


@pytest.fixture(scope="session")
def plain_base(base_cache: Path) -> Any:
    """Another copy of the tiny base, never served (for references computed with `generate`)."""
    loaded = load_tiny_base(base_cache)
    loaded.model.eval()
    return loaded


# =========================================================================================================
# end of the HTTP app fixtures
# =========================================================================================================
