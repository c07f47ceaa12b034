"""Which served model answers a request: the base, an adapter, or a version of an A/B split.

Why our own: neither FastAPI nor the engines route a public model name to one of several versions by a
traffic share. A request's `model` is one of

- the base's served name           -> the base (no adapter)
- an adapter's name                -> that adapter on the base
- an A/B split's public name       -> one of the split's versions (each a base or adapter name), chosen
  by share: with a `user` the choice is sticky (a hash of split name + user, mapped into [0, 1), against the
  cumulative normalised shares, so a user keeps their version as long as the shares stay), without one
  at random from a generator seeded by the config's seed.
"""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from seektune.config import ABSplitConfig
from seektune.errors import UserError
from seektune.serve.errors import APIError


@dataclass(frozen=True)
class Route:
    """Where a request goes: `public` is the name it asked for, `version` the served model that answers
    (the base's name or an adapter's), `adapter` the adapter to run (None: the base)."""

    public: str
    version: str
    adapter: str | None


@dataclass(frozen=True)
class _Split:
    name: str
    versions: tuple[str, ...]
    cumulative: tuple[float, ...]  # normalised, last == 1.0


def sticky_point(split: str, user: str) -> float:
    """A user's fixed point in [0, 1) for one split (the same across restarts and replicas)."""
    digest = hashlib.sha256(f"{split}\x00{user}".encode(errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def _cumulative(shares: dict[str, float]) -> tuple[tuple[str, ...], tuple[float, ...]]:
    total = sum(shares.values())
    names, bounds, running = [], [], 0.0
    for name, share in shares.items():
        running += share / total
        names.append(name)
        bounds.append(running)
    bounds[-1] = 1.0
    return tuple(names), tuple(bounds)


class Router:
    """Resolves a request's `model` to a `Route`; adapter names are read live (they change at run time)."""

    def __init__(
        self,
        base_name: str,
        adapter_names: Callable[[], Iterable[str]],
        splits: list[ABSplitConfig],
        seed: int = 0,
    ) -> None:
        self.base_name = base_name
        self._adapter_names = adapter_names
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._splits: dict[str, _Split] = {}
        for split in splits:
            names, bounds = _cumulative(split.versions)
            self._splits[split.name] = _Split(split.name, names, bounds)
        validate_routes(base_name, list(adapter_names()), splits)

    @property
    def split_names(self) -> list[str]:
        return list(self._splits)

    def adapters(self) -> list[str]:
        return list(self._adapter_names())

    def split_versions(self, name: str) -> tuple[str, ...]:
        return self._splits[name].versions

    def served_names(self) -> list[str]:
        """Every name a client may send: base, adapters, A/B names."""
        return [self.base_name, *self.adapters(), *self._splits]

    def uses(self, version: str) -> list[str]:
        """The A/B splits that route to `version`."""
        return [split.name for split in self._splits.values() if version in split.versions]

    def resolve(self, model: str, user: str | None = None) -> Route:
        split = self._splits.get(model)
        version = self._pick(split, user) if split is not None else model
        if version == self.base_name:
            return Route(model, version, None)
        if version in set(self.adapters()):
            return Route(model, version, version)
        if split is not None:  # its adapter was unloaded (the admin endpoint refuses that, but be safe)
            raise APIError(
                503, f"model {model!r} routes to {version!r}, which is not loaded", code="model_not_loaded"
            )
        raise APIError(
            404,
            f"the model {model!r} does not exist on this server; served: {', '.join(self.served_names())}",
            param="model",
            code="model_not_found",
        )

    def _pick(self, split: _Split, user: str | None) -> str:
        if user:
            point = sticky_point(split.name, user)
        else:
            with self._lock:
                point = self._random.random()
        for name, bound in zip(split.versions, split.cumulative, strict=True):
            if point < bound:
                return name
        return split.versions[-1]


def validate_routes(base_name: str, adapters: list[str], splits: list[ABSplitConfig]) -> None:
    """Every A/B version names a served model and no name is served twice (UserError otherwise)."""
    served = [base_name, *adapters]
    seen: set[str] = set()
    for name in served:
        if name in seen:
            raise UserError(f"the served name {name!r} is given twice (base and adapter names must differ)")
        seen.add(name)
    for split in splits:
        if split.name in seen:
            raise UserError(
                f"serve.ab name {split.name!r} is already a served model or split: give the split a "
                "public name of its own"
            )
        seen.add(split.name)
        unknown = [v for v in split.versions if v not in served]
        if unknown:
            raise UserError(
                f"serve.ab {split.name!r} routes to {unknown}, which is not served: versions must be the "
                f"base ({base_name!r}) or adapter names ({', '.join(adapters) or 'none loaded'})"
            )
