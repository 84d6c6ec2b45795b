"""The PV drivers the sandbox plays: frontends and backends walking the xenbus states as
Linux's netfront/netback and blkfront/blkback do, and the guest kernel's boot."""

from __future__ import annotations

import attrs

from shyped.sandbox import devices as D
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import (
    GUEST_PORTS_PER_VCPU,
    GUEST_PORTS_PER_VCPU_PVH,
    DomainState,
    HostState,
)
from shyped.sandbox.layout import Actor
from shyped.sandbox.toolstack_base import (
    NETFRONT_GRANT_POOL,
    ToolstackBase,
    _sectors,
    _Session,
)


@attrs.define
class ToolstackDrivers(ToolstackBase):
    """Frontend and backend drivers over the plumbing."""

    def _unpause(self, host: HostState, session: _Session, dom: DomainState) -> None:
        dom.paused = False
        if not dom.booted:
            self._guest_boot(host, session, dom)

    def _guest_boot(self, host: HostState, session: _Session, dom: DomainState) -> None:
        """The guest kernel starts: control features, per-vCPU ports, then its xenbus
        frontends probe the devices under <home>/device (vifs first, as in the capture)."""
        if dom.booted:
            return
        dom.booted = True
        per_vcpu = GUEST_PORTS_PER_VCPU if dom.dom_type == "pv" else GUEST_PORTS_PER_VCPU_PVH
        for _ in range(per_vcpu * dom.vcpus):
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
            qdisk = dev.backend_kind == "qdisk"  # QEMU opens the image itself: no hotplug
            if mine == L.CONNECTED or (
                not qdisk and be.read(f"{dev.backend}/physical-device") is None
            ):
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
