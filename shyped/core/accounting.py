"""Per-domain resource accounting, derived from the host model (pure: no I/O, no reactor).

What a domain holds, in the units the rest of the daemon reports (bytes, counts):

* **sizes** (trusted): memory target and static maximum and the vCPUs (possible / online), from
  the dom0-owned ``memory/*`` and ``cpu/*`` nodes (`shyped.core.events.DomainResources`);
* **devices per kind** where the domain is the frontend, from the dom0-only libxl record
  (trusted), and devices it serves as a backend;
* **event channel ports and grant references published per device kind** (plus ``vchan`` for
  rendezvous the domain serves): written by the guest, so they are *counts* of what it
  published, never used for anything but accounting and quotas (a guest can hide keys from us
  but only to its own detriment: it cannot make another domain look bigger);
* **vchans** served and joined as a named client;
* **garbage**: writes of this domain the parser ignored (and how many hit a bound);
* **decisions** recorded about it, per hook and outcome.

`account_domain` is O(devices and vchans of the domain), for the engine's quota checks on one
domain; `account_host` walks every domain once, for metrics and ``shypectl status``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from shyped.core.events import (
    DeviceAdded,
    DeviceRemoved,
    DomainAppeared,
    DomainResources,
    Event,
    FrontendStateChanged,
    Garbage,
    RingsPublished,
    RingsWithdrawn,
    VchanPublished,
    VchanRemoved,
)
from shyped.core.host import HostModel
from shyped.core.hostfacts import Domain, DomainState
from shyped.policy.decisions import Hook

KIB: Final = 1024

#: The hook each kind of host-model question is decided at.
HOOK_OF_KIND: Final[Mapping[str, Hook]] = {
    "domain": Hook.DOMAIN_ADMIT,
    "device": Hook.DEVICE_CHANNEL,
    "vchan": Hook.VCHAN,
    "channel": Hook.XS_CHANNEL,
}

#: Pseudo device kind under which a served vchan's ring-ref and port are counted.
VCHAN_KIND: Final = "vchan"

#: States of a domain that belongs to the running system (as `HostModel.running_system`).
RUNNING_STATES: Final = frozenset({DomainState.ADMITTED, DomainState.PAUSED})

Counts = tuple[tuple[str, int], ...]


def _counts(d: Mapping[str, int]) -> Counts:
    return tuple(sorted(d.items()))


def _total(c: Counts) -> int:
    return sum(n for _, n in c)


@attrs.frozen
class DomainAccount:
    """What one domain holds and what was decided about it (an immutable view)."""

    domid: int
    uuid: str | None
    name: str | None
    label: str | None
    state: DomainState
    memory_target_bytes: int | None
    memory_max_bytes: int | None
    vcpus: int | None
    vcpus_online: int | None
    #: (kind, count), sorted by kind; kinds with no entry are 0.
    devices: Counts
    backend_devices: Counts
    event_channels: Counts
    grant_refs: Counts
    vchans_served: int
    vchans_joined: int
    garbage_writes: int
    garbage_limit_hits: int
    #: (hook, "permit"/"deny", count), sorted.
    decisions: tuple[tuple[str, str, int], ...]

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @functools.cached_property
    def device_count(self) -> int:
        """Devices this domain is the frontend of, every kind together."""
        return _total(self.devices)

    @functools.cached_property
    def event_channel_count(self) -> int:
        return _total(self.event_channels)

    @functools.cached_property
    def grant_ref_count(self) -> int:
        return _total(self.grant_refs)

    @property
    def vchan_count(self) -> int:
        """Rendezvous the domain takes part in, as server or named client."""
        return self.vchans_served + self.vchans_joined

    @property
    def memory_bytes(self) -> int | None:
        """The most memory the domain may have: static-max, else the target."""
        return (
            self.memory_max_bytes
            if self.memory_max_bytes is not None
            else (self.memory_target_bytes)
        )


@attrs.frozen
class HostAccount:
    """Every domain's account (by domid) and the garbage no domain could be charged with."""

    domains: tuple[DomainAccount, ...]
    unattributed_garbage_writes: int
    unattributed_garbage_limit_hits: int
    _by_domid: Mapping[int, DomainAccount] = attrs.field(
        init=False, repr=False, eq=False, hash=False, factory=dict
    )

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "_by_domid", {a.domid: a for a in self.domains})

    def domain(self, domid: int) -> DomainAccount | None:
        return self._by_domid.get(domid)

    def running_with_label(self, label: str) -> int:
        return sum(1 for a in self.domains if a.running and a.label == label)


def _bytes(kib: int | None) -> int | None:
    return None if kib is None else kib * KIB


