"""Typed events from xenstore nodes: a sans-I/O assembler (no I/O, no reactor, no xenstore).

The gateway hands over what xenstored reports — a node's path, its value read after the watch
fired (``None``: the node is absent, i.e. it or an ancestor was removed) and, for the few nodes
where it matters, the node's permission list — and `EventAssembler` (`shyped.core.assembler`,
one reader per subtree behind a small façade) turns that into the typed events defined here. It
keeps the little state needed to join facts spread over several nodes (a device is only known
once its libxl record, its domain and its backend domain are all there), so the events come out
the same whether the nodes arrive one by one, in the burst of one transaction's watch events
(`EventAssembler.feed_batch`) or as a full snapshot during reconcile
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
  permissions naming it stop counting; but when one batch also announces a new domain with
  its UUID (a restart), it comes right before that `DomainAppeared` (its removals follow).
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

from collections.abc import Iterator, Sequence
from typing import Final, NamedTuple, Protocol, runtime_checkable

import attrs

from shyped.core.channels import (
    ChannelShared,
    ChannelUnshared,
    guest_path,
)
from shyped.core.xsparse import (
    PermInput,
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

    ``resource`` is the raw record value (vbd ``params``, vif ``bridge``, 9pfs ``path``, the
    BDF of a ``pci`` device) or None; ``writable`` is False only for a vbd whose record says
    ``mode`` = ``r``. ``emulated``: dom0's device model (or the hypervisor, for PCI) gives the
    guest the resource outside the PV handshake too -- an HVM guest's disks and ``vif_ioemu``
    NICs, a passed-through PCI device -- so cutting the PV device does not take it away.
    """

    device: DeviceKey
    backend: int
    backend_kind: str
    resource: str | None
    writable: bool
    emulated: bool = False


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
    """A snapshot entry as the gateway returns it (``shyped.xenstore.gatewayconfig.Node``)."""

    @property
    def value(self) -> bytes: ...

    @property
    def perms(self) -> Sequence[PermInput] | None: ...


#: What `EventAssembler.reconcile` takes per path: ``(value, perms)`` or a `SnapshotNode`.
SnapshotEntry = tuple[bytes, Sequence[PermInput] | None] | SnapshotNode


@runtime_checkable
class SortedSnapshot(Protocol):
    """A snapshot that holds its nodes packed and gives them in sorted path order, one at a
    time (``shyped.xenstore.snapshot.ScanEntries``): `EventAssembler.reconcile` feeds it
    without making every path and value an object at once."""

    def __len__(self) -> int: ...

    def __contains__(self, path: object) -> bool: ...

    def sorted_items(self) -> Iterator[tuple[str, bytes, Sequence[PermInput] | None]]: ...


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


def ignored_subtree(path: str) -> bool:
    """True if the assembler ignores `path` and everything below it, so a reconcile walk
    need not read it: top-level trees other than ``/local``, ``/libxl`` and ``/vm``,
    ``/local/<x>`` for x other than ``domain``, and whatever is below ``/vm/<uuid>`` (only the
    UUID's presence counts, and its node is read)."""
    comps = path.split("/", 4)
    n = len(comps)
    if n < 2 or comps[1] == "":
        return False  # "/" itself
    top = comps[1]
    if top == "local":
        return n >= 3 and comps[2] != "domain"
    if top == "vm":
        return n >= 4
    return top != "libxl"


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
