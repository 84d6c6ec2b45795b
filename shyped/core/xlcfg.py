"""A small, safe parser for xl domain configuration files (xl.cfg(5)) and device specs.

Why: the sandbox toolstack must accept the same files an operator gives `xl create`, and the
daemon's wrapper reads the security label out of them.  The file itself is read by
`shyped.core.xlcfgfile` exactly as libxl reads it, or refused (never `eval`).  Disk specs are read
as libxlutil 4.17's ``xlu_disk_parse`` reads them (xl-disk-configuration(5): key=value or
positional `target,format,vdev,access`, deprecated `phy:`/`file:`/`raw:`… prefixes), or refused
(tests/test_xlcfg_differential_disk.py); vif specs follow xl-network-configuration(5).

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
from collections.abc import Mapping, Sequence
from typing import Final, Literal

import attrs

from shyped.core.xlcfgfile import CfgValue, XlConfigError, parse_assignments
from shyped.core.xlcfgpci import parse_pci_spec

__all__ = ["CfgValue", "XlConfigError", "parse_assignments"]


# -- labels --------------------------------------------------------------------------------


@attrs.frozen
class SecurityLabel:
    """An sHype/ACM label `ACM:<policy>:<label>` as the Xen 3.x tools wrote it."""

    policy: str
    label: str

    def __str__(self) -> str:
        return f"ACM:{self.policy}:{self.label}"


_LABEL_PART = re.compile(r"^[A-Za-z0-9_.\-]+\Z")


def parse_acm_label(text: str) -> SecurityLabel:
    """`ACM:policy:label` (the scheme prefix is required) -> SecurityLabel."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "ACM":
        raise XlConfigError(f"label {text!r} is not of the form ACM:<policy>:<label>")
    return SecurityLabel(_label_part(parts[1], text), _label_part(parts[2], text))


def _label_part(part: str, whole: str) -> str:
    if not _LABEL_PART.fullmatch(part):
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
_BACKENDTYPES = ("phy", "tap", "qdisk", "standalone")
# The deprecated `word:` prefixes libxlutil 4.17 knows (xl-disk-configuration(5)): a format,
# a block script (`nbd:` is `script=block-nbd`), or nothing at all (`phy:`, `file:` …: libxl
# picks the backend from the target, the prefix does not choose it).
_FORMAT_PREFIXES = ("raw", "qcow", "qcow2", "vhd")
_SCRIPT_PREFIXES = ("iscsi", "nbd", "enbd", "drbd")
_PLAIN_PREFIXES = ("tapdisk", "tap", "tap2", "aio", "ioemu", "file", "phy")
_PREFIX = re.compile(r"([a-z][a-z0-9]*):")
_DISK_KEYS = ("format", "access", "backend", "backendtype", "vdev", "script", "devtype")
# (`trusted`/`untrusted` came after 4.17: libxlutil 4.17 reads them as positional parameters)
_DISK_FLAGS = ("cdrom", "discard", "no-discard", "direct-io-safe")
_VDEV = re.compile(r"[A-Za-z0-9]+")
_DOMID = re.compile(r"0|[1-9][0-9]{0,4}")
_DOMID_FIRST_RESERVED = 0x7FF0


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
    backendtype: str | None = None  # phy / qdisk / tap / standalone (None: libxl picks)
    discard: bool = True
    trusted: bool = True


