"""What the registry answers and changes: find a version, list, show, tag, promote, compare, lineage, gc,
record an evaluation, resolve a version's verified artefact.

Every function takes an open `RegistryStore`, runs in one transaction and returns plain data (dicts,
`ResolvedVersion`), so the CLI, the pipeline and the server never hold database objects.
"""

from __future__ import annotations

import difflib
import getpass
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from seektune.config import EvalMetric
from seektune.errors import UserError
from seektune.registry import artefacts
from seektune.registry.models import (
    STAGES,
    Evaluation,
    ModelVersion,
    RegisteredModel,
    StageTransition,
    VersionTag,
)
from seektune.registry.refs import Ref, check_tag, parse_ref, parse_version, version_key
from seektune.registry.store import RegistryStore

QUALITY_METRICS = set(get_args(EvalMetric))
PROMOTED_STAGES = ("staging", "production")  # moving a version here needs an evaluation
ORPHAN_AGE_S = 3600.0  # a staged copy older than this belongs to no registration still running


def current_user() -> str:
    """Who registers or promotes: the login name at the host name."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# ---------------------------------------------------------------------------------------------------------
# Finding versions


def get_model(session: Session, name: str, lock: bool = False) -> RegisteredModel | None:
    query = select(RegisteredModel).where(RegisteredModel.name == name)
    if lock:
        query = query.with_for_update()  # PostgreSQL row lock; SQLite's BEGIN IMMEDIATE already serialises
    return session.scalars(query).one_or_none()


def find_version(session: Session, ref: Ref | str, lock: bool = False) -> ModelVersion:
    """The version `ref` names (`NAME` alone: the newest); a UserError saying what exists otherwise."""
    if isinstance(ref, str):
        ref = parse_ref(ref)
    model = get_model(session, ref.name, lock=lock)
    if model is None:
        names = session.scalars(select(RegisteredModel.name).order_by(RegisteredModel.name)).all()
        known = f"registered: {', '.join(names[:10])}" if names else "the registry is empty"
        raise UserError(f"no model named {ref.name!r} in the registry ({known}): see seektune registry list")
    versions = sorted(model.versions, key=lambda v: version_key(v.version))
    if not versions:
        raise UserError(f"{ref.name} has no versions")
    wanted = ref.ref or "latest"
    if wanted == "latest":
        return max(versions, key=lambda v: v.id)  # the newest registered
    if wanted in STAGES:
        staged = [v for v in versions if v.stage == wanted]
        if not staged:
            raise UserError(
                f"{ref.name} has no version in {wanted}: promote one (seektune registry promote "
                f"{ref.name}@VERSION {wanted})"
            )
        return max(staged, key=lambda v: v.id)
    parsed = parse_version(wanted)
    if parsed is not None:
        for version in versions:
            if parse_version(version.version) == parsed and str(parsed) == version.version:
                return version
    for version in versions:
        if any(t.tag == wanted for t in version.tags):
            return version
    shown = ", ".join(v.version for v in versions[-8:])
    raise UserError(
        f"{ref.name} has no version or tag {wanted!r} (versions: {shown}): see seektune registry list "
        f"{ref.name}"
    )


def has_evaluation(version: ModelVersion) -> bool:
    """Whether some evaluation of the version measured its quality (not only its size or speed)."""
    return any(QUALITY_METRICS & set(e.metrics or {}) for e in version.evaluations)


def latest_metrics(version: ModelVersion) -> dict[str, Any]:
    for evaluation in reversed(version.evaluations):
        if QUALITY_METRICS & set(evaluation.metrics or {}):
            return dict(evaluation.metrics)
    return dict(version.evaluations[-1].metrics) if version.evaluations else {}


# ---------------------------------------------------------------------------------------------------------
# Views (plain data)


def _when(value: datetime | None) -> str | None:
    if value is None:
        return None
    value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return value.isoformat(timespec="seconds")


def summary_view(version: ModelVersion) -> dict[str, Any]:
    """The line `registry list` shows for a version."""
    return {
        "name": version.model.name,
        "version": version.version,
        "ref": version.ref,
        "kind": version.kind,
        "method": version.method,
        "stage": version.stage,
        "tags": sorted(t.tag for t in version.tags),
        "metrics": latest_metrics(version),
        "primary_metric": (version.details or {}).get("primary_metric"),
        "parent": version.parent.ref if version.parent else None,
        "size_bytes": version.artefact_bytes,
        "artefact_removed": version.artefact_removed_at is not None,
        "created_by": version.created_by,
        "created_at": _when(version.created_at),
    }


def full_view(version: ModelVersion, session: Session) -> dict[str, Any]:
    """Everything the registry knows of a version (`registry show`)."""
    children = session.scalars(select(ModelVersion).where(ModelVersion.parent_id == version.id)).all()
    return {
        **summary_view(version),
        "base_model": version.base_model,
        "base_revision": version.base_revision,
        "base_fingerprint": version.base_fingerprint,
        "children": sorted(c.ref for c in children),
        "data_fingerprint": version.data_fingerprint,
        "data_report": version.data_report,
        "environment": version.environment,
        "details": version.details,
        "config_yaml": version.config_yaml,
        "artefact": {
            "path": version.artefact_path,
            "registered_from": version.artefact_source,
            "sha256": version.artefact_sha256,
            "bytes": version.artefact_bytes,
            "files": len(version.artefact_files or {}),
            "removed_at": _when(version.artefact_removed_at),
        },
        "run_dir": version.run_dir,
        "evaluations": [
            {
                "source": e.source,
                "metrics": e.metrics,
                "data_fingerprint": e.data_fingerprint,
                "run_dir": e.run_dir,
                "at": _when(e.created_at),
            }
            for e in version.evaluations
        ],
        "stage_history": [
            {
                "from": t.from_stage,
                "to": t.to_stage,
                "by": t.changed_by,
                "at": _when(t.changed_at),
                "reason": t.reason,
            }
            for t in version.transitions
        ],
    }


def list_versions(store: RegistryStore, name: str | None = None, stage: str | None = None) -> list[dict]:
    with store.read() as session:
        query = select(ModelVersion).join(RegisteredModel)
        if name:
            if get_model(session, name) is None:
                find_version(session, Ref(name, None))  # the message that says what is registered
            query = query.where(RegisteredModel.name == name)
        if stage:
            query = query.where(ModelVersion.stage == stage)
        rows = session.scalars(query).all()
        ordered = sorted(rows, key=lambda v: (v.model.name, version_key(v.version)))
        return [summary_view(v) for v in ordered]


def show_version(store: RegistryStore, ref: str) -> dict[str, Any]:
    with store.read() as session:
        return full_view(find_version(session, ref), session)


# ---------------------------------------------------------------------------------------------------------
# Changes


def tag_version(
    store: RegistryStore, ref: str, tags: list[str], remove: bool = False, move: bool = False
) -> dict:
    """Add (or with `remove`, take off) tags; a tag on another version of the name moves only with `move`."""
    for tag in tags:
        if not remove:
            check_tag(tag)
    with store.write() as session:
        version = find_version(session, ref, lock=True)
        mine = {t.tag: t for t in version.tags}
        for tag in tags:
            if remove:
                if tag not in mine:
                    raise UserError(
                        f"{version.ref} has no tag {tag!r} (its tags: {', '.join(mine) or 'none'})"
                    )
                version.tags.remove(mine.pop(tag))
                continue
            if tag in mine:
                continue
            holder = session.scalars(
                select(VersionTag).where(VersionTag.model_id == version.model_id, VersionTag.tag == tag)
            ).one_or_none()
            if holder is not None:
                if not move:
                    raise UserError(
                        f"tag {tag!r} is on {holder.version.ref}; a tag names one version: add --move to "
                        f"move it to {version.version}"
                    )
                session.delete(holder)
                session.flush()
            mine[tag] = VersionTag(model_id=version.model_id, tag=tag)
            version.tags.append(mine[tag])
        session.flush()
        return summary_view(version)


def promote_version(store: RegistryStore, ref: str, stage: str, reason: str | None = None) -> dict[str, Any]:
    """Move a version to `stage`, keeping the history; a new production version archives the old one.
    Returns the version's view and `archived`: the version it replaced in production, if any."""
    if stage not in STAGES:
        raise UserError(f"stage {stage!r} is not one of {', '.join(STAGES)}")
    who = current_user()
    with store.write() as session:
        version = find_version(session, ref, lock=True)
        if version.stage == stage:
            return {**summary_view(version), "archived": None, "changed": False}
        if stage in PROMOTED_STAGES:
            if not has_evaluation(version):
                raise UserError(
                    f"{version.ref} has no evaluation, so nothing shows it is fit for {stage}: evaluate it "
                    f"first (seektune eval --model registry:{version.ref}), then promote it"
                )
            if version.artefact_removed_at is not None:
                raise UserError(f"{version.ref}'s artefact was removed by gc: it cannot be {stage} any more")
        archived = None
        if stage == "production":
            for other in version.model.versions:
                if other.id != version.id and other.stage == "production":
                    _move(session, other, "archived", who, f"replaced in production by {version.version}")
                    archived = other.ref
            session.flush()  # the old production row changes before the new one takes the unique slot
        _move(session, version, stage, who, reason)
        session.flush()
        return {**summary_view(version), "archived": archived, "changed": True}


