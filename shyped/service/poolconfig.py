"""The ``[pool]`` table of `shyped.toml`: pool mode on etcd (docs/pool.md). Off by default:
without the table the daemon runs on its files alone (single-host mode)."""

from __future__ import annotations

import math
import socket
import urllib.parse
from pathlib import Path
from typing import Any

import attrs

from shyped.pool.keys import PoolKeyError, check_host, check_prefix


class PoolConfigError(ValueError):
    """A ``[pool]`` key that cannot be used (the message names it)."""


@attrs.frozen
class PoolConfig:
    enabled: bool = False
    #: etcd client URLs (``http://127.0.0.1:2379``); every member, tried in turn
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    #: the key prefix every entry of this pool lives under
    prefix: str = "/shyped/pool"
    #: this host's name in the pool (default: the short host name)
    host: str = ""
    #: the local copy of the last known pool state (start and enforce without etcd)
    cache: Path = Path("/var/lib/shyped/pool-cache.json")
    #: seconds a dead host's entries (membership, running labels) outlive it
    lease_ttl: int = 10
    #: seconds one etcd call may take before the next endpoint is tried
    timeout: float = 2.0
    #: seconds between audit chain head anchors (and one at stop)
    anchor_interval: float = 60.0
    #: TLS (https endpoints): the CA of the members' certificates; a client certificate and
    #: key when the members run with --client-cert-auth
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: etcd's role-based access control: the user, and a root-only file with its password
    user: str | None = None
    password_file: Path | None = None


_KEYS = {
    "ca_file",
    "cert_file",
    "key_file",
    "user",
    "password_file",
    "enabled",
    "endpoints",
    "prefix",
    "host",
    "cache",
    "lease_ttl",
    "timeout",
    "anchor_interval",
}


def _endpoint(url: str, tls: bool) -> str:
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path.strip("/"):
        raise PoolConfigError(f"pool.endpoints: {url!r} is not an etcd client URL")
    if (parsed.scheme == "https") != tls:
        raise PoolConfigError(
            f"pool.endpoints: {url!r}: https endpoints go with pool.ca_file, http ones without"
        )
    return url.rstrip("/")


def parse_pool(doc: dict[str, Any], base: Path, where: str) -> PoolConfig:
    """The ``[pool]`` table of a parsed configuration document."""
    table = doc.get("pool")
    if table is None:
        return PoolConfig()
    if not isinstance(table, dict):
        raise PoolConfigError(f"{where}: [pool] must be a table")
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise PoolConfigError(f"{where}: unknown key(s) in [pool]: {', '.join(unknown)}")

    def get(key: str, kind: type, default: Any) -> Any:
        value = table.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise PoolConfigError(f"{where}: pool.{key} must be a {kind.__name__}")
        return value

    endpoints = get("endpoints", list, ["http://127.0.0.1:2379"])
    if not endpoints or not all(isinstance(e, str) for e in endpoints) or len(endpoints) > 16:
        raise PoolConfigError(f"{where}: pool.endpoints must be 1 to 16 URLs")
    ttl = get("lease_ttl", int, 10)
    if not 2 <= ttl <= 600:
        raise PoolConfigError(f"{where}: pool.lease_ttl must be 2..600 seconds")
    timeout = get("timeout", float, 2.0)
    interval = get("anchor_interval", float, 60.0)
    for key, value in (("timeout", timeout), ("anchor_interval", interval)):
        if not (math.isfinite(value) and 0 < value <= 3600):
            raise PoolConfigError(f"{where}: pool.{key} must be in (0, 3600] seconds")
    cache = get("cache", str, "/var/lib/shyped/pool-cache.json")
    if not cache.strip() or "\x00" in cache:
        raise PoolConfigError(f"{where}: pool.cache must name a file")
    try:
        prefix = check_prefix(get("prefix", str, "/shyped/pool"))
        host = check_host(get("host", str, "") or socket.gethostname().split(".")[0])
        urls = tuple(_endpoint(e, "ca_file" in table) for e in endpoints)
    except (PoolKeyError, PoolConfigError) as exc:
        raise PoolConfigError(f"{where}: {exc}") from None
    files: dict[str, Path | None] = {}
    for key in ("ca_file", "cert_file", "key_file", "password_file"):
        value = get(key, str, "") if key in table else None
        if value is not None and (not value.strip() or "\x00" in value):
            raise PoolConfigError(f"{where}: pool.{key} must name a file")
        files[key] = None if value is None else base / value
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise PoolConfigError(f"{where}: pool.cert_file and pool.key_file go together")
    user = get("user", str, "") if "user" in table else None
    if (user is None) != (files["password_file"] is None) or (user is not None and not user):
        raise PoolConfigError(f"{where}: pool.user and pool.password_file go together")
    return PoolConfig(
        user=user,
        **files,
        enabled=get("enabled", bool, True),
        endpoints=urls,
        prefix=prefix,
        host=host,
        cache=base / cache,
        lease_ttl=ttl,
        timeout=timeout,
        anchor_interval=interval,
    )
