"""Who may talk to the service: the Host-header allow-list and the bearer-token check.

Both run on the request headers alone, so :class:`allocator.service.main.Guard` can answer
before the body is read, and the route dependencies (:mod:`allocator.service.deps`) reuse the
same token check.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from allocator.service.infra.config import Settings
from allocator.service.infra.errors import ServiceError

__all__ = ["SAFE_METHODS", "host_error", "needs_token", "request_host", "token_error"]

#: methods that only read; every other method is a write and needs the token on any bind
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def request_host(value: str) -> str:
    """The host part of a ``Host`` header, lower case, without port or brackets."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8765
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        value = value.split(":", 1)[0]
    return value.rstrip(".")


def _matches(host: str, allowed: frozenset[str]) -> bool:
    if host in allowed:
        return True
    return any(a.startswith("*.") and host.endswith(a[1:]) for a in allowed)


def host_error(settings: Settings, host_header: str | None) -> ServiceError | None:
    """A 400 when the request names a host outside ``settings.allowed_hosts`` (DNS rebinding)."""
    allowed = settings.allowed_hosts
    if allowed is None:
        return None
    host = request_host(host_header or "")
    if host and _matches(host, allowed):
        return None
    return ServiceError(400, "host_not_allowed",
                        f"Host {host or '(none)'!r} is not served here; add it to "
                        "BITALLOC_TRUSTED_HOSTS or use http://127.0.0.1")


def needs_token(settings: Settings, method: str) -> bool:
    """Writes always; reads too when bound off loopback (docs and the OpenAPI spec included)."""
    return method.upper() not in SAFE_METHODS or not settings.loopback_only


def _given(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if auth:
        scheme, _, credentials = auth.partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    return headers.get("x-bitalloc-token") or None


def token_error(settings: Settings, headers: Mapping[str, str]) -> ServiceError | None:
    """A 401 unless ``headers`` carry the server's token (``Authorization: Bearer`` or
    ``X-Bitalloc-Token``); compared in constant time."""
    given = _given(headers)
    if not given:
        return ServiceError(401, "unauthorized",
                            "this request needs the token: send 'Authorization: Bearer <token>'")
    if settings.token is None:  # create_app runs ensure_token; a bare Settings has none
        return ServiceError(401, "unauthorized", "the server has no token configured")
    if not secrets.compare_digest(given.encode(), settings.token.encode()):
        return ServiceError(401, "unauthorized", "the token is wrong; use the server's BITALLOC_TOKEN")
    return None