def _move(session: Session, version: ModelVersion, stage: str, who: str, reason: str | None) -> None:
    version.transitions.append(
        StageTransition(from_stage=version.stage, to_stage=stage, changed_by=who, reason=reason)
    )
    version.stage = stage


def record_evaluation(
    store: RegistryStore,
    ref: str,
    metrics: dict[str, Any],
    data_fingerprint: str | None,
    run_dir: str | None,
    source: str = "eval",
) -> None:
    """Attach an evaluation's metrics to a version (what `promote` asks for)."""
    with store.write() as session:
        version = find_version(session, ref)
        version.evaluations.append(
            Evaluation(source=source, metrics=metrics, data_fingerprint=data_fingerprint, run_dir=run_dir)
        )


# ---------------------------------------------------------------------------------------------------------
# Lineage and comparison


def lineage(store: RegistryStore, ref: str) -> dict[str, Any]:
    """The chain from the base model through `ref`'s ancestors to it, and what was derived from it:
    `{base: {...}, chain: [views, root first], descendants: nested {view, children}}`. A bare NAME gives
    every version of the name, grouped by root."""
    parsed = parse_ref(ref)
    with store.read() as session:
        if parsed.ref is None:
            model = get_model(session, parsed.name)
            if model is None:
                find_version(session, parsed)
            roots = {root.id: root for root in map(_root, model.versions)}
            return {"trees": [_tree_from(session, roots[key], chain=[]) for key in sorted(roots)]}
        version = find_version(session, parsed)
        chain = []
        node: ModelVersion | None = version
        while node is not None:
            chain.append(node)
            node = node.parent
        chain.reverse()
        return {"trees": [_tree_from(session, version, chain=chain[:-1])], "focus": version.ref}


