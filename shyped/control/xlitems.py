"""What the daemon must check in an xl.cfg or an attach command, as control-protocol items.

Pure. shypectl ``dry-run`` and shype-xl read a domain configuration the way ``xl create``
does — the file, then each ``KEY=VALUE`` override from the command line appended as a line
(tools/xl/xl_vmcontrol.c ``main_create``'s ``extra_config``), later assignments winning — with
`shyped.core.xlcfgfile`, which reads exactly what libxl reads or refuses the file. Any guest
type xl knows (``type`` = pv, pvh, hvm, or the old ``builder``); the name, uuid, label, disks
(qdisk included), vifs (``type=ioemu`` included), PCI devices and the devices decided by STE
with their backend (``vtpm``, ``vkb``, console ``channel``s; ``usbctrl``, ``vsnd``,
``vdispl`` are dry-run as the daemon decides them: denied) matter here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from shyped.control.backend import (
    ChannelItem,
    DiskItem,
    DryRunArgs,
    NewDomain,
    PciItem,
    VifItem,
)
from shyped.core.xlcfg import (
    CfgValue,
    SecurityLabel,
    XlConfigError,
    guest_type,
    parse_access_control,
    parse_acm_label,
    parse_assignments,
    parse_disk_spec,
    parse_disk_specs,
    parse_vif_spec,
)
from shyped.core.xlcfgfile import parse_statements
from shyped.core.xlcfgpci import parse_pci_spec

_LABEL_KEYS = frozenset({"seclabel", "init_seclabel", "access_control"})
#: libxl's default bridge for a vif without ``bridge=`` (libxl__device_nic_setdefault).
DEFAULT_BRIDGE = "xenbr0"


@attrs.frozen
class CfgSummary:
    """The parts of an xl.cfg the policy decides on."""

    name: str
    uuid: str | None
    label: SecurityLabel | None
    disks: tuple[DiskItem, ...]
    vifs: tuple[VifItem, ...]
    values: dict[str, CfgValue] = attrs.field(eq=False, repr=False)
    pcis: tuple[PciItem, ...] = ()
    channels: tuple[ChannelItem, ...] = ()
    type: str = "pv"

    @property
    def domain(self) -> NewDomain:
        return NewDomain(
            name=self.name,
            uuid=self.uuid,
            label=str(self.label) if self.label is not None else None,
        )

    def dry_run_args(self, domain: NewDomain | None = None) -> DryRunArgs:
        """The dry run of this cfg: its domain (or `domain`) and every device it lists."""
        return DryRunArgs(
            domain=domain or self.domain,
            disks=self.disks,
            vifs=self.vifs,
            pcis=self.pcis,
            channels=self.channels,
        )


def with_overrides(text: str, overrides: list[str]) -> str:
    """The cfg text as xl sees it: each ``KEY=VALUE`` override appended as a line."""
    if not overrides:
        return text
    return text + "\n" + "\n".join(overrides) + "\n"


def cfg_label(values: dict[str, CfgValue], filename: str) -> SecurityLabel | None:
    """The ACM label of a cfg: ``seclabel``/``init_seclabel`` = ``ACM:P:L`` or
    ``access_control = ['policy=P,label=L']`` (both: they must agree). A non-ACM (FLASK)
    seclabel is not an ACM label: None."""
    label: SecurityLabel | None = None
    for key in ("init_seclabel", "seclabel"):
        value = values.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise XlConfigError(f"{filename}: {key} must be a string")
        if value.startswith("ACM:"):
            label = parse_acm_label(value)
            break
    if "access_control" in values:
        acl = values["access_control"]
        if not isinstance(acl, list):
            raise XlConfigError(f"{filename}: access_control must be a list")
        from_acl = parse_access_control(acl)
        if label is not None and label != from_acl:
            raise XlConfigError(f"{filename}: seclabel and access_control name different labels")
        label = from_acl
    return label


def disk_item(spec: str | Sequence[str]) -> DiskItem:
    """One disk of a cfg's ``disk`` list (a string), or of ``xl block-attach``'s arguments
    (a list: xl scans each on its own, so they are never joined)."""
    d = parse_disk_spec(spec) if isinstance(spec, str) else parse_disk_specs(spec)
    # A layered format (qemu opens what its header names too) keeps its prefix, as libxl
    # writes a qdisk's params, so the dry run refuses it as the daemon does.
    layered = d.format in ("qcow", "qcow2", "vhd", "qed")
    return DiskItem(
        target=f"{d.format}:{d.target}" if layered else d.target,
        vdev=d.vdev,
        writable=d.readwrite,
        backend_domid=d.backend_domid,
        cdrom=d.cdrom,
    )


def vif_item(spec: str, dom_type: str = "hvm") -> VifItem:
    """One vif; ``type=ioemu`` (an emulated NIC whose tap joins the same bridge, decided with
    the bridge's label all the same) only for an HVM guest, as libxl_nic.c allows it."""
    v = parse_vif_spec(spec)
    if v.type not in (None, "vif", "ioemu"):
        raise XlConfigError(f"vif spec {spec!r}: type must be vif or ioemu, not {v.type!r}")
    if v.type == "ioemu" and dom_type != "hvm":
        raise XlConfigError(f"vif spec {spec!r}: a {dom_type} guest cannot have type=ioemu")
    return VifItem(
        bridge=v.bridge or DEFAULT_BRIDGE, backend_domid=v.backend_domid, mac=v.mac, devid=v.devid
    )


#: xl.cfg keys that hand the guest a host resource without any xenstore device record (the
#: device model's own arguments, host serial/USB/sound/IO ranges): the daemon never sees
#: them, so shype-xl and dry-run refuse a cfg that sets them. (``pci`` is decided: libxl's
#: ``/libxl/pci/<bdf>`` record names the device, labelled ``pci:SSSS:BB:DD.F``.)
HOST_RESOURCE_KEYS: Final = frozenset(
    {
        "device_model_args", "device_model_args_pv", "device_model_args_hvm",
        "device_model_override", "usbdevice", "usbdev", "soundhw", "iomem",
        "ioports", "irqs", "dtdev", "rdm",
    }
)  # fmt: skip
#: Console/serial values that reach nothing on the host.
_SERIAL_OK: Final = frozenset({"pty", "none"})


def _host_resources(values: Mapping[str, object], filename: str) -> None:
    keys = sorted(k for k in values if k in HOST_RESOURCE_KEYS)
    serial = values.get("serial")
    serials = serial if isinstance(serial, list) else [] if serial is None else [serial]
    if any(v not in _SERIAL_OK for v in serials):
        keys.append("serial")
    if keys:
        raise XlConfigError(
            f"{filename}: {', '.join(keys)} would hand the guest host resources no shyped "
            "decision covers (the device model's arguments, host serial/USB/sound/IO); "
            "refused by shype-xl and dry-run"
        )


def summarize(text: str, filename: str = "<xl.cfg>") -> CfgSummary:
    """Parse an xl.cfg text (overrides already appended); `XlConfigError` on anything bad."""
    values = parse_assignments(text, filename)
    _host_resources(values, filename)

    def strings(key: str) -> list[str]:
        value = values.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise XlConfigError(f"{filename}: {key} must be a list of strings")
        return [str(v) for v in value]

    name = values.get("name")
    if not isinstance(name, str) or not name:
        raise XlConfigError(f"{filename}: domain name must be specified")
    uuid = values.get("uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise XlConfigError(f"{filename}: uuid must be a string")
    dom_type = guest_type(values.get("type"), values.get("builder"), filename)
    channels = [channel_item("console", s) for s in strings("channel")]
    for key, kind in _STE_KINDS:
        channels += [channel_item(kind, s) for s in strings(key)]
    return CfgSummary(
        name=name,
        uuid=uuid,
        label=cfg_label(values, filename),
        disks=tuple(disk_item(s) for s in strings("disk")),
        vifs=tuple(vif_item(s, dom_type) for s in strings("vif")),
        values=values,
        pcis=tuple(PciItem(parse_pci_spec(s)) for s in strings("pci")),
        channels=tuple(channels),
        type=dom_type,
    )


#: cfg keys of devices other than disks, vifs and PCI, and the device kind libxl gives them.
_STE_KINDS: Final = (
    ("vtpm", "vtpm"),
    ("vkb", "vkbd"),
    ("usbctrl", "vusb"),
    ("vsnd", "vsnd"),
    ("vdispl", "vdispl"),
)


def channel_item(kind: str, spec: str) -> ChannelItem:
    """A device decided by STE with its backend: ``backend=`` names the backend domain (dom0
    by default). A console ``channel`` with ``connection=socket`` hands the guest a Unix
    socket in dom0 (QEMU's chardev) that no label covers: refused."""
    fields: dict[str, str] = {}
    for token in spec.split(","):
        key, sep, value = token.partition("=")
        if not sep:
            if token.strip():
                raise XlConfigError(f"{kind} spec {spec!r}: {token!r} is not key=value")
            continue
        fields[key.strip()] = value.strip()
    if kind == "console" and fields.get("connection", "pty") != "pty":
        raise XlConfigError(
            f"channel {spec!r}: connection={fields['connection']} reaches a host socket no "
            "shyped label covers; refused by shype-xl and dry-run (use connection=pty)"
        )
    return ChannelItem(kind=kind, backend=fields.get("backend") or "0")


def set_cfg_label(text: str, label: str | None, filename: str = "<xl.cfg>") -> str:
    """The cfg text with its ACM label replaced by `label` (removed when None).

    Every ``seclabel``, ACM ``init_seclabel`` and ``access_control`` statement is removed (its
    whole lines, comments on them included) and one ``seclabel = "ACM:P:L"`` line is put where
    the first was, or appended. Other lines are kept byte for byte. The result is parsed again
    and must carry exactly `label`. A FLASK ``init_seclabel`` (xl would prefer it over
    ``seclabel``) is refused: edit that file by hand.
    """
    statements = parse_statements(text, filename)  # refuses anything libxl could read otherwise
    values = {st.key: st.value for st in statements}
    init = values.get("init_seclabel")
    if isinstance(init, str) and not init.startswith("ACM:"):
        raise XlConfigError(f"{filename}: has a non-ACM init_seclabel; edit it by hand")
    if label is not None:
        parse_acm_label(label)
    lines = text.splitlines(keepends=True)
    drop: set[int] = set()
    first: int | None = None
    for st in statements:
        if st.key in _LABEL_KEYS:
            drop.update(range(st.first_line - 1, st.last_line))
            if first is None:
                first = st.first_line - 1
    for st in statements:
        if st.key not in _LABEL_KEYS and set(range(st.first_line - 1, st.last_line)) & drop:
            raise XlConfigError(
                f"{filename}:{st.first_line}: a label shares its line with {st.key}; "
                "put it on a line of its own"
            )
    new_line = f'seclabel = "{label}"\n' if label is not None else None
    out: list[str] = []
    for n, line in enumerate(lines):
        if n == first and new_line is not None:
            out.append(new_line)
        if n not in drop:
            out.append(line)
    if first is None and new_line is not None:
        if out and not out[-1].endswith("\n"):
            out[-1] += "\n"
        out.append(new_line)
    result = "".join(out)
    check = cfg_label(parse_assignments(result, filename), filename)
    if (str(check) if check else None) != label:
        raise XlConfigError(f"{filename}: could not set the label safely; file left unchanged")
    return result
