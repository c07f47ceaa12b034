"""A version's files: copied into the registry's artefact folder, checksummed, verified, exported, removed.

A registered artefact lives at `<artefacts>/<name>/<version>/`, copied (or hard-linked, with
`registry.artefacts: link`) from where the run wrote it, so deleting or moving the run directory does not
break the registry. Its manifest records the sha256 and size of every file; the version's checksum is the
sha256 of that manifest. Loading a version recomputes the manifest and names the first file that
differs, so a model that changed on disk is never served or evaluated as the registered one.

The copy is made into `<artefacts>/.incoming/` first and renamed into place inside the registering
transaction (`place_artefact`), so a failed registration leaves no folder that looks registered.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from seektune.errors import UserError
from seektune.rundir import fsync_dir

INCOMING = ".incoming"
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(path: Path) -> dict[str, dict[str, Any]]:
    """`{relative path: {sha256, bytes}}` of every file under the folder `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: {"sha256": file_sha256(path), "bytes": path.stat().st_size}}
    manifest = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        manifest[file.relative_to(path).as_posix()] = {
            "sha256": file_sha256(file),
            "bytes": file.stat().st_size,
        }
    return manifest


def manifest_sha256(manifest: dict[str, dict[str, Any]]) -> str:
    """The checksum of a whole artefact: sha256 over its sorted (path, sha256, size) lines."""
    digest = hashlib.sha256()
    for name in sorted(manifest):
        entry = manifest[name]
        digest.update(f"{name}\0{entry['sha256']}\0{entry['bytes']}\n".encode())
    return digest.hexdigest()


def stage_artefact(source: Path, root: Path, link: bool) -> tuple[Path, dict[str, dict[str, Any]]]:
    """Copy `source` (folder or file) into `<root>/.incoming/<random>/` and return it with its manifest
    (computed from the copy: the checksum is of what the registry holds)."""
    source = Path(source)
    if not source.exists():
        raise UserError(f"artefact {source} does not exist: was the run directory moved or cleaned?")
    incoming = root / INCOMING / uuid.uuid4().hex
    incoming.parent.mkdir(parents=True, exist_ok=True)
    copy = _link_or_copy if link else shutil.copy2
    try:
        if source.is_file():
            incoming.mkdir()
            copy(source, incoming / source.name)
        else:
            shutil.copytree(source, incoming, copy_function=copy)
    except OSError as exc:
        shutil.rmtree(incoming, ignore_errors=True)
        raise UserError(f"cannot copy {source} into the registry's folder {root}: {exc.strerror}") from None
    return incoming, build_manifest(incoming)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: a copy
        shutil.copy2(src, dst)


def place_artefact(incoming: Path, target: Path) -> None:
    """Rename a staged copy to its final folder. A folder already there without a registered version (a
    crash between rename and commit) is replaced."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(incoming, target)
    fsync_dir(target.parent)


def unplace_artefact(target: Path, incoming: Path) -> None:
    """Undo `place_artefact` (its registration was rolled back), so a retry can place it again."""
    if target.exists() and not incoming.exists():
        os.replace(target, incoming)


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def artefact_problem(path: Path, manifest: dict[str, dict[str, Any]]) -> str | None:
    """What differs between the files at `path` and the registered `manifest`, or None when they match."""
    path = Path(path)
    if not path.exists():
        return f"its artefact {path} is missing"
    found = build_manifest(path)
    for name, entry in manifest.items():
        if name not in found:
            return f"{name} is missing from {path}"
        if found[name]["sha256"] != entry["sha256"]:
            return (
                f"{name} in {path} changed since it was registered (sha256 {found[name]['sha256'][:12]}... "
                f"!= {entry['sha256'][:12]}...)"
            )
    extra = sorted(set(found) - set(manifest))
    if extra:
        return f"{path} holds files that were not registered: {', '.join(extra[:3])}"
    return None


def export_artefact(path: Path, destination: Path) -> Path:
    """Copy a verified artefact to `destination` (a new or empty folder), atomically (copy, then rename)."""
    destination = Path(destination).expanduser()
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"{destination} exists and is not an empty folder: give a new folder to export to")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copytree(path, staging)
        if destination.exists():
            destination.rmdir()
        os.replace(staging, destination)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"cannot export to {destination}: {exc.strerror}") from None
    return destination


def folder_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0
