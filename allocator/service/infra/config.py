"""Service settings (pydantic-settings, ``BITALLOC_`` environment variables), failing fast.

Rules enforced at startup rather than on the first request:

* binding anything but loopback needs a token (``BITALLOC_TOKEN``);
* model roots must exist and are stored resolved, so path confinement compares real paths;
* the database URL must be SQLite or PostgreSQL.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Self

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LOOPBACK", "Settings", "default_db_url"]

LOOPBACK = "127.0.0.1"
_WILDCARD_BINDS = ("0.0.0.0", "::", "")


def default_db_url() -> str:
    """An SQLite file in the user's data dir: nothing to install."""
    return f"sqlite:///{Path.home() / '.local' / 'share' / 'bitalloc' / 'service.db'}"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Everything the app and the workers read; one instance per process."""

    model_config = SettingsConfigDict(env_prefix="BITALLOC_", extra="ignore", frozen=True)

    db_url: str = Field(default_factory=default_db_url)
    host: str = LOOPBACK
    port: int = Field(default=8765, ge=0, le=65535)
    #: bearer token; required for every write, and for every request when bound off loopback
    token: str | None = None
    #: directories estimate jobs may read models from (``root-name/sub/dir`` or absolute inside)
    model_roots: list[Path] = Field(default_factory=list)
    max_body_bytes: int = Field(default=64 * 2**20, gt=0)
    max_table_rows: int = Field(default=2_000_000, gt=0)
    #: worker processes ``bitalloc serve`` starts next to the HTTP server
    workers: int = Field(default=1, ge=0, le=64)
    heartbeat_s: float = Field(default=2.0, gt=0)
    #: a running job whose heartbeat is older than this is declared lost (retried or failed)
    stale_after_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=2, ge=1, le=20)
    poll_s: float = Field(default=0.5, gt=0)
    #: modules imported at startup that register extra job kinds (plug-ins, tests)
    job_modules: list[str] = Field(default_factory=list)
    table_cache: int = Field(default=64, ge=0)
    #: Host-header values the app answers (``*`` any, ``*.example.com`` subdomains); ``None``:
    #: localhost, 127.0.0.1, ::1 and the bound host (any host when bound to 0.0.0.0 / ::, where
    #: every request needs the token anyway). Stops DNS rebinding of the tokenless loopback reads.
    trusted_hosts: list[str] | None = None
    #: decoded size (Arrow bytes) an uploaded or stored parquet table may reach
    max_table_bytes: int = Field(default=2**30, gt=0)

    @field_validator("db_url")
    @classmethod
    def _known_db(cls, url: str) -> str:
        if not url.startswith(("sqlite://", "postgresql://", "postgresql+")):
            raise ValueError(
                f"db_url {url!r} is not supported; use sqlite:///path.db or postgresql://user@host/db"
            )
        return url

    @field_validator("model_roots")
    @classmethod
    def _roots_exist(cls, roots: list[Path]) -> list[Path]:
        out = []
        for r in roots:
            p = Path(r).expanduser()
            if not p.is_dir():
                raise ValueError(f"model root {str(p)!r} is not a directory; create it or drop it")
            out.append(p.resolve())
        return out

    @field_validator("trusted_hosts")
    @classmethod
    def _hosts_valid(cls, hosts: list[str] | None) -> list[str] | None:
        if hosts is None:
            return None
        out = [h.strip().lower().rstrip(".").removeprefix("[").removesuffix("]") for h in hosts]
        for h in out:
            if h.count(":") == 1:  # name:port (IPv6 addresses have several colons)
                raise ValueError(f"trusted host {h!r} has a port; list the host name alone")
            if not h or any(c in h for c in "/ @[]") or (h.startswith("*") and h != "*"
                                                        and not h.startswith("*.")):
                raise ValueError(f"trusted host {h!r} is not a host name; use e.g. 'gpu-box', "
                                 "'*.example.com' or '*'")
        return out

    @model_validator(mode="after")
    def _token_off_loopback(self) -> Self:
        if not _is_loopback(self.host) and not self.token:
            raise ValueError(
                f"binding {self.host!r} exposes the service beyond this machine; "
                "set BITALLOC_TOKEN (or --token) or bind 127.0.0.1"
            )
        if self.token is not None and len(self.token) < 16:
            raise ValueError("token must be at least 16 characters; generate one with "
                             "python -c 'import secrets; print(secrets.token_urlsafe())'")
        if self.stale_after_s <= 2 * self.heartbeat_s:
            raise ValueError(
                f"stale_after_s={self.stale_after_s} must exceed 2 × heartbeat_s={self.heartbeat_s}, "
                "or live jobs would be declared lost"
            )
        return self

    @property
    def loopback_only(self) -> bool:
        return _is_loopback(self.host)

    @property
    def allowed_hosts(self) -> frozenset[str] | None:
        """Host names requests may address (lower case, no port); ``None`` allows any."""
        if self.trusted_hosts is None:
            if self.host in _WILDCARD_BINDS:
                return None
            return frozenset({"localhost", "127.0.0.1", "::1", self.host.lower().strip("[]")})
        return None if "*" in self.trusted_hosts else frozenset(self.trusted_hosts)


def token_file(settings: Settings) -> Path:
    """Where a generated token is kept (next to an SQLite database, else in the data dir)."""
    if settings.db_url.startswith("sqlite:///") and settings.db_url != "sqlite:///:memory:":
        return Path(settings.db_url.removeprefix("sqlite:///")).expanduser().with_suffix(".token")
    return Path.home() / ".local" / "share" / "bitalloc" / "service.token"


def ensure_token(settings: Settings) -> Settings:
    """Settings with a token: the configured one, else one read from or written to
    :func:`token_file` (mode 0600), as Jupyter does, so loopback needs no setup yet every
    write still carries a secret."""
    if settings.token:
        return settings
    import os
    import secrets

    path = token_file(settings)
    if path.is_file():
        token = path.read_text().strip()
    else:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    return settings.model_copy(update={"token": token})
