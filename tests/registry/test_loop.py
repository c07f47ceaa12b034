"""The registry inside the pipeline, on the reduced offline base: a run registers its adapter and the
models compression derived from it; a later evaluation of a registered version is recorded on it."""

from __future__ import annotations

import json

import pytest

from seektune.config import validate_config
from seektune.errors import UserError
from seektune.pipeline import run_eval_stage, run_pipeline, run_train_stage
from seektune.registry.catalog import lineage, promote_version, show_version
from seektune.registry.store import open_store
from support import tiny_run_config


def test_run_registers_base_adapter_merged_quantised_and_eval_records_on_versions(tmp_path, base_cache):
    url = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    registry = {"enabled": True, "url": url, "model_name": "qa", "tags": ["first"]}
    raw = tiny_run_config(
        tmp_path,
        base_cache,
        compress={"enabled": True, "quantize": {"method": "int8_dynamic"}},
        registry=registry,
    )
    run = run_pipeline(validate_config(raw))
    metrics = json.loads(run.metrics_path.read_text())
    assert [v["ref"] for v in metrics["registry"]["versions"]] == [
        "qa@1.0.0",
        "qa@1.0.0+merged",
        "qa@1.0.0+int8-dynamic",
    ]
    assert "## Registry" in run.report_path.read_text()
    store = open_store(url)
    tree = lineage(store, "qa@1.0.0+int8-dynamic")["trees"][0]
    assert tree["base"]["model"] == "tiny-deepseek-v3"
    assert [v["kind"] for v in tree["ancestors"]] == ["adapter", "merged"]
    assert tree["version"]["kind"] == "quantised"
    tuned = metrics["eval"]["tuned"]
    assert show_version(store, "qa@first")["metrics"]["perplexity"] == tuned["perplexity"]

    # the same version again is refused before anything runs
    with pytest.raises(UserError, match=r"qa@1\.0\.0 is already registered"):
        run_pipeline(validate_config({**raw, "registry": {**registry, "version": "1.0.0", "tags": []}}))

    # a second training that starts from the registered adapter's base: the next minor version
    train = tiny_run_config(tmp_path, base_cache, registry={**registry, "tags": []})
    run_train_stage(validate_config(train))
    with pytest.raises(UserError, match=r"has no evaluation"):
        promote_version(store, "qa@1.1.0", "staging")
    evaluated = run_eval_stage(
        validate_config(tiny_run_config(tmp_path, base_cache, model={"name_or_path": "registry:qa@1.1.0"},
                                        registry={"url": url}))
    )  # fmt: skip
    shown = show_version(store, "qa@1.1.0")
    assert [e["source"] for e in shown["evaluations"]] == ["eval"]
    assert shown["evaluations"][0]["run_dir"] == str(evaluated.path)
    assert json.loads(evaluated.metrics_path.read_text())["registry"]["inputs"] == {
        "model.name_or_path": "qa@1.1.0"
    }
    assert promote_version(store, "qa@1.1.0", "staging")["stage"] == "staging"
