"""What Xen measures per domain (pure: no I/O, no reactor): samples, matching them to the
host model's domains, and the per-label use the run-time quotas judge.

A `MeterSample` is one reading of the hypervisor (``libxenstat`` on a real dom0, the same
library ``xentop`` uses: `shyped.service.xenstat`; or only the CPU times of ``xl list``):

* **from the hypervisor** (``XEN_DOMCTL_getdomaininfo`` / ``getvcpuinfo``): CPU time per domain
  and per vCPU, memory in use (pages the domain holds) and its maximum;
* **from dom0's backends** (dom0's kernel, never the guest): bytes and packets of each vif as
  dom0's ``vif<domid>.<devid>`` interface counts them (``/proc/net/dev``: *received* is what
  the guest sent), requests and sectors of each vbd as blkback counts them (sysfs
  ``statistics/``).

None of it is written by the guest: unlike the event channel and grant counts the guest
publishes in xenstore (``shyped_domain_guest_*``), a guest cannot under-report these.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from shyped.core.accounting import HostAccount

#: Bytes per sector in blkback's statistics (Linux counts 512-byte sectors).
SECTOR_BYTES: Final = 512
NS: Final = 1e9


@attrs.frozen
class VcpuTime:
    vcpu: int
    online: bool
    cpu_ns: int


@attrs.frozen
class VifCounters:
    """A vif as dom0's backend interface counts it (receive: from the guest)."""

    devid: int
    receive_bytes: int
    receive_packets: int
    transmit_bytes: int
    transmit_packets: int


@attrs.frozen
class VbdCounters:
    """A vbd as its backend counts it."""

    devid: int
    read_requests: int
    write_requests: int
    read_sectors: int
    write_sectors: int


@attrs.frozen
class DomainMeter:
    """One domain in a sample. None: not measured by this source (``xl list`` gives CPU
    only); `memory_max_bytes` None also when the domain has no maximum."""

    domid: int
    name: str | None
    uuid: str | None
    cpu_ns: int
    vcpus: tuple[VcpuTime, ...] = ()
    memory_bytes: int | None = None
    memory_max_bytes: int | None = None
    vifs: tuple[VifCounters, ...] = ()
    vbds: tuple[VbdCounters, ...] = ()

    @property
    def cpu_seconds(self) -> float:
        return self.cpu_ns / NS


@attrs.frozen
class MeterSample:
    """One reading: `taken_at` on a monotonic clock (seconds), from `source`."""

    taken_at: float
    source: str
    domains: tuple[DomainMeter, ...]


def match(sample: MeterSample, host: HostAccount) -> tuple[DomainMeter, ...]:
    """The measured domains the host model knows, by domid, and where both sides know it the
    same uuid and name (another incarnation under the same domid is not charged to ours)."""
    out = []
    for m in sample.domains:
        acc = host.domain(m.domid)
        if acc is None:
            continue
        if acc.uuid is not None and m.uuid is not None and acc.uuid != m.uuid:
            continue
        if acc.name is not None and m.name is not None and acc.name != m.name:
            continue
        out.append(m)
    return tuple(out)


# ---- per-label use, for the run-time quotas -------------------------------------------------


@attrs.frozen
class LabelUse:
    """What a label's running domains use now: memory in use (hypervisor), and CPU over the
    window (`cpu_share`: CPU seconds per second, 1.0 = one physical CPU; None until the window
    holds two samples). `top_*`: the domain using most of each (the one a breach acts on)."""

    label: str
    memory_bytes: int
    cpu_share: float | None
    top_memory: int | None
    top_cpu: int | None


class CpuWindow:
    """CPU use over a sliding window of samples (pure: the caller passes the samples, which
    carry their own times). A domain's share is its CPU time between the oldest sample in the
    window that holds it (same domid and name) and the newest, over the time between them."""

    def __init__(self, window: float) -> None:
        if window <= 0:
            raise ValueError("the CPU window must be positive")
        self.window = window
        self._samples: deque[tuple[float, Mapping[int, tuple[str | None, int]]]] = deque()

    def add(self, sample: MeterSample) -> None:
        cpu = {m.domid: (m.name, m.cpu_ns) for m in sample.domains}
        if self._samples and sample.taken_at <= self._samples[-1][0]:
            self._samples.clear()  # the clock went back, or a replay: start again
        self._samples.append((sample.taken_at, cpu))
        # keep the newest sample at or before the window's start, drop older ones
        while len(self._samples) > 2 and self._samples[1][0] <= sample.taken_at - self.window:
            self._samples.popleft()

    @property
    def span(self) -> float:
        """Seconds between the oldest and the newest sample kept."""
        if len(self._samples) < 2:
            return 0.0
        return self._samples[-1][0] - self._samples[0][0]

    def shares(self) -> dict[int, float]:
        """CPU seconds per second of every domain in both the oldest and the newest sample."""
        if len(self._samples) < 2:
            return {}
        (t0, old), (t1, new) = self._samples[0], self._samples[-1]
        out = {}
        for domid, (name, ns) in new.items():
            before = old.get(domid)
            if before is None or before[0] != name or ns < before[1]:
                continue  # new, another incarnation, or a counter that went back
            out[domid] = (ns - before[1]) / NS / (t1 - t0)
        return out


def label_use(
    measured: Iterable[DomainMeter], host: HostAccount, shares: Mapping[int, float] | None
) -> dict[str, LabelUse]:
    """Per VM label, over its running domains: memory in use and CPU share (`shares`: by domid,
    from `CpuWindow.shares`; None: no window yet). Domains without a label are not counted."""
    mem: dict[str, int] = {}
    cpu: dict[str, float] = {}
    top_mem: dict[str, tuple[int, int]] = {}
    top_cpu: dict[str, tuple[float, int]] = {}
    for m in measured:
        acc = host.domain(m.domid)
        if acc is None or acc.label is None or not acc.running:
            continue
        label = acc.label
        if m.memory_bytes is not None:
            mem[label] = mem.get(label, 0) + m.memory_bytes
            if m.memory_bytes > top_mem.get(label, (-1, 0))[0]:
                top_mem[label] = (m.memory_bytes, m.domid)
        share = None if shares is None else shares.get(m.domid)
        if share is not None:
            cpu[label] = cpu.get(label, 0.0) + share
            if share > top_cpu.get(label, (-1.0, 0))[0]:
                top_cpu[label] = (share, m.domid)
    labels = sorted(set(mem) | set(cpu) | set(top_mem))
    return {
        label: LabelUse(
            label,
            mem.get(label, 0),
            None if shares is None else cpu.get(label, 0.0),
            top_mem[label][1] if label in top_mem else None,
            top_cpu[label][1] if label in top_cpu else None,
        )
        for label in labels
    }
