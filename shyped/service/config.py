"""The daemon's configuration file (`shyped.toml`), parsed and validated in one place.

Parsing is pure (text in, `Config` out) so that every mistake an operator can make is reported
with the file and key before the daemon touches xenstore. Defaults are the secure ones: fail
closed, enforcing, local sockets only.
"""

from __future__ import annotations

import difflib
import grp
import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any

import attrs

from shyped.core.modes import DomainVeto as DomainVeto
from shyped.core.modes import Mode as Mode
from shyped.fileio.boundedread import CONFIG_MAX_BYTES, read_bounded
from shyped.policy.toml_source import SourceIndex
from shyped.service.attestconfig import KEYS as ATTESTATION_KEYS
from shyped.service.attestconfig import AttestationConfig, parse_attestation
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
    metering_interval: float = 15.0  # seconds between two reads of the hypervisor's counters
    cpu_window: float = 60.0  # seconds the run-time CPU quota averages over

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
class LogConfig:
    """``[log]``: the daemon's own log on stderr (docs/operations.md, "The log")."""

    #: ``text`` (one line per event) or ``json`` (one JSON object per line).
    format: str = "text"
    #: Mirror denials to the Linux audit subsystem as USER_AVC when the kernel allows it.
    user_avc: bool = True


@attrs.frozen
class FlaskConfig:
    """Xen's FLASK (docs/flask.md): detected at start unless `enabled` is false; the policy
    is compiled with Xen's policy tree from `xen_source` (needed only when Xen has FLASK)."""

    enabled: bool = True
    xen_source: Path | None = None
    cache: Path = Path("/var/cache/shyped-flask")
    poll_interval: float = 2.0


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
    log: LogConfig = LogConfig()
    pool: PoolConfig = attrs.field(factory=PoolConfig)
    source: Path | None = None
    flask: FlaskConfig = FlaskConfig()
    attestation: AttestationConfig = attrs.field(factory=AttestationConfig)


