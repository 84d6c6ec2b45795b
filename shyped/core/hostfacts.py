"""What the host model knows and asks: domain states, keys, the facts kept per domain, device,
vchan and shared node, the questions for the policy and the running system. Pure values;
`shyped.core.host.HostModel` keeps and changes them."""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Sequence
from typing import Literal, NamedTuple

import attrs

from shyped.core.channels import ChannelKey
from shyped.core.events import (
    DeviceKey,
)

DecisionKind = Literal["domain", "device", "vchan", "channel"]


class DomainState(enum.StrEnum):
    """Where a domain stands with the daemon."""

    SEEN = "seen"  #: appeared, not decided yet
    ADMITTED = "admitted"
    DENIED = "denied"
    PAUSED = "paused"  #: admitted once, then held paused by the daemon (e.g. after a relabel)
    GONE = "gone"  #: vanished; only seen on objects handed out before


#: States that count as decided for the devices and vchans waiting on a domain.
_DECIDED = frozenset({DomainState.ADMITTED, DomainState.DENIED, DomainState.PAUSED})
#: States whose domain belongs to the running system (Chinese Wall, policy update check).
_RUNNING = frozenset({DomainState.ADMITTED, DomainState.PAUSED})


class VchanKey(NamedTuple):
    """A vchan rendezvous: the server domain and the directory it published."""

    server: int
    path: str


@attrs.frozen
class ResourceUse:
    """A domain using a resource: vbd ``params`` path, vif bridge, 9pfs path (raw values)."""

    domid: int
    kind: str
    resource: str
    writable: bool


@attrs.frozen
class NeedsDecision:
    """Something the policy must decide.

    * ``domain``: `key` and `domid` are the domain; `uuid`, `name` identify it.
    * ``device``: `key` is the `DeviceKey`, `domid` the frontend, `peers` = (backend,),
      `resource` what the frontend uses through it (None for console and the like).
    * ``vchan``: `key` is the `VchanKey`, `domid` the server, `peers` the named clients,
      `any_peer` True if every domain may connect.
    * ``channel``: `key` is the `ChannelKey` of a shared guest-owned node, `domid` its owner,
      `peers` the domains it names, `any_peer` True if every domain may reach it;
      `over_limit` True for a node past the tracking bound (not stored: always current).

    `facts` fingerprints what the question was asked on (see `HostModel.is_current`).
    """

    kind: DecisionKind
    key: int | DeviceKey | VchanKey | ChannelKey
    domid: int
    peers: tuple[int, ...] = ()
    any_peer: bool = False
    uuid: str | None = None
    name: str | None = None
    resource: ResourceUse | None = None
    facts: tuple[object, ...] = ()
    over_limit: bool = False
    #: ``domain`` only: why its identity cannot be trusted (a name that does not parse, a
    #: UUID another domain holds); such a domain is denied unless it already runs.
    identity: str = ""


@attrs.frozen
class DomainReleased:
    """A domain vanished; `state` and `label` are what it had (release CW counts if running)."""

    domid: int
    uuid: str | None
    name: str | None
    label: str | None
    state: DomainState


ModelOutput = NeedsDecision | DomainReleased


@attrs.frozen
class RecordedDecision:
    """A decision the engine recorded, with the facts it was made on."""

    allowed: bool
    reason: str
    facts: tuple[object, ...]


@attrs.define
class GarbageRecord:
    """Ignored input: how much, and the last few (path, reason) pairs."""

    ring: int = 16
    count: int = 0
    limit_hits: int = 0
    #: Made on the first add: an empty bounded deque costs ~760 bytes, per domain.
    _last: deque[tuple[str, str]] | None = attrs.field(init=False, default=None)

    @property
    def last(self) -> Sequence[tuple[str, str]]:
        """The last `ring` (path, reason) pairs, oldest first."""
        return () if self._last is None else self._last

    def add(self, path: str, why: str, limit: bool) -> None:
        self.count += 1
        if limit:
            self.limit_hits += 1
        if self._last is None:
            self._last = deque(maxlen=self.ring)
        self._last.append((path, why))


@attrs.define
class _NoGarbage(GarbageRecord):
    """The record of a domain that never wrote garbage (most): empty, shared, never added to
    (`HostUpdates.garbage` gives the domain a record of its own first)."""

    def add(self, path: str, why: str, limit: bool) -> None:
        raise TypeError("the shared empty garbage record is read-only")


#: See `_NoGarbage` (a record per domain cost ~80 bytes).
NO_GARBAGE: GarbageRecord = _NoGarbage(0)