@attrs.define
class _DiskParse:
    """The reading so far (libxlutil's DiskParseContext + libxl_device_disk, in Python)."""

    spec: str
    target: str | None = None
    vdev: str | None = None
    format: str | None = None
    backendtype: str | None = None
    script: str | None = None
    backend: str | None = None
    readwrite: bool = True
    cdrom: bool = False
    had_prefix: bool = False
    access_set: bool = False
    flags: dict[str, bool] = attrs.Factory(dict)

    def fail(self, why: str) -> XlConfigError:
        return XlConfigError(f"disk spec {self.spec!r}: {why}")

    def save(self, what: str, value: str) -> None:
        """A string parameter: set once (an empty one may be set again), as libxl does."""
        if getattr(self, what):
            raise self.fail(f"{what} given twice")
        setattr(self, what, value)

    def set_format(self, value: str) -> None:
        fmt = value or "raw"
        if fmt not in _DISK_FORMATS:
            raise self.fail(f"unknown format {value!r}")
        if self.format not in (None, fmt):
            raise self.fail(f"format given twice ({self.format!r}, {fmt!r})")
        self.format = fmt

    def set_access(self, value: str) -> None:
        if value not in ("r", "ro", "w", "rw", ""):
            raise self.fail(f"access must be r, ro, w or rw, not {value!r}")
        self.readwrite = value not in ("r", "ro")

    def set_backendtype(self, value: str) -> None:
        if value not in _BACKENDTYPES:
            raise self.fail(f"unknown backendtype {value!r}")
        if self.backendtype not in (None, value):
            raise self.fail("backendtype given twice")
        self.backendtype = value

    def vdev_and_devtype(self, value: str) -> bool:
        """`hdc:cdrom` / `xvda:disk` (deprecated): True if `value` had the colon."""
        vdev, colon, devtype = value.rpartition(":")
        if not colon:
            return False
        if devtype not in ("cdrom", "disk"):
            raise self.fail(f"unknown device type {devtype!r} in {value!r}")
        self.save("vdev", vdev)
        self.cdrom = devtype == "cdrom"
        return True

    def key(self, key: str, value: str) -> None:
        if key == "format":
            self.set_format(value)
        elif key == "access":
            self.set_access(value)
        elif key == "backendtype":
            self.set_backendtype(value)
        elif key == "devtype":
            if value not in ("cdrom", "disk"):
                raise self.fail(f"devtype must be cdrom or disk, not {value!r}")
            self.cdrom = value == "cdrom"
        else:  # vdev, script, backend: strings
            self.save(key, value)

    def positional(self, value: str) -> None:
        """target, format, vdev, access in that order; a slot already filled (format by a
        prefix or format=, vdev by vdev=) is skipped."""
        if self.target is None:
            self.target = value
        elif not self.had_prefix and self.format is None:
            if self.target == "" and self.vdev_and_devtype(value):
                self.format = "empty"
            else:
                self.set_format(value)
        elif self.vdev is None:
            if not self.vdev_and_devtype(value):
                self.save("vdev", value)
        elif not self.access_set:
            self.access_set = True
            self.set_access(value)
        else:
            raise self.fail("too many positional parameters")

    def scan(self, text: str) -> None:
        pos = 0
        while True:
            # blanks before a parameter are skipped; blanks after it or after `=` are kept
            while pos < len(text) and text[pos] == " ":
                pos += 1
            if pos >= len(text):
                return
            rest = text[pos:]
            if rest.startswith("target="):
                # target= swallows the rest of the spec, commas included, less one final comma
                value = rest[len("target=") :]
                self.save("target", value[:-1] if value.endswith(",") else value)
                return
            prefix = _PREFIX.match(rest)
            if prefix:
                word, after = prefix[1], rest[prefix.end() : prefix.end() + 1]
                if word in _FORMAT_PREFIXES + _SCRIPT_PREFIXES + _PLAIN_PREFIXES:
                    if word in _FORMAT_PREFIXES:
                        self.set_format(word)
                    elif word in _SCRIPT_PREFIXES:
                        self.save("script", f"block-{word}")
                    self.had_prefix = True
                    pos += prefix.end()
                    continue
                if not re.fullmatch(r"[a-z0-9]", after):
                    raise self.fail(f"unknown prefix {word + ':'!r}")
            token, comma, _ = rest.partition(",")
            pos += len(token) + len(comma)
            key, equals, value = token.partition("=")
            if equals:
                if key not in _DISK_KEYS:
                    raise self.fail(f"unknown or unsupported parameter {key!r}")
                self.key(key, value)
            elif token in ("colo", "no-colo"):
                raise self.fail(f"{token!r}: COLO is not supported")
            elif token == "cdrom":
                self.cdrom = True
            elif token in _DISK_FLAGS:
                self.flags[token.removeprefix("no-")] = not token.startswith("no-")
            else:
                self.positional(token)

    def result(self) -> DiskSpec:
        fmt = self.format or "raw"
        if self.cdrom and not self.target:
            fmt = "empty"
        if self.vdev is None:
            raise self.fail("no vdev")
        if not _VDEV.fullmatch(self.vdev):
            raise self.fail(f"vdev {self.vdev!r} is not letters and digits")
        if not self.target and not self.cdrom:
            raise self.fail("no target")
        target = self.target or ""
        if target != target.strip(" "):
            raise self.fail(
                f"the target {target!r} has leading or trailing blanks; refused (libxl would "
                "open the name with them)"
            )
        if self.script is not None and not re.fullmatch(r"[^\s]+", self.script):
            raise self.fail(f"script {self.script!r} is empty or has blanks")
        backend = 0
        if self.backend is not None:
            if not _DOMID.fullmatch(self.backend) or int(self.backend) >= _DOMID_FIRST_RESERVED:
                raise self.fail(f"backend {self.backend!r} is not a domid (plain decimal)")
            backend = int(self.backend)
        return DiskSpec(
            target=target,
            vdev=self.vdev,
            format=fmt,
            readwrite=self.readwrite and not self.cdrom,
            cdrom=self.cdrom,
            script=self.script,
            backend_domid=backend,
            backendtype=self.backendtype,
            discard=self.flags.get("discard", True),
        )


