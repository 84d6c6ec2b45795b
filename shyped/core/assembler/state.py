"""The assembler's internal facts per domain, the limits' helpers, and its state (pure).

See `shyped.core.events` for what the assembler emits and `shyped.core.assembler` for the
façade; the readers of each subtree build on `AssemblerState`."""

from __future__ import annotations

from typing import Final

from shyped.core.channels import (
    SharedNodeTracker,
    TrackerLimits,
)
from shyped.core.events import (
    DeviceKey,
    Event,
    Garbage,
    Limits,
)

_MAX_KIND: Final = 32
_DEVID_MAX: Final = 0x7FFFFFFF
_XENBUS_STATE_MAX: Final = 8  # XenbusStateReconfigured
#: Record keys naming the resource a device uses, per frontend kind.
_RESOURCE_KEY: Final = {"vbd": "params", "vif": "bridge", "9pfs": "path"}
_RECORD_KEYS: Final = frozenset({"frontend", "backend", "mode", "script", *_RESOURCE_KEY.values()})
#: The hotplug scripts libxl records by default (``/etc/xen/scripts/`` + ``block`` /
#: ``vif-bridge``; a qdisk has none). Any other script decides itself what the device
#: reaches (``vif-route`` puts the guest on dom0's IP stack, ``block-iscsi`` turns params into
#: a remote target): the resource is then not the one the label store names.
DEFAULT_SCRIPTS: Final = {
    "vbd": "/etc/xen/scripts/block",
    "vif": "/etc/xen/scripts/vif-bridge",
}


def resource_with_script(kind: str, resource: str | None, script: str | None) -> str | None:
    """The resource a device record names, or ``hotplug-script:<script>`` (an id no label
    store holds: the device is denied) when its script is not the kind's default."""
    if script is None or script == DEFAULT_SCRIPTS.get(kind):
        return resource
    return f"hotplug-script:{script}"


_MAX_GARBAGE_PATH: Final = 200
#: Bounds on the dom0-written sizes: memory in KiB (2^48 KiB = 256 PiB), vCPU indexes
#: (HVM_MAX_VCPUS is 128 in Xen 4.17, XEN_LEGACY_MAX_VCPUS 32; leave room).
_MEMORY_KIB_MAX: Final = 1 << 48
_VCPU_INDEX_MAX: Final = 4095
_MEMORY_KEYS: Final = frozenset({"target", "static-max"})
_EMPTY: Final[frozenset[int]] = frozenset()


def _short(raw: str | bytes) -> str:
    if isinstance(raw, bytes):
        return repr(raw[:_MAX_GARBAGE_PATH])
    return raw if len(raw) <= _MAX_GARBAGE_PATH else raw[:_MAX_GARBAGE_PATH] + "…"


def _is_ref_key(name: str) -> bool:
    base = name.rstrip("0123456789")
    return base == "ring-ref" or base.endswith("-ring-ref") or base == "page-gref"


def _is_port_key(name: str) -> bool:
    return name == "event-channel" or name == "port" or name.startswith("event-channel-")


_KINDS: set[str] = set()  # device kinds seen valid (bounded below)


def _valid_kind(kind: str) -> bool:
    if kind in _KINDS:
        return True
    ok = 0 < len(kind) <= _MAX_KIND and kind.replace("_", "").isalnum() and kind.islower()
    if ok and len(_KINDS) < 256:
        _KINDS.add(kind)
    return ok


# --------------------------------------------------------------------------------------------
# Internal facts


class _Record:
    """``/libxl/<fe>/device/<kind>/<devid>`` plus what was last emitted for the device."""

    __slots__ = (
        "backend",
        "em_be",
        "em_fe_state",
        "em_rings",
        "emitted",
        "frontend_ok",
        "gone",
        "keys",
        "resource",
        "script",
        "writable",
    )

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.frontend_ok = False
        self.backend: tuple[int, str] | None = None
        self.resource: str | None = None
        self.script: str | None = None
        self.writable = True
        self.gone = False
        self.emitted: tuple[int, str, str | None, bool] | None = None
        self.em_fe_state: int | None = None
        self.em_be: tuple[int | None, bool | None] = (None, None)
        self.em_rings: tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]] | None
        self.em_rings = None

    def reset(self) -> None:
        self.keys.clear()
        self.frontend_ok = False
        self.resource = None
        self.script = None
        self.writable = True
        self.gone = False


class _Front:
    """Facts of a frontend directory (guest-written)."""

    __slots__ = ("ports", "refs", "state")

    def __init__(self) -> None:
        self.state: int | None = None
        self.refs: dict[str, int] = {}
        self.ports: dict[str, int] = {}


