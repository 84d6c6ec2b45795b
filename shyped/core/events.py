"""Typed events from xenstore nodes: a sans-I/O assembler (no I/O, no reactor, no xenstore).

The gateway hands over what xenstored reports — a node's path, its value read after the watch
fired (``None``: the node is absent, i.e. it or an ancestor was removed) and, for the few nodes
where it matters, the node's permission list — and `EventAssembler` turns that into typed
events. It keeps the little state needed to join facts spread over several nodes (a device is
only known once its libxl record, its domain and its backend domain are all there), so the
events come out the same whether the nodes arrive one by one, in the burst of one
transaction's watch events (`EventAssembler.feed_batch`) or as a full snapshot during reconcile
(`EventAssembler.reconcile`). Derived events are computed at the end of each batch by comparing
the facts with what was last emitted, which makes replays idempotent: feeding the same facts
again emits nothing.

Which nodes make what (Xen 4.17 libxl, ``tools/libs/light/libxl_create.c`` and
``libxl_device.c``; see ``/work/shared/xen-4.17-reference``):

* **DomainAppeared(domid)** once all of these are present: ``/local/domain/<domid>/name`` (any
  value: a name that is not printable UTF-8 of bounded length is announced as None with a
  ``name_problem``, and decided), ``/local/domain/<domid>/vm`` (exactly ``/vm/<uuid>``), the
  node ``/vm/<uuid>`` (or anything below it) and ``/libxl/<domid>`` (or anything below it).
  libxl writes all of them in the first creation transaction, so a live stream yields the
  event at the end of that transaction's burst. All are dom0-only nodes. Re-emitted (an
  upsert) if the name or uuid changes. Domain 0 is always present and never announced.
* **DomainVanished(domid)** only when xenstore says the domain is gone: its home
  ``/local/domain/<domid>`` is removed (on ``xl destroy`` right after ``/vm/<uuid>``, the
  toolstack's clean-up after death; ``@releaseDomain`` only yields a `RescanHint`). Never
  because a value fails to parse, nor on the removal of ``/vm/<uuid>`` alone (two domains may
  share a UUID; the other one still runs). Its devices and vchans are removed first, and vchan
  permissions naming it stop counting.
* **DeviceAdded / DeviceRemoved** from the dom0-only libxl record
  ``/libxl/<fe>/device/<kind>/<devid>/{frontend,backend}``: ``frontend`` must be the canonical
  frontend directory of that very device (``/local/domain/<fe>/device/<kind>/<devid>``, console
  0 at ``/local/domain/<fe>/console``, vuart at ``/local/domain/<fe>/vuart/<devid>``) and
  ``backend`` must be ``/local/domain/<be>/backend/<bkind>/<fe>/<devid>``; that backend path is
  what names the backend domain. The device is announced once both domains are present and is
  removed when the record goes or either domain vanishes. The resource comes from the same
  record: ``params`` and ``mode`` (vbd), ``bridge`` (vif), ``path`` (9pfs).
* **FrontendStateChanged / BackendStateChanged** from ``state`` (and backend ``online``) in the
  two directories of an announced device.
* **RingsPublished / RingsWithdrawn**: grant references (``ring-ref``, ``ring-refN``,
  ``tx-ring-ref``/``rx-ring-ref``, ``ctrl-ring-ref``, ``page-gref``) and event channel ports
  (``event-channel``, ``event-channel-tx``/``-rx``/``-ctrl``…, ``port``), directly in the
  frontend directory or one level down (``queue-N/…``). Published once at least one of each is
  present and the frontend state is Initialised (3) or Connected (4) — or, for a directory
  without a ``state`` key such as console 0, as soon as both are there.
* **VchanPublished / VchanRemoved**: a directory below ``/local/domain/<server>/`` (outside
  ``device``, ``backend``, ``console``, ``vuart`` and ``store``) holding both ``ring-ref`` and
  ``event-channel`` (libxenvchan ``init_xs_srv``, ``tools/libs/vchan/init.c``). The clients
  are the domains that may read both nodes besides the server, taken from the nodes'
  permissions: the gateway must pass ``perms`` for every path where `needs_perms` is true
  (a ``get_perms`` after the watch fired; the server's ``set_permissions`` fires the watch
  again). Values that do not parse never hide a rendezvous, and unreadable permissions count as
  readable by every domain.
* **DomainResources(domid)** (an upsert) from ``/local/domain/<domid>/memory/{target,static-max}``
  (KiB) and the ``/local/domain/<domid>/cpu/<n>/availability`` entries (``online``/``offline``),
  which libxl writes in ``libxl__build_post`` (``tools/libs/light/libxl_dom.c``) after the
  creation transaction, and ``xl mem-set``/``vcpu-set`` rewrite later. The ``memory`` and ``cpu``
  directories are created with permissions ``n0,r<domid>`` (dom0 owns them, the guest may only
  read; see ``layout-paused.txt``), so a guest cannot write below them: these are trusted sizes.
  Sent after the domain's `DomainAppeared` (domain 0 included, which only has ``memory``) and
  whenever they change; nothing is sent while none of them is known.
* **ChannelShared / ChannelUnshared** (`shyped.core.channels`): every node a guest owns below
  ``/local/domain/`` whose permissions let another guest read or write it, wherever it is:
  the gateway passes permissions for every path where `needs_perms` is true (vchan keys and
  every `shyped.core.channels.guest_path`). A vchan key node past the rendezvous limit is reported
  as an over-limit channel (denied and removed), never only counted.
* **RescanHint** for ``@introduceDomain`` / ``@releaseDomain``: a hint to reconcile, never relied
  on.
* **Garbage(domid, path, why)** for anything malformed, counted against the domain whose
  ``/local/domain/<domid>`` tree holds the node (``None`` for ``/libxl``, ``/vm`` and invalid
  paths). Guest-written pointers (the frontend's ``backend``/``backend-id``) are only checked
  against the record and counted, never followed.

Memory is bounded per domain by `Limits`; going over a limit gives a `Garbage` with
``limit=True`` and the excess is not tracked. Where the excess could carry a channel (vchan
keys past ``vchans_per_domain``, shared nodes past ``shared_nodes_per_domain``) it is also
reported as an over-limit `ChannelShared`: denied and removed, never only counted.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Final, NamedTuple, Protocol

import attrs

from shyped.core.channels import (
    ChannelShared,
    ChannelUnshared,
    SharedNodeTracker,
    TrackerLimits,
    device_dir_of,
    guest_path,
)
from shyped.core.xsparse import (
    MAX_NAME,
    MAX_VALUE,
    U32_MAX,
    PermInput,
    is_uuid,
    parse_abs_path_value,
    parse_domid,
    parse_domid_component,
    parse_path,
    parse_perms,
    parse_text,
    parse_uint,
    parse_uint_component,
)

# --------------------------------------------------------------------------------------------
# Event types


class DeviceKey(NamedTuple):
    """A PV device as libxl names it: frontend kind, frontend domain, device id."""

    kind: str
    frontend: int
    devid: int


@attrs.frozen(slots=True)
class DomainAppeared:
    """A toolstack-created domain is complete in xenstore (upsert: re-sent on rename).

    `name` is None when the ``name`` node does not parse (or was removed): `name_problem`
    then says why, and the domain is still there (a value that fails to parse never makes a
    domain vanish).
    """

    domid: int
    uuid: str
    name: str | None
    name_problem: str = ""


@attrs.frozen(slots=True)
class DomainVanished:
    """The domain's ``/local/domain/<domid>`` tree is gone."""

    domid: int