def _root(version: ModelVersion) -> ModelVersion:
    while version.parent is not None:
        version = version.parent
    return version


def _tree_from(session: Session, version: ModelVersion, chain: list[ModelVersion]) -> dict[str, Any]:
    root = chain[0] if chain else version
    return {
        "base": {
            "model": root.base_model,
            "revision": root.base_revision,
            "fingerprint": root.base_fingerprint,
        },
        "ancestors": [summary_view(v) for v in chain],
        "version": _descendants(session, version),
    }


def _descendants(session: Session, version: ModelVersion) -> dict[str, Any]:
    children = session.scalars(select(ModelVersion).where(ModelVersion.parent_id == version.id)).all()
    ordered = sorted(children, key=lambda v: version_key(v.version))
    return {**summary_view(version), "children": [_descendants(session, c) for c in ordered]}


def compare_versions(store: RegistryStore, a: str, b: str) -> dict[str, Any]:
    """Two versions side by side: metrics (from evaluations on the same test data when there are some),
    what they are, and their configs as a unified diff."""
    with store.read() as session:
        first, second = find_version(session, a), find_version(session, b)
        metrics_a, metrics_b, same_data = _paired_metrics(first, second)
        names = [m for m in dict.fromkeys([*metrics_a, *metrics_b]) if m not in ("n",)]
        rows = []
        for metric in names:
            value_a, value_b = metrics_a.get(metric), metrics_b.get(metric)
            numeric = isinstance(value_a, (int, float)) and isinstance(value_b, (int, float))
            rows.append(
                {
                    "metric": metric,
                    "a": value_a,
                    "b": value_b,
                    "diff": (value_b - value_a) if numeric else None,
                }
            )
        diff = list(
            difflib.unified_diff(
                (first.config_yaml or "").splitlines(),
                (second.config_yaml or "").splitlines(),
                fromfile=first.ref,
                tofile=second.ref,
                lineterm="",
            )
        )
        facts = {}
        for key in ("kind", "method", "base_model", "data_fingerprint", "artefact_bytes", "stage"):
            facts[key] = {"a": getattr(first, key), "b": getattr(second, key)}
        return {
            "a": first.ref,
            "b": second.ref,
            "same_test_data": same_data,
            "metrics": rows,
            "facts": facts,
            "config_diff": diff,
        }


def _paired_metrics(a: ModelVersion, b: ModelVersion) -> tuple[dict, dict, bool | None]:
    """The newest pair of quality evaluations on the same test data, else each one's newest."""
    quality_a = [e for e in a.evaluations if QUALITY_METRICS & set(e.metrics or {})]
    quality_b = [e for e in b.evaluations if QUALITY_METRICS & set(e.metrics or {})]
    for ea in reversed(quality_a):
        for eb in reversed(quality_b):
            if ea.data_fingerprint and ea.data_fingerprint == eb.data_fingerprint:
                return dict(ea.metrics), dict(eb.metrics), True
    same = None if not (quality_a and quality_b) else False
    return latest_metrics(a), latest_metrics(b), same


