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
from typing import Any

import attrs

from shyped.core.xlcfg import DiskSpec, DomainConfig, VifSpec
from shyped.sandbox import devices as D
from shyped.sandbox import guests as G
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import (
    DomainState,
    HostState,
)
from shyped.sandbox.layout import Actor, Op, Step
from shyped.sandbox.toolstack_base import (
    DEFAULT_SECTORS,
    MAX_TX_ATTEMPTS,
    NETFRONT_GRANT_POOL,
    XEN_SCRIPTS,
    CommitHook,
    ToolstackError,
    VchanEndpoint,
    _backend_domid,
    _backend_kind,
    _block_device,
    _config_json,
    _driver_key,
    _random_mac,
    _Session,
    _vchan_full_path,
)
from shyped.sandbox.toolstack_drivers import ToolstackDrivers
from shyped.sandbox.xsconn import XsError


@attrs.define
class Toolstack(ToolstackDrivers):
    """`xl` plus the rest of a Xen host, against the xenstored at ``socket_path``."""

    def boot_host(self) -> None:
        """What a freshly booted dom0 has written (layout-before-create.txt)."""
        with self._command() as (host, session):
            host.ensure_dom0()
            self._run(session, L.host_boot_steps())

    def create(self, cfg: DomainConfig, *, paused: bool = True) -> int:
        """`xl create [-p]`: make, build, add disks, console, vifs; unpause unless ``paused``."""
        with self._command() as (host, session):
            dom = host.create_domain(cfg.name, cfg.uuid, cfg.target_memkb, cfg.max_memkb, cfg.vcpus)
            dom.config = _config_json(cfg)
            dom.dom_type = cfg.type
            domid = dom.domid
            try:
                dom.store_port = dom.alloc_port("store peer=0 ")
                dom.console_port = dom.alloc_port("console peer=0 ")
                dom.store_mfn, dom.console_mfn = host.alloc_mfns(2, cfg.max_memkb // 4 + 2)
                start = self.clock()
                start_time = f"{int(start)}.{int((start % 1) * 100):02d}"
                self._run(session, L.domain_make_step(domid, cfg.name, cfg.uuid, cfg.type))
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
                        dom_type=cfg.type,
                        video_memkb=cfg.video_memkb,
                    ),
                )
                # xs_introduce_domain: xenstored binds the store port from dom0 (the request
                # itself is not sent: oxenstored cannot map a guest that does not exist).
                host.ensure_dom0().alloc_port(f"peer={domid} xenstored")
                self._run(session, L.dm_version_step(domid))
                disks = [self._add_disk(host, session, dom, spec) for spec in cfg.disks]
                self._run(session, D.console_add_step(domid, dom.console_port, dom.console_mfn))
                # domcreate_launch_dm: QEMU for HVM, or for a PV/PVH guest's qdisk backends.
                if cfg.type == "hvm" or any(d.backend_kind == "qdisk" for d in disks):
                    self._run(session, G.device_model_steps(domid, cfg.type, 4000 + domid))
                vifs = [
                    self._add_nic(host, session, dom, spec, devid=spec.devid or i, hotplug=False)
                    for i, spec in enumerate(cfg.vifs)
                ]
                for num, bdf in enumerate(cfg.pcis):  # device_type_tbl: pci after the nics
                    self._add_pci(host, session, dom, bdf, num)
                dom.tty = host.alloc_pty(domid)
                host.ensure_dom0().alloc_port(f"peer={domid} xenconsoled")
                self._run(session, D.xenconsoled_tty_step(domid, dom.tty))
                for dev in vifs:
                    self._vif_hotplug(session, dev)
                if not paused:
                    self._unpause(host, session, dom)
            except (ToolstackError, XsError) as exc:
                # domcreate_destruction_cb: a failed create destroys what it made.
                with contextlib.suppress(ToolstackError, XsError):
                    self._pci_destroy(session, dom)
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
            self._pci_destroy(session, dom)
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

    def attach_pci(self, domain: str | int, bdf: str) -> None:
        """`xl pci-attach DOMAIN BDF` (libxl_device_pci_add): the /libxl/pci record, then the
        device's backend entries (a running domain's backend goes to Reconfiguring)."""
        with self._command() as (host, session):
            dom = host.lookup(str(domain))
            conn = session.conn(Actor.LIBXL)
            num = conn.read(f"{L.backend_path(0, 'pci', dom.domid, 0)}/num_devs")
            num_devs = int(num) if num and num.isdigit() else 0
            self._add_pci(host, session, dom, bdf, num_devs, starting=False)

    def _add_pci(
        self,
        host: HostState,
        session: _Session,
        dom: DomainState,
        bdf: str,
        num: int,
        *,
        starting: bool = True,
    ) -> None:
        for other in host.domains.values():
            if bdf in other.pcis:  # xc_assign_device
                raise ToolstackError(
                    f"PCI device {bdf} already assigned to a different guest ({other.domid})"
                )
        try:
            self._run(session, G.pci_assign_step(bdf, dom.domid))
        except ValueError as exc:
            raise ToolstackError(str(exc)) from None
        name = session.conn(Actor.LIBXL).read(f"{L.dom_path(dom.domid)}/name") or ""
        self._run(session, G.pci_backend_step(dom.domid, name, bdf, num, starting=starting))
        dom.pcis = [*dom.pcis, bdf]

    def _pci_destroy(self, session: _Session, dom: DomainState) -> None:
        if dom.pcis:
            self._run(session, G.pci_release_steps(dom.domid, list(dom.pcis)))
            dom.pcis = []
        if session.conn(Actor.LIBXL).read(G.device_model_path(dom.domid)) is not None:
            self._run(session, G.device_model_destroy_step(dom.domid))

    def _add_disk(
        self, host: HostState, session: _Session, dom: DomainState, spec: DiskSpec
    ) -> D.VbdDevice:
        try:
            devid = D.disk_devid(spec.vdev)
        except ValueError as exc:
            raise ToolstackError(str(exc)) from None
        qdisk = spec.backendtype == "qdisk" or (spec.format != "raw" and spec.backendtype is None)
        if spec.backendtype in ("tap", "standalone") or (spec.format != "raw" and not qdisk):
            raise ToolstackError(f"disk {spec.vdev}: only the phy and qdisk backends are simulated")
        if qdisk:  # libxl_disk.c device_disk_add: params = "<format>:<target>", no script
            dev = D.VbdDevice(
                domid=dom.domid,
                devid=devid,
                vdev=spec.vdev,
                params=f"{spec.format}:{spec.target}",
                readwrite=spec.readwrite,
                cdrom=spec.cdrom,
                backend_domid=spec.backend_domid,
                backend_type="qdisk",
                backend_kind="qdisk",
                discard_enable=spec.discard,
                trusted=spec.trusted,
                protocol="x86_64-abi" if dom.dom_type == "pv" else None,
            )
            self._device_add(session, dev, D.vbd_add_step(dev))
            self._driver_state(host, dev, backend=True, state=L.INIT_WAIT)
            self._run(session, D.state_step(Actor.QEMU, dev.backend, L.INIT_WAIT, what="qdisk"))
            return dev
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
            protocol="x86_64-abi" if dom.dom_type == "pv" else None,
        )
        self._device_add(session, dev, D.vbd_add_step(dev))
        self._driver_state(host, dev, backend=True, state=L.INIT_WAIT)
        self._run(session, D.blkback_probe_steps(dev))
        if self.before_hotplug is not None:
            self.before_hotplug(dev.backend)
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
        # libxl__device_nic_setdefault: an HVM guest's NICs at create are emulated too
        # (vif_ioemu) unless type=vif; a PV/PVH guest cannot have type=ioemu.
        nictype = "vif"
        if spec.type == "ioemu" or (dom.dom_type == "hvm" and not hotplug and spec.type is None):
            nictype = "vif_ioemu"
        if nictype == "vif_ioemu" and dom.dom_type != "hvm":
            raise ToolstackError("trying to create PV or PVH guest with an emulated interface")
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
            nictype=nictype,
        )
        self._device_add(session, dev, D.vif_add_step(dev))
        self._driver_state(host, dev, backend=True, state=L.INIT_WAIT)
        self._run(session, D.netback_probe_steps(dev))
        if hotplug:  # at create time the scripts run after xenconsoled's tty (capture order)
            self._vif_hotplug(session, dev)
        return dev

    def _vif_hotplug(self, session: _Session, dev: D.VifDevice) -> None:
        """libxl runs ``vif-bridge online`` (device_hotplug) and fails the add if it exits
        non-zero. A backend set Closing with ``online`` = 0 meanwhile (a veto) has had its
        ``vif<d>.<n>`` dropped by netback under the script, which then fails: seen on real
        Xen 4.17 (docs/operations.md, "A cut during xl create")."""
        if self.before_hotplug is not None:
            self.before_hotplug(dev.backend)
        if session.conn(Actor.LIBXL).read(f"{dev.backend}/online") == "0":
            error = f"vif{dev.domid}.{dev.devid}: no such device (netback dropped it: Closing)"
            self._run(session, D.vif_hotplug_failed_steps(dev, error))
            raise ToolstackError(f"unable to add vif devices: script: {error}")
        self._run(session, D.vif_hotplug_steps(dev))

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
                dev.kind,
                dev.domid,
                dev.devid,
                dev.backend_domid,
                state,
                force=force,
                backend_kind=_backend_kind(dev),
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
        self._run(
            session,
            D.device_destroy_step(
                dev.kind, dev.domid, dev.devid, dev.backend_domid, _backend_kind(dev)
            ),
        )
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


__all__ = [
    "DEFAULT_SECTORS",
    "MAX_TX_ATTEMPTS",
    "NETFRONT_GRANT_POOL",
    "XEN_SCRIPTS",
    "CommitHook",
    "Toolstack",
    "ToolstackError",
    "VchanEndpoint",
]
