"""The host model: domains, devices, vchans and their decisions, fed only by typed events.

Pure (no I/O). `HostModel.apply` takes one event from `shyped.core.events` and returns what the
daemon's engine must act on: `NeedsDecision` items (ask the policy, then `record_decision`) and
`DomainReleased` (an admitted domain is gone: release its Chinese Wall counts). Decisions are
idempotent: each carries a fingerprint of the facts it was made on, so replaying the same
events (reconcile after a reconnect) asks nothing again, while a changed fact (another backend,
another disk, a new vchan client) asks again.

Order of decisions: a device is only asked about once both its domains are decided (admitted,
denied or paused), a vchan once its server and every *present* client are; `record_decision`
for a domain returns the device and vchan questions that were waiting on it. A vchan naming a
domain that is not there yet is asked about (again) when that domain is decided.

Lookups are dicts keyed by domid, uuid, `DeviceKey` and `VchanKey`, plus per-domain indexes of
devices and vchans, so nothing on the event path scans all domains. Per-domain garbage is a
counter plus a bounded ring of the last reasons.

Accounting facts kept per domain (see `shyped.core.accounting` for the derived view): the
dom0-written sizes from `DomainResources` (trusted) and how many decisions were recorded for it, by
kind and outcome (a device's against its frontend, a vchan's against its server). `Domain.revision`
changes whenever anything its account is derived from changes (its own fields, its devices at either
end, vchans it serves or is named in), so a reader can recompute only those accounts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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
    _RUNNING,
    Channel,
    DecisionKind,
    Device,
    Domain,
    DomainReleased,
    DomainState,
    GarbageRecord,
    LiveChannel,
    ModelOutput,
    NeedsDecision,
    RecordedDecision,
    ResourceUse,
    RunningDomain,
    RunningSystem,
    Vchan,
    VchanKey,
    _add,
    _discard,
)


class HostModel:
    """Domains, devices, vchans and decisions; pure and single-threaded."""

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
                garbage=GarbageRecord(garbage_ring),
            )
        }
        #: uuid -> domids naming it, in order of appearance (the first one holds the UUID).
        self._by_uuid: dict[str, list[int]] = {}
        self._devices: dict[DeviceKey, Device] = {}
        self._vchans: dict[VchanKey, Vchan] = {}
        self._dom_devices: dict[int, set[object]] = {}  # domid -> DeviceKeys (either end)
        self._dom_vchans: dict[int, set[object]] = {}  # domid -> VchanKeys (server or client)
        self._channels: dict[ChannelKey, Channel] = {}
        self._dom_channels: dict[int, set[object]] = {}  # domid -> ChannelKeys (owner or peer)
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

    # ---- queries ------------------------------------------------------------------------

    def domain(self, domid: int) -> Domain | None:
        return self._domains.get(domid)

    def domain_by_uuid(self, uuid: str) -> Domain | None:
        """The domain holding `uuid`: the first of those that name it and are still there."""
        ds = self._by_uuid.get(uuid)
        return None if not ds else self._domains.get(ds[0])

    def domains_by_uuid(self, uuid: str) -> list[Domain]:
        """Every domain naming `uuid` (more than one: a duplicate UUID), holder first."""
        return [self._domains[d] for d in self._by_uuid.get(uuid, ())]

    def domains(self) -> list[Domain]:
        return [self._domains[d] for d in sorted(self._domains)]

    def device(self, key: DeviceKey) -> Device | None:
        return self._devices.get(key)

    def devices(self) -> list[Device]:
        return [self._devices[k] for k in sorted(self._devices)]

    def devices_of(self, domid: int) -> list[Device]:
        """Devices with `domid` at either end."""
        keys = cast("set[DeviceKey]", self._dom_devices.get(domid, set()))
        return [self._devices[k] for k in sorted(keys)]

    def vchan(self, key: VchanKey) -> Vchan | None:
        return self._vchans.get(key)

    def vchans(self) -> list[Vchan]:
        return [self._vchans[k] for k in sorted(self._vchans)]

    def vchans_of(self, domid: int) -> list[Vchan]:
        """Vchans with `domid` as server or named client."""
        keys = cast("set[VchanKey]", self._dom_vchans.get(domid, set()))
        return [self._vchans[k] for k in sorted(keys)]

    def channel(self, key: ChannelKey) -> Channel | None:
        return self._channels.get(key)

    def channels(self) -> list[Channel]:
        return [self._channels[k] for k in sorted(self._channels)]

    def channels_of(self, domid: int) -> list[Channel]:
        """Shared nodes `domid` owns or is named in."""
        keys = cast("set[ChannelKey]", self._dom_channels.get(domid, set()))
        return [self._channels[k] for k in sorted(keys)]

    def garbage(self, domid: int | None) -> GarbageRecord:
        """The garbage record of a domain (the unattributed one for None or unknown ids)."""
        dom = self._domains.get(domid) if domid is not None else None
        return dom.garbage if dom is not None else self.unattributed

    def running_system(self) -> RunningSystem:
        """Running domains with labels, allowed channels between them, resources they use."""
        running = {
            d: dom
            for d, dom in self._domains.items()
            if dom.state in _RUNNING and dom.label is not None
        }
        domains = tuple(
            RunningDomain(d, dom.uuid, dom.name, cast(str, dom.label))
            for d, dom in sorted(running.items())
        )
        channels: set[LiveChannel] = set()
        resources: set[ResourceUse] = set()
        for dev in self._devices.values():
            fe = dev.key.frontend
            if dev.decision is None or not dev.decision.allowed or fe not in running:
                continue
            if dev.backend in running:
                channels.add(LiveChannel(fe, dev.backend, dev.key.kind))
            if dev.resource is not None:
                resources.add(ResourceUse(fe, dev.key.kind, dev.resource, dev.writable))
        for v in self._vchans.values():
            s = v.key.server
            if v.decision is None or not v.decision.allowed or s not in running:
                continue
            peers = running if v.any_domain else v.clients
            for c in peers:
                if c != s and c in running:
                    channels.add(LiveChannel(s, c, "vchan"))
        for ch in self._channels.values():
            o = ch.key.owner
            if ch.decision is None or not ch.decision.allowed or o not in running:
                continue
            for c in running if ch.any_domain else ch.peers:
                if c != o and c in running:
                    channels.add(LiveChannel(o, c, "xs-channel"))
        return RunningSystem(
            domains,
            tuple(sorted(channels)),
            tuple(sorted(resources, key=lambda r: (r.domid, r.kind, r.resource, r.writable))),
        )

    # ---- events -------------------------------------------------------------------------

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

    # ---- domains ------------------------------------------------------------------------

    def _domain_appeared(self, e: DomainAppeared) -> list[ModelOutput]:
        """A domain is identified by its domid; a UUID another domain already holds, or a name
        that does not parse, is an identity problem (decided: denied unless it runs)."""
        out: list[ModelOutput] = []
        dom = self._domains.get(e.domid)
        if dom is not None and dom.uuid != e.uuid:
            out.extend(self._domain_vanished(e.domid))  # a new incarnation under the same id
            dom = None
        if dom is None:
            dom = self._domains[e.domid] = Domain(
                e.domid, e.uuid, e.name, garbage=GarbageRecord(self._ring)
            )
            self._by_uuid.setdefault(e.uuid, []).append(e.domid)
        else:
            dom.name = e.name
        holder = self._by_uuid[e.uuid][0]
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
            holders = self._by_uuid.get(dom.uuid, [])
            if domid in holders:
                holders.remove(domid)
            if not holders:
                self._by_uuid.pop(dom.uuid, None)
        for key in list(cast("set[DeviceKey]", self._dom_devices.get(domid, set()))):
            if key.frontend == domid:
                self._drop_device(key)
        for vkey in list(cast("set[VchanKey]", self._dom_vchans.get(domid, set()))):
            if vkey.server == domid:
                self._drop_vchan(vkey)
        for ckey in list(cast("set[ChannelKey]", self._dom_channels.get(domid, set()))):
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

    # ---- devices ------------------------------------------------------------------------

    def _device_added(self, e: DeviceAdded) -> list[ModelOutput]:
        key = e.device
        dev = self._devices.get(key)
        if dev is None:
            dev = self._devices[key] = Device(
                key, e.backend, e.backend_kind, e.resource, e.writable
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
        return (dev.backend, dev.backend_kind, dev.resource, dev.writable, states)

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

    # ---- vchans -------------------------------------------------------------------------

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

    # ---- shared nodes (generic channels) -------------------------------------------------

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
                out.append((d, dom.state is DomainState.DENIED))
        return tuple(out)

    # ---- decisions ----------------------------------------------------------------------

    def _facts_now(self, need: NeedsDecision) -> tuple[object, ...] | None:
        if need.kind == "domain":
            dom = self._domains.get(cast(int, need.key))
            return None if dom is None else (dom.uuid,)
        if need.kind == "device":
            dev = self._devices.get(cast(DeviceKey, need.key))
            return None if dev is None else self._device_facts(dev)
        if need.kind == "channel":
            if need.over_limit:
                return need.facts
            ch = self._channels.get(cast(ChannelKey, need.key))
            return None if ch is None else self._channel_facts(ch)
        v = self._vchans.get(cast(VchanKey, need.key))
        return None if v is None else self._vchan_facts(v)

    def is_current(self, need: NeedsDecision) -> bool:
        """The thing asked about still exists with the facts the question was asked on."""
        return self._facts_now(need) == need.facts

    def record_decision(
        self, need: NeedsDecision, allowed: bool, *, label: str | None = None, reason: str = ""
    ) -> list[NeedsDecision]:
        """Store the engine's answer; returns questions that were waiting on it.

        A stale answer (see `is_current`) is ignored and returns nothing. For a domain,
        `label` is the label it runs with (kept even when denied, for reporting).
        """
        if not self.is_current(need):
            return []
        rec = RecordedDecision(allowed, reason, need.facts)
        counted = self._domains.get(need.domid)
        if counted is not None:
            tally = (need.kind, allowed)
            counted.decisions[tally] = counted.decisions.get(tally, 0) + 1
            self._bump(need.domid)
        if need.kind == "device":
            dev = self._devices[cast(DeviceKey, need.key)]
            dev.decision, dev.asked = rec, None
            return []
        if need.kind == "vchan":
            v = self._vchans[cast(VchanKey, need.key)]
            v.decision, v.asked = rec, None
            return []
        if need.kind == "channel":
            if not need.over_limit:
                ch = self._channels[cast(ChannelKey, need.key)]
                ch.decision, ch.asked = rec, None
            return []
        dom = self._domains[cast(int, need.key)]
        dom.decision, dom.asked = rec, None
        dom.label = label
        dom.state = DomainState.ADMITTED if allowed else DomainState.DENIED
        ready: list[NeedsDecision] = []
        for key in sorted(cast("set[DeviceKey]", self._dom_devices.get(dom.domid, set()))):
            need_dev = self._ask_device(self._devices[key])
            if need_dev is not None:
                ready.append(need_dev)
        for vkey in sorted(cast("set[VchanKey]", self._dom_vchans.get(dom.domid, set()))):
            need_v = self._ask_vchan(self._vchans[vkey])
            if need_v is not None:
                ready.append(need_v)
        for ckey in sorted(cast("set[ChannelKey]", self._dom_channels.get(dom.domid, set()))):
            need_c = self._ask_channel(self._channels[ckey])
            if need_c is not None:
                ready.append(need_c)
        return ready

    def all_needs(self) -> list[NeedsDecision]:
        """Every question again (after a policy change): domains first, then the rest.

        Devices and vchans are included when their domains are decided now; their current
        decisions stay in force until new ones are recorded.
        """
        out: list[NeedsDecision] = []
        for d in sorted(self._domains):
            if d == 0:
                continue
            need = self._ask_domain(self._domains[d], force=True)
            if need is not None:
                out.append(need)
        for key in sorted(self._devices):
            need = self._ask_device(self._devices[key], force=True)
            if need is not None:
                out.append(need)
        for vkey in sorted(self._vchans):
            need = self._ask_vchan(self._vchans[vkey], force=True)
            if need is not None:
                out.append(need)
        for ckey in sorted(self._channels):
            need = self._ask_channel(self._channels[ckey], force=True)
            if need is not None:
                out.append(need)
        return out


__all__ = [
    "Channel",
    "DecisionKind",
    "Device",
    "Domain",
    "DomainReleased",
    "DomainState",
    "GarbageRecord",
    "LiveChannel",
    "ModelOutput",
    "NeedsDecision",
    "RecordedDecision",
    "ResourceUse",
    "RunningDomain",
    "RunningSystem",
    "Vchan",
    "VchanKey",
]
