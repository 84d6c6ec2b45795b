"""The assembler's internal facts per domain, the limits' helpers, and its state (pure).

See `shyped.core.events` for what the assembler emits and `shyped.core.assembler` for the
façade; the readers of each subtree build on `AssemblerState`."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable
from typing import Any, Final

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
_RECORD_KEYS: Final = frozenset(
    {"frontend", "backend", "mode", "script", "type", *_RESOURCE_KEY.values()}
)
#: The record keys in a fixed order, and each one's bit in `_Record.keys` (a bit set: an int
#: costs nothing per record where a set of names cost 216-472 bytes).
_RECORD_KEY_ORDER: Final = tuple(sorted(_RECORD_KEYS))
RECORD_KEY_BIT: Final = {k: 1 << i for i, k in enumerate(_RECORD_KEY_ORDER)}


def record_key_names(bits: int) -> tuple[str, ...]:
    """The record key names set in `bits` (see `RECORD_KEY_BIT`)."""
    return tuple(k for k in _RECORD_KEY_ORDER if bits & RECORD_KEY_BIT[k])


#: Guest types libxl 4.17 writes as ``/libxl/<domid>/type`` (libxl_domain_type_to_string):
#: any other value is an identity problem (the domain is denied admission).
GUEST_TYPES: Final = frozenset({"pv", "pvh", "hvm"})
#: A vif record's ``type`` (libxl_nic.c libxl__set_xenstore_nic: libxl_nic_type_to_string):
#: ``vif`` is the PV device alone; ``vif_ioemu`` adds an emulated NIC whose tap the device model
#: puts on the same bridge. Anything else is treated as emulated (fail closed).
PV_ONLY_NIC_TYPES: Final = frozenset({"vif"})
#: ``/libxl/pci/<SSSS-BB-DD-F>`` (libxl_pci.c pci_info_xs_path, ``PCI_BDF_XSPATH``).
_PCI_XSPATH: Final = re.compile(r"([0-9a-f]{4})-([0-9a-f]{2})-([01][0-9a-f])-([0-7])")
#: Device ids of PCI records whose path component is not a BDF: above every real one.
_PCI_ODD_DEVIDS: Final = 0x7FFF0000


def pci_record_key(component: str) -> tuple[int, str]:
    """The device id and resource of the PCI device named by a ``/libxl/pci`` component.

    A canonical BDF gives ``pci_encode_bdf``'s number (segment, bus, devfn) and
    ``SSSS:BB:DD.F``; anything else a device id in a range no BDF reaches and the component
    itself as resource, which `shyped.core.labelstore.pci_resource` refuses (so the device is
    denied, never left undecided)."""
    m = _PCI_XSPATH.fullmatch(component)
    if m is not None and int(m.group(1), 16) < 0x7FFF:
        seg, bus, dev, fn = (int(g, 16) for g in m.groups())
        return (seg << 16) | (bus << 8) | (dev << 3) | fn, f"{m[1]}:{m[2]}:{m[3]}.{m[4]}"
    return _PCI_ODD_DEVIDS | (zlib.crc32(component.encode()) & 0xFFFF), component[:64]


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


#: Device kinds seen valid (bounded below), each mapped to one string object: the facts kept
#: per device share it instead of holding a copy split out of each path.
_KINDS: dict[str, str] = {}


def _valid_kind(kind: str) -> bool:
    if kind in _KINDS:
        return True
    ok = 0 < len(kind) <= _MAX_KIND and kind.replace("_", "").isalnum() and kind.islower()
    if ok and len(_KINDS) < 256:
        _KINDS[kind] = kind
    return ok


def canon_kind(kind: str) -> str:
    """The shared string object of a kind seen valid (else `kind` itself): same value."""
    return _KINDS.get(kind, kind)


#: (kind, device id) keys of records and frontends seen, each one tuple object (bounded
#: below): every domain has ``("vif", 0)``, ``("vbd", 51712)``, ``("console", 0)`` ...
_DEV_PAIRS: dict[tuple[str, int], tuple[str, int]] = {}
_DEV_PAIRS_MAX: Final = 4096


def canon_pair(kind: str, devid: int) -> tuple[str, int]:
    """The shared ``(kind, devid)`` tuple (a new one past the bound): same value."""
    key = (kind, devid)
    held = _DEV_PAIRS.get(key)
    if held is not None:
        return held
    key = (canon_kind(kind), devid)
    if len(_DEV_PAIRS) < _DEV_PAIRS_MAX:
        _DEV_PAIRS[key] = key
    return key


# --------------------------------------------------------------------------------------------
# Internal facts


class _Record:
    """``/libxl/<fe>/device/<kind>/<devid>`` plus what was last emitted for the device."""

    __slots__ = (
        "backend",
        "dk",
        "em_be",
        "em_fe_state",
        "em_rings",
        "emitted",
        "frontend_ok",
        "gone",
        "keys",
        "pci",
        "resource",
        "rtype",
        "script",
        "writable",
    )

    def __init__(self, dk: DeviceKey) -> None:
        #: The device's key: the one object every fact and event about the device shares.
        self.dk = dk
        #: The record keys present, as `RECORD_KEY_BIT` bits.
        self.keys = 0
        self.frontend_ok = False
        self.backend: tuple[int, str] | None = None
        self.resource: str | None = None
        self.script: str | None = None
        self.rtype: str | None = None  # the record's ``type`` (vif: vif / vif_ioemu)
        self.pci: str | None = None  # the ``/libxl/pci`` component of a PCI record
        self.writable = True
        self.gone = False
        self.emitted: tuple[int, str, str | None, bool, bool] | None = None
        self.em_fe_state: int | None = None
        self.em_be: tuple[int | None, bool | None] = (None, None)
        self.em_rings: tuple[tuple[tuple[str, int], ...], tuple[tuple[str, int], ...]] | None
        self.em_rings = None

    def reset(self) -> None:
        self.keys = 0
        self.frontend_ok = False
        self.resource = None
        self.script = None
        self.rtype = None
        self.writable = True
        self.gone = False


#: Grant refs or event channel ports of a frontend: (key, value) pairs sorted by key, the
#: form `RingsPublished` carries, so that the front, what was emitted and the host model's
#: device share one tuple (a dict per table cost ~200 bytes and a sorted copy per emission).
RingTable = tuple[tuple[str, int], ...]


def ring_get(table: RingTable, key: str) -> int | None:
    """The value of `key` in `table`, or None."""
    for k, v in table:
        if k == key:
            return v
    return None


def ring_put(table: RingTable, key: str, value: int) -> RingTable:
    """`table` with `key` set to `value` (a new tuple, still sorted)."""
    return tuple(sorted((*(kv for kv in table if kv[0] != key), (key, value))))


def ring_drop(table: RingTable, keep: Callable[[str], bool]) -> RingTable:
    """`table` without the keys `keep` refuses (`table` itself when none goes)."""
    kept = tuple(kv for kv in table if keep(kv[0]))
    return table if len(kept) == len(table) else kept


class _Front:
    """Facts of a frontend directory (guest-written)."""

    __slots__ = ("ports", "refs", "state")

    def __init__(self) -> None:
        self.state: int | None = None
        #: Grant refs and event channel ports (see `RingTable`), empty until the first one.
        self.refs: RingTable = ()
        self.ports: RingTable = ()

    def ring_keys(self) -> int:
        return len(self.refs) + len(self.ports)


#: A backend directory's facts (written by the backend domain): (XenbusState, online), None
#: where absent. Every combination is one shared tuple object (`back_facts`), so a backend
#: costs a dict entry and no object of its own.
BackFacts = tuple[int | None, bool | None]
_BACK_FACTS: Final[dict[BackFacts, BackFacts]] = {
    (st, on): (st, on) for st in (None, *range(_XENBUS_STATE_MAX + 1)) for on in (None, False, True)
}
NO_BACK: Final = _BACK_FACTS[None, None]


def back_facts(state: int | None, online: bool | None) -> BackFacts:
    """The shared (state, online) tuple."""
    key = (state, online)
    return _BACK_FACTS.get(key, key)


class _Access:
    """Who may read one vchan node: named readers and whether every domain may."""

    __slots__ = ("readers", "world")

    def __init__(self, readers: frozenset[int], world: bool) -> None:
        self.readers = readers
        self.world = world


class _Vchan:
    """A vchan candidate directory."""

    __slots__ = (
        "ec",
        "ec_acc",
        "ec_val",
        "emitted",
        "gone",
        "indexed",
        "rr",
        "rr_acc",
        "rr_val",
    )

    def __init__(self) -> None:
        self.emitted: tuple[tuple[int, ...], bool, int | None, int | None] | None = None
        #: The named readers this candidate is filed under in `AssemblerState._clients`.
        self.indexed: frozenset[int] = _EMPTY
        self.reset()

    def named_readers(self) -> frozenset[int]:
        """Every domain either node's permissions name as a reader."""
        rr = self.rr_acc.readers if self.rr_acc is not None else _EMPTY
        ec = self.ec_acc.readers if self.ec_acc is not None else _EMPTY
        return rr | ec

    def reset(self) -> None:
        self.rr = False
        self.ec = False
        self.rr_val: int | None = None
        self.ec_val: int | None = None
        self.rr_acc: _Access | None = None
        self.ec_acc: _Access | None = None
        self.gone = False


