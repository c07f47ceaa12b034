"""Registering runs: versions, lineage, refused input without half-written rows, concurrent processes."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from registry_runs import make_run
from seektune.config import RegistryConfig
from seektune.errors import UserError
from seektune.registry.catalog import lineage, list_versions, resolve_version, show_version
from seektune.registry.register import register_run
from seektune.registry.store import open_store


def test_a_run_registers_its_adapter_and_each_compressed_model_as_a_chain(tmp_path, store):
    run = make_run(tmp_path)
    views = register_run(store, RegistryConfig(tags=["v1.0-legal-202403"]), run)
    assert [(v["ref"], v["kind"], v["parent"]) for v in views] == [
        ("legal@1.0.0", "adapter", None),
        ("legal@1.0.0+merged", "merged", "legal@1.0.0"),
        ("legal@1.0.0+int8-dynamic", "quantised", "legal@1.0.0+merged"),
    ]
    shown = show_version(store, "legal@v1.0-legal-202403")
    assert shown["ref"] == "legal@1.0.0" and shown["method"] == "lora"
    assert shown["base_model"] == "tiny-deepseek-v3" and shown["base_fingerprint"] == "sha256:abc"
    assert shown["data_fingerprint"] == "data-0" and shown["data_report"]["train_rows"] == 64
    assert shown["metrics"]["perplexity"] == 20.0 and shown["environment"]["torch"] == "2.13.0"
    assert "lora:\n    r: 8" in shown["config_yaml"] and shown["run_dir"] == str(run.resolve())
    artefact = Path(shown["artefact"]["path"])
    assert artefact.is_relative_to(store.artefacts) and (artefact / "adapter_model.safetensors").is_file()
    assert shown["artefact"]["files"] == 3
    tree = lineage(store, "legal@1.0.0+int8-dynamic")["trees"][0]
    assert tree["base"]["model"] == "tiny-deepseek-v3"
    assert [a["ref"] for a in tree["ancestors"]] == ["legal@1.0.0", "legal@1.0.0+merged"]
    # the registry keeps its own copy: the run directory can go
    import shutil

    shutil.rmtree(run)
    assert resolve_version(store, "registry:legal@1.0.0+merged").path.is_dir()


def test_next_runs_get_the_next_minor_version_or_the_one_asked_for(tmp_path, store):
    register_run(store, RegistryConfig(), make_run(tmp_path, seed=0, compress_steps=()))
    register_run(store, RegistryConfig(), make_run(tmp_path, seed=1, compress_steps=()))
    register_run(store, RegistryConfig(version="2.0.0"), make_run(tmp_path, seed=2, compress_steps=()))
    register_run(store, RegistryConfig(bump="patch"), make_run(tmp_path, seed=3, compress_steps=()))
    assert [v["version"] for v in list_versions(store, "legal")] == ["1.0.0", "1.1.0", "2.0.0", "2.0.1"]


def _row_count(store) -> tuple[int, int]:
    path = store.url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        return (
            db.execute("SELECT count(*) FROM model_versions").fetchone()[0],
            db.execute("SELECT count(*) FROM evaluations").fetchone()[0],
        )


def _artefact_folders(store) -> list[Path]:
    return sorted(p for p in store.artefacts.rglob("*") if p.is_dir() and p.parent.name != ".incoming")


def test_a_version_that_exists_is_refused_and_nothing_is_half_written(tmp_path, store):
    register_run(store, RegistryConfig(version="1.2.0"), make_run(tmp_path, seed=0))
    before, folders = _row_count(store), _artefact_folders(store)
    with pytest.raises(UserError, match=r"legal@1\.2\.0 is already registered .*the next is 1\.3\.0"):
        register_run(store, RegistryConfig(version="1.2.0"), make_run(tmp_path, seed=1))
    assert _row_count(store) == before
    assert _artefact_folders(store) == folders
    assert not any((store.artefacts / ".incoming").iterdir())


def test_a_failure_half_way_rolls_back_every_version_of_the_run(tmp_path, store, monkeypatch):
    from seektune.registry import artefacts

    real = artefacts.place_artefact
    calls = []

    def fail_on_the_third(incoming, target):
        calls.append(target)
        if len(calls) == 3:
            raise OSError("disk full")
        real(incoming, target)

    monkeypatch.setattr(artefacts, "place_artefact", fail_on_the_third)
    with pytest.raises(OSError, match=r"disk full"):
        register_run(store, RegistryConfig(), make_run(tmp_path))
    assert _row_count(store) == (0, 0)
    assert _artefact_folders(store) == [] or all(not any(p.iterdir()) for p in _artefact_folders(store))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"state": "failed"}, "did not complete"),
        ({"no_status": True}, "not a seektune run directory"),
    ],
)
def test_runs_that_cannot_be_registered(tmp_path, store, change, expected):
    run = make_run(tmp_path)
    if change.get("no_status"):
        (run / "status.json").unlink()
    else:
        (run / "status.json").write_text('{"state": "failed"}')
    with pytest.raises(UserError, match=expected):
        register_run(store, RegistryConfig(), run)


def test_a_missing_step_folder_is_one_message(tmp_path, store):
    run = make_run(tmp_path)
    import shutil

    shutil.rmtree(run / "compress" / "01-merge")
    with pytest.raises(UserError, match=r"01-merge, a model of run .* is missing"):
        register_run(store, RegistryConfig(), run)
    assert _row_count(store) == (0, 0)


@pytest.mark.parametrize(
    ("registry", "expected"),
    [
        ({"version": "1.2"}, "is not a semantic version"),
        ({"version": "1.2.0+merged"}, "build metadata"),
        ({"model_name": "no spaces"}, "is not a registered model name"),
        ({"tags": ["production"]}, "is a stage name"),
        ({"tags": ["1.0.0"]}, "reads as a version"),
    ],
)
def test_bad_registry_settings_are_refused(tmp_path, store, registry, expected):
    with pytest.raises(UserError, match=expected):
        register_run(store, RegistryConfig(**registry), make_run(tmp_path))
    assert _row_count(store) == (0, 0)


def test_a_compression_run_of_a_registered_model_builds_on_that_version(tmp_path, store):
    trained = make_run(tmp_path, compress_steps=())
    register_run(store, RegistryConfig(), trained)
    # a later `seektune compress` run whose source is that run's model (found by its checksum)
    chain = make_run(tmp_path, name="compress", seed=5)
    import json
    import shutil

    shutil.rmtree(chain / "model")
    results = json.loads((chain / "compress" / "results.json").read_text())
    results["source"] = str(trained / "model")
    (chain / "compress" / "results.json").write_text(json.dumps(results))
    views = register_run(store, RegistryConfig(), chain)
    assert [(v["ref"], v["parent"]) for v in views] == [
        ("legal@1.0.0+merged", "legal@1.0.0"),
        ("legal@1.0.0+int8-dynamic", "legal@1.0.0+merged"),
    ]
    again = register_run(store, RegistryConfig(), chain)  # a second chain of the same release
    assert [v["version"] for v in again] == ["1.0.0+merged.2", "1.0.0+int8-dynamic.2"]


# ---------------------------------------------------------------------------------------------------------
# Several processes at once


def _register_in_process(url: str, run: str, version: str | None, queue) -> None:
    try:
        store = open_store(url)
        views = register_run(store, RegistryConfig(version=version), Path(run))
        queue.put(("ok", views[0]["version"]))
    except UserError as exc:
        queue.put(("error", str(exc)))
    except BaseException as exc:  # anything else is a failure of the test
        queue.put(("crash", repr(exc)))


def _race(url: str, runs: list[Path], version: str | None) -> list[tuple[str, str]]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=_register_in_process, args=(url, str(run), version, queue)) for run in runs
    ]
    for process in processes:
        process.start()
    results = [queue.get(timeout=240) for _ in processes]
    for process in processes:
        process.join(timeout=60)
    return results


def test_processes_registering_at_once_each_get_their_own_version(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared' / 'registry.db'}"  # none of them finds it migrated
    runs = [make_run(tmp_path, seed=i) for i in range(4)]
    results = _race(url, runs, None)
    assert sorted(results) == [("ok", f"1.{i}.0") for i in range(4)]
    store = open_store(url)
    versions = list_versions(store, "legal")
    assert len(versions) == 12  # every run's three versions, none lost or doubled
    for view in versions:
        resolve_version(store, f"registry:{view['ref']}")  # and each one's files are whole


def test_processes_asking_for_the_same_version_one_wins_the_others_are_told(tmp_path):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    results = _race(url, [make_run(tmp_path, seed=i, compress_steps=()) for i in range(3)], "3.0.0")
    outcomes = sorted(kind for kind, _ in results)
    assert outcomes == ["error", "error", "ok"], results
    assert all("already registered" in text for kind, text in results if kind == "error")
    assert len(list_versions(open_store(url), "legal")) == 1
