"""The arguments of the control operations: what a client sends, validated into frozen attrs.

`shyped.control.protocol` turns a request's JSON ``args`` into one of these classes (strictly:
unknown keys, wrong types and values out of range are refused before the backend sees them);
`shyped.control.backend.ControlBackend` takes them. Plain data only (strings, ints, bools,
tuples, nested classes of this module), so that the protocol can carry them both ways.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import attrs

#: A domain as an operator names it: domid (decimal), UUID or name.
DomainRef: TypeAlias = str
ModeName = Literal["enforcing", "permissive"]
LabelType = Literal["vm", "res"]
PolicyFormat = Literal["toml", "acm-xml"]


@attrs.frozen
class NoArgs:
    """Arguments of a request that takes none."""


@attrs.frozen
class LabelsArgs:
    type: Literal["vm", "res", "any"] = "any"


@attrs.frozen
class DomainArgs:
    domain: DomainRef


@attrs.frozen
class ResourceArgs:
    #: ``file:/path``, ``phy:/dev/…``, an absolute path, or ``bridge:NAME``.
    resource: str


@attrs.frozen
class ValidateLabelArgs:
    label: str
    type: LabelType = "vm"


@attrs.frozen
class NewDomain:
    """A domain about to be created, as its xl.cfg describes it."""

    name: str
    uuid: str | None = None
    #: The cfg's label (``seclabel``/``access_control``); None: unlabelled in the cfg.
    label: str | None = None


@attrs.frozen
class DiskItem:
    """One disk of a cfg or a block-attach (xl-disk-configuration(5), already parsed)."""

    target: str
    vdev: str
    writable: bool = True
    backend_domid: int = 0
    cdrom: bool = False


@attrs.frozen
class VifItem:
    """One vif of a cfg or a network-attach; `bridge` defaults to libxl's ``xenbr0``."""

    bridge: str = "xenbr0"
    backend_domid: int = 0
    mac: str | None = None
    devid: int | None = None


@attrs.frozen
class PciItem:
    """One PCI device of a cfg's ``pci`` list or a pci-attach: ``SSSS:BB:DD.F``."""

    bdf: str


@attrs.frozen
class ChannelItem:
    """A device of another `kind` (vtpm, vkbd, a console channel; vusb and the like are
    denied): STE between the domain and its `backend` (name, domid or UUID)."""

    kind: str
    backend: DomainRef = "0"


@attrs.frozen
class DryRunArgs:
    """Would these be admitted now? Either a new `domain` or devices for a `running` one."""

    domain: NewDomain | None = None
    running: DomainRef | None = None
    disks: tuple[DiskItem, ...] = ()
    vifs: tuple[VifItem, ...] = ()
    pcis: tuple[PciItem, ...] = ()
    channels: tuple[ChannelItem, ...] = ()
    #: Xen ACM's ``xm dry-run`` view: the label exists and each disk's resource label shares
    #: a type with it; no Chinese Wall against running domains, no device channels, no vifs.
    acm_only: bool = False

    def __attrs_post_init__(self) -> None:
        if (self.domain is None) == (self.running is None):
            raise ValueError("exactly one of 'domain' and 'running' is required")


@attrs.frozen
class RegisterDomainArgs:
    """Assign `label` to the domain with this UUID before it is created (None: forget it)."""

    uuid: str
    name: str | None = None
    label: str | None = None


@attrs.frozen
class WaitAdmissionArgs:
    """Wait until the domain with this UUID and at least `devices` devices are decided."""

    uuid: str
    devices: int = attrs.field(default=0, validator=attrs.validators.in_(range(0, 4097)))
    timeout: float = attrs.field(default=30.0)

    @timeout.validator
    def _timeout(self, _a: attrs.Attribute[float], value: float) -> None:
        if not 0 < value <= 600:
            raise ValueError("timeout must be in (0, 600] seconds")


@attrs.frozen
class RelabelDomainArgs:
    domain: DomainRef
    label: str


@attrs.frozen
class SetResourceLabelArgs:
    resource: str
    #: None removes the resource's label.
    label: str | None


@attrs.frozen
class PolicyShowArgs:
    format: PolicyFormat = "toml"


@attrs.frozen
class PolicySource:
    """A policy text sent by the client (the daemon may not see the client's files)."""

    text: str
    filename: str = "<policy>"
    format: Literal["auto", "toml", "acm-xml"] = "auto"


@attrs.frozen
class PolicyLoadArgs:
    """Load `source`, or re-read the configured policy file when it is None (like SIGHUP)."""

    source: PolicySource | None = None


@attrs.frozen
class SetEnforceArgs:
    mode: ModeName


@attrs.frozen
class PlacementArgs:
    """Where may a domain with VM label `label` be admitted now (pool mode)?"""

    label: str


@attrs.frozen
class ReserveArgs:
    """Pool mode: ask host `host`'s daemon for a place for the domain with `uuid` (label: the
    given one, else the pool store's, else the running domain's) before a migration/restore."""

    uuid: str
    host: str
    kind: Literal["migrate", "restore"] = "migrate"
    label: str | None = None
