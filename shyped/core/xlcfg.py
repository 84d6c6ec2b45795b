"""A small, safe parser for xl domain configuration files (xl.cfg(5)) and device specs.

Why: the sandbox toolstack must accept the same files an operator gives `xl create`, and the
daemon's wrapper reads the security label out of them.  The file itself is read by
`shyped.core.xlcfgfile` exactly as libxl reads it, or refused (never `eval`).  Disk specs follow
xl-disk-configuration(5) (key=value or positional `target,format,vdev,access`, deprecated
`phy:`/`file:` prefixes) and vif specs xl-network-configuration(5).

Security labels: the xl.cfg(5) of Xen 4.17 knows `seclabel` / `init_seclabel` (FLASK contexts
handed to libxl as `c_info.ssid_label` / `b_info.exec_ssid_label`, see tools/xl/xl_parse.c
parse_config_data).  Without XSM (Debian), libxl logs "XSM Disabled: seclabel not supported" and
goes on (tools/libs/light/libxl_create.c libxl__domain_config_setdefault): **no xenstore node
is written for a label**.  `access_control = ['policy=P,label=L']` is the xm/xend-era ACM syntax;
xl 4.17 ignores it (it is not read anywhere in tools/xl).  We parse both ACM forms
(`seclabel = "ACM:policy:label"` and `access_control`) into :class:`SecurityLabel` for the
daemon's wrapper, and the sandbox toolstack, like libxl, writes nothing for them.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Mapping
from typing import Final, Literal

import attrs

from shyped.core.xlcfgfile import CfgValue, XlConfigError, parse_assignments

__all__ = ["CfgValue", "XlConfigError", "parse_assignments"]


# -- labels --------------------------------------------------------------------------------


@attrs.frozen
class SecurityLabel:
    """An sHype/ACM label `ACM:<policy>:<label>` as the Xen 3.x tools wrote it."""

    policy: str
    label: str

    def __str__(self) -> str:
        return f"ACM:{self.policy}:{self.label}"


_LABEL_PART = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_acm_label(text: str) -> SecurityLabel:
    """`ACM:policy:label` (the scheme prefix is required) -> SecurityLabel."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "ACM":
        raise XlConfigError(f"label {text!r} is not of the form ACM:<policy>:<label>")
    return SecurityLabel(_label_part(parts[1], text), _label_part(parts[2], text))


def _label_part(part: str, whole: str) -> str:
    if not _LABEL_PART.match(part):
        raise XlConfigError(f"label {whole!r}: bad policy or label name {part!r}")
    return part


def parse_access_control(entries: list[str | int]) -> SecurityLabel:
    """xm's `access_control = ['policy=P,label=L']` -> SecurityLabel."""
    if len(entries) != 1 or not isinstance(entries[0], str):
        raise XlConfigError("access_control must be a list with one 'policy=P,label=L' string")
    fields = _key_values(entries[0], "access_control")
    if set(fields) != {"policy", "label"}:
        raise XlConfigError("access_control needs exactly policy= and label=")
    whole = entries[0]
    return SecurityLabel(_label_part(fields["policy"], whole), _label_part(fields["label"], whole))


# -- devices -------------------------------------------------------------------------------

_DISK_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
_DEPRECATED_PREFIXES = {
    "phy:": ("raw", "phy"),
    "file:": ("raw", None),
    "raw:": ("raw", None),
    "aio:": ("raw", None),
    "tap:aio:": ("raw", None),
    "tap2:aio:": ("raw", None),
    "qcow:": ("qcow", None),
    "qcow2:": ("qcow2", None),
    "tap:qcow2:": ("qcow2", None),
    "vhd:": ("vhd", None),
    "tap:vhd:": ("vhd", None),
}


@attrs.frozen
class DiskSpec:
    """One `disk=[...]` entry, as xl parsed it (libxl_device_disk before setdefault)."""

    target: str
    vdev: str
    format: str = "raw"
    readwrite: bool = True
    cdrom: bool = False
    script: str | None = None
    backend_domid: int = 0
    backendtype: str | None = None  # phy / qdisk / tap (None: libxl picks)
    discard: bool = True
    trusted: bool = True