@attrs.frozen(slots=True)
class DomainResources:
    """The dom0-written size of a present domain (upsert; None: not written or unparsable).

    ``vcpus`` counts the ``cpu/<n>`` entries (libxl writes one per possible vCPU, i.e.
    ``max_vcpus``), ``vcpus_online`` those whose ``availability`` is ``online``.
    """

    domid: int
    memory_target_kib: int | None
    memory_static_max_kib: int | None
    vcpus: int | None
    vcpus_online: int | None


@attrs.frozen(slots=True)
class DeviceAdded:
    """A device per the trusted libxl record, both ends present (upsert on record change).

    ``resource`` is the raw record value (vbd ``params``, vif ``bridge``, 9pfs ``path``) or
    None; ``writable`` is False only for a vbd whose record says ``mode`` = ``r``.
    """

    device: DeviceKey
    backend: int
    backend_kind: str
    resource: str | None
    writable: bool


@attrs.frozen(slots=True)
class DeviceRemoved:
    """The device's record is gone, or one of its two domains vanished."""

    device: DeviceKey
    backend: int


@attrs.frozen(slots=True)
class FrontendStateChanged:
    """The frontend's XenbusState (None: the key is gone)."""

    device: DeviceKey
    state: int | None


@attrs.frozen(slots=True)
class BackendStateChanged:
    """The backend's XenbusState and ``online`` flag (None: not present)."""

    device: DeviceKey
    backend: int
    state: int | None
    online: bool | None


@attrs.frozen(slots=True)
class RingsPublished:
    """The frontend published its grant refs and event channel ports: (key, value) pairs."""

    device: DeviceKey
    grant_refs: tuple[tuple[str, int], ...]
    event_channels: tuple[tuple[str, int], ...]


@attrs.frozen(slots=True)
class RingsWithdrawn:
    """A published frontend left Initialised/Connected or removed its keys."""

    device: DeviceKey


@attrs.frozen(slots=True)
class VchanPublished:
    """A vchan rendezvous: `server` offers `path` to `clients` (upsert).

    ``any_domain``: the nodes are readable by every domain (or their permissions could not be
    read), so any domain may connect. ``ring_ref``/``port`` are None when the values do not
    parse (the rendezvous is still reported).
    """

    server: int
    path: str
    clients: tuple[int, ...]
    any_domain: bool
    ring_ref: int | None
    port: int | None


@attrs.frozen(slots=True)
class VchanRemoved:
    """The rendezvous is gone (nodes removed, no client left, or the server vanished)."""

    server: int
    path: str


@attrs.frozen(slots=True)
class RescanHint:
    """xenstored fired a special watch; reconciling is advised, nothing else follows from it."""

    reason: str


@attrs.frozen(slots=True)
class Garbage:
    """A node that could not be used. ``limit``: a per-domain bound was hit."""

    domid: int | None
    path: str
    why: str
    limit: bool = False


Event = (
    DomainAppeared
    | DomainVanished
    | DomainResources
    | DeviceAdded
    | DeviceRemoved
    | FrontendStateChanged
    | BackendStateChanged
    | RingsPublished
    | RingsWithdrawn
    | VchanPublished
    | VchanRemoved
    | ChannelShared
    | ChannelUnshared
    | RescanHint
    | Garbage
)

#: One node as the gateway reports it: path, value (None = absent), permissions (or None).
Node = tuple[str | bytes, bytes | None, Sequence[PermInput] | None]


class SnapshotNode(Protocol):
    """A snapshot entry as the gateway returns it (``shyped.xenstore.gateway.Node``)."""

    @property
    def value(self) -> bytes: ...

    @property
    def perms(self) -> Sequence[PermInput] | None: ...


#: What `EventAssembler.reconcile` takes per path: ``(value, perms)`` or a `SnapshotNode`.
SnapshotEntry = tuple[bytes, Sequence[PermInput] | None] | SnapshotNode


@attrs.frozen
class Limits:
    """Per-domain bounds on what the assembler tracks (guest-controlled amounts)."""

    records_per_domain: int = 1024
    frontends_per_domain: int = 256
    backends_per_domain: int = 16384
    ring_keys_per_device: int = 64
    vchans_per_domain: int = 64
    shared_nodes_per_domain: int = 4096


# --------------------------------------------------------------------------------------------
# Path helpers

_LOCAL_DOMAIN: Final = "/local/domain/"
#: Subtrees of a domain's home that are not vchan candidates (device dirs, backends).
_NOT_VCHAN: Final = frozenset({"device", "backend", "console", "vuart", "store"})
_VCHAN_KEYS: Final = frozenset({"ring-ref", "event-channel"})
_MAX_KIND: Final = 32
_DEVID_MAX: Final = 0x7FFFFFFF
_XENBUS_STATE_MAX: Final = 8  # XenbusStateReconfigured
#: Record keys naming the resource a device uses, per frontend kind.
_RESOURCE_KEY: Final = {"vbd": "params", "vif": "bridge", "9pfs": "path"}
_RECORD_KEYS: Final = frozenset({"frontend", "backend", "mode", *_RESOURCE_KEY.values()})
_MAX_GARBAGE_PATH: Final = 200
#: Bounds on the dom0-written sizes: memory in KiB (2^48 KiB = 256 PiB), vCPU indexes
#: (HVM_MAX_VCPUS is 128 in Xen 4.17, XEN_LEGACY_MAX_VCPUS 32; leave room).
_MEMORY_KIB_MAX: Final = 1 << 48
_VCPU_INDEX_MAX: Final = 4095
_MEMORY_KEYS: Final = frozenset({"target", "static-max"})
_EMPTY: Final[frozenset[int]] = frozenset()


