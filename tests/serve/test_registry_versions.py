"""The server resolves registered versions: MODEL_OR_RUN registry:NAME@REF, and an A/B split of two
registered versions on one base; a version whose files changed is not served."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from registry_runs import make_run
from seektune.config import RegistryConfig, SeektuneConfig
from seektune.errors import UserError
from seektune.registry.catalog import promote_version, record_evaluation, resolve_version
from seektune.registry.register import register_run
from seektune.registry.store import open_store
from seektune.serve.server import build_app
from support import TINY_RECIPE


@pytest.fixture
def registered(tmp_path: Path, base_cache: Path, serve_helpers) -> str:
    """Two LoRA adapters of the tiny base registered as qa@1.0.0 (production) and qa@1.1.0."""
    url = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    store = open_store(url)
    for seed in (1, 2):
        run = make_run(tmp_path / "runs", name="qa", compress_steps=(), seed=seed)
        shutil.rmtree(run / "model")
        serve_helpers.save_lora(base_cache, run / "model", seed=seed)
        register_run(store, RegistryConfig(), run)
    record_evaluation(store, "qa@1.0.0", {"rouge_l": 0.3}, None, None)
    promote_version(store, "qa@1.0.0", "production")
    return url


def _config(base_cache: Path, url: str, **serve) -> SeektuneConfig:
    return SeektuneConfig(
        model={"cache_dir": str(base_cache), "base": TINY_RECIPE, "device": "cpu", "dtype": "float32"},
        registry={"url": url},
        serve=serve,
    )


def test_a_registered_version_and_an_ab_split_of_versions(base_cache, registered, serve_app):
    split = {"name": "qa-live", "versions": {"registry:qa@production": 0.5, "registry:qa@1.1.0": 0.5}}
    app = build_app(_config(base_cache, registered, ab=[split]), "registry:qa@production", {})
    with serve_app(app) as running:
        served = {m["id"] for m in httpx.get(f"{running.url}/v1/models").json()["data"]}
        # the production adapter under its registered name, the other version under NAME@VERSION
        assert {"qa", "qa@1.1.0", "qa-live"} <= served
        picked = set()
        for user in range(12):
            body = {"model": "qa-live", "prompt": "The cat", "max_tokens": 2, "user": f"u{user}"}
            answer = httpx.post(f"{running.url}/v1/completions", json=body, timeout=60)
            assert answer.status_code == 200
            picked.add(answer.headers.get("x-seektune-version") or answer.json()["model"])
        assert picked == {"qa", "qa@1.1.0"}
        metrics = httpx.get(f"{running.url}/metrics").text
        assert 'version="qa@1.1.0"' in metrics


def test_a_version_whose_files_changed_is_not_served(base_cache, registered):
    folder = resolve_version(open_store(registered), "registry:qa@1.1.0").path
    (folder / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"adapter_config.json in .* changed since it was registered"):
        build_app(_config(base_cache, registered), "registry:qa@1.1.0", {})


def test_only_adapters_share_a_base_in_an_ab_split(tmp_path, base_cache, registered):
    run = make_run(tmp_path / "more", name="qa", seed=7)  # its compression steps are full models
    register_run(open_store(registered), RegistryConfig(), run)
    split = {"name": "qa-live", "versions": {"registry:qa@1.0.0": 0.5, "registry:qa@1.2.0+merged": 0.5}}
    with pytest.raises(UserError, match=r"a merged model, but only LoRA adapters share one base"):
        build_app(_config(base_cache, registered, ab=[split]), "registry:qa@production", {})