def _exact_target(spec: str, target: str) -> str:
    """A disk target as libxl keeps it (``libxlu_disk_l.l``: blanks before a parameter are
    skipped, blanks after it are part of it), refused when the two readings could differ:
    ``/img/a.img `` (trailing blank) is another file than ``/img/a.img``."""
    body = target.lstrip(" \t\n")
    if body != body.rstrip() or any(ord(c) < 0x20 or c == "\x7f" for c in body):
        raise XlConfigError(
            f"disk spec {spec!r}: the target {body!r} has trailing blanks or control "
            "characters; refused (libxl would open the name with them)"
        )
    return body


def parse_disk_spec(spec: str) -> DiskSpec:
    """Parse an xl-disk-configuration(5) string (positional and/or key=value)."""
    target: str | None = None
    fmt: str | None = None
    vdev: str | None = None
    access: str | None = None
    values: dict[str, str] = {}
    flags: set[str] = set()
    raw = spec.split(",")
    tokens = [t.strip() for t in raw]
    for idx, token in enumerate(tokens):
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip()
            if key == "target":
                # target= swallows the rest of the string, commas included (xl-disk-config(5)),
                # and libxl keeps its blanks: never strip them (see _exact_target).
                target = _exact_target(spec, ",".join([raw[idx].split("=", 1)[1], *raw[idx + 1 :]]))
                break
            values[key] = value.strip()
            continue
        if token in ("cdrom", "devtype=cdrom", "discard", "no-discard", "direct-io-safe"):
            flags.add(token)
            continue
        if token in ("trusted", "untrusted"):
            flags.add(token)
            continue
        # Positional: target, format, vdev, access in order; empty means "default".
        if target is None:
            target = _exact_target(spec, raw[idx])
            for prefix, (pfx_format, _backend) in _DEPRECATED_PREFIXES.items():
                if target.startswith(prefix):
                    target = target[len(prefix) :]
                    fmt = pfx_format
                    if _backend:
                        values.setdefault("backendtype", _backend)
                    break
        elif fmt is None:
            fmt = token or "raw"
        elif vdev is None:
            vdev = token
        elif access is None:
            access = token
        else:
            raise XlConfigError(f"disk spec {spec!r}: too many positional parameters")
    fmt = values.pop("format", fmt or "raw")
    vdev = values.pop("vdev", vdev)
    access = values.pop("access", access or "rw")
    devtype = values.pop("devtype", "disk")
    script = values.pop("script", None)
    backend = values.pop("backend", "0")
    backendtype = values.pop("backendtype", None)
    if values:
        raise XlConfigError(f"disk spec {spec!r}: unknown key(s) {', '.join(sorted(values))}")
    if vdev and vdev.endswith(":cdrom"):
        vdev, devtype = vdev[: -len(":cdrom")], "cdrom"
    if "cdrom" in flags or "devtype=cdrom" in flags:
        devtype = "cdrom"
    if not vdev:
        raise XlConfigError(f"disk spec {spec!r}: no vdev")
    if fmt not in _DISK_FORMATS:
        raise XlConfigError(f"disk spec {spec!r}: unknown format {fmt!r}")
    if access not in ("r", "ro", "w", "rw"):
        raise XlConfigError(f"disk spec {spec!r}: access must be r, ro, w or rw")
    if devtype not in ("disk", "cdrom"):
        raise XlConfigError(f"disk spec {spec!r}: devtype must be disk or cdrom")
    if not target and devtype != "cdrom":
        raise XlConfigError(f"disk spec {spec!r}: no target")
    if backendtype not in (None, "phy", "qdisk", "tap", "standalone"):
        raise XlConfigError(f"disk spec {spec!r}: unknown backendtype {backendtype!r}")
    return DiskSpec(
        target=target or "",
        vdev=vdev,
        format=fmt,
        readwrite=access in ("w", "rw") and devtype != "cdrom",
        cdrom=devtype == "cdrom",
        script=script,
        backend_domid=_int(backend, f"disk spec {spec!r}: backend"),
        backendtype=backendtype,
        discard="no-discard" not in flags,
        trusted="untrusted" not in flags,
    )


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