def needs_perms(path: str | bytes) -> bool:
    """True if the gateway must pass the node's permissions with its value: vchan keys and
    every node a guest could own (`shyped.core.channels.guest_path`)."""
    p = path.decode("ascii", "replace") if isinstance(path, bytes) else path
    if not p.startswith(_LOCAL_DOMAIN):
        return False
    if guest_path(p):
        return True
    leaf = p[p.rfind("/") + 1 :]
    if leaf not in _VCHAN_KEYS:
        return False
    comps = p.split("/")
    return len(comps) >= 6 and comps[4] not in _NOT_VCHAN


def frontend_dir(key: DeviceKey) -> str:
    """The canonical frontend directory of a device (``libxl__device_frontend_path``)."""
    if key.kind == "console" and key.devid == 0:
        return f"/local/domain/{key.frontend}/console"
    if key.kind == "vuart":
        return f"/local/domain/{key.frontend}/vuart/{key.devid}"
    return f"/local/domain/{key.frontend}/device/{key.kind}/{key.devid}"


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
        "writable",
    )

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.frontend_ok = False
        self.backend: tuple[int, str] | None = None
        self.resource: str | None = None
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


# --------------------------------------------------------------------------------------------
# The assembler


class EventAssembler:
    """Turns xenstore nodes into typed events; pure and single-threaded (the reactor's)."""

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

    # ---- public API ---------------------------------------------------------------------

    def feed(
        self,
        path: str | bytes,
        value: bytes | None,
        perms: Sequence[PermInput] | None = None,
    ) -> list[Event]:
        """One node: its path, value (None = absent) and, if `needs_perms`, permissions."""
        self._apply(path, value, perms)
        return self._flush()

    def feed_batch(self, nodes: Iterable[Node]) -> list[Event]:
        """Several nodes (e.g. one transaction's burst); derived events come once at the end."""
        for path, value, perms in nodes:
            self._apply(path, value, perms)
        return self._flush()

    def reconcile(
        self,
        snapshot: Mapping[str, SnapshotEntry] | Mapping[bytes, SnapshotEntry],
        root: str = "/",
    ) -> list[Event]:
        """Bring the state in line with a full snapshot of the subtree at `root`.

        Everything tracked under `root` that the snapshot lacks is treated as removed, then the
        snapshot's nodes are fed in sorted order. Unchanged facts emit nothing.
        """
        nodes: dict[str, tuple[bytes, Sequence[PermInput] | None]] = {}
        for k, v in snapshot.items():
            key = k.decode("ascii", "replace") if isinstance(k, bytes) else k
            nodes[key] = v if isinstance(v, tuple) else (v.value, v.perms)
        root = root.rstrip("/") or "/"
        prefix = "/" if root == "/" else root + "/"
        gone = [
            p
            for p in self._tracked_paths()
            if p not in nodes and (root == "/" or p == root or p.startswith(prefix))
        ]
        gone.sort(key=len)
        for p in gone:
            self._apply(p, None, None)
        for p in sorted(nodes):
            value, perms = nodes[p]
            self._apply(p, value, perms)
        return self._flush()

    def withdraw(self, path: str, *, subtree: bool = False) -> tuple[list[Event], list[str]]:
        """The daemon's own veto changed `path` in xenstore: its permissions were reset
        (``ResetPerms``), or, with `subtree`, it and everything below it were removed
        (``RemoveVchan``, ``RemoveNode``). Watch events coalesce and a read shows only the
        node's latest state, so a guest that grants again (or publishes the same rendezvous
        again) before the daemon reads the node would show the very facts emitted before the
        veto, and nothing would be decided. So what was emitted about the shared nodes and
        vchan rendezvous there is withdrawn now (`ChannelUnshared`, `VchanRemoved`), and the
        caller must read the returned paths again (a watch batch): what is there then is new
        and decided again.
        """
        again = self._shared.withdraw(path, subtree)
        comps = path.split("/")
        d = (
            parse_domid_component(comps[3])
            if len(comps) > 4 and comps[1:3] == ["local", "domain"]
            else None
        )
        dom = self._doms.get(d) if d is not None else None
        if dom is not None and subtree:
            pre = path + "/"
            for vpath, vc in dom.vchans.items():
                if vpath == path or vpath.startswith(pre):
                    vc.gone = True
                    self._dirty_vchans.add((dom.domid, vpath))
                    again.extend((vpath + "/ring-ref", vpath + "/event-channel"))
        return self._flush(), sorted(set(again))

    def present_domains(self) -> list[int]:
        """Domain ids currently announced (plus domain 0)."""
        return sorted(d for d, dom in self._doms.items() if d == 0 or dom.emitted is not None)

    def tracked_domains(self) -> int:
        """How many domain ids hold any state (for bounds checks and metrics)."""
        return len(self._doms)

    def tracked_items(self, domid: int) -> int:
        """How many facts are held for one domain id (records, dirs, ring keys, vchans)."""
        dom = self._doms.get(domid)
        if dom is None:
            return 0
        keys = sum(len(f.refs) + len(f.ports) + 1 for f in dom.fronts.values())
        return len(dom.records) + keys + len(dom.backs) + len(dom.vchans)

    # ---- dispatch -----------------------------------------------------------------------

    def _garbage(self, domid: int | None, path: str | bytes, why: str, limit: bool = False) -> None:
        self._out.append(Garbage(domid, _short(path), why, limit))

    def _dom(self, domid: int) -> _Dom:
        dom = self._doms.get(domid)
        if dom is None:
            dom = self._doms[domid] = _Dom(domid)
            self._touched.add(domid)
        return dom

    def _apply(
        self, raw: str | bytes, value: bytes | None, perms: Sequence[PermInput] | None
    ) -> None:
        path = parse_path(raw)
        if path is None:
            self._garbage(None, raw, "invalid path")
            return
        if path[0] == "@":
            self._out.append(RescanHint(path))
            return
        comps = path.split("/")
        top = comps[1]
        if top == "local":
            self._local(path, comps, value, perms)
        elif top == "libxl":
            self._libxl(path, comps, value)
        elif top == "vm":
            self._vm(comps, value)
        elif top == "" and value is None:  # "/" itself is gone
            self._remove_all_local()
            self._remove_libxl_all()
            self._vm(["", "vm"], None)

    # ---- /local/domain ------------------------------------------------------------------

    def _local(
        self,
        path: str,
        comps: list[str],
        value: bytes | None,
        perms: Sequence[PermInput] | None,
    ) -> None:
        n = len(comps)
        if n < 4:
            if value is None and (n == 2 or comps[2] == "domain"):
                self._remove_all_local()
            return
        if comps[2] != "domain":
            return
        d = parse_domid_component(comps[3])
        if d is None:
            self._garbage(None, path, "domain id in path is not a domain id")
            return
        if n == 4:
            if value is None:
                self._shared.note(d, path, None, None)
                self._shared.domain_gone(d)
                dom = self._doms.get(d)
                if dom is not None:
                    self._home_removed(dom)
            return
        if d != 0 and (value is None or perms is not None):
            self._shared.note(d, path, value, perms)
        if value is None and d not in self._doms:
            return  # nothing tracked there
        sub = comps[4]
        if sub == "device":
            if n >= 7:
                kind = comps[5]
                if kind in ("console", "vuart") or not _valid_kind(kind):
                    return
                devid = parse_uint_component(comps[6], _DEVID_MAX)
                if devid is None:
                    return  # e.g. device/suspend/event-channel: not a device directory
                self._front(d, kind, devid, comps[7:], path, value)
            elif value is None:
                self._front_prefix_removed(d, comps[5] if n == 6 else None)
        elif sub == "console":
            if n == 5 and value is None:
                self._front_prefix_removed(d, "console")
            else:
                self._front(d, "console", 0, comps[5:], path, value)
        elif sub == "vuart":
            if n >= 6:
                devid = parse_uint_component(comps[5], _DEVID_MAX)
                if devid is not None:
                    self._front(d, "vuart", devid, comps[6:], path, value)
            elif value is None:
                self._front_prefix_removed(d, "vuart")
        elif sub == "backend":
            self._back(d, comps, path, value)
        elif n == 5 and sub == "name":
            self._name(d, path, value)
        elif n == 5 and sub == "vm":
            self._vm_pointer(d, path, value)
        elif (sub == "memory" or sub == "cpu") and self._sizes(d, comps, path, value):
            return
        else:
            self._vchan_node(d, comps, path, value, perms)

    def _name(self, d: int, path: str, value: bytes | None) -> None:
        if d == 0:
            return
        name = None if value is None else parse_text(value, MAX_NAME)
        problem = ""
        if value is not None and name is None:
            problem = (
                f"domain name is not printable UTF-8 of at most {MAX_NAME} bytes: {_short(value)}"
            )
            self._garbage(d, path, "domain name is not printable UTF-8 of bounded length")
        dom = self._dom(d)
        if dom.name != name or dom.name_set != (value is not None) or dom.name_problem != problem:
            dom.name = name
            dom.name_set = value is not None
            dom.name_problem = problem
            self._dirty_doms.add(d)

    def _vm_pointer(self, d: int, path: str, value: bytes | None) -> None:
        """``/local/domain/<d>/vm`` (dom0-only). Once the domain is announced, a value that
        does not parse (or a removal) is only counted: the domain keeps its UUID until its
        home goes (or its ``/vm/<uuid>``). A valid other UUID is a new incarnation."""
        if d == 0:
            return
        uuid = None
        if value is not None:
            if value.startswith(b"/vm/") and len(value) == 40 and value.isascii():
                text = value[4:].decode("ascii")
                if is_uuid(text):
                    uuid = text
            if uuid is None:
                self._garbage(d, path, "vm is not /vm/<uuid>")
        dom = self._dom(d)
        if uuid is None and dom.emitted is not None:
            return
        if dom.uuid != uuid:
            dom.uuid = uuid
            self._dirty_doms.add(d)

    def _sizes(self, d: int, comps: list[str], path: str, value: bytes | None) -> bool:
        """``memory/{target,static-max}`` and ``cpu/<n>/availability`` (dom0-written).

        Returns True when a write was fully handled here; removals and other nodes go on to
        the vchan check as before (a removed subtree may hold a rendezvous too).
        """
        n = len(comps)
        sub = comps[4]
        if sub == "memory":
            if n == 5:
                if value is None:
                    dom = self._doms.get(d)
                    if dom is not None and (dom.mem_target is not None or dom.mem_max is not None):
                        dom.mem_target = dom.mem_max = None
                        self._sizes_dirty(d)
                return False
            if n != 6 or comps[5] not in _MEMORY_KEYS:
                return False
            kib = None
            if value is not None:
                kib = parse_uint(value, _MEMORY_KIB_MAX)
                if kib is None:
                    self._garbage(d, path, "memory size is not a KiB count")
            dom = self._doms.get(d) if value is None else self._dom(d)
            if dom is not None:
                if comps[5] == "target":
                    if dom.mem_target != kib:
                        dom.mem_target = kib
                        self._sizes_dirty(d)
                elif dom.mem_max != kib:
                    dom.mem_max = kib
                    self._sizes_dirty(d)
            return value is not None
        # cpu
        if n == 5:
            if value is None:
                dom = self._doms.get(d)
                if dom is not None and dom.cpus:
                    dom.cpus.clear()
                    self._sizes_dirty(d)
            return False
        if n > 7 or (n == 7 and comps[6] != "availability"):
            return False
        idx = parse_uint_component(comps[5], _VCPU_INDEX_MAX)
        if idx is None:
            if value is not None:
                self._garbage(d, path, "cpu entry is not a vCPU index")
            return value is not None
        if value is None:
            dom = self._doms.get(d)
            if dom is not None and idx in dom.cpus:
                del dom.cpus[idx]
                self._sizes_dirty(d)
            return False
        if n == 6:
            return True  # the cpu/<n> directory itself: its availability says more
        online = value == b"online"
        if not online and value != b"offline":
            self._garbage(d, path, "cpu availability is not online or offline")
        dom = self._dom(d)
        if dom.cpus.get(idx) != online:
            dom.cpus[idx] = online
            self._sizes_dirty(d)
        return True

    def _sizes_dirty(self, d: int) -> None:
        self._dirty_res.add(d)
        self._touched.add(d)

    def _home_removed(self, dom: _Dom) -> None:
        d = dom.domid
        self._dirty_doms.add(d)
        dom.name = None
        dom.name_set = False
        dom.name_problem = ""
        dom.uuid = None
        if dom.mem_target is not None or dom.mem_max is not None or dom.cpus:
            dom.mem_target = dom.mem_max = None
            dom.cpus.clear()
            self._dirty_res.add(d)
        dom.fronts.clear()
        for bkey in dom.backs:
            dk = self._be_index.get((d, *bkey))
            if dk is not None:
                self._dirty_devs.add(dk)
        dom.backs.clear()
        for path, vc in dom.vchans.items():
            vc.gone = True
            self._dirty_vchans.add((d, path))
        for kind, devid in dom.records:
            self._dirty_devs.add(DeviceKey(kind, d, devid))
        self._dirty_devs.update(dom.served)
        # xenstored drops permissions naming a dead domain (XSA-322): it is no longer a client.
        for s in self._vchan_servers:
            sdom = self._doms[s]
            for path, vc in sdom.vchans.items():
                for acc in (vc.rr_acc, vc.ec_acc):
                    if acc is not None and d in acc.readers:
                        acc.readers = acc.readers - {d}
                        self._dirty_vchans.add((s, path))

    def _remove_all_local(self) -> None:
        self._shared.note(0, "/local", None, None)
        for dom in list(self._doms.values()):
            self._home_removed(dom)

    # ---- frontends ----------------------------------------------------------------------

    def _front_prefix_removed(self, d: int, kind: str | None) -> None:
        """``device`` (kind None), ``device/<kind>``, ``console`` or ``vuart`` was removed."""
        dom = self._doms.get(d)
        if dom is None:
            return
        for fkey in list(dom.fronts):
            k = fkey[0]
            if kind is None:
                hit = k != "vuart" and fkey != ("console", 0)
            elif kind == "console":
                hit = fkey == ("console", 0)
            elif kind == "vuart":
                hit = k == "vuart"
            else:
                hit = k == kind and fkey != ("console", 0)
            if hit:
                del dom.fronts[fkey]
                self._front_dirty(dom, fkey)
                self._touched.add(d)

    def _front_dirty(self, dom: _Dom, fkey: tuple[str, int]) -> None:
        if fkey in dom.records:
            self._dirty_devs.add(DeviceKey(fkey[0], dom.domid, fkey[1]))

    def _front(
        self, d: int, kind: str, devid: int, rest: list[str], path: str, value: bytes | None
    ) -> None:
        fkey = (kind, devid)
        nrest = len(rest)
        if value is None:
            dom = self._doms.get(d)
            fe = dom.fronts.get(fkey) if dom is not None else None
            if dom is None or fe is None:
                return
            if nrest == 0:
                del dom.fronts[fkey]
                self._touched.add(d)
            else:
                sub = "/".join(rest)
                pre = sub + "/"
                if sub == "state":
                    fe.state = None
                for table in (fe.refs, fe.ports):
                    for k in [k for k in table if k == sub or k.startswith(pre)]:
                        del table[k]
            self._front_dirty(dom, fkey)
            return
        if nrest == 0 or nrest > 2:
            return
        name = rest[-1]
        if nrest == 1 and name == "state":
            state = parse_uint(value, _XENBUS_STATE_MAX)
            if state is None:
                self._garbage(d, path, "state is not a XenbusState")
            fe = self._front_get(d, fkey, path)
            if fe is not None and fe.state != state:
                fe.state = state
                self._front_dirty(self._doms[d], fkey)
            return
        if nrest == 1 and name in ("backend-id", "backend"):
            self._check_claim(d, fkey, name, path, value)
            return
        if _is_ref_key(name):
            ref = True
        elif _is_port_key(name):
            ref = False
        else:
            return  # features, mac, protocol …: not ours to judge
        num = parse_uint(value, U32_MAX)
        fe = self._front_get(d, fkey, path)
        if fe is None:
            return
        table = fe.refs if ref else fe.ports
        key = name if nrest == 1 else rest[0] + "/" + name
        if num is None:
            self._garbage(d, path, "grant ref or port is not a uint32")
            if table.pop(key, None) is not None:
                self._front_dirty(self._doms[d], fkey)
            return
        if table.get(key) == num:
            return
        if key not in table and len(fe.refs) + len(fe.ports) >= self._limits.ring_keys_per_device:
            self._garbage(d, path, "too many ring keys in one device", limit=True)
            return
        table[key] = num
        self._front_dirty(self._doms[d], fkey)

    def _front_get(self, d: int, fkey: tuple[str, int], path: str) -> _Front | None:
        dom = self._dom(d)
        fe = dom.fronts.get(fkey)
        if fe is None:
            if len(dom.fronts) >= self._limits.frontends_per_domain:
                self._garbage(d, path, "too many frontend directories", limit=True)
                return None
            fe = dom.fronts[fkey] = _Front()
        return fe

    def _check_claim(
        self, d: int, fkey: tuple[str, int], name: str, path: str, value: bytes
    ) -> None:
        """Count a guest-written backend pointer that disagrees with the record; never use it."""
        dom = self._doms.get(d)
        rec = dom.records.get(fkey) if dom is not None else None
        if rec is None or rec.backend is None:
            return
        be, bkind = rec.backend
        if name == "backend-id":
            if parse_domid(value) != be:
                self._garbage(d, path, "frontend backend-id disagrees with the libxl record")
        elif value != f"/local/domain/{be}/backend/{bkind}/{d}/{fkey[1]}".encode():
            self._garbage(d, path, "frontend backend path disagrees with the libxl record")

    # ---- backends -----------------------------------------------------------------------

    def _back(self, be: int, comps: list[str], path: str, value: bytes | None) -> None:
        n = len(comps)
        if n > 9:
            return
        bkind = comps[5] if n > 5 else None
        fe = parse_domid_component(comps[6]) if n > 6 else None
        devid = parse_uint_component(comps[7], _DEVID_MAX) if n > 7 else None
        if (n > 6 and fe is None) or (n > 7 and devid is None):
            if value is not None:
                self._garbage(be, path, "backend path with a bad frontend id or device id")
            return
        if value is None:
            dom = self._doms.get(be)
            if dom is None:
                return
            if n <= 8:
                for bkey in list(dom.backs):
                    if (
                        (bkind is None or bkey[0] == bkind)
                        and (fe is None or bkey[1] == fe)
                        and (devid is None or bkey[2] == devid)
                    ):
                        del dom.backs[bkey]
                        self._back_dirty(be, bkey)
                        self._touched.add(be)
                return
            assert bkind is not None and fe is not None and devid is not None
            bk = dom.backs.get((bkind, fe, devid))
            if bk is not None and comps[8] in ("state", "online"):
                if comps[8] == "state":
                    bk.state = None
                else:
                    bk.online = None
                self._back_dirty(be, (bkind, fe, devid))
            return
        if n != 9:
            return
        assert bkind is not None and fe is not None and devid is not None
        name = comps[8]
        if name == "frontend-id":
            if parse_domid(value) != fe:
                self._garbage(be, path, "backend frontend-id disagrees with its path")
            return
        if name == "state":
            state = parse_uint(value, _XENBUS_STATE_MAX)
            if state is None:
                self._garbage(be, path, "state is not a XenbusState")
            bk = self._back_get(be, (bkind, fe, devid), path)
            if bk is not None and bk.state != state:
                bk.state = state
                self._back_dirty(be, (bkind, fe, devid))
        elif name == "online":
            online = None
            if value in (b"0", b"1"):
                online = value == b"1"
            else:
                self._garbage(be, path, "online is not 0 or 1")
            bk = self._back_get(be, (bkind, fe, devid), path)
            if bk is not None and bk.online != online:
                bk.online = online
                self._back_dirty(be, (bkind, fe, devid))

    def _back_get(self, be: int, bkey: tuple[str, int, int], path: str) -> _Back | None:
        dom = self._dom(be)
        bk = dom.backs.get(bkey)
        if bk is None:
            if len(dom.backs) >= self._limits.backends_per_domain:
                self._garbage(be, path, "too many backend directories", limit=True)
                return None
            bk = dom.backs[bkey] = _Back()
        return bk

    def _back_dirty(self, be: int, bkey: tuple[str, int, int]) -> None:
        dk = self._be_index.get((be, *bkey))
        if dk is not None:
            self._dirty_devs.add(dk)

    # ---- /libxl -------------------------------------------------------------------------

    def _remove_libxl_all(self) -> None:
        for dom in list(self._doms.values()):
            self._libxl_removed(dom, None, None)
            if dom.libxl:
                dom.libxl = False
                self._dirty_doms.add(dom.domid)

    def _libxl_removed(self, dom: _Dom, kind: str | None, devid: int | None) -> None:
        for rkey, rec in dom.records.items():
            if (kind is None or rkey[0] == kind) and (devid is None or rkey[1] == devid):
                rec.gone = True
                self._dirty_devs.add(DeviceKey(rkey[0], dom.domid, rkey[1]))

    def _libxl(self, path: str, comps: list[str], value: bytes | None) -> None:
        n = len(comps)
        if n == 2:
            if value is None:
                self._remove_libxl_all()
            return
        d = parse_domid_component(comps[2])
        if d is None:
            self._garbage(None, path, "domain id in path is not a domain id")
            return
        if value is None:
            dom = self._doms.get(d)
            if dom is None:
                return
            if n == 3:
                if dom.libxl:
                    dom.libxl = False
                    self._dirty_doms.add(d)
                self._libxl_removed(dom, None, None)
                return
            if comps[3] != "device":
                return
            if n <= 6:
                kind = comps[4] if n > 4 else None
                devid = parse_uint_component(comps[5], _DEVID_MAX) if n > 5 else None
                if n > 5 and devid is None:
                    return
                self._libxl_removed(dom, kind, devid)
                return
            if n == 7:
                devid = parse_uint_component(comps[5], _DEVID_MAX)
                if devid is not None:
                    rec = dom.records.get((comps[4], devid))
                    if rec is not None and comps[6] in rec.keys:
                        self._record_key_removed(d, comps[4], devid, rec, comps[6])
            return
        dom = self._dom(d)
        if not dom.libxl:
            dom.libxl = True
            self._dirty_doms.add(d)
        if n < 6 or comps[3] != "device":
            return
        kind = comps[4]
        devid = parse_uint_component(comps[5], _DEVID_MAX)
        if not _valid_kind(kind) or devid is None:
            self._garbage(None, path, "libxl device record with a bad kind or device id")
            return
        rkey = (kind, devid)
        rec = dom.records.get(rkey)
        if rec is None:
            if len(dom.records) >= self._limits.records_per_domain:
                self._garbage(None, path, "too many device records", limit=True)
                return
            rec = dom.records[rkey] = _Record()
        elif rec.gone:
            rec.reset()  # removed and written again within one batch
            self._unlink_backend(d, kind, devid, rec)
        dk = DeviceKey(kind, d, devid)
        self._dirty_devs.add(dk)
        if n != 7:
            return
        name = comps[6]
        if name not in _RECORD_KEYS:
            return
        rec.keys.add(name)
        if name == "frontend":
            fpath = parse_abs_path_value(value)
            rec.frontend_ok = fpath == frontend_dir(dk)
            if not rec.frontend_ok:
                self._garbage(None, path, "record frontend is not the device's frontend directory")
        elif name == "backend":
            target = self._parse_backend_path(value, d, devid)
            if target is None:
                self._garbage(None, path, "record backend is not a backend directory of it")
            self._link_backend(dk, rec, target)
        elif name == "mode":
            if value not in (b"r", b"w"):
                self._garbage(None, path, "record mode is not r or w")
            rec.writable = value != b"r"
        elif name == _RESOURCE_KEY.get(kind):
            res = parse_text(value, MAX_VALUE)
            if res is None:
                self._garbage(None, path, "record resource is not printable UTF-8")
            rec.resource = res

    def _record_key_removed(self, d: int, kind: str, devid: int, rec: _Record, name: str) -> None:
        rec.keys.discard(name)
        if name == "frontend":
            rec.frontend_ok = False
        elif name == "backend":
            self._unlink_backend(d, kind, devid, rec)
        elif name == "mode":
            rec.writable = True
        else:
            rec.resource = None
        self._dirty_devs.add(DeviceKey(kind, d, devid))

    @staticmethod
    def _parse_backend_path(value: bytes, fe: int, devid: int) -> tuple[int, str] | None:
        p = parse_abs_path_value(value)
        if p is None or not p.startswith(_LOCAL_DOMAIN):
            return None
        comps = p.split("/")
        if len(comps) != 8 or comps[4] != "backend" or not _valid_kind(comps[5]):
            return None
        be = parse_domid_component(comps[3])
        if be is None or parse_domid_component(comps[6]) != fe:
            return None
        if parse_uint_component(comps[7], _DEVID_MAX) != devid:
            return None
        return be, comps[5]

    def _link_backend(self, dk: DeviceKey, rec: _Record, target: tuple[int, str] | None) -> None:
        if rec.backend == target:
            return
        self._unlink_backend(dk.frontend, dk.kind, dk.devid, rec)
        rec.backend = target
        if target is not None:
            be, bkind = target
            self._be_index[(be, bkind, dk.frontend, dk.devid)] = dk
            self._dom(be).served.add(dk)

    def _unlink_backend(self, fe: int, kind: str, devid: int, rec: _Record) -> None:
        if rec.backend is None:
            return
        be, bkind = rec.backend
        dk = DeviceKey(kind, fe, devid)
        if self._be_index.get((be, bkind, fe, devid)) == dk:
            del self._be_index[(be, bkind, fe, devid)]
        bdom = self._doms.get(be)
        if bdom is not None:
            bdom.served.discard(dk)
            self._touched.add(be)
        rec.backend = None

    # ---- /vm ----------------------------------------------------------------------------

    def _vm(self, comps: list[str], value: bytes | None) -> None:
        n = len(comps)
        if n == 2:
            if value is None and self._vms:
                self._vms.clear()
                self._dirty_doms.update(d for d, dom in self._doms.items() if dom.uuid)
            return
        uuid = comps[2]
        if value is None:
            if n == 3 and uuid in self._vms:
                self._vms.discard(uuid)
                self._dirty_doms.update(d for d, dom in self._doms.items() if dom.uuid == uuid)
            return
        if uuid in self._vms or not is_uuid(uuid):
            return
        self._vms.add(uuid)
        self._dirty_doms.update(d for d, dom in self._doms.items() if dom.uuid == uuid)

    # ---- vchans -------------------------------------------------------------------------

    def _vchan_node(
        self,
        s: int,
        comps: list[str],
        path: str,
        value: bytes | None,
        perms: Sequence[PermInput] | None,
    ) -> None:
        leaf = comps[-1]
        if value is None:
            dom = self._doms.get(s)
            if dom is None or not dom.vchans:
                return
            pre = path + "/"
            for vpath, cand in dom.vchans.items():
                if vpath == path or vpath.startswith(pre):
                    cand.gone = True
                    self._dirty_vchans.add((s, vpath))
            if leaf in _VCHAN_KEYS:
                vpath = path[: -len(leaf) - 1]
                old = dom.vchans.get(vpath)
                if old is not None:
                    if leaf == "ring-ref":
                        old.rr, old.rr_val, old.rr_acc = False, None, None
                    else:
                        old.ec, old.ec_val, old.ec_acc = False, None, None
                    self._dirty_vchans.add((s, vpath))
            return
        if leaf not in _VCHAN_KEYS or len(comps) < 6:
            return
        vpath = path[: -len(leaf) - 1]
        dom = self._dom(s)
        vc = dom.vchans.get(vpath)
        if vc is None:
            if len(dom.vchans) >= self._limits.vchans_per_domain:
                self._garbage(s, path, "too many vchan rendezvous directories", limit=True)
                p = parse_perms(perms) if perms is not None else None
                if p is None:  # unknown reach: every domain
                    self._shared.over_limit(s, path, _EMPTY, True)
                else:
                    peers = frozenset(d for d, a in p.acl if a != "n" and d not in (0, s))
                    self._shared.over_limit(s, path, peers, p.default != "n")
                return
            vc = dom.vchans[vpath] = _Vchan()
            self._vchan_servers.add(s)
        elif vc.gone:
            vc.reset()  # removed and written again within one batch
        num = parse_uint(value, U32_MAX)
        if num is None:
            self._garbage(s, path, "vchan ring-ref or event-channel is not a uint32")
        acc = None
        if perms is not None:
            p = parse_perms(perms)
            if p is None:
                self._garbage(s, path, "unreadable permissions: treated as readable by all")
                acc = _Access(_EMPTY, True)
            else:
                acc = _Access(p.readers(), p.world_readable)
        if leaf == "ring-ref":
            vc.rr, vc.rr_val = True, num
            if acc is not None:
                vc.rr_acc = acc
        else:
            vc.ec, vc.ec_val = True, num
            if acc is not None:
                vc.ec_acc = acc
        self._dirty_vchans.add((s, vpath))

    # ---- derived events -----------------------------------------------------------------

    def _present(self, d: int) -> bool:
        if d == 0:
            return True
        dom = self._doms.get(d)
        return dom is not None and dom.emitted is not None

    def _flush(self) -> list[Event]:
        out = self._out
        self._out = []
        if not (
            self._shared.pending()
            or self._dirty_doms
            or self._dirty_devs
            or self._dirty_vchans
            or self._touched
            or self._dirty_res
        ):
            return out
        vanished: list[int] = []
        if self._dirty_doms:
            doms = sorted(self._dirty_doms)
            self._dirty_doms.clear()
            self._touched.update(doms)
            for d in doms:
                self._flush_domain(d, out, vanished)
        if self._dirty_res:
            res = sorted(self._dirty_res)
            self._dirty_res.clear()
            for d in res:
                self._flush_resources(d, out)
        if self._dirty_devs:
            devs = sorted(self._dirty_devs) if len(self._dirty_devs) > 1 else list(self._dirty_devs)
            self._dirty_devs.clear()
            for dk in devs:
                self._flush_device(dk, out)
        if self._dirty_vchans:
            vcs = sorted(self._dirty_vchans)
            self._dirty_vchans.clear()
            for s, vpath in vcs:
                self._flush_vchan(s, vpath, out)
        out.extend(self._shared.flush(self._covered))
        if vanished:
            out.extend(DomainVanished(d) for d in vanished)
        if self._touched:
            for d in self._touched:
                dom = self._doms.get(d)
                if dom is not None and dom.empty():
                    del self._doms[d]
            self._touched.clear()
        return out

    def _covered(self, owner: int, path: str) -> tuple[frozenset[int], bool]:
        """Who another hook decides for a shared node of `owner` (`shyped.core.channels`): a
        published vchan's clients for its key nodes; for a node in a directory of an announced
        device (per the trusted record) owned by one end of it, the other end; else nobody."""
        leaf = path[path.rfind("/") + 1 :]
        dom = self._doms.get(owner)
        if leaf in _VCHAN_KEYS and dom is not None:
            vc = dom.vchans.get(path[: -len(leaf) - 1])
            if vc is not None and vc.emitted is not None:
                return frozenset(vc.emitted[0]), vc.emitted[1]
        where = device_dir_of(path)
        home = parse_domid_component(path.split("/")[3])
        if where is None or home is None:
            return _EMPTY, False
        side, kind, a, b = where
        if side == "front":  # libxl: frontend keys n<fe>,r<be>; read-only ones n<be>,r<fe>
            hdom = self._doms.get(home)
            rec = hdom.records.get((kind, a)) if hdom is not None else None
            ends = (home, rec.emitted[0]) if rec is not None and rec.emitted else None
        else:
            dk = self._be_index.get((home, kind, a, b))
            fdom = self._doms.get(a) if dk is not None else None
            rec = fdom.records.get((dk.kind, dk.devid)) if fdom and dk else None
            ends = (a, home) if rec is not None and rec.emitted else None
        if ends is None or owner not in ends:
            return _EMPTY, False
        return frozenset(ends) - {owner}, False

    def _flush_domain(self, d: int, out: list[Event], vanished: list[int]) -> None:
        """Announce a domain once its creation facts are all there; once announced it is gone
        only when its home ``/local/domain/<d>`` is removed (libxl's clean-up after death,
        with ``@releaseDomain``). A name that does not parse, a removed ``name``, ``vm``,
        ``/vm/<uuid>`` (two domains may share one) or ``/libxl/<d>`` never make it vanish."""
        dom = self._doms.get(d)
        if dom is None or d == 0:
            return
        if dom.emitted is None:
            complete = dom.name_set and dom.libxl and dom.uuid is not None
            if not complete or dom.uuid not in self._vms:
                return
        elif dom.uuid is None:
            dom.emitted = None
            vanished.append(d)
            self._wake(dom)
            return
        uuid = dom.uuid
        facts = (uuid, dom.name, dom.name_problem)
        if dom.emitted != facts:
            first = dom.emitted is None
            dom.emitted = facts
            out.append(DomainAppeared(d, uuid, dom.name, dom.name_problem))
            if first:
                self._wake(dom)

    def _flush_resources(self, d: int, out: list[Event]) -> None:
        dom = self._doms.get(d)
        if dom is None:
            return
        if not self._present(d):
            dom.em_res = None  # the domain's DomainVanished says it all
            return
        facts = dom.resources()
        if facts != dom.em_res:
            dom.em_res = facts
            out.append(DomainResources(d, *(facts or (None, None, None, None))))

    def _wake(self, dom: _Dom) -> None:
        """The domain came or went: re-evaluate everything that depends on its presence."""
        d = dom.domid
        self._dirty_res.add(d)
        self._dirty_devs.update(DeviceKey(k, d, i) for k, i in dom.records)
        self._dirty_devs.update(dom.served)
        self._dirty_vchans.update((d, p) for p in dom.vchans)

    def _flush_device(self, dk: DeviceKey, out: list[Event]) -> None:
        dom = self._doms.get(dk.frontend)
        rkey = (dk.kind, dk.devid)
        rec = dom.records.get(rkey) if dom is not None else None
        if dom is None or rec is None:
            return
        active = (
            not rec.gone
            and rec.frontend_ok
            and rec.backend is not None
            and self._present(dk.frontend)
            and self._present(rec.backend[0])
        )
        if not active:
            if rec.emitted is not None:
                self._shared.recheck(dk.frontend)
                self._shared.recheck(rec.emitted[0])
                out.append(DeviceRemoved(dk, rec.emitted[0]))
                rec.emitted = None
                rec.em_fe_state = None
                rec.em_be = (None, None)
                rec.em_rings = None
            if rec.gone:
                self._unlink_backend(dk.frontend, dk.kind, dk.devid, rec)
                del dom.records[rkey]
                self._touched.add(dk.frontend)
            return
        assert rec.backend is not None
        be, bkind = rec.backend
        facts = (be, bkind, rec.resource, rec.writable)
        if rec.emitted != facts:
            if rec.emitted is not None and rec.emitted[:2] != facts[:2]:
                rec.em_be = (None, None)
            rec.emitted = facts
            self._shared.recheck(dk.frontend)
            self._shared.recheck(be)
            out.append(DeviceAdded(dk, be, bkind, rec.resource, rec.writable))
        fe = dom.fronts.get(rkey)
        state = fe.state if fe is not None else None
        if state != rec.em_fe_state:
            rec.em_fe_state = state
            out.append(FrontendStateChanged(dk, state))
        bdom = self._doms.get(be)
        bk = bdom.backs.get((bkind, dk.frontend, dk.devid)) if bdom is not None else None
        bfacts = (bk.state, bk.online) if bk is not None else (None, None)
        if bfacts != rec.em_be:
            rec.em_be = bfacts
            out.append(BackendStateChanged(dk, be, bfacts[0], bfacts[1]))
        rings = None
        if fe is not None and fe.refs and fe.ports and (state is None or state == 3 or state == 4):
            rings = (tuple(sorted(fe.refs.items())), tuple(sorted(fe.ports.items())))
        if rings != rec.em_rings:
            if rings is not None:
                out.append(RingsPublished(dk, rings[0], rings[1]))
            elif rec.em_rings is not None:
                out.append(RingsWithdrawn(dk))
            rec.em_rings = rings

    def _flush_vchan(self, s: int, vpath: str, out: list[Event]) -> None:
        dom = self._doms.get(s)
        vc = dom.vchans.get(vpath) if dom is not None else None
        if dom is None or vc is None:
            return
        facts = None
        if not vc.gone and vc.rr and vc.ec and self._present(s):
            ra, ea = vc.rr_acc, vc.ec_acc
            if ra is not None and ea is not None:
                if ra.world and ea.world:
                    readers: frozenset[int] = _EMPTY
                elif ra.world:
                    readers = ea.readers
                elif ea.world:
                    readers = ra.readers
                else:
                    readers = ra.readers & ea.readers
                clients = tuple(sorted(readers - {s}))
                world = ra.world and ea.world
                if clients or world:
                    facts = (clients, world, vc.rr_val, vc.ec_val)
        if facts != vc.emitted:
            self._shared.touch(vpath + "/ring-ref")
            self._shared.touch(vpath + "/event-channel")
            if facts is not None:
                out.append(VchanPublished(s, vpath, facts[0], facts[1], facts[2], facts[3]))
            elif vc.emitted is not None:
                out.append(VchanRemoved(s, vpath))
            vc.emitted = facts
        if vc.gone:
            del dom.vchans[vpath]
            if not dom.vchans:
                self._vchan_servers.discard(s)
            self._touched.add(s)

    # ---- reconcile ----------------------------------------------------------------------

    def _tracked_paths(self) -> Iterator[str]:
        """Every node path the current state relies on (directories and their keys)."""
        for d, dom in self._doms.items():
            home = f"/local/domain/{d}"
            sized = dom.mem_target is not None or dom.mem_max is not None or dom.cpus
            if d != 0 and (dom.name or dom.uuid or dom.fronts or dom.backs or dom.vchans or sized):
                yield home
            if dom.mem_target is not None:
                yield home + "/memory/target"
            if dom.mem_max is not None:
                yield home + "/memory/static-max"
            for idx in dom.cpus:
                yield f"{home}/cpu/{idx}/availability"
            if dom.name is not None:
                yield home + "/name"
            if dom.uuid is not None:
                yield home + "/vm"
            if dom.libxl or dom.records:
                yield f"/libxl/{d}"
            for (kind, devid), rec in dom.records.items():
                base = f"/libxl/{d}/device/{kind}/{devid}"
                yield base
                for k in rec.keys:
                    yield base + "/" + k
            for (kind, devid), fe in dom.fronts.items():
                base = frontend_dir(DeviceKey(kind, d, devid))
                yield base
                if fe.state is not None:
                    yield base + "/state"
                for k in fe.refs:
                    yield base + "/" + k
                for k in fe.ports:
                    yield base + "/" + k
            for (bkind, fe_id, devid), bk in dom.backs.items():
                base = f"{home}/backend/{bkind}/{fe_id}/{devid}"
                yield base
                if bk.state is not None:
                    yield base + "/state"
                if bk.online is not None:
                    yield base + "/online"
            for vpath, vc in dom.vchans.items():
                yield vpath
                if vc.rr:
                    yield vpath + "/ring-ref"
                if vc.ec:
                    yield vpath + "/event-channel"
        for u in self._vms:
            yield f"/vm/{u}"
        yield from self._shared.paths()