class _Back:
    """Facts of a backend directory (written by the backend domain)."""

    __slots__ = ("online", "state")

    def __init__(self) -> None:
        self.state: int | None = None
        self.online: bool | None = None


class _Access:
    """Who may read one vchan node: named readers and whether every domain may."""

    __slots__ = ("readers", "world")

    def __init__(self, readers: frozenset[int], world: bool) -> None:
        self.readers = readers
        self.world = world


class _Vchan:
    """A vchan candidate directory."""

    __slots__ = ("ec", "ec_acc", "ec_val", "emitted", "gone", "rr", "rr_acc", "rr_val")

    def __init__(self) -> None:
        self.emitted: tuple[tuple[int, ...], bool, int | None, int | None] | None = None
        self.reset()

    def reset(self) -> None:
        self.rr = False
        self.ec = False
        self.rr_val: int | None = None
        self.ec_val: int | None = None
        self.rr_acc: _Access | None = None
        self.ec_acc: _Access | None = None
        self.gone = False


class _Dom:
    """Everything tracked for one domain id."""

    __slots__ = (
        "backs",
        "cpus",
        "domid",
        "em_res",
        "emitted",
        "fronts",
        "libxl",
        "mem_max",
        "mem_target",
        "name",
        "name_problem",
        "name_set",
        "records",
        "served",
        "uuid",
        "vchans",
    )

    def __init__(self, domid: int) -> None:
        self.domid = domid
        self.name: str | None = None
        self.name_set = False  # the name node exists (whether its value parses or not)
        self.name_problem = ""
        self.uuid: str | None = None
        self.libxl = False
        self.emitted: tuple[str, str | None, str] | None = None
        self.records: dict[tuple[str, int], _Record] = {}
        self.fronts: dict[tuple[str, int], _Front] = {}
        self.backs: dict[tuple[str, int, int], _Back] = {}
        self.vchans: dict[str, _Vchan] = {}
        self.served: set[DeviceKey] = set()
        self.mem_target: int | None = None
        self.mem_max: int | None = None
        self.cpus: dict[int, bool] = {}  # vCPU index -> online
        self.em_res: tuple[int | None, int | None, int | None, int | None] | None = None

    def resources(self) -> tuple[int | None, int | None, int | None, int | None] | None:
        """(target, static-max, vcpus, online) or None when nothing is known."""
        if self.mem_target is None and self.mem_max is None and not self.cpus:
            return None
        vcpus = len(self.cpus) if self.cpus else None
        online = sum(self.cpus.values()) if self.cpus else None
        return (self.mem_target, self.mem_max, vcpus, online)

    def empty(self) -> bool:
        return (
            self.domid != 0
            and self.name is None
            and not self.name_set
            and self.uuid is None
            and not self.libxl
            and self.emitted is None
            and not self.records
            and not self.fronts
            and not self.backs
            and not self.vchans
            and not self.served
            and self.mem_target is None
            and self.mem_max is None
            and not self.cpus
            and self.em_res is None
        )


class AssemblerState:
    """What every reader shares: the facts per domain, the dirty sets, the events not yet
    returned. Pure and single-threaded (the reactor's)."""

    def __init__(self, limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._doms: dict[int, _Dom] = {0: _Dom(0)}
        self._vms: set[str] = set()
        # (backend domid, backend kind, frontend domid, devid) -> device, for backend writes
        self._be_index: dict[tuple[int, str, int, int], DeviceKey] = {}
        self._vchan_servers: set[int] = set()
        self._out: list[Event] = []
        self._dirty_doms: set[int] = set()  # appearance facts changed
        self._touched: set[int] = set()  # something was dropped: check whether to free it
        self._dirty_devs: set[DeviceKey] = set()
        self._dirty_vchans: set[tuple[int, str]] = set()
        self._dirty_res: set[int] = set()  # dom0-written sizes changed
        self._shared = SharedNodeTracker(TrackerLimits(self._limits.shared_nodes_per_domain))

    def _garbage(self, domid: int | None, path: str | bytes, why: str, limit: bool = False) -> None:
        self._out.append(Garbage(domid, _short(path), why, limit))

    def _dom(self, domid: int) -> _Dom:
        dom = self._doms.get(domid)
        if dom is None:
            dom = self._doms[domid] = _Dom(domid)
            self._touched.add(domid)
        return dom

    def _present(self, d: int) -> bool:
        if d == 0:
            return True
        dom = self._doms.get(d)
        return dom is not None and dom.emitted is not None