class _NoEntries(dict):  # type: ignore[type-arg]
    """The empty table every domain starts with for its backends and vchans (most never
    have any; an empty dict costs 64 bytes each): read like any empty dict, never written
    (the writers put a dict of the domain's own in its place first)."""

    __slots__ = ()

    def _refuse(self, *args: object, **kwargs: object) -> None:
        raise TypeError("the shared empty table is read-only")

    __setitem__ = update = setdefault = _refuse


_NO_ENTRIES: Final[dict[Any, Any]] = _NoEntries()


class _Dom:
    """Everything tracked for one domain id."""

    __slots__ = (
        "backs",
        "cpus",
        "cpus_on",
        "domid",
        "dtype",
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
        "shadowed",
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
        #: ``/libxl/<domid>/type`` as read (None: absent), see `GUEST_TYPES`.
        self.dtype: str | None = None
        self.emitted: tuple[str, str | None, str] | None = None
        self.records: dict[tuple[str, int], _Record] = {}
        self.fronts: dict[tuple[str, int], _Front] = {}
        #: Backend directories and vchan candidates (`_NO_ENTRIES` until the first one).
        self.backs: dict[tuple[str, int, int], BackFacts] = _NO_ENTRIES
        self.vchans: dict[str, _Vchan] = _NO_ENTRIES
        #: Devices this domain is the backend of: (backend kind, frontend, devid) -> device,
        #: the index a backend write is resolved with (None until it serves one: most never
        #: do). Where the backend kind is the device's kind the key is the `DeviceKey` object
        #: itself (equal as a tuple): no key object of its own.
        self.served: dict[tuple[str, int, int], DeviceKey] | None = None
        #: Devices linked here whose `served` entry a later record of the same backend
        #: directory took over (rare; None until then): still woken with this domain.
        self.shadowed: set[DeviceKey] | None = None
        self.mem_target: int | None = None
        self.mem_max: int | None = None
        #: The vCPU indexes whose availability is known (bit ``1 << index``), and of those the
        #: ones online: two small ints instead of a dict per domain.
        self.cpus = 0
        self.cpus_on = 0
        self.em_res: tuple[int | None, int | None, int | None, int | None] | None = None

    def resources(self) -> tuple[int | None, int | None, int | None, int | None] | None:
        """(target, static-max, vcpus, online) or None when nothing is known."""
        if self.mem_target is None and self.mem_max is None and not self.cpus:
            return None
        vcpus = self.cpus.bit_count() if self.cpus else None
        online = self.cpus_on.bit_count() if self.cpus else None
        return (self.mem_target, self.mem_max, vcpus, online)

    def empty(self) -> bool:
        return (
            self.domid != 0
            and self.name is None
            and not self.name_set
            and self.uuid is None
            and not self.libxl
            and self.dtype is None
            and self.emitted is None
            and not self.records
            and not self.fronts
            and not self.backs
            and not self.vchans
            and not self.served
            and not self.shadowed
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
        #: UUID -> the domain id whose ``vm`` pointer names it, or the set of them when more
        #: than one does (index: no scan per ``/vm`` event; a set only for a duplicate).
        self._by_uuid: dict[str, int | set[int]] = {}
        #: Domain id -> the vchan candidates (server, path) whose permissions name it as a
        #: reader (index: a removed home visits only the candidates it is a client of).
        self._clients: dict[int, set[tuple[int, str]]] = {}
        self._vchan_servers: set[int] = set()
        #: ``/libxl/pci`` component -> (domid, devid) of the record made from it.
        self._pci: dict[str, tuple[int, int]] = {}
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

    def _set_uuid(self, dom: _Dom, uuid: str | None) -> None:
        """Set the domain's UUID and keep `_by_uuid` in step."""
        old = dom.uuid
        if old == uuid:
            return
        d = dom.domid
        if old is not None:
            ids = self._by_uuid.get(old)
            if ids == d:
                del self._by_uuid[old]
            elif isinstance(ids, set):
                ids.discard(d)
                if len(ids) == 1:
                    self._by_uuid[old] = next(iter(ids))
        if uuid is not None:
            ids = self._by_uuid.get(uuid)
            if ids is None:
                self._by_uuid[uuid] = d
            elif isinstance(ids, set):
                ids.add(d)
            elif ids != d:
                self._by_uuid[uuid] = {ids, d}
        dom.uuid = uuid

    def _with_uuid(self, uuid: str) -> set[int] | tuple[int, ...]:
        """The domain ids whose ``vm`` pointer names `uuid` (from the index)."""
        ids = self._by_uuid.get(uuid)
        if ids is None:
            return ()
        return ids if isinstance(ids, set) else (ids,)

    def _served_by(self, be: int, bkey: tuple[str, int, int]) -> DeviceKey | None:
        """The device whose record names backend directory `bkey` of domain `be`."""
        bdom = self._doms.get(be)
        served = bdom.served if bdom is not None else None
        return served.get(bkey) if served else None

    def _index_vchan(self, s: int, vpath: str, vc: _Vchan, *, drop: bool = False) -> None:
        """File the candidate under the readers its permissions name now (none with `drop`)."""
        new = _EMPTY if drop else vc.named_readers()
        old = vc.indexed
        if new == old:
            return
        key = (s, vpath)
        for d in old - new:
            keys = self._clients.get(d)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._clients[d]
        for d in new - old:
            self._clients.setdefault(d, set()).add(key)
        vc.indexed = new
