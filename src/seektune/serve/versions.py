"""Registered versions on the server: `registry:NAME@REF` wherever `seektune serve` takes a model.

- MODEL_OR_RUN `registry:NAME@REF` serves that version's verified artefact under the public name NAME
  (an adapter on its base, or a full, merged or quantised model as the base), so clients keep their model
  name when a new version is promoted and the server restarted.
- `--adapter LABEL=registry:NAME@REF` (and `serve.adapters`) loads a registered adapter as LABEL.
- An A/B split's versions may be registered versions: `{registry:legal@1.2.0: 0.9, registry:legal@1.3.0:
  0.1}`; each is loaded as an adapter named `NAME@VERSION` (or reuses the served model that is already
  that version), so the split and its per-version metrics name versions.
Checksums are verified before anything loads (`resolve_version`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seektune.config import SeektuneConfig
from seektune.errors import UserError
from seektune.registry.refs import is_registry_ref


@dataclass
class ServedVersions:
    """MODEL_OR_RUN, the adapters and the A/B splits with registered versions replaced by folders/names."""

    model_or_run: str
    adapters: dict[str, str]
    cfg: SeektuneConfig
    served_name: str | None = None  # the public name of a registered MODEL_OR_RUN
    notes: list[str] = field(default_factory=list)


def resolve_served_versions(
    cfg: SeektuneConfig, model_or_run: str, adapters: dict[str, str]
) -> ServedVersions:
    """Replace every registry reference in what `seektune serve` was given (serve.adapters merged into
    `adapters`); nothing to do without one."""
    adapters = {**cfg.serve.adapters, **adapters}
    refs = [model_or_run, *adapters.values(), *(v for s in cfg.serve.ab for v in s.versions)]
    if not any(is_registry_ref(r) for r in refs):
        return ServedVersions(model_or_run, dict(adapters), cfg)
    from seektune.registry.catalog import resolve_version
    from seektune.registry.store import open_store

    store = open_store(cfg.registry.url, cfg.registry.artefact_dir)
    result = ServedVersions(model_or_run, {}, cfg)
    by_path: dict[str, str] = {}  # artefact folder -> the served name it has
    if is_registry_ref(model_or_run):
        version = resolve_version(store, model_or_run)
        result.model_or_run = str(version.path)
        result.served_name = version.name
        by_path[str(version.path)] = version.name
        result.notes.append(f"serving {version.ref} ({version.kind}, {version.stage}) as {version.name!r}")
    for label, path in adapters.items():
        if is_registry_ref(path):
            version = _adapter_version(resolve_version(store, path), path)
            path = str(version.path)
            result.notes.append(f"adapter {label!r} is {version.ref}")
        result.adapters[label] = path
        by_path.setdefault(path, label)
    splits = []
    for split in cfg.serve.ab:
        versions: dict[str, float] = {}
        for name, share in split.versions.items():
            if is_registry_ref(name):
                version = resolve_version(store, name)
                served = by_path.get(str(version.path))
                if served is None:
                    _adapter_version(version, name)
                    served = version.ref
                    result.adapters[served] = str(version.path)
                    by_path[str(version.path)] = served
                name = served
            versions[name] = versions.get(name, 0.0) + share
        splits.append(split.model_copy(update={"versions": versions}))
    serve = cfg.serve.model_copy(update={"ab": splits, "adapters": {}})  # all of them in result.adapters
    result.cfg = cfg.model_copy(update={"serve": serve})
    return result


def _adapter_version(version: Any, given: str) -> Any:
    if version.kind != "adapter":
        raise UserError(
            f"{given} is {version.ref}, a {version.kind} model, but only LoRA adapters share one base in "
            "a server: serve it in its own process (seektune serve registry:...) and split traffic in front"
        )
    return version
