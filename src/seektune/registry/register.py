"""Registering what a run produced: its trained model and every model its compression chain derived.

A run directory already holds everything a version records (config.yaml, environment.json, metrics.json
with the data fingerprint and the evaluation, compress/results.json with each step's folder and
before/after row); this module reads it, copies the artefacts into the registry and writes all versions
of the run in one transaction, so a failure registers none of them. The trained model is a release
(`registry.version`, or the next one of the name); each compression step a build of it, whose parent is
the step before: base → adapter → merged → quantised.

A compression run whose source is a registered version (`compress.source: registry:NAME@REF`, or a
folder with the same checksum) builds on that version; one whose source is a run's trained model that
is not registered yet registers that model first.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from seektune.config import RegistryConfig
from seektune.errors import UserError
from seektune.registry import artefacts
from seektune.registry.catalog import current_user, find_version, get_model, summary_view
from seektune.registry.models import Evaluation, ModelVersion, RegisteredModel, VersionTag
from seektune.registry.refs import (
    build_version,
    check_name,
    check_tag,
    check_version,
    next_release,
    release_of,
)
from seektune.registry.store import RegistryStore

logger = logging.getLogger(__name__)

# The kind of each compression step's model, and the build metadata it gets.
_STEP_KINDS = {
    "merge": "merged",
    "distill": "distilled",
    "prune": "pruned",
    "qat": "qat",
    "export": "gguf",
    "quantize": "quantised",
}
_ROW_SKIP = ("label", "device", "change_vs_source", "change_vs_previous")
_ATTEMPTS = 5  # an automatic version taken by a concurrent registration is retried with the next one


@dataclass
class Product:
    """One artefact of a run to register."""

    path: Path
    kind: str
    method: str | None
    build: str | None  # None: the release itself
    metrics: dict[str, Any] | None
    details: dict[str, Any] = field(default_factory=dict)
    eval_source: str = "run"


@dataclass
class RunRecord:
    """What a run directory says about its products."""

    run_dir: Path
    config_yaml: str | None
    config: dict[str, Any]
    environment: dict[str, Any] | None
    data: dict[str, Any] | None
    products: list[Product]
    compress_source: Path | None = None  # the chain's source, when no product of the run is it


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError:
        raise UserError(f"{path} is not valid JSON: is the run directory complete?") from None


def _in_run(run: Path, recorded: str) -> Path:
    """A path the run recorded (absolute, or relative to where it started), or the same name under the
    run's compress/ when the run was moved."""
    for candidate in (Path(recorded), run / "compress" / Path(recorded).name):
        if candidate.exists():
            return candidate
    raise UserError(f"{recorded}, a model of run {run}, is missing: was the run directory cleaned?")