@attrs.define(weakref_slot=False)
class Domain:
    """A domain as the daemon knows it."""

    domid: int
    uuid: str | None
    name: str | None
    state: DomainState = DomainState.SEEN
    label: str | None = None
    decision: RecordedDecision | None = None
    asked: tuple[object, ...] | None = None
    garbage: GarbageRecord = NO_GARBAGE  # made by `HostUpdates.garbage` on the first write
    events: int = 0
    #: dom0-written sizes (`DomainResources`): KiB, and vCPUs possible / online. None: unknown.
    memory_target_kib: int | None = None
    memory_static_max_kib: int | None = None
    vcpus: int | None = None
    vcpus_online: int | None = None
    #: Recorded decisions about this domain: (kind, allowed) -> count.
    decisions: dict[tuple[DecisionKind, bool], int] = attrs.field(factory=dict)
    #: Changes (model-wide unique value) when anything this domain's account derives from does.
    revision: int = 0
    #: Why its identity cannot be trusted ("" if it can): see `NeedsDecision.identity`.
    identity: str = ""
    #: The last `party_fact` made (shared by the facts of every decision naming this domain).
    _party: tuple[int, bool] | None = attrs.field(init=False, default=None, eq=False, repr=False)
    #: The last party states made for a device of this frontend (`shared_states`).
    _states: tuple[object, ...] | None = attrs.field(init=False, default=None, eq=False, repr=False)

    def shared_states(self, states: tuple[object, ...]) -> tuple[object, ...]:
        """`states` or an equal tuple made before for another device of this frontend (its
        devices mostly have one backend: one tuple object in all their facts)."""
        held = self._states
        if held == states:
            return held
        self._states = states
        return states

    def party_fact(self) -> tuple[int, bool]:
        """(domid, denied): this domain's part in a device's, vchan's or channel's facts."""
        denied = self.state is DomainState.DENIED
        p = self._party
        if p is None or p[1] != denied:
            p = self._party = (self.domid, denied)
        return p


@attrs.define
class Device:
    """A PV device between a frontend and a backend domain (from the trusted libxl record)."""

    key: DeviceKey
    backend: int
    backend_kind: str
    resource: str | None
    writable: bool
    #: Given to the guest outside the PV handshake too (`shyped.core.events.DeviceAdded`).
    emulated: bool = False
    frontend_state: int | None = None
    backend_state: int | None = None
    online: bool | None = None
    grant_refs: tuple[tuple[str, int], ...] = ()
    event_channels: tuple[tuple[str, int], ...] = ()
    decision: RecordedDecision | None = None
    asked: tuple[object, ...] | None = None

    @property
    def published(self) -> bool:
        """The frontend has published its rings (grant refs and ports)."""
        return bool(self.grant_refs)


@attrs.define
class Vchan:
    """A vchan rendezvous offered by `key.server` to `clients` (or to anyone)."""

    key: VchanKey
    clients: tuple[int, ...]
    any_domain: bool
    ring_ref: int | None
    port: int | None
    decision: RecordedDecision | None = None
    asked: tuple[object, ...] | None = None


@attrs.define
class Channel:
    """A guest-owned node `key.path` of `key.owner` that `peers` (or anyone) may reach."""

    key: ChannelKey
    peers: tuple[int, ...]
    any_domain: bool
    decision: RecordedDecision | None = None
    asked: tuple[object, ...] | None = None


@attrs.frozen
class RunningDomain:
    """A running (admitted or paused) domain with its label."""

    domid: int
    uuid: str | None
    name: str | None
    label: str


@attrs.frozen(order=True)
class LiveChannel:
    """An allowed channel between two running domains: a device kind or ``vchan``."""

    dom_a: int
    dom_b: int
    kind: str


@attrs.frozen
class RunningSystem:
    """What a new policy must accept (plain data; the policy side adapts it)."""

    domains: tuple[RunningDomain, ...]
    channels: tuple[LiveChannel, ...]
    resources: tuple[ResourceUse, ...]


#: Per-domain index of keys (devices, vchans, shared nodes with a domain at either end): a
#: tuple while small (most domains have a handful: a set costs 216 bytes and up, a tuple of
#: three 64), a set past `_SMALL_INDEX` entries (dom0 serves every device: no quadratic copies).
DomIndex = dict[int, "tuple[object, ...] | set[object]"]
_SMALL_INDEX = 8


def _add(index: DomIndex, domid: int, item: object) -> None:
    s = index.get(domid)
    if s is None:
        index[domid] = (item,)
    elif isinstance(s, set):
        s.add(item)
    elif item not in s:
        index[domid] = (*s, item) if len(s) < _SMALL_INDEX else {*s, item}


def _discard(index: DomIndex, domid: int, item: object) -> None:
    s = index.get(domid)
    if s is None:
        return
    if isinstance(s, set):
        s.discard(item)
        if not s:
            del index[domid]
    elif item in s:
        rest = tuple(x for x in s if x != item)
        if rest:
            index[domid] = rest
        else:
            del index[domid]
