"""The sandbox toolstack: plays libxl, dom0's backends, hotplug scripts, xenconsoled and the
guest's frontends against any xenstored, writing what a real Xen 4.17 host writes.

Why: there is no hypervisor here, yet the daemon must be tested against exactly the xenstore
traffic of a real host (shared/xen-4.17-reference).  The knowledge of *what* is written lives in
:mod:`shyped.sandbox.layout` (pure); this module is the imperative shell: it allocates domids,
ports and grants in the simulated hypervisor (:mod:`shyped.sandbox.hypervisor`), opens one
xenstore connection per simulated program, runs transactions with libxl's EAGAIN retry, and
makes the simulated drivers react to what they read back from xenstore -- so a daemon that
vetoes (removes a device, closes a backend) changes what the "guest" does next.

Every public method is one toolstack command and holds the hypervisor state lock for its
duration, so commands from several processes (the daemon's actuator, the `xl`-like CLI) are
serialized like libxl's per-domain locks serialize them.

Not simulated: XS_INTRODUCE / @introduceDomain / @releaseDomain (oxenstored needs a real
domain for them), libxl's 10 s device-removal timeout (an unresponsive guest is forced at once),
multi-queue vifs and multi-page rings (the capture's dom0 advertises one queue), HVM/PVH.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs

from shyped.core.xlcfg import DiskSpec, DomainConfig, VifSpec
from shyped.sandbox import devices as D
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import (
    GUEST_PORTS_PER_VCPU,
    DomainState,
    HostState,
    HypervisorError,
    HypervisorStore,
)
from shyped.sandbox.layout import Actor, Op, Step
from shyped.sandbox.xsconn import XsConn, XsError

#: Sectors reported for a disk image the sandbox cannot see: the capture's 8 MiB image.
DEFAULT_SECTORS = 16384
#: Netfront reserves NET_TX_RING_SIZE + NET_RX_RING_SIZE grant references per queue before
#: granting its rings (xen-netfront.c xennet_init_queue), hence the capture's 520/521.
NETFRONT_GRANT_POOL = 512
MAX_TX_ATTEMPTS = 64
XEN_SCRIPTS = "/etc/xen/scripts"


class ToolstackError(RuntimeError):
    """A toolstack command failed; the message is what xl would say."""


#: Called after a transaction's operations and before its commit: (step description, attempt).
CommitHook = Callable[[str, int], None]


@attrs.frozen
class VchanEndpoint:
    """A libxenvchan rendezvous published by a server domain."""

    server: int
    client: int
    path: str
    ring_ref: int
    evtchn: int


class _Session:
    """The connections of one toolstack command, one per simulated program."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self._conns: dict[tuple[Actor, int], XsConn] = {}

    def conn(self, actor: Actor, domid: int = 0) -> XsConn:
        key = (actor, domid if actor is Actor.GUEST_KERNEL else 0)
        if key not in self._conns:
            self._conns[key] = XsConn(self.socket_path)
        return self._conns[key]

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()


