"""The host model's updates: the typed events applied to domains, devices, vchans and shared
nodes, and the questions they raise. Pure. `shyped.core.host.HostModel` adds the queries and
the decisions recorded."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, cast

from shyped.core.channels import ChannelKey, ChannelShared, ChannelUnshared
from shyped.core.events import (
    BackendStateChanged,
    DeviceAdded,
    DeviceKey,
    DeviceRemoved,
    DomainAppeared,
    DomainResources,
    DomainVanished,
    Event,
    FrontendStateChanged,
    Garbage,
    RescanHint,
    RingsPublished,
    RingsWithdrawn,
    VchanPublished,
    VchanRemoved,
)
from shyped.core.hostfacts import (
    _DECIDED,
    NO_GARBAGE,
    Channel,
    DecisionKind,
    Device,
    Domain,
    DomainReleased,
    DomainState,
    DomIndex,
    GarbageRecord,
    ModelOutput,
    NeedsDecision,
    ResourceUse,
    Vchan,
    VchanKey,
    _add,
    _discard,
)


class HostUpdates:
    """The model's state and how events change it (see `HostModel`)."""

    def __init__(
        self, dom0_label: str | None = None, *, dom0_name: str = "Domain-0", garbage_ring: int = 16
    ) -> None:
        self._ring = garbage_ring
        self._domains: dict[int, Domain] = {
            0: Domain(
                0,
                None,
                dom0_name,
                state=DomainState.ADMITTED,
                label=dom0_label,
            )
        }
        #: uuid -> domids naming it, in order of appearance (the first one holds the UUID).
        #: A single domid where only one names it (most UUIDs): no list per domain.
        self._by_uuid: dict[str | None, int | list[int]] = {}
        self._devices: dict[DeviceKey, Device] = {}
        self._vchans: dict[VchanKey, Vchan] = {}
        self._dom_devices: DomIndex = {}  # domid -> DeviceKeys (either end)
        self._dom_vchans: DomIndex = {}  # domid -> VchanKeys (server or client)
        self._channels: dict[ChannelKey, Channel] = {}
        self._dom_channels: DomIndex = {}  # domid -> ChannelKeys (owner or peer)
        #: Garbage from domains the model does not know (or from dom0-only trees).
        self.unattributed = GarbageRecord(garbage_ring)
        #: Events applied, by event class name.
        self.counters: dict[str, int] = {}
        self._revision = 0
        self._handlers: dict[type, Callable[[Any], list[ModelOutput]]] = {
            Garbage: self._on_garbage,
            FrontendStateChanged: self._on_frontend_state,
            BackendStateChanged: self._on_backend_state,
            RingsPublished: self._on_rings,
            RingsWithdrawn: self._on_rings_withdrawn,
            DeviceAdded: self._device_added,
            DeviceRemoved: self._on_device_removed,
            VchanPublished: self._vchan_published,
            VchanRemoved: self._on_vchan_removed,
            ChannelShared: self._channel_shared,
            ChannelUnshared: self._on_channel_unshared,
            DomainAppeared: self._domain_appeared,
            DomainResources: self._on_resources,
            DomainVanished: self._on_vanished,
            RescanHint: self._on_hint,
        }

    def _uuid_holders(self, uuid: str | None) -> Sequence[int]:
        """The domids naming `uuid`, in order of appearance (the first one holds it)."""
        ids = self._by_uuid.get(uuid)
        if ids is None:
            return ()
        return (ids,) if isinstance(ids, int) else ids

    def garbage(self, domid: int | None) -> GarbageRecord:
        """The garbage record of a domain (the unattributed one for None or unknown ids)."""
        dom = self._domains.get(domid) if domid is not None else None
        if dom is None:
            return self.unattributed
        if dom.garbage is NO_GARBAGE:
            dom.garbage = GarbageRecord(self._ring)
        return dom.garbage

    def apply_all(self, events: Iterable[Event]) -> list[ModelOutput]:
        out: list[ModelOutput] = []
        for e in events:
            out.extend(self.apply(e))
        return out

    def apply(self, event: Event) -> list[ModelOutput]:
        """Update the model from one event; return what the engine must act on."""
        cls = type(event)
        name = cls.__name__
        self.counters[name] = self.counters.get(name, 0) + 1
        handler = self._handlers.get(cls)
        if handler is None:
            raise TypeError(f"not an event: {event!r}")
        return handler(event)

    def _on_garbage(self, e: Garbage) -> list[ModelOutput]:
        self.garbage(e.domid).add(e.path, e.why, e.limit)
        if e.domid is not None:
            self._bump(e.domid)
        return []

    def _on_frontend_state(self, e: FrontendStateChanged) -> list[ModelOutput]:
        dev = self._devices.get(e.device)
        if dev is not None:
            dev.frontend_state = e.state
            self._count(e.device.frontend)
        return []

    def _on_backend_state(self, e: BackendStateChanged) -> list[ModelOutput]:
        dev = self._devices.get(e.device)
        if dev is not None:
            dev.backend_state = e.state
            dev.online = e.online
            self._count(dev.backend)
        return []

    def _on_rings(self, e: RingsPublished) -> list[ModelOutput]:
        dev = self._devices.get(e.device)
        if dev is not None:
            dev.grant_refs = e.grant_refs
            dev.event_channels = e.event_channels
            self._count(e.device.frontend)
        return []

    def _on_rings_withdrawn(self, e: RingsWithdrawn) -> list[ModelOutput]:
        dev = self._devices.get(e.device)
        if dev is not None:
            dev.grant_refs = ()
            dev.event_channels = ()
            self._count(e.device.frontend)
        return []

    def _on_device_removed(self, e: DeviceRemoved) -> list[ModelOutput]:
        self._drop_device(e.device)
        self._count(e.device.frontend)
        return []

    def _on_vchan_removed(self, e: VchanRemoved) -> list[ModelOutput]:
        self._drop_vchan(VchanKey(e.server, e.path))
        self._count(e.server)
        return []

    def _on_resources(self, e: DomainResources) -> list[ModelOutput]:
        dom = self._domains.get(e.domid)
        if dom is not None:
            dom.memory_target_kib = e.memory_target_kib
            dom.memory_static_max_kib = e.memory_static_max_kib
            dom.vcpus = e.vcpus
            dom.vcpus_online = e.vcpus_online
            self._bump(e.domid)
        return []

    def _on_vanished(self, e: DomainVanished) -> list[ModelOutput]:
        return self._domain_vanished(e.domid)

    @staticmethod
    def _on_hint(e: RescanHint) -> list[ModelOutput]:
        return []

    def _count(self, domid: int) -> None:
        dom = self._domains.get(domid)
        if dom is not None:
            dom.events += 1
            self._revision += 1
            dom.revision = self._revision

    def _bump(self, domid: int) -> None:
        """Something `domid`'s account derives from changed."""
        dom = self._domains.get(domid)
        if dom is not None:
            self._revision += 1
            dom.revision = self._revision

    def _domain_appeared(self, e: DomainAppeared) -> list[ModelOutput]:
        """A domain is identified by its domid; a UUID another domain already holds, or a name
        that does not parse, is an identity problem (decided: denied unless it runs)."""
        out: list[ModelOutput] = []
        dom = self._domains.get(e.domid)
        if dom is not None and dom.uuid != e.uuid:
            out.extend(self._domain_vanished(e.domid))  # a new incarnation under the same id
            dom = None
        if dom is None:
            dom = self._domains[e.domid] = Domain(e.domid, e.uuid, e.name)
            ids = self._by_uuid.get(e.uuid)
            if ids is None:
                self._by_uuid[e.uuid] = e.domid
            elif isinstance(ids, int):
                self._by_uuid[e.uuid] = [ids, e.domid]
            else:
                ids.append(e.domid)
        else:
            dom.name = e.name
        holder = self._uuid_holders(e.uuid)[0]
        problems = [e.name_problem] if e.name_problem else []
        if holder != e.domid:
            problems.append(f"UUID {e.uuid} is already held by domain {holder}")
        dom.identity = "; ".join(problems)
        self._count(e.domid)
        need = self._ask_domain(dom)
        if need is not None:
            out.append(need)
        return out

    def _domain_vanished(self, domid: int) -> list[ModelOutput]:
        if domid == 0:
            return []
        dom = self._domains.pop(domid, None)
        if dom is None:
            return []
        if dom.uuid is not None:
            ids = self._by_uuid.get(dom.uuid)
            if ids == domid:
                del self._by_uuid[dom.uuid]
            elif isinstance(ids, list) and domid in ids:
                ids.remove(domid)
                if len(ids) == 1:
                    self._by_uuid[dom.uuid] = ids[0]
        for key in list(cast("Collection[DeviceKey]", self._dom_devices.get(domid, ()))):
            if key.frontend == domid:
                self._drop_device(key)
        for vkey in list(cast("Collection[VchanKey]", self._dom_vchans.get(domid, ()))):
            if vkey.server == domid:
                self._drop_vchan(vkey)
        for ckey in list(cast("Collection[ChannelKey]", self._dom_channels.get(domid, ()))):
            if ckey.owner == domid:
                self._drop_channel(ckey)
        released = DomainReleased(domid, dom.uuid, dom.name, dom.label, dom.state)
        dom.state = DomainState.GONE
        return [released]

    def _decided(self, domid: int) -> bool:
        dom = self._domains.get(domid)
        return dom is not None and dom.state in _DECIDED

    def _ask_domain(self, dom: Domain, force: bool = False) -> NeedsDecision | None:
        facts: tuple[object, ...] = (dom.uuid,)
        if not force and (
            (dom.decision is not None and dom.decision.facts == facts) or dom.asked == facts
        ):
            return None
        dom.asked = facts
        return NeedsDecision(
            "domain",
            dom.domid,
            dom.domid,
            uuid=dom.uuid,
            name=dom.name,
            facts=facts,
            identity=dom.identity,
        )

    def set_state(self, domid: int, state: DomainState) -> None:
        """Record what the engine did to a domain (e.g. PAUSED); GONE comes from events only."""
        if state is DomainState.GONE:
            raise ValueError("a domain is gone when its xenstore tree is, not on request")
        dom = self._domains.get(domid)
        if dom is None:
            raise KeyError(domid)
        dom.state = state
        self._bump(domid)

    def set_label(self, domid: int, label: str | None) -> None:
        """Record a domain's new label (a relabel the daemon allowed); decisions stay."""
        dom = self._domains.get(domid)
        if dom is None:
            raise KeyError(domid)
        dom.label = label
        self._bump(domid)

    def _device_added(self, e: DeviceAdded) -> list[ModelOutput]:
        key = e.device
        dev = self._devices.get(key)
        if dev is None:
            dev = self._devices[key] = Device(
                key, e.backend, e.backend_kind, e.resource, e.writable, e.emulated
            )
            _add(self._dom_devices, key.frontend, key)
            _add(self._dom_devices, e.backend, key)
        else:
            if dev.backend != e.backend:
                if dev.backend != key.frontend:
                    _discard(self._dom_devices, dev.backend, key)
                _add(self._dom_devices, e.backend, key)
                self._bump(dev.backend)
            dev.backend = e.backend
            dev.backend_kind = e.backend_kind
            dev.resource = e.resource
            dev.writable = e.writable
            dev.emulated = e.emulated
        self._count(key.frontend)
        self._bump(e.backend)
        need = self._ask_device(dev)
        return [need] if need is not None else []

    def _drop_device(self, key: DeviceKey) -> None:
        dev = self._devices.pop(key, None)
        if dev is not None:
            _discard(self._dom_devices, key.frontend, key)
            _discard(self._dom_devices, dev.backend, key)
            self._bump(key.frontend)
            self._bump(dev.backend)

    def _device_facts(self, dev: Device) -> tuple[object, ...]:
        states = self._party_states((dev.key.frontend, dev.backend))
        fdom = self._domains.get(dev.key.frontend)
        if fdom is not None:
            states = fdom.shared_states(states)
        return (dev.backend, dev.backend_kind, dev.resource, dev.writable, dev.emulated, states)

    def _ask_device(self, dev: Device, force: bool = False) -> NeedsDecision | None:
        fe = dev.key.frontend
        if not (self._decided(fe) and self._decided(dev.backend)):
            return None
        facts = self._device_facts(dev)
        if not force and (
            (dev.decision is not None and dev.decision.facts == facts) or dev.asked == facts
        ):
            return None
        dev.asked = facts
        res = None
        if dev.resource is not None:
            res = ResourceUse(fe, dev.key.kind, dev.resource, dev.writable)
        return NeedsDecision("device", dev.key, fe, peers=(dev.backend,), resource=res, facts=facts)

    def _vchan_published(self, e: VchanPublished) -> list[ModelOutput]:
        key = VchanKey(e.server, e.path)
        v = self._vchans.get(key)
        if v is None:
            v = self._vchans[key] = Vchan(key, e.clients, e.any_domain, e.ring_ref, e.port)
            _add(self._dom_vchans, e.server, key)
        else:
            for c in v.clients:
                if c != e.server and c not in e.clients:
                    _discard(self._dom_vchans, c, key)
                    self._bump(c)
            v.clients = e.clients
            v.any_domain = e.any_domain
            v.ring_ref = e.ring_ref
            v.port = e.port
        for c in e.clients:
            _add(self._dom_vchans, c, key)
            self._bump(c)
        self._count(e.server)
        need = self._ask_vchan(v)
        return [need] if need is not None else []

    def _drop_vchan(self, key: VchanKey) -> None:
        v = self._vchans.pop(key, None)
        if v is not None:
            _discard(self._dom_vchans, key.server, key)
            self._bump(key.server)
            for c in v.clients:
                _discard(self._dom_vchans, c, key)
                self._bump(c)

    def _vchan_facts(self, v: Vchan) -> tuple[object, ...]:
        known = tuple(c for c in v.clients if self._decided(c))
        return (v.clients, v.any_domain, known, self._party_states((v.key.server, *v.clients)))

    def _ask_vchan(self, v: Vchan, force: bool = False) -> NeedsDecision | None:
        return self._ask_pair("vchan", v, v.key.server, v.clients, v.any_domain, force)

    def _ask_pair(
        self,
        kind: DecisionKind,
        obj: Vchan | Channel,
        subject: int,
        peers: tuple[int, ...],
        any_peer: bool,
        force: bool,
    ) -> NeedsDecision | None:
        """The question about a vchan or shared node once its subject and every present peer
        are decided (None: wait, or already asked/decided on the same facts)."""
        if not self._decided(subject):
            return None
        for c in peers:
            dom = self._domains.get(c)
            if dom is not None and dom.state is DomainState.SEEN:
                return None  # present but undecided: wait for it
        facts = self._vchan_facts(obj) if isinstance(obj, Vchan) else self._channel_facts(obj)
        if not force and (
            (obj.decision is not None and obj.decision.facts == facts) or obj.asked == facts
        ):
            return None
        obj.asked = facts
        return NeedsDecision(kind, obj.key, subject, peers=peers, any_peer=any_peer, facts=facts)

    def _channel_shared(self, e: ChannelShared) -> list[ModelOutput]:
        key = ChannelKey(e.owner, e.path)
        if e.over_limit:  # not stored: decided (denied) at once, whoever the parties are
            self._count(e.owner)
            facts: tuple[object, ...] = ("over-limit", e.peers, e.any_domain)
            return [
                NeedsDecision(
                    "channel",
                    key,
                    e.owner,
                    peers=e.peers,
                    any_peer=e.any_domain,
                    facts=facts,
                    over_limit=True,
                )
            ]
        ch = self._channels.get(key)
        if ch is None:
            ch = self._channels[key] = Channel(key, e.peers, e.any_domain)
            _add(self._dom_channels, e.owner, key)
        else:
            for c in ch.peers:
                if c != e.owner and c not in e.peers:
                    _discard(self._dom_channels, c, key)
            ch.peers = e.peers
            ch.any_domain = e.any_domain
        for c in e.peers:
            _add(self._dom_channels, c, key)
        self._count(e.owner)
        need = self._ask_channel(ch)
        return [need] if need is not None else []

    def _on_channel_unshared(self, e: ChannelUnshared) -> list[ModelOutput]:
        self._drop_channel(ChannelKey(e.owner, e.path))
        self._count(e.owner)
        return []

    def _drop_channel(self, key: ChannelKey) -> None:
        ch = self._channels.pop(key, None)
        if ch is not None:
            _discard(self._dom_channels, key.owner, key)
            for c in ch.peers:
                _discard(self._dom_channels, c, key)

    def _channel_facts(self, ch: Channel) -> tuple[object, ...]:
        return (ch.peers, ch.any_domain, self._party_states((ch.key.owner, *ch.peers)))

    def _ask_channel(self, ch: Channel, force: bool = False) -> NeedsDecision | None:
        return self._ask_pair("channel", ch, ch.key.owner, ch.peers, ch.any_domain, force)

    def _party_states(self, domids: Iterable[int]) -> tuple[object, ...]:
        """Which parties are decided, and which of them are denied: a decision is asked again
        when a party gets decided or denied (fail closed for denied domains)."""
        out = []
        for d in domids:
            dom = self._domains.get(d)
            if dom is not None and dom.state in _DECIDED:
                out.append(dom.party_fact())
        return tuple(out)
