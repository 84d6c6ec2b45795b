"""The daemon's configuration file (`shyped.toml`), parsed and validated in one place.

Parsing is pure (text in, `Config` out) so that every mistake an operator can make is reported
with the file and key before the daemon touches xenstore. Defaults are the secure ones: fail
closed, enforcing, local sockets only.
"""

from __future__ import annotations

import grp
import math
import re
import tomllib
from enum import Enum
from pathlib import Path
from typing import Any

import attrs

from shyped.core.modes import DomainVeto as DomainVeto
from shyped.core.modes import Mode as Mode
from shyped.fileio.boundedread import CONFIG_MAX_BYTES, read_bounded
from shyped.service.poolconfig import PoolConfig, PoolConfigError, parse_pool


class ConfigError(Exception):
    """A configuration file that cannot be used; the message names the file and the key."""


@attrs.frozen
class XenstoreConfig:
    transport: str = "unix"  # "unix" (xenstored socket) or "xenbus" (/dev/xen/xenbus)
    socket: Path = Path("/var/run/xenstored/socket")
    reconnect_max_backoff: float = 30.0


@attrs.frozen
class ActuatorConfig:
    kind: str = "xl"  # "xl" on a real dom0, "sandbox" for the sandbox toolstack
    xl: tuple[str, ...] = ("xl",)
    timeout: float = 30.0


@attrs.frozen
class ControlConfig:
    socket: Path = Path("/run/shyped/control.sock")
    read_group: str | None = None
    admin_group: str | None = None


