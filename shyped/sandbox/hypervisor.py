"""The simulated hypervisor's state, shared between processes through a small JSON file.

Why a file and not xenstore: a real host keeps this state in Xen (which domids exist, paused or
running, event channels, grant tables), not in xenstore; putting it in xenstore would add nodes
no real host has.  The daemon under test calls the sandbox toolstack from another process and
tests run the `xl`-like CLI as a subprocess, so the state lives next to the xenstored socket
(`<socket dir>/sandbox-hypervisor.json`), read and written under an exclusive `flock` and
replaced atomically (write a temporary file, `os.replace`).

Allocation follows Xen where it is simple to: domids go up from the last one allocated and wrap,
skipping live ones (xen/common/domain.c domain_create's rover); event channel ports are the
lowest free port of the domain (xen/common/event_channel.c get_free_port); grant references are
the lowest free entry past Linux's 8 reserved ones (drivers/xen/grant-table.c).  The fixed
reservations below are calibrated on the capture (1 vCPU dom0 and domU) and documented there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs

STATE_FILE_NAME = "sandbox-hypervisor.json"

DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h
#: Linux reserves grant references 0..7 (GNTTAB_NR_RESERVED_ENTRIES).
GNTTAB_NR_RESERVED = 8
#: Ports dom0 holds once booted: its kernel's per-cpu VIRQs/IPIs and xenstored/xenconsoled's
#: VIRQs.  Calibrated so that the capture's vchan (after one domU with a vif and a vbd)
#: gets port 23 in dom0.
DOM0_BOOT_PORTS = 17
#: Ports a Linux PV guest kernel binds per vCPU at boot (timer and debug VIRQs, IPIs).
#: Calibrated on the capture: with 1 vCPU, netfront's first port is 8 (1 store, 2 console).
GUEST_PORTS_PER_VCPU = 5
#: The same for a PVH guest (no timer VIRQ: it has a local APIC timer): measured on the e2e
#: tier's PVH capture (tests/e2e/test_e2e_pvh.py: netfront's first port is 7). HVM guests are
#: assumed to do the same (not measured: HVM is not booted by the tests).
GUEST_PORTS_PER_VCPU_PVH = 4
#: The first store MFN handed out (the capture's value); each domain advances it.
FIRST_STORE_MFN = 260097
DOM0_MEMORY_KB = 1048576  # the capture's dom0_mem=1024M


class HypervisorError(RuntimeError):
    """A request the simulated hypervisor refuses (no such domain, out of domids...)."""


@attrs.define
class DomainState:
    """One domain as Xen (and the sandbox's simulated kernels) know it."""

    domid: int
    name: str
    uuid: str
    memory_kb: int
    max_memkb: int
    vcpus: int
    paused: bool = True
    #: The guest kernel has run (frontends probe once the domain first runs).
    booted: bool = False
    #: port -> what holds it ("store", "netfront vif/0 tx", "bound to 1:store"...).
    ports: dict[int, str] = attrs.field(factory=dict)
    #: grant reference -> what holds it.
    grants: dict[int, str] = attrs.field(factory=dict)
    store_port: int = 0
    store_mfn: int = 0
    console_port: int = 0
    console_mfn: int = 0
    tty: str = ""
    #: The xl.cfg values the domain was created from (for `list -l`).
    config: dict[str, Any] = attrs.field(factory=dict)
    #: Each simulated xenbus driver's own view of its state ("back:vif/1/0" -> 4): it can
    #: differ from xenstore's (libxl writes Closing into the backend's node).
    drivers: dict[str, int] = attrs.field(factory=dict)
    #: libxl's domain type (pv, pvh, hvm).
    dom_type: str = "pv"
    #: PCI devices assigned to it (xc_assign_device), as libxl prints them.
    pcis: list[str] = attrs.field(factory=list)

    def alloc_port(self, what: str) -> int:
        """Lowest free port >= 1 (port 0 is never valid)."""
        port = 1
        while port in self.ports:
            port += 1
        self.ports[port] = what
        return port

    def alloc_grant(self, what: str) -> int:
        ref = GNTTAB_NR_RESERVED
        while ref in self.grants:
            ref += 1
        self.grants[ref] = what
        return ref

    def free_where(self, predicate: str) -> None:
        """Free every port and grant whose holder mentions ``predicate``."""
        self.ports = {p: w for p, w in self.ports.items() if predicate not in w}
        self.grants = {g: w for g, w in self.grants.items() if predicate not in w}


@attrs.define
class HostState:
    """Everything the simulated hypervisor knows; serialized as JSON."""

    domains: dict[int, DomainState] = attrs.field(factory=dict)
    last_domid: int = 0
    next_mfn: int = FIRST_STORE_MFN
    #: /dev/loopN -> backend path holding it (the block hotplug script's losetup).
    loop_devices: dict[str, str] = attrs.field(factory=dict)
    #: /dev/pts/N -> domid (xenconsoled's ptys).
    ptys: dict[str, int] = attrs.field(factory=dict)

    # -- domains -----------------------------------------------------------------------

    def domain(self, domid: int) -> DomainState:
        try:
            return self.domains[domid]
        except KeyError:
            raise HypervisorError(f"domain {domid} does not exist") from None

    def lookup(self, name_or_id: str) -> DomainState:
        """A domain by name or domid, as xl accepts."""
        if name_or_id.isdigit():
            return self.domain(int(name_or_id))
        for dom in self.domains.values():
            if dom.name == name_or_id:
                return dom
        raise HypervisorError(f"{name_or_id!r} is an invalid domain identifier")

    def ensure_dom0(self) -> DomainState:
        """Dom0 exists from boot, running, with its boot-time ports held."""
        if 0 not in self.domains:
            dom0 = DomainState(
                domid=0,
                name="Domain-0",
                uuid="00000000-0000-0000-0000-000000000000",
                memory_kb=DOM0_MEMORY_KB,
                max_memkb=DOM0_MEMORY_KB,
                vcpus=1,
                paused=False,
                booted=True,
            )
            for _ in range(DOM0_BOOT_PORTS):
                dom0.alloc_port("dom0 kernel")
            self.domains[0] = dom0
        return self.domains[0]

    def create_domain(
        self, name: str, uuid: str, memory_kb: int, max_memkb: int, vcpus: int
    ) -> DomainState:
        """xc_domain_create: a fresh domid (never a live one), paused."""
        self.ensure_dom0()
        for dom in self.domains.values():
            if dom.name == name:
                raise HypervisorError(f"domain with name {name!r} already exists")
        domid = self.last_domid
        for _ in range(DOMID_FIRST_RESERVED):
            domid = domid + 1 if domid + 1 < DOMID_FIRST_RESERVED else 1
            if domid not in self.domains:
                break
        else:
            raise HypervisorError("no free domid")
        self.last_domid = domid
        dom = DomainState(
            domid=domid,
            name=name,
            uuid=uuid,
            memory_kb=memory_kb,
            max_memkb=max_memkb,
            vcpus=vcpus,
        )
        self.domains[domid] = dom
        return dom

    def remove_domain(self, domid: int) -> DomainState:
        """xc_domain_destroy: the domain and everything others hold on its behalf go away."""
        dom = self.domain(domid)
        if domid == 0:
            raise HypervisorError("cannot destroy dom0")
        del self.domains[domid]
        for other in self.domains.values():
            other.free_where(f"peer={domid} ")
        self.ptys = {t: d for t, d in self.ptys.items() if d != domid}
        return dom

    def alloc_mfns(self, count: int, stride: int) -> list[int]:
        mfns = [self.next_mfn + i for i in range(count)]
        self.next_mfn += stride
        return mfns

    def alloc_pty(self, domid: int) -> str:
        n = 0
        while f"/dev/pts/{n}" in self.ptys:
            n += 1
        tty = f"/dev/pts/{n}"
        self.ptys[tty] = domid
        return tty

    def alloc_loop(self, holder: str) -> str:
        n = 0
        while f"/dev/loop{n}" in self.loop_devices:
            n += 1
        dev = f"/dev/loop{n}"
        self.loop_devices[dev] = holder
        return dev

    def free_loop(self, holder: str) -> None:
        self.loop_devices = {d: h for d, h in self.loop_devices.items() if h != holder}

    # -- JSON --------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def dom(d: DomainState) -> dict[str, Any]:
            data = attrs.asdict(d)
            data["ports"] = {str(k): v for k, v in d.ports.items()}
            data["grants"] = {str(k): v for k, v in d.grants.items()}
            return data

        return {
            "version": 1,
            "domains": {str(k): dom(v) for k, v in self.domains.items()},
            "last_domid": self.last_domid,
            "next_mfn": self.next_mfn,
            "loop_devices": self.loop_devices,
            "ptys": self.ptys,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostState:
        if data.get("version") != 1:
            raise HypervisorError("unknown sandbox hypervisor state version")
        domains: dict[int, DomainState] = {}
        for key, raw in data["domains"].items():
            raw = dict(raw)
            raw["ports"] = {int(k): v for k, v in raw["ports"].items()}
            raw["grants"] = {int(k): v for k, v in raw["grants"].items()}
            domains[int(key)] = DomainState(**raw)
        return cls(
            domains=domains,
            last_domid=int(data["last_domid"]),
            next_mfn=int(data["next_mfn"]),
            loop_devices=dict(data["loop_devices"]),
            ptys={k: int(v) for k, v in data["ptys"].items()},
        )


@attrs.frozen
class HypervisorStore:
    """The JSON state file, locked for the duration of each :meth:`locked` block."""

    path: Path

    @classmethod
    def beside(cls, socket_path: Path) -> HypervisorStore:
        return cls(Path(socket_path).parent / STATE_FILE_NAME)

    @property
    def lock_path(self) -> Path:
        return self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def locked(self) -> Iterator[HostState]:
        """Hold the lock, yield the state, write it back atomically if the block succeeds."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._load()
            yield state
            self._save(state)
        finally:
            os.close(fd)

    def read(self) -> HostState:
        """A consistent snapshot (takes the lock briefly)."""
        with self.locked() as state:
            return state

    def _load(self) -> HostState:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return HostState()
        try:
            return HostState.from_json(json.loads(text))
        except (ValueError, KeyError, TypeError) as exc:
            raise HypervisorError(f"corrupt sandbox hypervisor state {self.path}: {exc}") from exc

    def _save(self, state: HostState) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".hv-", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(state.to_json(), out, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