# ---------------------------------------------------------------------------------------------------------
# Artefacts: resolve with the checksum check, export, garbage collection


@dataclass(frozen=True)
class ResolvedVersion:
    """A version's verified artefact, for loading."""

    ref: str  # NAME@VERSION
    name: str
    version: str
    kind: str
    path: Path
    stage: str


def resolve_version(store: RegistryStore, text: str, require_ref: bool = True) -> ResolvedVersion:
    """The artefact of the version `text` names (`registry:NAME@REF`), its checksum verified: a mismatch,
    a missing or a removed artefact is a UserError that says which file and what to do."""
    ref = parse_ref(text, require_ref=require_ref)
    with store.read() as session:
        version = find_version(session, ref)
        resolved = ResolvedVersion(
            ref=version.ref,
            name=version.model.name,
            version=version.version,
            kind=version.kind,
            path=Path(version.artefact_path),
            stage=version.stage,
        )
        manifest = dict(version.artefact_files or {})
        removed = version.artefact_removed_at
    if removed is not None:
        raise UserError(
            f"{resolved.ref} was archived and its artefact removed by seektune registry gc on "
            f"{_when(removed)}: use another version"
        )
    problem = artefacts.artefact_problem(resolved.path, manifest)
    if problem:
        raise UserError(
            f"{resolved.ref} does not match what was registered: {problem}; restore the file(s) or register "
            "the model again as a new version"
        )
    return resolved


def export_version(store: RegistryStore, ref: str, destination: Path) -> tuple[ResolvedVersion, Path]:
    """Copy a version's verified artefact to `destination`, with `registry.json` (what `show` prints)."""
    from seektune.rundir import atomic_write_json

    resolved = resolve_version(store, ref, require_ref=False)
    target = artefacts.export_artefact(resolved.path, destination)
    card = show_version(store, resolved.ref)
    card.pop("config_yaml", None)
    atomic_write_json(target / "registry.json", card)
    return resolved, target


_ARCHIVED_WITH_FILES = select(ModelVersion).where(
    ModelVersion.stage == "archived", ModelVersion.artefact_removed_at.is_(None)
)


def gc_plan(store: RegistryStore) -> dict[str, Any]:
    """What `gc` would remove: the artefacts of archived versions, and folders no version owns."""
    with store.read() as session:
        archived = session.scalars(_ARCHIVED_WITH_FILES).all()
        versions = [
            {"ref": v.ref, "path": v.artefact_path, "bytes": artefacts.folder_bytes(Path(v.artefact_path))}
            for v in archived
        ]
        owned = {Path(p) for p in session.scalars(select(ModelVersion.artefact_path)).all()}
    orphans = [
        {"path": str(p), "bytes": artefacts.folder_bytes(p)} for p in _orphan_folders(store.artefacts, owned)
    ]
    return {"versions": versions, "orphans": orphans}


def _orphan_folders(root: Path, owned: set[Path]) -> list[Path]:
    if not root.is_dir():
        return []
    found = []
    now = time.time()
    for staged in (root / artefacts.INCOMING).glob("*") if (root / artefacts.INCOMING).is_dir() else []:
        if now - staged.stat().st_mtime > ORPHAN_AGE_S:
            found.append(staged)
    for name_dir in root.iterdir():
        if name_dir.name == artefacts.INCOMING or not name_dir.is_dir():
            continue
        found += [v for v in name_dir.iterdir() if v.is_dir() and v not in owned]
    return sorted(found)


def collect_garbage(store: RegistryStore) -> dict[str, Any]:
    """Remove what `gc_plan` lists, in one write transaction (no registration places a folder meanwhile);
    the versions' rows stay, marked as having no artefact."""
    with store.write() as session:
        archived = session.scalars(_ARCHIVED_WITH_FILES).all()
        owned = {Path(p) for p in session.scalars(select(ModelVersion.artefact_path)).all()}
        freed = 0
        removed = []
        for version in archived:
            path = Path(version.artefact_path)
            freed += artefacts.folder_bytes(path)
            artefacts.discard(path)
            version.artefact_removed_at = datetime.now(timezone.utc)
            removed.append(version.ref)
        orphans = _orphan_folders(store.artefacts, owned)
        for orphan in orphans:
            freed += artefacts.folder_bytes(orphan)
            artefacts.discard(orphan)
        return {"versions": removed, "orphans": [str(o) for o in orphans], "bytes": freed}
