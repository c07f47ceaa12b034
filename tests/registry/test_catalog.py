"""Stages, tags, comparison, the checksum check, export and garbage collection."""

from __future__ import annotations

import sqlite3

import pytest

from registry_runs import make_run
from seektune.config import RegistryConfig
from seektune.errors import UserError
from seektune.registry.catalog import (
    collect_garbage,
    compare_versions,
    export_version,
    find_version,
    gc_plan,
    promote_version,
    record_evaluation,
    resolve_version,
    show_version,
    tag_version,
)
from seektune.registry.register import register_run


@pytest.fixture
def two_releases(tmp_path, store):
    register_run(store, RegistryConfig(), make_run(tmp_path, seed=0))
    register_run(store, RegistryConfig(), make_run(tmp_path, seed=1))
    return store


def test_one_production_version_per_name_and_the_history_is_kept(two_releases):
    store = two_releases
    assert promote_version(store, "legal@1.0.0", "production", reason="first release")["archived"] is None
    result = promote_version(store, "legal@1.1.0", "production")
    assert result["archived"] == "legal@1.0.0"
    assert resolve_version(store, "registry:legal@production").version == "1.1.0"
    history = show_version(store, "legal@1.0.0")["stage_history"]
    assert [(h["from"], h["to"]) for h in history] == [("none", "production"), ("production", "archived")]
    assert (
        history[0]["reason"] == "first release" and "replaced in production by 1.1.0" in history[1]["reason"]
    )
    assert promote_version(store, "legal@1.1.0", "production")["changed"] is False
    database = store.url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db, pytest.raises(sqlite3.IntegrityError):  # the database keeps it too
        db.execute("UPDATE model_versions SET stage = 'production'")


def test_promoting_a_version_without_evaluation_is_refused_until_it_is_evaluated(tmp_path, store):
    register_run(store, RegistryConfig(), make_run(tmp_path, evaluated=False, compress_steps=()))
    with pytest.raises(UserError, match=r"has no evaluation.*seektune eval --model registry:legal@1.0.0"):
        promote_version(store, "legal@1.0.0", "staging")
    promote_version(store, "legal@1.0.0", "archived")  # moving down needs none
    record_evaluation(store, "legal@1.0.0", {"n": 8, "rouge_l": 0.4}, "data-0", "/runs/eval-1")
    assert promote_version(store, "legal@1.0.0", "staging")["stage"] == "staging"


def test_size_and_speed_alone_are_no_evaluation(tmp_path, store):
    run = make_run(tmp_path, evaluated=False)
    import json

    results = json.loads((run / "compress" / "results.json").read_text())
    for row in results["table"]:
        row.pop("perplexity")
    (run / "compress" / "results.json").write_text(json.dumps(results))
    register_run(store, RegistryConfig(), run)
    with pytest.raises(UserError, match=r"has no evaluation"):
        promote_version(store, "legal@1.0.0+merged", "production")


def test_references_by_stage_tag_version_and_latest(two_releases):
    store = two_releases
    tag_version(store, "legal@1.0.0", ["v1.0-legal-202403"])
    with store.read() as session:
        assert find_version(session, "legal@v1.0-legal-202403").version == "1.0.0"
        assert find_version(session, "legal@v1.1.0").version == "1.1.0"
        assert find_version(session, "legal@latest").version == "1.1.0+int8-dynamic"
        with pytest.raises(UserError, match=r"has no version in staging: promote one"):
            find_version(session, "legal@staging")
        with pytest.raises(UserError, match=r"has no version or tag '9.9.9'"):
            find_version(session, "legal@9.9.9")
        with pytest.raises(UserError, match=r"no model named 'other'.*registered: legal"):
            find_version(session, "other@1.0.0")
    with pytest.raises(UserError, match=r"names no version"):
        resolve_version(store, "registry:legal")


