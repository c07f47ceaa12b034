"""Bearer API keys, as OpenAI clients send them (`Authorization: Bearer KEY`).

Two sets of keys: `api_keys` for the API, `admin_keys` for loading and unloading adapters (when none are
given, the API keys are the admin keys too; an admin key is also an API key). With no keys configured at
all, auth is off, which `run_server` allows on a loopback address only. /health, /ready and /metrics never
need a key: Kubernetes probes and Prometheus scrapes send none.

Keys are compared with `hmac.compare_digest` over every configured key, so the time a check takes does not
tell how much of a guessed key was right.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from seektune.serve.errors import APIError


class KeyCheck:
    """Checks the bearer key of a request against a set of accepted keys (none: anyone)."""

    def __init__(self, keys: list[str], *, what: str = "API") -> None:
        self._keys = [key.encode() for key in keys if key]
        self.what = what

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def accepts(self, key: str | None) -> bool:
        if not self._keys:
            return True
        if key is None:
            return False
        given = key.encode()
        matched = False
        for accepted in self._keys:  # no early exit: every key is compared
            matched |= hmac.compare_digest(given, accepted)
        return matched

    def __call__(self, request: Request) -> None:
        """A FastAPI dependency: 401 with OpenAI's body for a missing or wrong key."""
        if not self._keys:
            return
        key = bearer_key(request.headers.get("authorization"))
        if key is None:
            raise APIError(
                401,
                "missing API key: send it as 'Authorization: Bearer YOUR_KEY'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not self.accepts(key):
            raise APIError(
                401,
                f"incorrect {self.what} key provided",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )


def bearer_key(header: str | None) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, None when absent or of another scheme."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def api_key_check(api_keys: list[str], admin_keys: list[str]) -> KeyCheck:
    """The API accepts its keys and the admin keys."""
    keys = list(api_keys) + [key for key in admin_keys if key not in api_keys] if api_keys else []
    return KeyCheck(keys)


def admin_key_check(api_keys: list[str], admin_keys: list[str]) -> KeyCheck:
    """The admin endpoints accept the admin keys, else the API keys."""
    return KeyCheck(admin_keys or api_keys, what="admin")