_TOP_KEYS = (
    "policy", "enforcement", "xenstore", "actuator", "control", "metrics", "audit", "log",
    "flask", "pool", "attestation",
)  # fmt: skip
_KEYS: dict[str, tuple[str, ...]] = {
    "policy": ("path", "labels"),
    "enforcement": ("mode", "domain_veto", "device_close_timeout"),
    "xenstore": ("transport", "socket", "reconnect_max_backoff"),
    "actuator": ("kind", "xl", "timeout"),
    "control": ("socket", "read_group", "admin_group"),
    "metrics": (
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
        "metering_interval",
        "cpu_window",
    ),
    "metrics.tls_server_config": ("cert_file", "key_file"),
    "log": ("format", "user_avc"),
    "flask": ("enabled", "xen_source", "cache", "poll_interval"),
    "attestation": ATTESTATION_KEYS,
    "audit": (
        "enabled",
        "directory",
        "max_file_bytes",
        "keep_files",
        "disk_full_action",
        "retry_interval",
        "mirror_denials",
        "group",
    ),
}
#: A bcrypt hash as htpasswd -B, Python's bcrypt and Prometheus' web config write it.
_BCRYPT = re.compile(r"\$2[aby]?\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
#: Upper bounds for sizes and counts: beyond them a value is a typo, not a setting.
_MAX_FILE_BYTES = 1 << 30
_MAX_KEEP_FILES = 100_000


class _Checker:
    """Reads typed values out of the parsed document and collects every problem with its line
    (the TOML source index of `shyped.policy.toml_source`), instead of stopping at the first."""

    def __init__(self, doc: dict[str, Any], text: str, where: str, base: Path) -> None:
        self.doc = doc
        self.where = where
        self.base = base
        self.problems: list[tuple[int | None, str]] = []
        try:
            self.index: SourceIndex | None = SourceIndex(text)
        except (ValueError, IndexError):  # pragma: no cover - tomllib accepted the text
            self.index = None

    def bad(self, message: str, *path: str) -> None:
        line = None if self.index is None else self.index.line_of(tuple(path))
        self.problems.append((line, message))

    def error(self) -> ConfigError:
        lines = sorted(self.problems, key=lambda p: (p[0] is None, p[0] or 0))
        return ConfigError(
            "\n".join(f"{self.where}{'' if n is None else f':{n}'}: {msg}" for n, msg in lines)
        )

    def table(self, parent: dict[str, Any], key: str, *path: str) -> dict[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            self.bad(f"[{'.'.join((*path, key))}] must be a table", *path, key)
            return {}
        return value

    def known(self, table: dict[str, Any], section: str) -> None:
        top = section == "top level"
        allowed = _TOP_KEYS if top else _KEYS[section]
        path = () if top else tuple(section.split("."))
        shown = section if top else f"[{section}]"
        for key in table:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            self.bad(
                f"unknown key {key!r} in {shown} ({hint}known: {', '.join(allowed)})", *path, key
            )

    def get(self, table: dict[str, Any], section: str, key: str, kind: type, default: Any) -> Any:
        if key not in table:
            return default
        value = table[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.bad(
                f"{section}.{key} must be a {kind.__name__}, not {value!r}",
                *section.split("."),
                key,
            )
            return default
        return value

    def number(
        self, table: dict[str, Any], section: str, key: str, kind: type, default: Any,
        low: float, high: float,
    ) -> Any:  # fmt: skip
        value = self.get(table, section, key, kind, default)
        if not (math.isfinite(value) and low <= value <= high):
            self.bad(f"{section}.{key} must be in [{low:g}, {high:g}], not {value!r}", section, key)
            return default
        return value

    def seconds(
        self, table: dict[str, Any], section: str, key: str, default: float, top: float = 3600
    ) -> float:
        """A duration in seconds: finite, more than 0 and at most `top`."""
        value: float = self.get(table, section, key, float, default)
        if not (math.isfinite(value) and 0 < value <= top):
            self.bad(
                f"{section}.{key} must be in (0, {top:g}] seconds, not {value!r}", section, key
            )
            return default
        return value

    def path(
        self, table: dict[str, Any], section: str, key: str, default: str | None
    ) -> Path | None:
        """A path (relative to the config's folder) that names something: not empty, not
        ".", no NUL byte (None when absent and without a default, or bad)."""
        value: str | None = self.get(table, section, key, str, default)
        if value is None:
            return None
        if value.strip() in ("", ".", "./") or "\x00" in value:
            self.bad(f"{section}.{key} must name a file, not {value!r}", *section.split("."), key)
            return None
        return self.base / value

    def group(self, table: dict[str, Any], section: str, key: str) -> str | None:
        value: str | None = self.get(table, section, key, str, None)
        if value is not None and not value.strip():
            self.bad(f"{section}.{key} must name a group, not {value!r}", section, key)
            return None
        return value

    def choice(
        self, table: dict[str, Any], section: str, key: str, choices: tuple[str, ...], default: str
    ) -> str:
        value: str = self.get(table, section, key, str, default)
        if value not in choices:
            shown = ", ".join(repr(c) for c in choices)
            self.bad(f"{section}.{key} must be one of {shown}, not {value!r}", section, key)
            return default
        return value


_NOWHERE = Path("/nonexistent")


def parse_config(text: str, source: Path | None = None) -> Config:
    """Parse and validate the text of a `shyped.toml`; relative paths are taken from its folder.

    Every problem is reported at once (`ConfigError`, one ``file:line: message`` per line),
    unknown keys with a "did you mean". This is the one validation of the file: ``shyped
    check`` and start both come through it (`shyped.service.startcheck`)."""
    where = str(source) if source else "<config>"
    base = source.parent if source else Path.cwd()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: values nested too deeply") from None
    c = _Checker(doc, text, where, base)
    c.known(doc, "top level")

    pol = c.table(doc, "policy")
    c.known(pol, "policy")
    if "path" not in pol:
        c.bad('policy.path is required ([policy] path = "/etc/shyped/policy.toml")', "policy")
    policy = c.path(pol, "policy", "path", None) or _NOWHERE
    labels = c.path(pol, "policy", "labels", "/var/lib/shyped/labels.json") or _NOWHERE

    enf = c.table(doc, "enforcement")
    c.known(enf, "enforcement")
    mode = Mode(c.choice(enf, "enforcement", "mode", tuple(m.value for m in Mode), "enforcing"))
    vetoes = tuple(m.value for m in DomainVeto)
    veto = DomainVeto(c.choice(enf, "enforcement", "domain_veto", vetoes, "destroy"))
    close_timeout = c.seconds(enf, "enforcement", "device_close_timeout", 10.0)

    xs = c.table(doc, "xenstore")
    c.known(xs, "xenstore")
    xenstore = XenstoreConfig(
        transport=c.choice(xs, "xenstore", "transport", ("unix", "xenbus"), "unix"),
        socket=c.path(xs, "xenstore", "socket", "/var/run/xenstored/socket") or _NOWHERE,
        reconnect_max_backoff=c.seconds(xs, "xenstore", "reconnect_max_backoff", 30.0),
    )

    act = c.table(doc, "actuator")
    c.known(act, "actuator")
    kind = c.choice(act, "actuator", "kind", ("xl", "sandbox"), "xl")
    xl_raw = act.get("xl", "xl")
    xl_cmd: tuple[str, ...] = ("xl",)
    if isinstance(xl_raw, str):
        xl_cmd = (xl_raw,)
    elif isinstance(xl_raw, list) and xl_raw and all(isinstance(a, str) for a in xl_raw):
        xl_cmd = tuple(xl_raw)
    else:
        c.bad("actuator.xl must be a command string or a list of strings", "actuator", "xl")
    if not xl_cmd[0].strip() or any("\x00" in a for a in xl_cmd):
        c.bad(f"actuator.xl must name a command, not {xl_raw!r}", "actuator", "xl")
    actuator = ActuatorConfig(
        kind=kind, xl=xl_cmd, timeout=c.seconds(act, "actuator", "timeout", 30.0)
    )

    ctl = c.table(doc, "control")
    c.known(ctl, "control")
    control = ControlConfig(
        socket=c.path(ctl, "control", "socket", "/run/shyped/control.sock") or _NOWHERE,
        read_group=c.group(ctl, "control", "read_group"),
        admin_group=c.group(ctl, "control", "admin_group"),
    )

    metrics = _metrics(c)
    audit = _audit(c)
    log = _log_config(c)
    flask = _flask_config(c)
    attestation = parse_attestation(c)
    try:
        pool = parse_pool(doc, base, where)
    except PoolConfigError as exc:
        c.bad(str(exc).removeprefix(f"{where}: "), "pool")
        pool = PoolConfig()
    if c.problems:
        raise c.error()
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
        log=log,
        pool=pool,
        source=source,
        flask=flask,
        attestation=attestation,
    )


def _log_config(c: _Checker) -> LogConfig:
    log = c.table(c.doc, "log")
    c.known(log, "log")
    return LogConfig(
        format=c.choice(log, "log", "format", ("text", "json"), "text"),
        user_avc=c.get(log, "log", "user_avc", bool, True),
    )


def _flask_config(c: _Checker) -> FlaskConfig:
    fl = c.table(c.doc, "flask")
    c.known(fl, "flask")
    env_source = os.environ.get("SHYPED_XEN_SOURCE") or None
    return FlaskConfig(
        enabled=c.get(fl, "flask", "enabled", bool, True),
        xen_source=c.path(fl, "flask", "xen_source", None)
        if "xen_source" in fl
        else (Path(env_source) if env_source else None),
        cache=c.path(fl, "flask", "cache", "/var/cache/shyped-flask") or _NOWHERE,
        poll_interval=c.seconds(fl, "flask", "poll_interval", 2.0),
    )


def loopback_problem(address: str) -> str | None:
    """Why `address` may not serve metrics (anything but a loopback IP: the series name
    domains, labels, uuids), or None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"metrics.address {address!r} is not an IP address"
    if not ip.is_loopback:
        return (
            f"metrics.address {address!r} is not a loopback address; the endpoint is for a "
            "local Prometheus (or a local proxy) only"
        )
    return None


def _metrics(c: _Checker) -> MetricsConfig:
    met = c.table(c.doc, "metrics")
    c.known(met, "metrics")
    users = c.table(met, "basic_auth_users", "metrics")
    good_users: list[tuple[str, str]] = []
    for user, hashed in users.items():
        at = ("metrics", "basic_auth_users", user)
        if not isinstance(hashed, str) or not _BCRYPT.fullmatch(hashed):
            c.bad(
                f"metrics.basic_auth_users.{user} must be a bcrypt hash "
                "(htpasswd -nBC 12 USER, or python3 -c 'import bcrypt; "
                'print(bcrypt.hashpw(b"PASSWORD", bcrypt.gensalt()).decode())\')',
                *at,
            )
        elif not user or ":" in user:
            c.bad(f"metrics.basic_auth_users: {user!r} is not a user name", *at)
        else:
            good_users.append((user, hashed))
    tls = c.table(met, "tls_server_config", "metrics")
    c.known(tls, "metrics.tls_server_config")
    cert = c.path(tls, "metrics.tls_server_config", "cert_file", None)
    key = c.path(tls, "metrics.tls_server_config", "key_file", None)
    if ("cert_file" in tls) != ("key_file" in tls):
        c.bad(
            "metrics.tls_server_config needs both cert_file and key_file",
            "metrics",
            "tls_server_config",
        )
    address = c.get(met, "metrics", "address", str, "127.0.0.1")
    why = loopback_problem(address)
    if why is not None:
        c.bad(why, "metrics", "address")
    config = MetricsConfig(
        enabled=c.get(met, "metrics", "enabled", bool, False),
        address=address,
        port=c.number(met, "metrics", "port", int, 9474, 0, 65535),
        allow_unauthenticated=c.get(met, "metrics", "allow_unauthenticated", bool, False),
        basic_auth_users=tuple(sorted(good_users)),
        bearer_token_file=c.path(met, "metrics", "bearer_token_file", None),
        tls_cert_file=cert,
        tls_key_file=key,
        max_connections=c.number(met, "metrics", "max_connections", int, 64, 1, 10_000),
        max_connections_per_peer=c.number(
            met, "metrics", "max_connections_per_peer", int, 8, 1, 10_000
        ),
        idle_timeout=c.number(met, "metrics", "idle_timeout", float, 10.0, 0.1, 3600),
        connection_timeout=c.number(met, "metrics", "connection_timeout", float, 30.0, 0.1, 86400),
        fd_reserve=c.number(met, "metrics", "fd_reserve", int, 128, 16, 1_000_000),
        metering_interval=c.number(met, "metrics", "metering_interval", float, 15.0, 1, 3600),
        cpu_window=c.number(met, "metrics", "cpu_window", float, 60.0, 5, 86400),
    )
    # Access control counts as set when it was written, even if badly (reported above).
    written = bool(users) or "bearer_token_file" in met
    if config.enabled and not written and not config.allow_unauthenticated:
        c.bad(
            "[metrics] is enabled without access control: set basic_auth_users "
            "and/or bearer_token_file (docs/metrics.md), or allow_unauthenticated = true to let "
            "every local user read the domains, UUIDs, labels and policy it exports",
            "metrics",
        )
    return config


def _audit(c: _Checker) -> AuditConfig:
    if "audit" not in c.doc:
        return AuditConfig()
    aud = c.table(c.doc, "audit")
    c.known(aud, "audit")
    size = c.get(aud, "audit", "max_file_bytes", int, 8 << 20)
    if not 1024 <= size <= _MAX_FILE_BYTES:
        c.bad(
            f"audit.max_file_bytes must be at least 1024 and at most {_MAX_FILE_BYTES} (1 GiB), "
            f"not {size}",
            "audit",
            "max_file_bytes",
        )
    keep = c.get(aud, "audit", "keep_files", int, 16)
    if not 0 <= keep <= _MAX_KEEP_FILES:
        c.bad(f"audit.keep_files must be 0 (keep all) to {_MAX_KEEP_FILES}", "audit", "keep_files")
    action = c.choice(aud, "audit", "disk_full_action", ("fail-closed", "ignore"), "fail-closed")
    return AuditConfig(
        enabled=c.get(aud, "audit", "enabled", bool, True),
        directory=c.path(aud, "audit", "directory", "/var/log/shyped/audit") or _NOWHERE,
        max_file_bytes=size,
        keep_files=keep,
        disk_full_action=action,
        retry_interval=c.seconds(aud, "audit", "retry_interval", 5.0),
        mirror_denials=c.get(aud, "audit", "mirror_denials", bool, False),
        group=c.group(aud, "audit", "group"),
    )


def check_host(config: Config) -> None:
    """What start needs from this host beyond the file itself: every group named exists (a
    decimal gid is taken as is, as the control socket does). `ConfigError` naming every
    missing one."""
    where = str(config.source) if config.source else "<config>"
    missing = []
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
            missing.append(f"{where}: {key}: no group named {name!r}")
    if missing:
        raise ConfigError("\n".join(missing))


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