def test_a_tag_names_one_version_and_moves_only_when_asked(two_releases):
    store = two_releases
    tag_version(store, "legal@1.0.0", ["reviewed"])
    with pytest.raises(UserError, match=r"tag 'reviewed' is on legal@1.0.0.*--move"):
        tag_version(store, "legal@1.1.0", ["reviewed"])
    assert tag_version(store, "legal@1.1.0", ["reviewed"], move=True)["tags"] == ["reviewed"]
    assert show_version(store, "legal@1.0.0")["tags"] == []
    assert tag_version(store, "legal@1.1.0", ["reviewed"], remove=True)["tags"] == []
    with pytest.raises(UserError, match=r"has no tag 'reviewed'"):
        tag_version(store, "legal@1.1.0", ["reviewed"], remove=True)
    with pytest.raises(UserError, match=r"reads as a version"):
        tag_version(store, "legal@1.1.0", ["v2.0.0"])


def test_compare_puts_metrics_side_by_side_and_diffs_the_configs(two_releases):
    comparison = compare_versions(two_releases, "legal@1.0.0", "legal@1.1.0")
    rows = {row["metric"]: row for row in comparison["metrics"]}
    assert rows["perplexity"]["a"] == 20.0 and rows["perplexity"]["b"] == 19.0
    assert rows["perplexity"]["diff"] == pytest.approx(-1.0)
    assert "-    r: 8" in comparison["config_diff"] and "+    r: 9" in comparison["config_diff"]
    assert comparison["same_test_data"] is False  # seeds 0 and 1 wrote different data fingerprints
    assert comparison["facts"]["kind"] == {"a": "adapter", "b": "adapter"}


def test_a_changed_missing_or_extra_file_stops_loading_with_its_name(two_releases):
    store = two_releases
    folder = resolve_version(store, "registry:legal@1.0.0").path
    weights = folder / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + b"\x00")
    with pytest.raises(UserError, match=r"adapter_model.safetensors in .* changed since it was registered"):
        resolve_version(store, "registry:legal@1.0.0")
    weights.write_bytes(original)
    (folder / "extra.bin").write_bytes(b"x")
    with pytest.raises(UserError, match=r"files that were not registered: extra.bin"):
        resolve_version(store, "registry:legal@1.0.0")
    (folder / "extra.bin").unlink()
    weights.unlink()
    with pytest.raises(UserError, match=r"adapter_model.safetensors is missing"):
        resolve_version(store, "registry:legal@1.0.0")
    import shutil

    shutil.rmtree(folder)
    with pytest.raises(UserError, match=r"its artefact .* is missing"):
        resolve_version(store, "registry:legal@1.0.0")


def test_export_copies_the_verified_files_and_a_card(tmp_path, two_releases):
    resolved, target = export_version(two_releases, "legal@1.0.0+merged", tmp_path / "out")
    assert (target / "model.safetensors").read_bytes() == (resolved.path / "model.safetensors").read_bytes()
    import json

    card = json.loads((target / "registry.json").read_text())
    assert card["ref"] == "legal@1.0.0+merged" and card["parent"] == "legal@1.0.0"
    with pytest.raises(UserError, match=r"is not an empty folder"):
        export_version(two_releases, "legal@1.0.0", target)


def test_gc_removes_archived_artefacts_and_orphans_but_keeps_the_records(two_releases):
    store = two_releases
    promote_version(store, "legal@1.0.0", "archived")
    orphan = store.artefacts / "legal" / "9.9.9"  # a folder no version owns
    orphan.mkdir(parents=True)
    (orphan / "x").write_bytes(b"x" * 10)
    plan = gc_plan(store)
    assert [v["ref"] for v in plan["versions"]] == ["legal@1.0.0"]
    assert [o["path"] for o in plan["orphans"]] == [str(orphan)]
    kept = resolve_version(store, "registry:legal@1.1.0").path
    done = collect_garbage(store)
    assert done["versions"] == ["legal@1.0.0"] and not orphan.exists()
    assert show_version(store, "legal@1.0.0")["artefact"]["removed_at"] is not None
    with pytest.raises(UserError, match=r"removed by seektune registry gc"):
        resolve_version(store, "registry:legal@1.0.0")
    with pytest.raises(UserError, match=r"cannot be production"):
        record_evaluation(store, "legal@1.0.0", {"rouge_l": 0.5}, None, None)
        promote_version(store, "legal@1.0.0", "production")
    assert kept.is_dir() and gc_plan(store) == {"versions": [], "orphans": []}