@attrs.frozen
class MetricsConfig:
    """The ``[metrics]`` table (docs/metrics.md). Access control follows Prometheus'
    exporter web config: bcrypt-hashed `basic_auth_users` and/or a bearer token in a root-only
    file, TLS optional; with neither, the endpoint starts only if `allow_unauthenticated`."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9474
    allow_unauthenticated: bool = False
    basic_auth_users: tuple[tuple[str, str], ...] = ()  # (user, bcrypt hash)
    bearer_token_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    max_connections: int = 64
    max_connections_per_peer: int = 8
    idle_timeout: float = 10.0  # seconds without a byte from the client
    connection_timeout: float = 30.0  # seconds a connection may live at most (slowloris)
    fd_reserve: int = 128  # stop accepting when fewer descriptors than this are left

    @property
    def authenticated(self) -> bool:
        return bool(self.basic_auth_users) or self.bearer_token_file is not None


@attrs.frozen
class AuditConfig:
    """The ``[audit]`` table (docs/audit.md). The audit trail is on when the table is present
    (``enabled`` defaults to true there) and off without it; `shyped.service.auditlog.AuditSettings`
    is built from it by `settings`."""

    enabled: bool = False
    directory: Path = Path("/var/log/shyped/audit")
    max_file_bytes: int = 8 << 20
    keep_files: int = 16
    disk_full_action: str = "fail-closed"  # or "ignore"
    retry_interval: float = 5.0
    mirror_denials: bool = False
    group: str | None = None

    def settings(self) -> Any:
        """The `shyped.service.auditlog.AuditSettings` these keys stand for."""
        from shyped.service.auditlog import AuditSettings, DiskFullAction

        return AuditSettings(
            directory=self.directory,
            max_file_bytes=self.max_file_bytes,
            keep_files=self.keep_files,
            disk_full_action=DiskFullAction(self.disk_full_action),
            retry_interval=self.retry_interval,
            mirror_denials=self.mirror_denials,
            group=self.group,
        )


@attrs.frozen
class Config:
    """Everything `shyped` reads from its configuration file."""

    policy: Path
    labels: Path = Path("/var/lib/shyped/labels.json")
    mode: Mode = Mode.ENFORCING
    domain_veto: DomainVeto = DomainVeto.DESTROY
    #: How long a device veto waits for the backend to reach Closed (6) before removing the
    #: device anyway (libxl's LIBXL_DESTROY_TIMEOUT is 10 s).
    device_close_timeout: float = 10.0
    xenstore: XenstoreConfig = XenstoreConfig()
    actuator: ActuatorConfig = ActuatorConfig()
    control: ControlConfig = ControlConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    pool: PoolConfig = attrs.field(factory=PoolConfig)
    source: Path | None = None


_TOP_KEYS = {"policy", "enforcement", "xenstore", "actuator", "control", "metrics", "audit", "pool"}
_AUDIT_KEYS = {
    "enabled",
    "directory",
    "max_file_bytes",
    "keep_files",
    "disk_full_action",
    "retry_interval",
    "mirror_denials",
    "group",
}


def _table(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _get(
    table: dict[str, Any], section: str, key: str, kind: type, default: Any, where: str
) -> Any:
    if key not in table:
        return default
    value = table[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {section}.{key} must be a {kind.__name__}, not {value!r}")
    return value


def _seconds(
    table: dict[str, Any], section: str, key: str, default: float, where: str, top: float = 3600
) -> float:
    """A duration in seconds: finite, more than 0 and at most `top`."""
    value: float = _get(table, section, key, float, default, where)
    if not (math.isfinite(value) and 0 < value <= top):
        raise ConfigError(
            f"{where}: {section}.{key} must be in (0, {top:g}] seconds, not {value!r}"
        )
    return value


def _path(
    table: dict[str, Any], section: str, key: str, default: str, base: Path, where: str
) -> Path:
    """A path (relative to the config's folder) that names something: not empty, not ".",
    no NUL byte."""
    value: str = _get(table, section, key, str, default, where)
    if value.strip() in ("", ".", "./") or "\x00" in value:
        raise ConfigError(f"{where}: {section}.{key} must name a file, not {value!r}")
    return base / value


def _group(table: dict[str, Any], section: str, key: str, where: str) -> str | None:
    value: str | None = _get(table, section, key, str, None, where)
    if value is not None and not value.strip():
        raise ConfigError(f"{where}: {section}.{key} must name a group, not {value!r}")
    return value


def _check_unknown(table: dict[str, Any], section: str, known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) in [{section}]: {', '.join(unknown)}")


def _enum(cls: type[Enum], value: str, name: str, where: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{where}: {name} must be one of {choices}, not {value!r}") from None


def parse_config(text: str, source: Path | None = None) -> Config:
    """Parse and validate the text of a `shyped.toml`; relative paths are taken from its folder."""
    where = str(source) if source else "<config>"
    base = source.parent if source else Path.cwd()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deeply") from None
    _check_unknown(doc, "top level", _TOP_KEYS, where)

    pol = _table(doc, "policy", where)
    _check_unknown(pol, "policy", {"path", "labels"}, where)
    if "path" not in pol:
        raise ConfigError(f"{where}: policy.path is required")
    policy = _path(pol, "policy", "path", "", base, where)
    labels = _path(pol, "policy", "labels", "/var/lib/shyped/labels.json", base, where)

    enf = _table(doc, "enforcement", where)
    _check_unknown(enf, "enforcement", {"mode", "domain_veto", "device_close_timeout"}, where)
    mode = _enum(
        Mode, _get(enf, "enforcement", "mode", str, "enforcing", where), "enforcement.mode", where
    )
    veto = _enum(
        DomainVeto,
        _get(enf, "enforcement", "domain_veto", str, "destroy", where),
        "enforcement.domain_veto",
        where,
    )
    close_timeout = _seconds(enf, "enforcement", "device_close_timeout", 10.0, where)

    xs = _table(doc, "xenstore", where)
    _check_unknown(xs, "xenstore", {"transport", "socket", "reconnect_max_backoff"}, where)
    transport = _get(xs, "xenstore", "transport", str, "unix", where)
    if transport not in ("unix", "xenbus"):
        raise ConfigError(f"{where}: xenstore.transport must be 'unix' or 'xenbus'")
    backoff = _seconds(xs, "xenstore", "reconnect_max_backoff", 30.0, where)
    xenstore = XenstoreConfig(
        transport=transport,
        socket=_path(xs, "xenstore", "socket", "/var/run/xenstored/socket", base, where),
        reconnect_max_backoff=backoff,
    )

    act = _table(doc, "actuator", where)
    _check_unknown(act, "actuator", {"kind", "xl", "timeout"}, where)
    kind = _get(act, "actuator", "kind", str, "xl", where)
    if kind not in ("xl", "sandbox"):
        raise ConfigError(f"{where}: actuator.kind must be 'xl' or 'sandbox'")
    xl_raw = act.get("xl", "xl")
    if isinstance(xl_raw, str):
        xl_cmd: tuple[str, ...] = (xl_raw,)
    elif isinstance(xl_raw, list) and xl_raw and all(isinstance(a, str) for a in xl_raw):
        xl_cmd = tuple(xl_raw)
    else:
        raise ConfigError(f"{where}: actuator.xl must be a command string or a list of strings")
    if not xl_cmd[0].strip() or any("\x00" in a for a in xl_cmd):
        raise ConfigError(f"{where}: actuator.xl must name a command, not {xl_raw!r}")
    actuator = ActuatorConfig(
        kind=kind, xl=xl_cmd, timeout=_seconds(act, "actuator", "timeout", 30.0, where)
    )

    ctl = _table(doc, "control", where)
    _check_unknown(ctl, "control", {"socket", "read_group", "admin_group"}, where)
    control = ControlConfig(
        socket=_path(ctl, "control", "socket", "/run/shyped/control.sock", base, where),
        read_group=_group(ctl, "control", "read_group", where),
        admin_group=_group(ctl, "control", "admin_group", where),
    )

    metrics = _metrics(doc, base, where)
    audit = _audit(doc, base, where)
    try:
        pool = parse_pool(doc, base, where)
    except PoolConfigError as exc:
        raise ConfigError(str(exc)) from None
    return Config(
        policy=policy,
        labels=labels,
        mode=mode,
        domain_veto=veto,
        device_close_timeout=close_timeout,
        xenstore=xenstore,
        actuator=actuator,
        control=control,
        metrics=metrics,
        audit=audit,
        pool=pool,
        source=source,
    )


_METRICS_KEYS = {
    "enabled",
    "address",
    "port",
    "allow_unauthenticated",
    "basic_auth_users",
    "bearer_token_file",
    "tls_server_config",
    "max_connections",
    "max_connections_per_peer",
    "idle_timeout",
    "connection_timeout",
    "fd_reserve",
}
#: A bcrypt hash as htpasswd -B, Python's bcrypt and Prometheus' web config write it.
_BCRYPT = re.compile(r"\$2[aby]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def _metrics(doc: dict[str, Any], base: Path, where: str) -> MetricsConfig:
    met = _table(doc, "metrics", where)
    _check_unknown(met, "metrics", _METRICS_KEYS, where)

    def number(key: str, kind: type, default: Any, low: float, high: float) -> Any:
        value = _get(met, "metrics", key, kind, default, where)
        if not low <= value <= high:
            raise ConfigError(f"{where}: metrics.{key} must be in [{low}, {high}], not {value!r}")
        return value

    def path(table: dict[str, Any], section: str, key: str) -> Path | None:
        value = _get(table, section, key, str, None, where)
        if value == "":
            raise ConfigError(f"{where}: {section}.{key} must name a file")
        return None if value is None else base / value

    users = _table(met, "basic_auth_users", where + ": [metrics]")
    for user, hashed in users.items():
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            raise ConfigError(
                f"{where}: metrics.basic_auth_users.{user} must be a bcrypt hash "
                "(htpasswd -nBC 12 USER, or python3 -c 'import bcrypt; "
                'print(bcrypt.hashpw(b"PASSWORD", bcrypt.gensalt()).decode())\')'
            )
        if not user or ":" in user:
            raise ConfigError(f"{where}: metrics.basic_auth_users: {user!r} is not a user name")
    tls = _table(met, "tls_server_config", where + ": [metrics]")
    _check_unknown(tls, "metrics.tls_server_config", {"cert_file", "key_file"}, where)
    cert = path(tls, "metrics.tls_server_config", "cert_file")
    key = path(tls, "metrics.tls_server_config", "key_file")
    if (cert is None) != (key is None):
        raise ConfigError(f"{where}: metrics.tls_server_config needs both cert_file and key_file")
    port = _get(met, "metrics", "port", int, 9474, where)
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: metrics.port must be 0..65535")
    config = MetricsConfig(
        enabled=_get(met, "metrics", "enabled", bool, False, where),
        address=_get(met, "metrics", "address", str, "127.0.0.1", where),
        port=port,
        allow_unauthenticated=_get(met, "metrics", "allow_unauthenticated", bool, False, where),
        basic_auth_users=tuple(sorted(users.items())),
        bearer_token_file=path(met, "metrics", "bearer_token_file"),
        tls_cert_file=cert,
        tls_key_file=key,
        max_connections=number("max_connections", int, 64, 1, 10_000),
        max_connections_per_peer=number("max_connections_per_peer", int, 8, 1, 10_000),
        idle_timeout=number("idle_timeout", float, 10.0, 0.1, 3600),
        connection_timeout=number("connection_timeout", float, 30.0, 0.1, 86400),
        fd_reserve=number("fd_reserve", int, 128, 16, 1_000_000),
    )
    if config.enabled and not config.authenticated and not config.allow_unauthenticated:
        raise ConfigError(
            f"{where}: [metrics] is enabled without access control: set basic_auth_users "
            "and/or bearer_token_file (docs/metrics.md), or allow_unauthenticated = true to let "
            "every local user read the domains, UUIDs, labels and policy it exports"
        )
    return config


def _audit(doc: dict[str, Any], base: Path, where: str) -> AuditConfig:
    if "audit" not in doc:
        return AuditConfig()
    aud = _table(doc, "audit", where)
    _check_unknown(aud, "audit", _AUDIT_KEYS, where)
    size = _get(aud, "audit", "max_file_bytes", int, 8 << 20, where)
    if size < 1024:
        raise ConfigError(f"{where}: audit.max_file_bytes must be at least 1024")
    keep = _get(aud, "audit", "keep_files", int, 16, where)
    if keep < 0:
        raise ConfigError(f"{where}: audit.keep_files must be 0 (keep all) or more")
    action = _get(aud, "audit", "disk_full_action", str, "fail-closed", where)
    if action not in ("fail-closed", "ignore"):
        raise ConfigError(f"{where}: audit.disk_full_action must be 'fail-closed' or 'ignore'")
    retry = _seconds(aud, "audit", "retry_interval", 5.0, where)
    group = _group(aud, "audit", "group", where)
    return AuditConfig(
        enabled=_get(aud, "audit", "enabled", bool, True, where),
        directory=_path(aud, "audit", "directory", "/var/log/shyped/audit", base, where),
        max_file_bytes=size,
        keep_files=keep,
        disk_full_action=action,
        retry_interval=retry,
        mirror_denials=_get(aud, "audit", "mirror_denials", bool, False, where),
        group=group,
    )


def check_host(config: Config) -> None:
    """What start needs from this host beyond the file itself: every group named exists (a
    decimal gid is taken as is, as the control socket does). `ConfigError` naming the key."""
    where = str(config.source) if config.source else "<config>"
    for key, name in (
        ("control.read_group", config.control.read_group),
        ("control.admin_group", config.control.admin_group),
        ("audit.group", config.audit.group if config.audit.enabled else None),
    ):
        if name is None or name.isdecimal():
            continue
        try:
            grp.getgrnam(name)
        except KeyError:
            raise ConfigError(f"{where}: {key}: no group named {name!r}") from None


def load_config(path: Path) -> Config:
    """Read (at most `CONFIG_MAX_BYTES`, a regular file) and parse a configuration file; any
    problem is a `ConfigError` naming the file."""
    try:
        data = read_bounded(path, CONFIG_MAX_BYTES, "configuration")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration is not UTF-8 text") from None
    return parse_config(text, path)