def parse_disk_spec(spec: str) -> DiskSpec:
    """Parse an xl-disk-configuration(5) string as libxlutil 4.17's ``xlu_disk_parse`` does
    (checked against it in tests/test_xlcfg_differential_disk.py), or refuse it."""
    return parse_disk_specs([spec])


def parse_disk_specs(specs: Sequence[str]) -> DiskSpec:
    """Several specs making one disk, as ``xl block-attach DOM SPEC…`` hands them to
    ``xlu_disk_parse``: each is scanned on its own (a ``target=`` ends at its spec's end), into
    one reading.

    Refused besides what libxl refuses: control characters anywhere, a target with leading or
    trailing blanks or empty (non-cdrom), a vdev other than letters and digits, a backend
    other than a decimal domid, the COLO and ``specification=`` parameters."""
    state = _DiskParse(", ".join(repr(s) for s in specs) if len(specs) != 1 else specs[0])
    for spec in specs:
        bad = [c for c in spec if ord(c) < 0x20 or c == "\x7f"]
        if bad:
            raise state.fail(f"control character {bad[0]!r} refused (tabs and newlines included)")
        state.scan(spec)
    return state.result()


_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")


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
    if mac is not None and not _MAC.fullmatch(mac):
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

_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}\Z")


@attrs.frozen
class DomainConfig:
    """What the sandbox toolstack needs from an xl.cfg (PV guests only, like the capture)."""

    name: str
    uuid: str
    memory_mb: int = 128
    maxmem_mb: int | None = None
    vcpus: int = 1
    maxvcpus: int | None = None
    type: Literal["pv", "pvh", "hvm"] = "pv"
    kernel: str | None = None
    ramdisk: str | None = None
    cmdline: str | None = None
    disks: tuple[DiskSpec, ...] = ()
    vifs: tuple[VifSpec, ...] = ()
    #: PCI devices passed through, as libxl prints them (``SSSS:BB:DD.F``).
    pcis: tuple[str, ...] = ()
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

    @property
    def video_memkb(self) -> int:
        """libxl__domain_build_info_setdefault: 8 MiB for an HVM guest's default cirrus VGA
        with qemu-xen, none for PV and PVH."""
        return 8 * 1024 if self.type == "hvm" else 0


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
    if not _NAME.fullmatch(name):
        raise XlConfigError(f"{filename}: name {name!r} has characters xl would not expect")
    dom_type = guest_type(values.get("type"), values.get("builder"), filename)
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
        type=dom_type,
        memory_mb=memory if memory is not None else 128,
        maxmem_mb=number("maxmem"),
        vcpus=vcpus if vcpus is not None else 1,
        maxvcpus=number("maxvcpus"),
        kernel=string("kernel"),
        ramdisk=string("ramdisk"),
        cmdline=cmdline,
        disks=tuple(parse_disk_spec(d) for d in strings("disk")),
        vifs=tuple(parse_vif_spec(v) for v in strings("vif")),
        pcis=tuple(parse_pci_spec(p) for p in strings("pci")),
        on_poweroff=string("on_poweroff") or "destroy",
        on_reboot=string("on_reboot") or "restart",
        on_crash=string("on_crash") or "destroy",
        label=label,
        seclabel=seclabel,
    )


def guest_type(
    type_value: object, builder: object, filename: str = "<xl.cfg>"
) -> Literal["pv", "pvh", "hvm"]:
    """The guest type as xl 4.17 reads it (xl_parse.c parse_config_data): ``type`` (pv, pvh,
    hvm), else the deprecated ``builder`` (generic = pv, hvm), else pv. Anything else is
    refused, as xl refuses it."""
    if type_value is not None:
        if type_value == "pv":
            return "pv"
        if type_value == "pvh":
            return "pvh"
        if type_value == "hvm":
            return "hvm"
        raise XlConfigError(f"{filename}: invalid domain type {type_value!r} (pv, pvh or hvm)")
    if builder in (None, "generic"):
        return "pv"
    if builder == "hvm":
        return "hvm"
    raise XlConfigError(f"{filename}: invalid builder {builder!r} (generic or hvm)")
