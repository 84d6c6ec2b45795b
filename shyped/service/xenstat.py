"""Hypervisor metering through libxenstat (edge code): the library ``xentop`` uses, loaded
with ctypes, read on a pool thread every `interval` seconds, never on the reactor.

The binding follows ``tools/include/xenstat.h`` of Xen 4.17 (Debian's ``libxenstat.so.4.17``,
package libxenmisc4.17): ``xenstat_init`` opens libxenctrl and xenstore (NULL without a
hypervisor: no ``/dev/xen/privcmd``), ``xenstat_get_node(handle, XENSTAT_VCPU |
XENSTAT_NETWORK | XENSTAT_VBD)`` takes one snapshot (``XEN_DOMCTL_getdomaininfolist``,
``getvcpuinfo``, dom0's ``/proc/net/dev`` for ``vif<d>.<n>``, blkback's sysfs statistics),
the getters read it, ``xenstat_free_node`` frees it. Everything the getters return is copied
into a `shyped.core.metering.MeterSample` before the node is freed.

Without the library or the hypervisor (the sandbox) `XenstatProvider.start` logs one line,
sets ``shyped_xen_metering_up{source="xenstat"} 0`` and polls nothing: no per-domain series,
nothing made up.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shyped.core.metering import DomainMeter, MeterSample, VbdCounters, VcpuTime, VifCounters

_log = Logger(namespace="shyped.metering")

LIBRARY: Final = "libxenstat.so.4.17"
SOURCE: Final = "xenstat"
XENSTAT_VCPU: Final = 0x1
XENSTAT_NETWORK: Final = 0x2
XENSTAT_VBD: Final = 0x8
#: ``xenstat_domain_max_mem`` for a domain without a maximum (``(unsigned long long)-1``).
NO_MAX: Final = (1 << 64) - 1

_P = ctypes.c_void_p
_U = ctypes.c_uint
_ULL = ctypes.c_ulonglong
#: function -> (restype, argtypes), as declared in xenstat.h.
_SIGNATURES: Final[dict[str, tuple[Any, tuple[Any, ...]]]] = {
    "xenstat_init": (_P, ()),
    "xenstat_uninit": (None, (_P,)),
    "xenstat_get_node": (_P, (_P, _U)),
    "xenstat_free_node": (None, (_P,)),
    "xenstat_node_num_domains": (_U, (_P,)),
    "xenstat_node_domain_by_index": (_P, (_P, _U)),
    "xenstat_domain_id": (_U, (_P,)),
    "xenstat_domain_name": (ctypes.c_char_p, (_P,)),
    "xenstat_domain_cpu_ns": (_ULL, (_P,)),
    "xenstat_domain_num_vcpus": (_U, (_P,)),
    "xenstat_domain_vcpu": (_P, (_P, _U)),
    "xenstat_vcpu_online": (_U, (_P,)),
    "xenstat_vcpu_ns": (_ULL, (_P,)),
    "xenstat_domain_cur_mem": (_ULL, (_P,)),
    "xenstat_domain_max_mem": (_ULL, (_P,)),
    "xenstat_domain_num_networks": (_U, (_P,)),
    "xenstat_domain_network": (_P, (_P, _U)),
    "xenstat_network_id": (_U, (_P,)),
    "xenstat_network_rbytes": (_ULL, (_P,)),
    "xenstat_network_rpackets": (_ULL, (_P,)),
    "xenstat_network_tbytes": (_ULL, (_P,)),
    "xenstat_network_tpackets": (_ULL, (_P,)),
    "xenstat_domain_num_vbds": (_U, (_P,)),
    "xenstat_domain_vbd": (_P, (_P, _U)),
    "xenstat_vbd_dev": (_U, (_P,)),
    "xenstat_vbd_rd_reqs": (_ULL, (_P,)),
    "xenstat_vbd_wr_reqs": (_ULL, (_P,)),
    "xenstat_vbd_rd_sects": (_ULL, (_P,)),
    "xenstat_vbd_wr_sects": (_ULL, (_P,)),
}


class XenstatUnavailable(Exception):
    """No libxenstat, or no hypervisor behind it."""


class Xenstat:
    """An open libxenstat handle (one thread at a time: `XenstatProvider` polls serially)."""

    def __init__(self, library: str = LIBRARY) -> None:
        try:
            lib: Any = ctypes.CDLL(library)
            for name, (restype, argtypes) in _SIGNATURES.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = restype, argtypes
        except (OSError, AttributeError) as exc:
            raise XenstatUnavailable(f"{library}: {exc}") from None
        self._lib = lib
        self._handle = lib.xenstat_init()
        if not self._handle:
            raise XenstatUnavailable(
                "xenstat_init failed: no hypervisor (cannot open the privcmd interface)"
            )

    def close(self) -> None:
        if self._handle:
            self._lib.xenstat_uninit(self._handle)
            self._handle = None

    def read(self, clock: Callable[[], float] = time.monotonic) -> MeterSample:
        """One snapshot of every domain (raises `XenstatUnavailable` when the node cannot be
        read, e.g. the hypervisor call failed)."""
        lib = self._lib
        if not self._handle:
            raise XenstatUnavailable("closed")
        node = lib.xenstat_get_node(self._handle, XENSTAT_VCPU | XENSTAT_NETWORK | XENSTAT_VBD)
        if not node:
            raise XenstatUnavailable("xenstat_get_node failed")
        taken = clock()
        try:
            domains = []
            for i in range(lib.xenstat_node_num_domains(node)):
                dom = lib.xenstat_node_domain_by_index(node, i)
                if dom:
                    domains.append(self._domain(dom))
        finally:
            lib.xenstat_free_node(node)
        return MeterSample(taken, SOURCE, tuple(domains))

    def _domain(self, dom: int) -> DomainMeter:
        lib = self._lib
        raw_name: bytes | None = lib.xenstat_domain_name(dom)
        vcpus = []
        for v in range(lib.xenstat_domain_num_vcpus(dom)):
            vcpu = lib.xenstat_domain_vcpu(dom, v)
            if vcpu:
                vcpus.append(
                    VcpuTime(v, bool(lib.xenstat_vcpu_online(vcpu)), lib.xenstat_vcpu_ns(vcpu))
                )
        vifs = []
        for n in range(lib.xenstat_domain_num_networks(dom)):
            net = lib.xenstat_domain_network(dom, n)
            if net:
                vifs.append(
                    VifCounters(
                        lib.xenstat_network_id(net),
                        lib.xenstat_network_rbytes(net),
                        lib.xenstat_network_rpackets(net),
                        lib.xenstat_network_tbytes(net),
                        lib.xenstat_network_tpackets(net),
                    )
                )
        vbds = []
        for n in range(lib.xenstat_domain_num_vbds(dom)):
            vbd = lib.xenstat_domain_vbd(dom, n)
            if vbd:
                vbds.append(
                    VbdCounters(
                        lib.xenstat_vbd_dev(vbd),
                        lib.xenstat_vbd_rd_reqs(vbd),
                        lib.xenstat_vbd_wr_reqs(vbd),
                        lib.xenstat_vbd_rd_sects(vbd),
                        lib.xenstat_vbd_wr_sects(vbd),
                    )
                )
        max_mem = lib.xenstat_domain_max_mem(dom)
        return DomainMeter(
            domid=lib.xenstat_domain_id(dom),
            name=None if raw_name is None else raw_name.decode("utf-8", "replace"),
            uuid=None,  # libxenstat does not expose the handle; matched by domid and name
            cpu_ns=lib.xenstat_domain_cpu_ns(dom),
            vcpus=tuple(vcpus),
            memory_bytes=lib.xenstat_domain_cur_mem(dom),
            memory_max_bytes=None if max_mem == NO_MAX else max_mem,
            vifs=tuple(vifs),
            vbds=tuple(vbds),
        )


class XenstatProvider:
    """Reads `Xenstat` on the reactor's thread pool every `interval` seconds and hands each
    sample to `on_sample(source, sample)` on the reactor thread (None: the read failed). One
    read at a time: a tick while the last read still runs is skipped."""

    def __init__(
        self,
        reactor: Any,
        on_sample: Callable[[str, MeterSample | None], None],
        *,
        interval: float = 15.0,
        open_xenstat: Callable[[], Xenstat] = Xenstat,
    ) -> None:
        self._reactor = reactor
        self._on_sample = on_sample
        self._open = open_xenstat
        self._interval = interval
        self._loop = LoopingCall(self.poll)
        self._loop.clock = reactor
        self._xs: Xenstat | None = None
        self._busy = threading.Event()
        self.failures = 0

    def start(self) -> bool:
        """Open libxenstat and start polling; False (one log line, ``up`` 0) without it."""
        try:
            self._xs = self._open()
        except XenstatUnavailable as exc:
            _log.info("no hypervisor metering through libxenstat: {why}", why=str(exc))
            self._on_sample(SOURCE, None)
            return False
        self._loop.start(self._interval, now=True)
        return True

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._xs is not None and not self._busy.is_set():
            self._xs.close()
            self._xs = None

    def poll(self) -> Deferred[None] | None:
        xs = self._xs
        if xs is None or self._busy.is_set():
            return None
        self._busy.set()
        pool = self._reactor.getThreadPool()
        d: Deferred[MeterSample] = threads.deferToThreadPool(self._reactor, pool, xs.read)

        def done(sample: MeterSample) -> None:
            self._busy.clear()
            self._on_sample(SOURCE, sample)

        def failed(why: Any) -> None:
            self._busy.clear()
            if self.failures == 0:
                _log.warn("libxenstat read failed: {why}", why=why.getErrorMessage())
            self.failures += 1
            self._on_sample(SOURCE, None)

        return d.addCallbacks(done, failed)