def _model_kind(folder: Path) -> str:
    """adapter: weights applied on a base (PEFT, or seektune's bottleneck adapters and prefixes);
    full: a model of its own (full fine-tuning, frozen layers)."""
    peft = (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()
    ours = (folder / "adapters.safetensors").is_file() or (folder / "prefix.safetensors").is_file()
    return "adapter" if peft or ours else "full"


def _row_metrics(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if not row:
        return None
    return {k: v for k, v in row.items() if k not in _ROW_SKIP and isinstance(v, (int, float, type(None)))}


def _build_name(step: dict[str, Any]) -> str:
    """The semver build identifier of a step's model: merged, pruned, int8-dynamic, gguf-f16, ..."""
    name = step["step"]
    details = step.get("details") or {}
    if name == "quantize" and details.get("method"):
        return str(details["method"]).replace("_", "-")
    if name == "export" and details.get("type"):
        return f"gguf-{details['type']}".replace("_", "-")
    return _STEP_KINDS[name]


def read_run(run_dir: Path) -> RunRecord:
    """A finished run directory's products, in the order they were derived."""
    run_dir = Path(run_dir)
    status = _read_json(run_dir / "status.json")
    if status is None:
        raise UserError(f"{run_dir} is not a seektune run directory (no status.json)")
    if status.get("state") != "completed":
        raise UserError(
            f"run {run_dir} did not complete (state {status.get('state')}): register a completed run"
        )
    config_path = run_dir / "config.yaml"
    config_yaml = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    config = yaml.safe_load(config_yaml) if config_yaml else {}
    metrics = _read_json(run_dir / "metrics.json") or {}
    method = (config.get("method") or {}).get("name")
    products: list[Product] = []
    if (run_dir / "model").is_dir():
        evaluation = (metrics.get("eval") or {}).get("tuned")
        products.append(Product(run_dir / "model", _model_kind(run_dir / "model"), method, None, evaluation))
    results = _read_json(run_dir / "compress" / "results.json")
    compress_source = None
    if results and results.get("status") == "completed":
        rows = {row.get("label"): row for row in results.get("table") or []}
        if not products:
            compress_source = Path(results["source"])
        for step in results.get("steps") or []:
            folder = _in_run(run_dir, step["model_dir"])
            products.append(
                Product(
                    folder,
                    _STEP_KINDS[step["step"]],
                    method if step["step"] != "distill" else "distill",
                    _build_name(step),
                    _row_metrics(rows.get(step["step"])),
                    details={"step": step["step"], **(step.get("details") or {})},
                    eval_source="compress",
                )
            )
    if not products:
        raise UserError(
            f"run {run_dir} produced no model to register (it neither trained nor compressed one)"
        )
    return RunRecord(
        run_dir=run_dir,
        config_yaml=config_yaml,
        config=config,
        environment=_read_json(run_dir / "environment.json"),
        data=metrics.get("data"),
        products=products,
        compress_source=compress_source,
    )


def _base_facts(record: RunRecord, first: Path) -> dict[str, Any]:
    model = record.config.get("model") or {}
    fingerprint = _read_json(first / "base_fingerprint.json") or {}
    return {
        "base_model": model.get("name_or_path"),
        "base_revision": model.get("revision"),
        "base_fingerprint": fingerprint.get("fingerprint"),
        "base_path": fingerprint.get("base"),
    }


def _primary_metric(config: dict[str, Any]) -> str | None:
    evaluation = config.get("eval") or {}
    if evaluation.get("primary_metric"):
        return evaluation["primary_metric"]
    metrics = evaluation.get("metrics") or []
    return next((m for m in metrics if m != "perplexity"), metrics[0] if metrics else None)


def check_registration(store: RegistryStore, registry: RegistryConfig, default_name: str) -> None:
    """Before a run starts: its name is valid and an explicit `registry.version` is still free."""
    name = check_name(registry.model_name or default_name)
    for tag in registry.tags:
        check_tag(tag)
    if registry.version is None:
        return
    version = check_version(registry.version)
    with store.read() as session:
        _refuse_taken(session, name, version)


def _refuse_taken(session: Session, name: str, version: str) -> None:
    model = get_model(session, name)
    taken = next((v for v in (model.versions if model else []) if v.version == version), None)
    if taken is not None:
        upcoming = next_release([v.version for v in model.versions], "minor")
        raise UserError(
            f"{name}@{version} is already registered (from {taken.run_dir or taken.artefact_source}, "
            f"{taken.created_at:%Y-%m-%d}): set registry.version to another (the next is {upcoming}) or "
            "leave it unset"
        )


def register_run(
    store: RegistryStore,
    registry: RegistryConfig,
    run_dir: Path,
    parent_ref: str | None = None,
    default_name: str | None = None,
) -> list[dict[str, Any]]:
    """Register the products of the run at `run_dir`; `parent_ref`: the registered version the run started
    from (a model.name_or_path or compress.source of registry:NAME@REF). Returns the new versions' views."""
    record = read_run(run_dir)
    default_name = default_name or record.config.get("name") or Path(run_dir).name
    if record.compress_source is not None and parent_ref is None:
        parent_ref = _registered_source(store, record.compress_source)
        if parent_ref is None and (record.compress_source.parent / "status.json").is_file():
            # the chain started from a run's trained model that is not registered: that model first
            source_run = record.compress_source.parent
            parent_ref = register_run(store, registry, source_run, default_name=default_name)[0]["ref"]
    staged = [
        artefacts.stage_artefact(p.path, store.artefacts, registry.artefacts == "link")
        for p in record.products
    ]
    try:
        for attempt in range(_ATTEMPTS):
            try:
                return _insert(store, registry, record, staged, parent_ref, default_name)
            except IntegrityError:
                if registry.version is not None or attempt == _ATTEMPTS - 1:
                    raise
                logger.info("a version was registered meanwhile; taking the next one")
    except IntegrityError as exc:
        raise UserError(f"the registration of {run_dir} collided with another one: {exc.orig}") from None
    finally:
        for incoming, _ in staged:
            artefacts.discard(incoming)  # what was placed is no longer there
    raise AssertionError("unreachable")


def _registered_source(store: RegistryStore, source: Path) -> str | None:
    """The registered version whose artefact has the same files as `source`, if any."""
    if not source.exists():
        return None
    checksum = artefacts.manifest_sha256(artefacts.build_manifest(source))
    with store.read() as session:
        found = session.scalars(
            select(ModelVersion).where(ModelVersion.artefact_sha256 == checksum).order_by(ModelVersion.id)
        ).first()
        return found.ref if found else None


def _insert(
    store: RegistryStore,
    registry: RegistryConfig,
    record: RunRecord,
    staged: list[tuple[Path, dict]],
    parent_ref: str | None,
    default_name: str,
) -> list[dict[str, Any]]:
    who = current_user()
    placed: list[tuple[Path, Path]] = []
    try:
        with store.write() as session:
            parent = find_version(session, parent_ref) if parent_ref else None
            name = check_name(registry.model_name or (parent.model.name if parent else default_name))
            model = get_model(session, name, lock=True)
            if model is None:
                model = RegisteredModel(name=name)
                session.add(model)
                session.flush()
            existing = [v.version for v in model.versions]
            release = _release(session, registry, record, parent, name, existing)
            base = _base_facts(record, record.products[0].path)
            if parent is not None:  # a derived model keeps its root's base
                base.update(
                    base_model=parent.base_model,
                    base_revision=parent.base_revision,
                    base_fingerprint=parent.base_fingerprint,
                )
            taken = set(existing)
            views = []
            for product, (incoming, manifest) in zip(record.products, staged, strict=True):
                version = release if product.build is None else build_version(release, product.build, taken)
                taken.add(version)
                target = store.artefacts / name / version
                row = ModelVersion(
                    model=model,
                    version=version,
                    kind=product.kind,
                    method=product.method,
                    stage="none",
                    base_model=base["base_model"],
                    base_revision=base["base_revision"],
                    base_fingerprint=base["base_fingerprint"],
                    parent=parent,
                    config_yaml=record.config_yaml,
                    data_fingerprint=(record.data or {}).get("fingerprint"),
                    data_report=record.data,
                    environment=record.environment,
                    details={
                        **product.details,
                        "base_path": base.get("base_path"),
                        "primary_metric": _primary_metric(record.config),
                    },
                    artefact_path=str(target.resolve()),
                    artefact_source=str(product.path.resolve()),
                    artefact_sha256=artefacts.manifest_sha256(manifest),
                    artefact_bytes=sum(entry["bytes"] for entry in manifest.values()),
                    artefact_files=manifest,
                    run_dir=str(record.run_dir.resolve()),
                    created_by=who,
                )
                if product.metrics:
                    row.evaluations.append(
                        Evaluation(
                            source=product.eval_source,
                            metrics=product.metrics,
                            data_fingerprint=(record.data or {}).get("fingerprint"),
                            run_dir=str(record.run_dir.resolve()),
                        )
                    )
                session.add(row)
                session.flush()  # a taken version fails here, before its files move
                if product.build is None:
                    for tag in registry.tags:
                        _tag_new(session, row, tag)
                artefacts.place_artefact(incoming, target)
                placed.append((target, incoming))
                parent = row
                views.append(summary_view(row))
            return views
    except BaseException:
        for target, incoming in placed:  # the rows are rolled back: their folders go back to staging
            artefacts.unplace_artefact(target, incoming)
        raise


def _release(
    session: Session,
    registry: RegistryConfig,
    record: RunRecord,
    parent: ModelVersion | None,
    name: str,
    existing: list[str],
) -> str:
    """The release the run's products are versions of."""
    trains = record.products[0].build is None
    if registry.version is not None and (trains or parent is None):
        version = check_version(registry.version)
        _refuse_taken(session, name, version)
        return version
    if not trains and parent is not None and parent.model.name == name:
        return release_of(parent.version)  # the chain's models are builds of the release they come from
    return next_release(existing, registry.bump)


def _tag_new(session: Session, version: ModelVersion, tag: str) -> None:
    check_tag(tag)
    holder = session.scalars(
        select(VersionTag).where(VersionTag.model_id == version.model_id, VersionTag.tag == tag)
    ).one_or_none()
    if holder is not None:
        raise UserError(
            f"registry.tags: {tag!r} is already on {holder.version.ref} (a tag names one version): pick "
            f"another, or move it afterwards: seektune registry tag {version.model.name}@VERSION {tag} "
            "--move"
        )
    version.tags.append(VersionTag(model_id=version.model_id, tag=tag))
