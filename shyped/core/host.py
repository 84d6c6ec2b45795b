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

from collections.abc import Collection
from typing import Final, cast, get_args

from shyped.core.channels import ChannelKey
from shyped.core.events import (
    DeviceKey,
)
from shyped.core.hostfacts import (
    _RUNNING,
    Channel,
    DecisionKind,
    Device,
    Domain,
    DomainState,
    LiveChannel,
    NeedsDecision,
    RecordedDecision,
    ResourceUse,
    RunningDomain,
    RunningSystem,
    Vchan,
    VchanKey,
)
from shyped.core.hostupdates import HostUpdates

#: The keys of `Domain.decisions`, one tuple object each (shared by every domain's tally).
_TALLIES: Final[dict[tuple[DecisionKind, bool], tuple[DecisionKind, bool]]] = {
    (k, a): (k, a)
    for k in cast("tuple[DecisionKind, ...]", get_args(DecisionKind))
    for a in (False, True)
}


class HostModel(HostUpdates):
    """Domains, devices, vchans and decisions; pure and single-threaded."""

    # ---- queries ------------------------------------------------------------------------

    def domain(self, domid: int) -> Domain | None:
        return self._domains.get(domid)

    def domain_by_uuid(self, uuid: str) -> Domain | None:
        """The domain holding `uuid`: the first of those that name it and are still there."""
        ds = self._uuid_holders(uuid)
        return None if not ds else self._domains.get(ds[0])

    def domains_by_uuid(self, uuid: str) -> list[Domain]:
        """Every domain naming `uuid` (more than one: a duplicate UUID), holder first."""
        return [self._domains[d] for d in self._uuid_holders(uuid)]

    def domains(self) -> list[Domain]:
        return [self._domains[d] for d in sorted(self._domains)]

    def device(self, key: DeviceKey) -> Device | None:
        return self._devices.get(key)

    def devices(self) -> list[Device]:
        return [self._devices[k] for k in sorted(self._devices)]

    def devices_of(self, domid: int) -> list[Device]:
        """Devices with `domid` at either end."""
        keys = cast("Collection[DeviceKey]", self._dom_devices.get(domid, ()))
        return [self._devices[k] for k in sorted(keys)]

    def vchan(self, key: VchanKey) -> Vchan | None:
        return self._vchans.get(key)

    def vchans(self) -> list[Vchan]:
        return [self._vchans[k] for k in sorted(self._vchans)]

    def vchans_of(self, domid: int) -> list[Vchan]:
        """Vchans with `domid` as server or named client."""
        keys = cast("Collection[VchanKey]", self._dom_vchans.get(domid, ()))
        return [self._vchans[k] for k in sorted(keys)]

    def channel(self, key: ChannelKey) -> Channel | None:
        return self._channels.get(key)

    def channels(self) -> list[Channel]:
        return [self._channels[k] for k in sorted(self._channels)]

    def channels_of(self, domid: int) -> list[Channel]:
        """Shared nodes `domid` owns or is named in."""
        keys = cast("Collection[ChannelKey]", self._dom_channels.get(domid, ()))
        return [self._channels[k] for k in sorted(keys)]

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
            tally = _TALLIES.get(tally, tally)
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
        for key in sorted(cast("Collection[DeviceKey]", self._dom_devices.get(dom.domid, ()))):
            need_dev = self._ask_device(self._devices[key])
            if need_dev is not None:
                ready.append(need_dev)
        for vkey in sorted(cast("Collection[VchanKey]", self._dom_vchans.get(dom.domid, ()))):
            need_v = self._ask_vchan(self._vchans[vkey])
            if need_v is not None:
                ready.append(need_v)
        for ckey in sorted(cast("Collection[ChannelKey]", self._dom_channels.get(dom.domid, ()))):
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
