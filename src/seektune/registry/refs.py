"""Names, versions, tags and references (`NAME@REF`, `registry:NAME@REF`).

Versions are semantic versions (the `semver` package parses, orders and bumps them). A release is what
training produced (`1.2.0`); the compression chain's models are builds of it (`1.2.0+merged`,
`1.2.0+int8`: semver build metadata, which does not change precedence). A reference's REF is, in this
order: a stage (`production`, `staging`), `latest`, a version (`1.2.0`, also written `v1.2.0`), or a tag.
Tags that would read as a stage or a version are refused, so a REF never means two things.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import semver

from seektune.errors import UserError
from seektune.registry.models import STAGES

PREFIX = "registry:"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
BUILD = re.compile(r"[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*")
FIRST_VERSION = "1.0.0"
BUMPS = ("major", "minor", "patch")
REFERENCE_STAGES = ("staging", "production", "archived")


@dataclass(frozen=True)
class Ref:
    """A parsed reference: a registered name and what to pick among its versions (None: not given)."""

    name: str
    ref: str | None

    def __str__(self) -> str:
        return f"{self.name}@{self.ref}" if self.ref else self.name


def is_registry_ref(value: str | None) -> bool:
    return bool(value) and str(value).startswith(PREFIX)


def parse_ref(text: str, require_ref: bool = False) -> Ref:
    """`NAME`, `NAME@REF` or `registry:NAME@REF`; with `require_ref` the `@REF` part must be there."""
    body = text.removeprefix(PREFIX)
    name, sep, ref = body.partition("@")
    check_name(name, what=f"{text!r}")
    if sep and not ref:
        raise UserError(f"{text!r} ends with '@': name a version, stage, tag or latest after it")
    if require_ref and not sep:
        raise UserError(f"{text!r} names no version: add @production, @staging, @latest, @1.2.0 or @TAG")
    return Ref(name, ref or None)


def check_name(name: str, what: str = "registry.model_name") -> str:
    if not NAME.fullmatch(name or ""):
        raise UserError(
            f"{what}: {name!r} is not a registered model name: use letters, digits, '.', '_' and '-' "
            "(starting with a letter or digit, at most 128)"
        )
    return name


def parse_version(text: str) -> semver.Version | None:
    """The semantic version `text` spells (a leading 'v' allowed), or None."""
    candidate = text[1:] if text[:1] in ("v", "V") else text
    try:
        return semver.Version.parse(candidate)
    except (ValueError, TypeError):
        return None


def check_version(text: str) -> str:
    """A release version as written in the registry (no leading 'v'); a UserError when it is not one."""
    parsed = parse_version(text)
    if parsed is None:
        raise UserError(
            f"registry.version {text!r} is not a semantic version: write MAJOR.MINOR.PATCH, e.g. 1.2.0"
        )
    if parsed.build:
        raise UserError(
            f"registry.version {text!r} has build metadata ('+{parsed.build}'), which the registry keeps "
            "for the models compression derives: give the release alone, e.g. 1.2.0"
        )
    return str(parsed)


def next_release(existing: list[str], bump: str) -> str:
    """The release after the newest of `existing` (versions of one name), bumping `bump`."""
    releases = [v.replace(build=None) for v in map(parse_version, existing) if v is not None]
    if not releases:
        return FIRST_VERSION
    newest = max(releases)
    return str(getattr(newest, f"bump_{bump}")())


def build_version(release: str, build: str, taken: set[str]) -> str:
    """`release+build`, or `release+build.2`, `.3`, ... when taken."""
    version = f"{release}+{build}"
    index = 2
    while version in taken:
        version = f"{release}+{build}.{index}"
        index += 1
    return version


def release_of(version: str) -> str:
    parsed = parse_version(version)
    return str(parsed.replace(build=None)) if parsed else version


def version_key(version: str) -> tuple:
    """A sort key: semver precedence, then the build metadata (a release before its builds)."""
    parsed = parse_version(version)
    if parsed is None:
        return (semver.Version(0), "", version)
    return (parsed.replace(build=None), parsed.build or "", version)


def check_tag(tag: str) -> str:
    if not TAG.fullmatch(tag or ""):
        raise UserError(
            f"tag {tag!r}: use letters, digits, '.', '_', '+' and '-' (starting with a letter or digit, at "
            "most 128), e.g. v1.0-legal-202403"
        )
    if tag in STAGES or tag == "latest":
        raise UserError(
            f"tag {tag!r} is a stage name or 'latest', which NAME@{tag} already means: pick another"
        )
    if parse_version(tag) is not None:
        raise UserError(f"tag {tag!r} reads as a version, so NAME@{tag} would be ambiguous: pick another")
    return tag