@attrs.define
class Toolstack:
    """`xl` plus the rest of a Xen host, against the xenstored at ``socket_path``."""

    socket_path: Path = attrs.field(converter=Path)
    store: HypervisorStore = attrs.field()
    #: Test hook run inside every transaction just before commit (provoke EAGAIN).
    before_commit: CommitHook | None = None
    clock: Callable[[], float] = time.time

    @store.default
    def _store_default(self) -> HypervisorStore:
        return HypervisorStore.beside(self.socket_path)

    # -- plumbing ------------------------------------------------------------------------

    def _check_socket(self) -> None:
        if not self.socket_path.exists():
            raise ToolstackError(f"no xenstored socket at {self.socket_path}")

    @contextlib.contextmanager
    def _command(self) -> Iterator[tuple[HostState, _Session]]:
        self._check_socket()
        session = _Session(str(self.socket_path))
        try:
            with self.store.locked() as host:
                yield host, session
        except HypervisorError as exc:
            raise ToolstackError(str(exc)) from exc
        finally:
            session.close()

    def _run(self, session: _Session, steps: Step | list[Step]) -> None:
        for st in [steps] if isinstance(steps, Step) else steps:
            if st.actor in (Actor.HOTPLUG, Actor.VCHAN):
                with XsConn(str(self.socket_path)) as fresh:  # a process of its own
                    self._execute(fresh, st)
            else:
                self._execute(session.conn(st.actor, st.domid), st)

    def _execute(self, conn: XsConn, st: Step) -> None:
        if st.transaction:
            self._transact(conn, lambda: list(st.ops), st.what)
        else:
            self._apply(conn, st.ops)

    def _transact(self, conn: XsConn, body: Callable[[], list[Op]], what: str) -> None:
        """Run ``body``'s ops in a transaction, retrying on EAGAIN as libxl does
        (`if (errno == EAGAIN) goto retry_transaction`)."""
        for attempt in range(1, MAX_TX_ATTEMPTS + 1):
            conn.start()
            try:
                self._apply(conn, body())
                if self.before_commit is not None:
                    self.before_commit(what, attempt)
            except XsError as exc:
                conn.abort()
                if exc.errno == errno.EAGAIN:
                    continue
                raise ToolstackError(f"{what}: {exc}") from exc
            except BaseException:
                conn.abort()
                raise
            if conn.commit():
                return
        raise ToolstackError(f"{what}: transaction kept failing with EAGAIN")

    def _apply(self, conn: XsConn, ops: tuple[Op, ...] | list[Op]) -> None:
        for op in ops:
            if isinstance(op, L.Write):
                conn.write(op.path, op.value)
            elif isinstance(op, L.SetPerms):
                conn.set_perms(op.path, op.perms)
            elif isinstance(op, L.Mkdir):
                conn.mkdir(op.path)
            elif isinstance(op, L.Rm):
                conn.rm(op.path)
            elif isinstance(op, L.Read):
                conn.read(op.path)
            else:
                self._path_cleanup(conn, op.path)

    @staticmethod
    def _path_cleanup(conn: XsConn, path: str) -> None:
        """libxl__xs_path_cleanup: rm, then empty-valued childless parents."""
        if not conn.rm(path):
            return
        parent = path
        while "/" in parent.strip("/"):
            parent = parent.rsplit("/", 1)[0]
            value = conn.read(parent)
            if value is None or value != "":
                return
            children = conn.directory(parent)
            if children is None or children:
                return
            conn.rm(parent)

    # -- host ------------------------------------------------------------------------------

    def boot_host(self) -> None:
        """What a freshly booted dom0 has written (layout-before-create.txt)."""
        with self._command() as (host, session):
            host.ensure_dom0()
            self._run(session, L.host_boot_steps())

    # -- domains ---------------------------------------------------------------------------

    def create(self, cfg: DomainConfig, *, paused: bool = True) -> int:
        """`xl create [-p]`: make, build, add disks, console, vifs; unpause unless ``paused``."""
        with self._command() as (host, session):
            dom = host.create_domain(cfg.name, cfg.uuid, cfg.target_memkb, cfg.max_memkb, cfg.vcpus)
            dom.config = _config_json(cfg)
            domid = dom.domid
            try:
                dom.store_port = dom.alloc_port("store peer=0 ")
                dom.console_port = dom.alloc_port("console peer=0 ")
                dom.store_mfn, dom.console_mfn = host.alloc_mfns(2, cfg.max_memkb // 4 + 2)
                start = self.clock()
                start_time = f"{int(start)}.{int((start % 1) * 100):02d}"
                self._run(session, L.domain_make_step(domid, cfg.name, cfg.uuid))
                self._run(session, L.dm_version_step(domid))
                self._run(
                    session,
                    L.build_post_step(
                        domid,
                        cfg.uuid,
                        max_memkb=cfg.max_memkb,
                        target_memkb=cfg.target_memkb,
                        vcpus=cfg.vcpus,
                        max_vcpus=cfg.max_vcpus,
                        store_port=dom.store_port,
                        store_mfn=dom.store_mfn,
                        start_time=start_time,
                        kernel=cfg.kernel,
                        ramdisk=cfg.ramdisk,
                        cmdline=cfg.cmdline,
                    ),
                )
                # xs_introduce_domain: xenstored binds the store port from dom0 (the request
                # itself is not sent: oxenstored cannot map a guest that does not exist).
                host.ensure_dom0().alloc_port(f"peer={domid} xenstored")
                self._run(session, L.dm_version_step(domid))
                for spec in cfg.disks:
                    self._add_disk(host, session, dom, spec)
                self._run(session, D.console_add_step(domid, dom.console_port, dom.console_mfn))
                vifs = [
                    self._add_nic(host, session, dom, spec, devid=spec.devid or i, hotplug=False)
                    for i, spec in enumerate(cfg.vifs)
                ]
                dom.tty = host.alloc_pty(domid)
                host.ensure_dom0().alloc_port(f"peer={domid} xenconsoled")
                self._run(session, D.xenconsoled_tty_step(domid, dom.tty))
                for dev in vifs:
                    self._run(session, D.vif_hotplug_steps(dev))
                if not paused:
                    self._unpause(host, session, dom)
            except (ToolstackError, XsError) as exc:
                # domcreate_destruction_cb: a failed create destroys what it made.
                with contextlib.suppress(ToolstackError, XsError):
                    self._devices_destroy(host, session, dom)
                    vm = L.vm_path(cfg.uuid)
                    self._run(session, L.domain_destroy_final_steps(domid, vm))
                raise ToolstackError(f"creating domain {cfg.name} failed: {exc}") from exc
            return domid

    def unpause(self, domain: str | int) -> None:
        """`xl unpause`: the domain runs; on its first run the guest kernel boots and its
        frontends connect to whatever backends are waiting for them."""
        with self._command() as (host, session):
            self._unpause(host, session, host.lookup(str(domain)))

    def pause(self, domain: str | int) -> None:
        """`xl pause`: a hypercall only; nothing is written to xenstore."""
        with self._command() as (host, _session):
            host.lookup(str(domain)).paused = True

    def destroy(self, domain: str | int) -> None:
        """`xl destroy` (libxl__destroy_domid): pause, force-remove every device, remove the
        domain's trees, then the domain."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            if dom.domid == 0:
                raise ToolstackError("cannot destroy dom0")
            dom.paused = True
            self._devices_destroy(host, session, dom)
            conn = session.conn(Actor.LIBXL)
            vm = conn.read(f"{L.dom_path(dom.domid)}/vm")
            self._run(session, L.domain_destroy_final_steps(dom.domid, vm))
            host.remove_domain(dom.domid)
            for dev, holder in list(host.loop_devices.items()):
                if f"/backend/vbd/{dom.domid}/" in holder:
                    del host.loop_devices[dev]

    def boot_guest(self, domain: str | int) -> None:
        """Run the guest kernel's boot now (normally done by the first unpause)."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            dom.paused = False
            self._guest_boot(host, session, dom)

    def list_domains(self) -> list[DomainState]:
        """The hypervisor's domain list, by domid (`xl list`)."""
        self._check_socket()
        host = self.store.read()
        host.ensure_dom0()
        return [host.domains[d] for d in sorted(host.domains)]

    def list_long(self) -> list[dict[str, Any]]:
        """`xl list -l`: the stored configurations; like libxl it fills in dom0's memory
        target and static-max when missing (libxl__fill_dom0_memory_info)."""
        with self._command() as (host, session):
            dom0 = host.ensure_dom0()
            conn = session.conn(Actor.LIBXL)

            def body() -> list[Op]:
                target = conn.read("/local/domain/0/memory/target")
                static_max = conn.read("/local/domain/0/memory/static-max")
                return L.dom0_memory_ops(
                    None if target is None else int(target),
                    None if static_max is None else int(static_max),
                    dom0.memory_kb,
                )

            self._transact(conn, body, "libxl__fill_dom0_memory_info")
            return [
                {"domid": d.domid, "config": d.config}
                for d in sorted(host.domains.values(), key=lambda d: d.domid)
                if d.domid != 0
            ]

    # -- devices: attach -------------------------------------------------------------------

    def attach_disk(self, domain: str | int, spec: DiskSpec) -> D.VbdDevice:
        """`xl block-attach`."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            dev = self._add_disk(host, session, dom, spec)
            if self._guest_responsive(dom):
                self._frontend_probe(host, session, dom, dev)
            return dev

    def attach_nic(self, domain: str | int, spec: VifSpec) -> D.VifDevice:
        """`xl network-attach`: devid is the next free one (libxl__device_nextid)."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            devid = spec.devid
            if devid is None:
                existing = session.conn(Actor.LIBXL).directory(
                    f"{L.libxl_path(dom.domid)}/device/vif"
                )
                devid = max((int(x) for x in existing or [] if x.isdigit()), default=-1) + 1
            dev = self._add_nic(host, session, dom, spec, devid=devid, hotplug=True)
            if self._guest_responsive(dom):
                self._frontend_probe(host, session, dom, dev)
            return dev

    def _add_disk(
        self, host: HostState, session: _Session, dom: DomainState, spec: DiskSpec
    ) -> D.VbdDevice:
        try:
            devid = D.disk_devid(spec.vdev)
        except ValueError as exc:
            raise ToolstackError(str(exc)) from None
        if spec.format != "raw" or spec.backendtype in ("qdisk", "tap", "standalone"):
            raise ToolstackError(
                f"disk {spec.vdev}: only raw images/devices with the phy backend are simulated"
            )
        script = spec.script or "block"
        dev = D.VbdDevice(
            domid=dom.domid,
            devid=devid,
            vdev=spec.vdev,
            params=spec.target,
            script=script if script.startswith("/") else f"{XEN_SCRIPTS}/{script}",
            readwrite=spec.readwrite,
            cdrom=spec.cdrom,
            backend_domid=spec.backend_domid,
            discard_enable=spec.discard,
            trusted=spec.trusted,
        )
        self._device_add(session, dev, D.vbd_add_step(dev))
        self._driver_state(host, dev, backend=True, state=L.INIT_WAIT)
        self._run(session, D.blkback_probe_steps(dev))
        node, major_minor = _block_device(host, dev)
        self._run(session, D.block_hotplug_steps(dev, node, major_minor))
        return dev

    def _add_nic(
        self,
        host: HostState,
        session: _Session,
        dom: DomainState,
        spec: VifSpec,
        *,
        devid: int,
        hotplug: bool,
    ) -> D.VifDevice:
        script = spec.script or "vif-bridge"
        dev = D.VifDevice(
            domid=dom.domid,
            devid=devid,
            mac=spec.mac or _random_mac(dom.uuid, devid),
            bridge=spec.bridge or "xenbr0",
            script=script if script.startswith("/") else f"{XEN_SCRIPTS}/{script}",
            backend_domid=spec.backend_domid,
            ip=spec.ip,
            vifname=spec.vifname,
            gatewaydev=spec.gatewaydev,
            rate=spec.rate,
            mtu=spec.mtu or 1500,
            trusted=spec.trusted,
        )
        self._device_add(session, dev, D.vif_add_step(dev))
        self._driver_state(host, dev, backend=True, state=L.INIT_WAIT)
        self._run(session, D.netback_probe_steps(dev))
        if hotplug:  # at create time the scripts run after xenconsoled's tty (capture order)
            self._run(session, D.vif_hotplug_steps(dev))
        return dev

    def _device_add(self, session: _Session, dev: D.Device, add: Step) -> None:
        """The device-add transaction: libxl__device_exists reads the libxl path inside it
        ("device already exists in xenstore" if present), then libxl__device_generic_add."""
        conn = session.conn(Actor.LIBXL)
        record = L.libxl_device_path(dev.domid, dev.kind, dev.devid)

        def body() -> list[Op]:
            if conn.read(record) is not None:
                raise ToolstackError(
                    f"Domain {dev.domid}:device {dev.kind} {dev.devid} already exists in xenstore"
                )
            return [op for op in add.ops if not isinstance(op, L.Read)]

        self._transact(conn, body, add.what)

    # -- devices: detach -------------------------------------------------------------------

    def detach_disk(self, domain: str | int, which: str) -> None:
        """`xl block-detach <domain> <vdev|devid>`."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            try:
                devid = int(which) if which.isdigit() else D.disk_devid(which)
            except ValueError as exc:
                raise ToolstackError(str(exc)) from None
            dev = self._read_vbd(session, dom.domid, devid)
            if dev is None:
                raise ToolstackError(f"Error: Device {which} not connected.")
            self._remove_device(host, session, dom, dev, force=False)

    def detach_nic(self, domain: str | int, which: str) -> None:
        """`xl network-detach <domain> <devid|mac>`."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            devids = session.conn(Actor.LIBXL).directory(f"{L.libxl_path(dom.domid)}/device/vif")
            for candidate in devids or []:
                dev = self._read_vif(session, dom.domid, int(candidate))
                if dev is not None and (which == str(dev.devid) or which.lower() == dev.mac):
                    self._remove_device(host, session, dom, dev, force=False)
                    return
            raise ToolstackError(f"Unknown device {which}.")

    def _remove_device(
        self, host: HostState, session: _Session, dom: DomainState, dev: D.Device, *, force: bool
    ) -> None:
        """libxl__initiate_device_generic_remove, the drivers' reactions, the hotplug script's
        remove, then libxl__device_destroy."""
        self._initiate_remove(session, dev, force=force)
        if not force and self._guest_responsive(dom):
            self._frontend_backend_changed(host, session, dom, dev)
        elif not force:
            # The frontend cannot answer: libxl times out (LIBXL_DESTROY_TIMEOUT, not waited
            # for here) and retries with force, which removes the frontend.
            self._initiate_remove(session, dev, force=True)
            self._backend_frontend_changed(host, session, dev, None)
        else:
            self._backend_frontend_changed(host, session, dev, None)
        self._finish_remove(host, session, dev)

    def _initiate_remove(self, session: _Session, dev: D.Device, *, force: bool) -> None:
        conn = session.conn(Actor.LIBXL)

        def body() -> list[Op]:
            state = conn.read(f"{dev.backend}/state")
            return D.device_remove_ops(
                dev.kind, dev.domid, dev.devid, dev.backend_domid, state, force=force
            )

        self._transact(conn, body, f"remove {dev.kind} {dev.devid}")

    def _finish_remove(self, host: HostState, session: _Session, dev: D.Device) -> None:
        state = session.conn(Actor.LIBXL).read(f"{dev.backend}/state")
        if state not in (None, str(L.CLOSED)):
            raise ToolstackError(
                f"backend {dev.backend} did not reach Closed (state {state}); not removed"
            )
        if isinstance(dev, D.VbdDevice):
            host.free_loop(dev.backend)  # block remove: losetup -d
        self._run(session, D.device_destroy_step(dev.kind, dev.domid, dev.devid, dev.backend_domid))
        backend_dom = host.domains.get(dev.backend_domid)
        if backend_dom is not None:
            backend_dom.free_where(f"peer={dev.domid} dev={dev.kind}/{dev.devid} ")
            backend_dom.drivers.pop(_driver_key(dev, backend=True), None)
        guest = host.domains.get(dev.domid)
        if guest is not None:
            guest.free_where(f"dev={dev.kind}/{dev.devid} ")
            guest.drivers.pop(_driver_key(dev, backend=False), None)

    def _devices_destroy(self, host: HostState, session: _Session, dom: DomainState) -> None:
        """libxl__devices_destroy with force: console synchronously, others in parallel."""
        conn = session.conn(Actor.LIBXL)
        base = f"{L.libxl_path(dom.domid)}/device"
        pending: list[D.Device] = []
        for kind in conn.directory(base) or []:
            for devid in conn.directory(f"{base}/{kind}") or []:
                if not devid.isdigit():
                    continue
                if kind == "console":
                    backend = conn.read(f"{base}/{kind}/{devid}/backend") or ""
                    be_domid = _backend_domid(backend)
                    self._run(session, D.device_destroy_step(kind, dom.domid, int(devid), be_domid))
                    continue
                dev: D.Device | None = None
                if kind == "vbd":
                    dev = self._read_vbd(session, dom.domid, int(devid))
                elif kind == "vif":
                    dev = self._read_vif(session, dom.domid, int(devid))
                if dev is not None:
                    self._initiate_remove(session, dev, force=True)
                    pending.append(dev)
        for dev in pending:
            self._backend_frontend_changed(host, session, dev, None)
        for dev in pending:
            self._finish_remove(host, session, dev)

    # -- the guest -------------------------------------------------------------------------

    def _unpause(self, host: HostState, session: _Session, dom: DomainState) -> None:
        dom.paused = False
        if not dom.booted:
            self._guest_boot(host, session, dom)

    @staticmethod
    def _guest_responsive(dom: DomainState) -> bool:
        return dom.booted and not dom.paused

    def _guest_boot(self, host: HostState, session: _Session, dom: DomainState) -> None:
        """The guest kernel starts: control features, per-vCPU ports, then its xenbus
        frontends probe the devices under <home>/device (vifs first, as in the capture)."""
        if dom.booted:
            return
        dom.booted = True
        for _ in range(GUEST_PORTS_PER_VCPU * dom.vcpus):
            dom.alloc_port("guest kernel")
        self._run(session, D.guest_boot_step(dom.domid))
        for kind in ("vif", "vbd"):
            devids = session.conn(Actor.GUEST_KERNEL, dom.domid).directory(
                f"{L.dom_path(dom.domid)}/device/{kind}"
            )
            for devid in sorted(int(d) for d in devids or [] if d.isdigit()):
                dev = self._frontend_device(session, dom.domid, kind, devid)
                if dev is not None:
                    self._frontend_probe(host, session, dom, dev)

    def _frontend_device(
        self, session: _Session, domid: int, kind: str, devid: int
    ) -> D.Device | None:
        """The device as the guest sees it: its frontend directory points at the backend."""
        if kind == "vbd":
            return self._read_vbd(session, domid, devid)
        return self._read_vif(session, domid, devid)

    def _frontend_probe(
        self, host: HostState, session: _Session, dom: DomainState, dev: D.Device
    ) -> None:
        """A frontend driver reacts to its backend's state (netback_changed/blkback_changed)."""
        guest = session.conn(Actor.GUEST_KERNEL, dom.domid)
        fe_state = guest.read(f"{dev.frontend}/state")
        if fe_state is None:
            return
        be_state = guest.read(f"{dev.backend}/state")
        mine = self._get_driver_state(host, dev, backend=False)
        if be_state == str(L.INIT_WAIT) and mine == L.INITIALISING:
            if isinstance(dev, D.VifDevice):
                self._netfront_connect(host, session, dom, dev)
            else:
                self._blkfront_connect(host, session, dom, dev)
        elif be_state in (str(L.CLOSING), str(L.CLOSED)):
            self._frontend_backend_changed(host, session, dom, dev)

    def _netfront_connect(
        self, host: HostState, session: _Session, dom: DomainState, dev: D.VifDevice
    ) -> None:
        guest = session.conn(Actor.GUEST_KERNEL, dom.domid)
        split = guest.read(f"{dev.backend}/feature-split-event-channels") == "1"
        xdp = guest.read(f"{dev.backend}/feature-xdp-headroom") == "1"
        tag = f"dev=vif/{dev.devid} "
        for _ in range(NETFRONT_GRANT_POOL):
            dom.alloc_grant(f"{tag}netfront pool")
        tx_ref = dom.alloc_grant(f"{tag}netfront tx ring")
        rx_ref = dom.alloc_grant(f"{tag}netfront rx ring")
        ev_tx = dom.alloc_port(f"{tag}netfront tx")
        ev_rx = dom.alloc_port(f"{tag}netfront rx") if split else None
        self._run(
            session,
            D.netfront_connect_steps(
                dev,
                tx_ring_ref=tx_ref,
                rx_ring_ref=rx_ref,
                evtchn_tx=ev_tx,
                evtchn_rx=ev_rx,
                xdp_headroom=xdp,
            ),
        )
        self._driver_state(host, dev, backend=False, state=L.CONNECTED)
        self._backend_frontend_changed(host, session, dev, L.CONNECTED)

    def _blkfront_connect(
        self, host: HostState, session: _Session, dom: DomainState, dev: D.VbdDevice
    ) -> None:
        tag = f"dev=vbd/{dev.devid} "
        ring = dom.alloc_grant(f"{tag}blkfront ring")
        port = dom.alloc_port(f"{tag}blkfront")
        self._run(session, D.blkfront_connect_steps(dev, ring_ref=ring, evtchn=port))
        self._driver_state(host, dev, backend=False, state=L.INITIALISED)
        self._backend_frontend_changed(host, session, dev, L.INITIALISED)
        guest = session.conn(Actor.GUEST_KERNEL, dom.domid)
        if guest.read(f"{dev.backend}/state") == str(L.CONNECTED):  # blkfront_connect
            self._run(
                session,
                D.state_step(
                    Actor.GUEST_KERNEL,
                    dev.frontend,
                    L.CONNECTED,
                    what="blkfront Connected",
                    domid=dom.domid,
                ),
            )
            self._driver_state(host, dev, backend=False, state=L.CONNECTED)

    def _frontend_backend_changed(
        self, host: HostState, session: _Session, dom: DomainState, dev: D.Device
    ) -> None:
        """Backend Closing/Closed seen by the frontend: xenbus_frontend_closed -> Closed, and
        the backend reacts to that."""
        if self._get_driver_state(host, dev, backend=False) == L.CLOSED:
            return
        guest = session.conn(Actor.GUEST_KERNEL, dom.domid)
        if guest.read(f"{dev.frontend}/state") is None:
            return
        self._run(
            session,
            D.state_step(
                Actor.GUEST_KERNEL,
                dev.frontend,
                L.CLOSED,
                what=f"{dev.kind}front Closed",
                domid=dom.domid,
            ),
        )
        self._driver_state(host, dev, backend=False, state=L.CLOSED)
        dom.free_where(f"dev={dev.kind}/{dev.devid} ")
        self._backend_frontend_changed(host, session, dev, L.CLOSED)

    # -- the backends ----------------------------------------------------------------------

    def _backend_frontend_changed(
        self, host: HostState, session: _Session, dev: D.Device, fe_state: int | None
    ) -> None:
        """netback/blkback frontend_changed; ``fe_state=None`` is XenbusStateUnknown (the
        frontend directory is gone)."""
        if isinstance(dev, D.VifDevice):
            self._netback_frontend_changed(host, session, dev, fe_state)
        else:
            self._blkback_frontend_changed(host, session, dev, fe_state)

    def _netback_frontend_changed(
        self, host: HostState, session: _Session, dev: D.VifDevice, fe_state: int | None
    ) -> None:
        be = session.conn(Actor.DOM0_KERNEL)
        mine = self._get_driver_state(host, dev, backend=True)
        if fe_state == L.CONNECTED:
            if mine != L.INIT_WAIT:
                return
            if be.read(f"{dev.backend}/hotplug-status") != "connected":
                return  # netback waits for the hotplug script before Connected
            self._bind_backend_ports(host, dev, 2 if self._split(session, dev) else 1)
            self._netback_walk(host, session, dev, L.CONNECTED)
        elif fe_state == L.CLOSING:
            self._netback_walk(host, session, dev, L.CLOSING)
        elif fe_state == L.CLOSED or fe_state is None:
            self._netback_walk(host, session, dev, L.CLOSED)
            online = be.read(f"{dev.backend}/online")
            if fe_state is None or online != "1":
                # device_unregister -> netback_remove: drops hotplug-status.
                self._run(
                    session,
                    L.step(
                        Actor.DOM0_KERNEL,
                        [L.Rm(f"{dev.backend}/hotplug-status")],
                        tx=False,
                        what="netback_remove",
                    ),
                )
                self._unbind_backend_ports(host, dev)

    def _netback_walk(
        self, host: HostState, session: _Session, dev: D.VifDevice, target: int
    ) -> None:
        current = self._get_driver_state(host, dev, backend=True)
        for state in D.netback_walk(current, target):
            self._run(session, D.state_step(Actor.DOM0_KERNEL, dev.backend, state, what="netback"))
            self._driver_state(host, dev, backend=True, state=state)

    def _blkback_frontend_changed(
        self, host: HostState, session: _Session, dev: D.VbdDevice, fe_state: int | None
    ) -> None:
        be = session.conn(Actor.DOM0_KERNEL)
        mine = self._get_driver_state(host, dev, backend=True)
        if fe_state in (L.INITIALISED, L.CONNECTED):
            if mine == L.CONNECTED or be.read(f"{dev.backend}/physical-device") is None:
                return
            self._bind_backend_ports(host, dev, 1)
            self._run(session, D.blkback_connect_steps(dev, sectors=_sectors(dev.params)))
            self._driver_state(host, dev, backend=True, state=L.CONNECTED)
        elif fe_state == L.CLOSING:
            self._blkback_switch(host, session, dev, L.CLOSING)
        elif fe_state == L.CLOSED:
            self._blkback_switch(host, session, dev, L.CLOSED)
            if be.read(f"{dev.backend}/online") != "1":
                self._unbind_backend_ports(host, dev)
        else:
            # Unknown: device_unregister; xenbus_dev_remove closes a device libxl set Closing.
            if be.read(f"{dev.backend}/state") == str(L.CLOSING):
                self._blkback_switch(host, session, dev, L.CLOSED)
            self._unbind_backend_ports(host, dev)

    def _blkback_switch(
        self, host: HostState, session: _Session, dev: D.VbdDevice, state: int
    ) -> None:
        """xenbus_switch_state: no write when the driver's own state already matches."""
        if self._get_driver_state(host, dev, backend=True) == state:
            return
        self._run(session, D.state_step(Actor.DOM0_KERNEL, dev.backend, state, what="blkback"))
        self._driver_state(host, dev, backend=True, state=state)

    @staticmethod
    def _split(session: _Session, dev: D.VifDevice) -> bool:
        be = session.conn(Actor.DOM0_KERNEL)
        return be.read(f"{dev.frontend}/event-channel-rx") is not None

    @staticmethod
    def _bind_backend_ports(host: HostState, dev: D.Device, count: int) -> None:
        backend_dom = host.domains.get(dev.backend_domid)
        if backend_dom is None:
            return
        for i in range(count):
            backend_dom.alloc_port(f"peer={dev.domid} dev={dev.kind}/{dev.devid} backend {i}")

    @staticmethod
    def _unbind_backend_ports(host: HostState, dev: D.Device) -> None:
        backend_dom = host.domains.get(dev.backend_domid)
        if backend_dom is not None:
            backend_dom.free_where(f"peer={dev.domid} dev={dev.kind}/{dev.devid} ")

    # -- driver states (the drivers' own view, which may differ from xenstore) -------------

    @staticmethod
    def _driver_state(host: HostState, dev: D.Device, *, backend: bool, state: int) -> None:
        owner = host.domains.get(dev.backend_domid if backend else dev.domid)
        if owner is not None:
            owner.drivers[_driver_key(dev, backend=backend)] = state

    @staticmethod
    def _get_driver_state(host: HostState, dev: D.Device, *, backend: bool) -> int:
        owner = host.domains.get(dev.backend_domid if backend else dev.domid)
        if owner is None:
            return L.CLOSED
        return owner.drivers.get(_driver_key(dev, backend=backend), L.INITIALISING)

    # -- reading libxl's records -----------------------------------------------------------

    def _read_vbd(self, session: _Session, domid: int, devid: int) -> D.VbdDevice | None:
        rec = self._libxl_record(session, domid, "vbd", devid)
        if rec is None:
            return None
        return D.VbdDevice(
            domid=domid,
            devid=devid,
            vdev=rec.get("dev", str(devid)),
            params=rec.get("params", ""),
            script=rec.get("script", f"{XEN_SCRIPTS}/block"),
            readwrite=rec.get("mode", "w") == "w",
            cdrom=rec.get("device-type") == "cdrom",
            backend_domid=_backend_domid(rec.get("backend", "")),
            backend_type=rec.get("type", "phy"),
            removable=rec.get("removable") == "1",
            discard_enable=rec.get("discard-enable", "1") == "1",
        )

    def _read_vif(self, session: _Session, domid: int, devid: int) -> D.VifDevice | None:
        rec = self._libxl_record(session, domid, "vif", devid)
        if rec is None:
            return None
        return D.VifDevice(
            domid=domid,
            devid=devid,
            mac=rec.get("mac", ""),
            bridge=rec.get("bridge", "xenbr0"),
            script=rec.get("script", f"{XEN_SCRIPTS}/vif-bridge"),
            backend_domid=_backend_domid(rec.get("backend", "")),
            ip=rec.get("ip"),
            vifname=rec.get("vifname"),
            gatewaydev=rec.get("gatewaydev"),
            rate=rec.get("rate"),
            mtu=int(rec.get("mtu", "1500")),
        )

    @staticmethod
    def _libxl_record(
        session: _Session, domid: int, kind: str, devid: int
    ) -> dict[str, str] | None:
        """/libxl/<domid>/device/<kind>/<devid>: the trusted copy libxl keeps (dom0-only)."""
        conn = session.conn(Actor.LIBXL)
        base = L.libxl_device_path(domid, kind, devid)
        keys = conn.directory(base)
        if keys is None:
            return None
        record = {}
        for key in keys:
            value = conn.read(f"{base}/{key}")
            if value is not None:
                record[key] = value
        return record

    # -- vchan -----------------------------------------------------------------------------

    def vchan_listen(
        self, server: int, client: int, *, path: str | None = None, port: int = 0
    ) -> VchanEndpoint:
        """libxenvchan_server_init: grant a ring page, allocate an unbound port for the
        client, publish both with read access for the client."""
        with self._command() as (host, session):
            server_dom = host.domain(server)
            host.domain(client)
            full = _vchan_full_path(server, client, path, port)
            holder = f"peer={client} vchan {full} "
            ring = server_dom.alloc_grant(holder)
            evtchn = server_dom.alloc_port(holder)
            self._run(session, L.vchan_server_step(server, client, full, ring, evtchn))
            return VchanEndpoint(server, client, full, ring, evtchn)

    def vchan_close(self, server: int, path: str) -> None:
        """libxenvchan_close on the server: its rendezvous directory is removed."""
        with self._command() as (host, session):
            full = path if path.startswith("/") else f"{L.dom_path(server)}/{path}"
            dom = host.domains.get(server)
            if dom is not None:
                dom.free_where(f" vchan {full} ")
            self._run(session, L.vchan_close_step(full))


# -- helpers --------------------------------------------------------------------------------


def _driver_key(dev: D.Device, *, backend: bool) -> str:
    side = "back" if backend else "front"
    return f"{side}:{dev.kind}/{dev.domid}/{dev.devid}"


def _backend_domid(backend: str) -> int:
    parts = backend.split("/")
    if len(parts) > 3 and parts[1:3] == ["local", "domain"] and parts[3].isdigit():
        return int(parts[3])
    return 0


def _vchan_full_path(server: int, client: int, path: str | None, port: int) -> str:
    if path is None:
        return L.vchan_path(server, client, port)
    if path.startswith("/"):
        return path
    return f"{L.dom_path(server)}/{path}"


def _random_mac(uuid: str, devid: int) -> str:
    """libxl__device_nic_setdefault: Xen's OUI 00:16:3e and three pseudo-random bytes (here
    derived from the domain's uuid so a replay is reproducible)."""
    digest = zlib.crc32(f"{uuid}/{devid}".encode()).to_bytes(4, "big")
    return f"00:16:3e:{digest[0] & 0x7F:02x}:{digest[1]:02x}:{digest[2]:02x}"


def _block_device(host: HostState, dev: D.VbdDevice) -> tuple[str | None, str]:
    """What /etc/xen/scripts/block add finds: a block device is used as is; a file gets a
    loop device (losetup -f).  Returns (node written for files, major:minor in hex)."""
    path = dev.params
    is_block = False
    with contextlib.suppress(OSError):
        is_block = stat.S_ISBLK(os.stat(path).st_mode)
    if is_block or (path.startswith("/dev/") and not os.path.isfile(path)):
        if is_block:
            rdev = os.stat(path).st_rdev
            return None, f"{os.major(rdev):x}:{os.minor(rdev):x}"
        return None, f"fe:{zlib.crc32(path.encode()) % 256:x}"  # a made-up dm device
    loop = host.alloc_loop(dev.backend)
    return loop, f"7:{int(loop.removeprefix('/dev/loop')):x}"


def _sectors(params: str) -> int:
    try:
        size = os.stat(params).st_size
    except OSError:
        return DEFAULT_SECTORS
    return size // 512 if size else DEFAULT_SECTORS


def _config_json(cfg: DomainConfig) -> dict[str, Any]:
    """The part of libxl's stored domain configuration `xl list -l` prints."""
    c_info: dict[str, Any] = {"type": cfg.type, "name": cfg.name, "uuid": cfg.uuid}
    if cfg.seclabel is not None:  # access_control is not read by xl, so not stored
        c_info["ssid_label"] = cfg.seclabel
    b_info: dict[str, Any] = {
        "max_vcpus": cfg.max_vcpus,
        "avail_vcpus": list(range(cfg.vcpus)),
        "max_memkb": cfg.max_memkb,
        "target_memkb": cfg.target_memkb,
    }
    for key, value in (("kernel", cfg.kernel), ("cmdline", cfg.cmdline), ("ramdisk", cfg.ramdisk)):
        if value:
            b_info[key] = value
    disks = [
        {
            "pdev_path": d.target,
            "vdev": d.vdev,
            "format": d.format,
            "readwrite": 1 if d.readwrite else 0,
        }
        for d in cfg.disks
    ]
    nics = [
        {k: v for k, v in {"devid": i, "mac": n.mac, "bridge": n.bridge}.items() if v is not None}
        for i, n in enumerate(cfg.vifs)
    ]
    return {
        "c_info": c_info,
        "b_info": b_info,
        "disks": disks,
        "nics": nics,
        "on_crash": cfg.on_crash,
    }