@attrs.frozen
class VifSpec:
    """One `vif=[...]` entry (libxl_device_nic before setdefault; None = libxl's default)."""

    mac: str | None = None
    bridge: str | None = None
    script: str | None = None
    ip: str | None = None
    vifname: str | None = None
    backend_domid: int = 0
    rate: str | None = None
    mtu: int | None = None
    gatewaydev: str | None = None
    devid: int | None = None
    model: str | None = None
    type: str | None = None
    trusted: bool = True


_VIF_KEYS = {
    "mac",
    "bridge",
    "script",
    "ip",
    "vifname",
    "backend",
    "rate",
    "mtu",
    "gatewaydev",
    "devid",
    "model",
    "type",
}


def parse_vif_spec(spec: str) -> VifSpec:
    """Parse an xl-network-configuration(5) string of key=value pairs."""
    fields: dict[str, str] = {}
    trusted = True
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token in ("trusted", "untrusted"):
            trusted = token == "trusted"
            continue
        if "=" not in token:
            raise XlConfigError(f"vif spec {spec!r}: {token!r} is not key=value")
        key, _, value = token.partition("=")
        key = key.strip()
        if key not in _VIF_KEYS:
            raise XlConfigError(f"vif spec {spec!r}: unknown key {key!r}")
        fields[key] = value.strip()
    mac = fields.get("mac")
    if mac is not None and not _MAC.match(mac):
        raise XlConfigError(f"vif spec {spec!r}: bad mac {mac!r}")
    return VifSpec(
        mac=mac.lower() if mac else None,
        bridge=fields.get("bridge"),
        script=fields.get("script"),
        ip=fields.get("ip"),
        vifname=fields.get("vifname"),
        backend_domid=_int(fields.get("backend", "0"), f"vif spec {spec!r}: backend"),
        rate=fields.get("rate"),
        mtu=_int(fields["mtu"], f"vif spec {spec!r}: mtu") if "mtu" in fields else None,
        gatewaydev=fields.get("gatewaydev"),
        devid=_int(fields["devid"], f"vif spec {spec!r}: devid") if "devid" in fields else None,
        model=fields.get("model"),
        type=fields.get("type"),
        trusted=trusted,
    )