def _account(model: HostModel, dom: Domain) -> DomainAccount:
    d = dom.domid
    devices: dict[str, int] = {}
    served: dict[str, int] = {}
    ports: dict[str, int] = {}
    refs: dict[str, int] = {}
    for dev in model.devices_of(d):
        kind = dev.key.kind
        if dev.key.frontend == d:
            devices[kind] = devices.get(kind, 0) + 1
            if dev.event_channels:
                ports[kind] = ports.get(kind, 0) + len(dev.event_channels)
            if dev.grant_refs:
                refs[kind] = refs.get(kind, 0) + len(dev.grant_refs)
        if dev.backend == d:
            served[kind] = served.get(kind, 0) + 1
    vserved = vjoined = 0
    for v in model.vchans_of(d):
        if v.key.server == d:
            vserved += 1
            if v.port is not None:
                ports[VCHAN_KIND] = ports.get(VCHAN_KIND, 0) + 1
            if v.ring_ref is not None:
                refs[VCHAN_KIND] = refs.get(VCHAN_KIND, 0) + 1
        elif d in v.clients:
            vjoined += 1
    decisions = tuple(
        sorted(
            (str(HOOK_OF_KIND[kind]), "permit" if allowed else "deny", n)
            for (kind, allowed), n in dom.decisions.items()
        )
    )
    return DomainAccount(
        domid=d,
        uuid=dom.uuid,
        name=dom.name,
        label=dom.label,
        state=dom.state,
        memory_target_bytes=_bytes(dom.memory_target_kib),
        memory_max_bytes=_bytes(dom.memory_static_max_kib),
        vcpus=dom.vcpus,
        vcpus_online=dom.vcpus_online,
        devices=_counts(devices),
        backend_devices=_counts(served),
        event_channels=_counts(ports),
        grant_refs=_counts(refs),
        vchans_served=vserved,
        vchans_joined=vjoined,
        garbage_writes=dom.garbage.count,
        garbage_limit_hits=dom.garbage.limit_hits,
        decisions=decisions,
    )


def account_domain(model: HostModel, domid: int) -> DomainAccount | None:
    """One domain's account, or None if the model does not know it."""
    dom = model.domain(domid)
    return None if dom is None else _account(model, dom)


def account_host(model: HostModel) -> HostAccount:
    """Every domain's account, sorted by domid."""
    return HostAccount(
        tuple(_account(model, dom) for dom in model.domains()),
        model.unattributed.count,
        model.unattributed.limit_hits,
    )


class AccountCache:
    """`account_host` that recomputes only the accounts whose `Domain.revision` changed.

    For one model at a time (a different model object starts afresh); single-threaded, like the
    model it reads. Publishing metrics after every batch then costs O(changed domains) account
    builds plus one pass over the domain list.
    """

    def __init__(self) -> None:
        self._model: HostModel | None = None
        self._accounts: dict[int, tuple[int, DomainAccount]] = {}

    def host(self, model: HostModel) -> HostAccount:
        if model is not self._model:
            self._model = model
            self._accounts = {}
        old = self._accounts
        fresh: dict[int, tuple[int, DomainAccount]] = {}
        out: list[DomainAccount] = []
        for dom in model.domains():
            hit = old.get(dom.domid)
            fresh_needed = hit is None or hit[0] != dom.revision
            acc = _account(model, dom) if fresh_needed or hit is None else hit[1]
            fresh[dom.domid] = (dom.revision, acc)
            out.append(acc)
        self._accounts = fresh
        return HostAccount(tuple(out), model.unattributed.count, model.unattributed.limit_hits)


def touched_domains(events: Iterable[Event]) -> set[int]:
    """Domains whose account these events may have changed (for quota re-checks).

    A device event touches its frontend (and backend, which serves one more or one less); a
    vchan event its server (its clients' joined counts follow the model's current view, so a
    caller re-checking vchan quotas should also look at `Vchan.clients`).
    """
    out: set[int] = set()
    for e in events:
        if isinstance(e, DomainResources | DomainAppeared):
            out.add(e.domid)
        elif isinstance(e, DeviceAdded | DeviceRemoved):
            out.add(e.device.frontend)
            out.add(e.backend)
        elif isinstance(e, RingsPublished | RingsWithdrawn | FrontendStateChanged):
            out.add(e.device.frontend)
        elif isinstance(e, VchanPublished):
            out.add(e.server)
            out.update(e.clients)
        elif isinstance(e, VchanRemoved):
            out.add(e.server)
        elif isinstance(e, Garbage) and e.domid is not None:
            out.add(e.domid)
    return out
