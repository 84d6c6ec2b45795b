"""Per-domain series as pure data (no prometheus_client objects): which families there are, and
one domain's samples of each, from its account (`domain_rows`) or from what Xen measured of it
(`metering_rows`). `shyped.service.metricsfamilies` turns rows into prometheus_client families,
`shyped.service.metricstext` into cached exposition text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from shyped.core.accounting import DomainAccount
from shyped.core.metering import NS, SECTOR_BYTES, DomainMeter

#: One sample of a per-domain family: its labels (domid first) and its value.
Row = tuple[tuple[tuple[str, str], ...], float]
#: A domain's samples, one tuple per family of `DOMAIN_FAMILIES` (or `METERING_FAMILIES`).
Rows = tuple[tuple[Row, ...], ...]

#: A per-domain family: (name, type, help, extra label names). The sample name adds ``_info``
#: to an info family and ``_total`` to a counter.
FamilySpec = tuple[str, str, str, tuple[str, ...]]

#: The per-domain families from the host model, in the order `domain_rows` fills them.
DOMAIN_FAMILIES: Final[tuple[FamilySpec, ...]] = (
    (
        "shyped_domain",
        "info",
        "A domain the daemon knows: its name, uuid, VM label and state (join on domid)",
        ("domain", "uuid", "label", "state"),
    ),
    (
        "shyped_domain_memory_target_bytes",
        "gauge",
        "memory/target (toolstack-written xenstore node)",
        (),
    ),
    (
        "shyped_domain_memory_max_bytes",
        "gauge",
        "memory/static-max (toolstack-written xenstore node)",
        (),
    ),
    ("shyped_domain_vcpus", "gauge", "vCPUs the domain was built with (cpu/<n>)", ()),
    ("shyped_domain_vcpus_online", "gauge", "vCPUs marked online (cpu/<n>)", ()),
    (
        "shyped_domain_devices",
        "gauge",
        "Devices the domain is the frontend of, by kind (libxl records)",
        ("kind",),
    ),
    (
        "shyped_domain_backend_devices",
        "gauge",
        "Devices the domain serves as backend, by kind (libxl records)",
        ("kind",),
    ),
    (
        "shyped_domain_guest_event_channels",
        "gauge",
        "Event channel ports the guest published in xenstore, by device kind (guest-reported)",
        ("kind",),
    ),
    (
        "shyped_domain_guest_grant_refs",
        "gauge",
        "Grant references the guest published in xenstore, by device kind (guest-reported)",
        ("kind",),
    ),
    ("shyped_domain_vchans", "gauge", "vchan rendezvous by the domain's role", ("role",)),
    (
        "shyped_domain_garbage_writes",
        "counter",
        "Writes of the domain the parser ignored (malformed or over a bound)",
        (),
    ),
    (
        "shyped_domain_garbage_limit_hits",
        "counter",
        "Ignored writes of the domain that hit a per-domain bound",
        (),
    ),
    (
        "shyped_domain_decisions",
        "counter",
        "Decisions recorded about the domain by hook and decision",
        ("hook", "decision"),
    ),
)

#: The per-domain families measured by Xen or dom0's backends (`MetricsSnapshot.metering`),
#: after `DOMAIN_FAMILIES`, in the order `metering_rows` fills them.
METERING_FAMILIES: Final[tuple[FamilySpec, ...]] = (
    (
        "shyped_xen_domain_cpu_seconds",
        "counter",
        "CPU time the domain has used, as the hypervisor counts it",
        (),
    ),
    (
        "shyped_xen_domain_vcpu_seconds",
        "counter",
        "CPU time per vCPU, as the hypervisor counts it",
        ("vcpu",),
    ),
    (
        "shyped_xen_domain_memory_bytes",
        "gauge",
        "Memory the domain holds now (its pages, as the hypervisor counts them)",
        (),
    ),
    (
        "shyped_xen_domain_memory_max_bytes",
        "gauge",
        "The most memory the hypervisor lets the domain hold (absent: no limit)",
        (),
    ),
    (
        "shyped_xen_vif_receive_bytes",
        "counter",
        "Bytes dom0's backend interface received from the guest's vif",
        ("vif",),
    ),
    (
        "shyped_xen_vif_receive_packets",
        "counter",
        "Packets dom0's backend interface received from the guest's vif",
        ("vif",),
    ),
    (
        "shyped_xen_vif_transmit_bytes",
        "counter",
        "Bytes dom0's backend interface sent to the guest's vif",
        ("vif",),
    ),
    (
        "shyped_xen_vif_transmit_packets",
        "counter",
        "Packets dom0's backend interface sent to the guest's vif",
        ("vif",),
    ),
    (
        "shyped_xen_vbd_read_requests",
        "counter",
        "Read requests of the guest's vbd, as its backend counts them",
        ("vbd",),
    ),
    (
        "shyped_xen_vbd_write_requests",
        "counter",
        "Write requests of the guest's vbd, as its backend counts them",
        ("vbd",),
    ),
    (
        "shyped_xen_vbd_read_bytes",
        "counter",
        "Bytes read through the guest's vbd (backend's sectors x 512)",
        ("vbd",),
    ),
    (
        "shyped_xen_vbd_write_bytes",
        "counter",
        "Bytes written through the guest's vbd (backend's sectors x 512)",
        ("vbd",),
    ),
)


def sample_name(spec: FamilySpec) -> str:
    name, kind, _, _ = spec
    return name + {"info": "_info", "counter": "_total"}.get(kind, "")


def domain_rows(acc: DomainAccount) -> Rows:
    """One domain's samples for each of `DOMAIN_FAMILIES`."""
    d = ("domid", str(acc.domid))
    key: tuple[tuple[str, str], ...] = (d,)

    def one(value: float | None) -> tuple[Row, ...]:
        return () if value is None else ((key, value),)

    def by(label: str, pairs: Iterable[tuple[str, int]]) -> tuple[Row, ...]:
        return tuple(((d, (label, k)), v) for k, v in pairs if v)

    info = (
        d,
        ("domain", acc.name or ""),
        ("uuid", acc.uuid or ""),
        ("label", acc.label or ""),
        ("state", str(acc.state)),
    )
    return (
        ((info, 1.0),),
        one(acc.memory_target_bytes),
        one(acc.memory_max_bytes),
        one(acc.vcpus),
        one(acc.vcpus_online),
        by("kind", acc.devices),
        by("kind", acc.backend_devices),
        by("kind", acc.event_channels),
        by("kind", acc.grant_refs),
        by("role", (("server", acc.vchans_served), ("client", acc.vchans_joined))),
        one(acc.garbage_writes),
        one(acc.garbage_limit_hits),
        tuple(
            ((d, ("hook", hook), ("decision", verdict)), count)
            for hook, verdict, count in acc.decisions
        ),
    )


def metering_rows(m: DomainMeter) -> Rows:
    """One measured domain's samples for each of `METERING_FAMILIES`."""
    d = ("domid", str(m.domid))
    key: tuple[tuple[str, str], ...] = (d,)

    def one(value: float | None) -> tuple[Row, ...]:
        return () if value is None else ((key, value),)

    vifs, vbds = m.vifs, m.vbds

    def vif(field: str) -> tuple[Row, ...]:
        return tuple(((d, ("vif", str(v.devid))), getattr(v, field)) for v in vifs)

    def vbd(field: str, scale: int = 1) -> tuple[Row, ...]:
        return tuple(((d, ("vbd", str(b.devid))), getattr(b, field) * scale) for b in vbds)

    return (
        one(m.cpu_seconds),
        tuple(((d, ("vcpu", str(v.vcpu))), v.cpu_ns / NS) for v in m.vcpus),
        one(m.memory_bytes),
        one(m.memory_max_bytes),
        vif("receive_bytes"),
        vif("receive_packets"),
        vif("transmit_bytes"),
        vif("transmit_packets"),
        vbd("read_requests"),
        vbd("write_requests"),
        vbd("read_sectors", SECTOR_BYTES),
        vbd("write_sectors", SECTOR_BYTES),
    )