def _key_values(text: str, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for token in (t.strip() for t in text.split(",")):
        if not token:
            continue
        key, sep, value = token.partition("=")
        if not sep:
            raise XlConfigError(f"{what}: {token!r} is not key=value")
        out[key.strip()] = value.strip()
    return out


_INT: Final = re.compile(r"0|[1-9][0-9]{0,17}|0[xX][0-9a-fA-F]{1,15}")


def _int(text: str, what: str) -> int:
    """A non-negative number as libxl's strtol(…, 0) reads it, for the unambiguous forms only:
    decimal without a leading 0, or 0x hex (no sign, blank, octal, or Python's ``1_0``)."""
    if not _INT.fullmatch(text):
        raise XlConfigError(f"{what}: {text!r} is not a plain decimal or 0x number")
    return int(text, 0)


# -- the domain ----------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


@attrs.frozen
class DomainConfig:
    """What the sandbox toolstack needs from an xl.cfg (PV guests only, like the capture)."""

    name: str
    uuid: str
    memory_mb: int = 128
    maxmem_mb: int | None = None
    vcpus: int = 1
    maxvcpus: int | None = None
    type: Literal["pv"] = "pv"
    kernel: str | None = None
    ramdisk: str | None = None
    cmdline: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    #: The ACM label from `seclabel="ACM:..."` or `access_control=[...]` (never in xenstore).
    label: SecurityLabel | None = None
    #: `seclabel` (or `init_seclabel`) verbatim, whatever its scheme: what xl hands libxl as
    #: c_info.ssid_label; libxl only warns about it without XSM.
    seclabel: str | None = None

    @property
    def max_memkb(self) -> int:
        return (self.maxmem_mb or self.memory_mb) * 1024

    @property
    def target_memkb(self) -> int:
        return self.memory_mb * 1024

    @property
    def max_vcpus(self) -> int:
        return self.maxvcpus or self.vcpus


def domain_config_from_text(
    text: str, filename: str = "<xl.cfg>", fresh_uuid: str | None = None
) -> DomainConfig:
    """Parse an xl.cfg into a DomainConfig (a missing uuid gets ``fresh_uuid`` or a random one)."""
    return domain_config_from_values(parse_assignments(text, filename), filename, fresh_uuid)


def domain_config_from_values(
    values: Mapping[str, CfgValue], filename: str = "<xl.cfg>", fresh_uuid: str | None = None
) -> DomainConfig:
    """Build a DomainConfig from parsed assignments, checking what xl checks."""

    def string(key: str) -> str | None:
        value = values.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise XlConfigError(f"{filename}: {key} must be a string")
        return value

    def number(key: str) -> int | None:
        value = values.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            value = _int(value, f"{filename}: {key}")
        if not isinstance(value, int) or value < 0:
            raise XlConfigError(f"{filename}: {key} must be a non-negative integer")
        return value

    def strings(key: str) -> list[str]:
        value = values.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise XlConfigError(f"{filename}: {key} must be a list of strings")
        return [str(v) for v in value]

    name = string("name")
    if not name:
        raise XlConfigError(f"{filename}: domain name must be specified")
    if not _NAME.match(name):
        raise XlConfigError(f"{filename}: name {name!r} has characters xl would not expect")
    dom_type = string("type") or ("pv" if values.get("builder") in (None, "generic") else None)
    if dom_type != "pv":
        raise XlConfigError(f"{filename}: the sandbox toolstack builds PV guests only")
    raw_uuid = string("uuid") or fresh_uuid or str(uuidlib.uuid4())
    try:
        canonical_uuid = str(uuidlib.UUID(raw_uuid))
    except ValueError:
        raise XlConfigError(f"{filename}: uuid {raw_uuid!r} is not a UUID") from None

    label: SecurityLabel | None = None
    seclabel = string("init_seclabel") or string("seclabel")
    if seclabel is not None and seclabel.startswith("ACM:"):
        label = parse_acm_label(seclabel)
    if "access_control" in values:
        acl = values["access_control"]
        if not isinstance(acl, list):
            raise XlConfigError(f"{filename}: access_control must be a list")
        from_acl = parse_access_control(acl)
        if label is not None and label != from_acl:
            raise XlConfigError(f"{filename}: seclabel and access_control name different labels")
        label = from_acl

    memory = number("memory")
    vcpus = number("vcpus")
    cmdline = string("cmdline")
    if cmdline is None:
        parts = [p for p in (string("root"), string("extra")) if p]
        if string("root"):
            parts[0] = f"root={parts[0]}"
        cmdline = " ".join(parts) or None
    return DomainConfig(
        name=name,
        uuid=canonical_uuid,
        memory_mb=memory if memory is not None else 128,
        maxmem_mb=number("maxmem"),
        vcpus=vcpus if vcpus is not None else 1,
        maxvcpus=number("maxvcpus"),
        kernel=string("kernel"),
        ramdisk=string("ramdisk"),
        cmdline=cmdline,
        disks=tuple(parse_disk_spec(d) for d in strings("disk")),
        vifs=tuple(parse_vif_spec(v) for v in strings("vif")),
        on_poweroff=string("on_poweroff") or "destroy",
        on_reboot=string("on_reboot") or "restart",
        on_crash=string("on_crash") or "destroy",
        label=label,
        seclabel=seclabel,
    )
