"""PV devices as a Xen 4.17 host writes them into xenstore, as pure data: vbd and vif records,
what libxl, the backends, hotplug scripts and frontends write when a device is added, connected
and removed; disk device ids."""

from __future__ import annotations

import attrs

from shyped.sandbox.layout import (
    CLOSED,
    CLOSING,
    CONNECTED,
    INIT_WAIT,
    INITIALISED,
    INITIALISING,
    Actor,
    Mkdir,
    Op,
    PathCleanup,
    Perms,
    Read,
    Rm,
    SetPerms,
    Step,
    Write,
    backend_path,
    dom_path,
    frontend_path,
    libxl_device_path,
    step,
)

# -- devices: what libxl writes ------------------------------------------------------------


@attrs.frozen
class VbdDevice:
    """A disk after libxl__device_disk_setdefault (libxl_disk.c device_disk_add)."""

    domid: int
    devid: int
    vdev: str
    params: str  # pdev_path: the file or block device
    script: str = "/etc/xen/scripts/block"
    readwrite: bool = True
    cdrom: bool = False
    backend_domid: int = 0
    backend_type: str = "phy"
    removable: bool = False
    discard_enable: bool = True
    trusted: bool = True
    protocol: str | None = "x86_64-abi"  # xc_domain_get_native_protocol for a PV x86_64 guest
    #: libxl__device_from_disk: ``qdisk`` for backendtype=qdisk (QEMU in dom0), else ``vbd``.
    backend_kind: str = "vbd"

    kind = "vbd"

    @property
    def frontend(self) -> str:
        return frontend_path(self.domid, "vbd", self.devid)

    @property
    def backend(self) -> str:
        return backend_path(self.backend_domid, self.backend_kind, self.domid, self.devid)

    @property
    def mode(self) -> str:
        return "w" if self.readwrite else "r"

    @property
    def device_type(self) -> str:
        return "cdrom" if self.cdrom else "disk"


@attrs.frozen
class VifDevice:
    """A nic after libxl__device_nic_setdefault (libxl_nic.c)."""

    domid: int
    devid: int
    mac: str
    bridge: str = "xenbr0"
    script: str = "/etc/xen/scripts/vif-bridge"
    backend_domid: int = 0
    ip: str | None = None
    vifname: str | None = None
    gatewaydev: str | None = None
    rate: str | None = None
    mtu: int = 1500  # LIBXL_DEVICE_NIC_MTU_DEFAULT
    trusted: bool = True
    #: libxl_nic.c libxl__device_nic_setdefault: ``vif_ioemu`` for an HVM guest's NICs at
    #: create (QEMU's emulated NIC, a tap on the same bridge), else ``vif``.
    nictype: str = "vif"

    kind = "vif"

    @property
    def frontend(self) -> str:
        return frontend_path(self.domid, "vif", self.devid)

    @property
    def backend(self) -> str:
        return backend_path(self.backend_domid, "vif", self.domid, self.devid)


Device = VbdDevice | VifDevice


def _generic_add_ops(
    kind: str,
    domid: int,
    devid: int,
    backend_domid: int,
    back: list[tuple[str, str]],
    front: list[tuple[str, str]],
    ro_front: list[tuple[str, str]],
    backend_kind: str | None = None,
) -> list[Op]:
    """libxl__device_generic_add (libxl_device.c) inside the caller's transaction, preceded by
    libxl__device_exists' read of the libxl path. The backend directory is under the
    backend's kind (``qdisk`` for a disk QEMU serves), the rest under the device's."""
    fe = frontend_path(domid, kind, devid)
    be = backend_path(backend_domid, backend_kind or kind, domid, devid)
    lx = libxl_device_path(domid, kind, devid)
    frontend_perms: Perms = (f"n{domid}", f"r{backend_domid}")
    ro_frontend_perms: Perms = (f"n{backend_domid}", f"r{domid}")
    backend_perms: Perms = (f"n{backend_domid}", f"r{domid}")
    ops: list[Op] = [Read(lx), Rm(lx), Write(f"{lx}/frontend", fe), Write(f"{lx}/backend", be)]
    ops += [Rm(fe), Mkdir(fe)]
    # Console 0 keeps its historical read-only frontend directory.
    dir_perms = ro_frontend_perms if kind == "console" and devid == 0 else frontend_perms
    ops += [SetPerms(fe, dir_perms), Write(f"{fe}/backend", be)]
    for key, value in front:  # libxl__xs_writev_perms: every entry gets its perms
        ops += [Write(f"{fe}/{key}", value), SetPerms(f"{fe}/{key}", frontend_perms)]
    for key, value in ro_front:
        ops += [Write(f"{fe}/{key}", value), SetPerms(f"{fe}/{key}", ro_frontend_perms)]
    ops += [Rm(be), Mkdir(be), SetPerms(be, backend_perms), Write(f"{be}/frontend", fe)]
    ops += [Write(f"{be}/{k}", v) for k, v in back]
    # "We make a copy of everything for the backend in the libxl path as well."
    ops += [Write(f"{lx}/{k}", v) for k, v in back]
    return ops


def vbd_add_step(dev: VbdDevice) -> Step:
    """device_disk_add (libxl_disk.c): one transaction; back/front entries in libxl's order."""
    back = [("params", dev.params)]
    if dev.backend_kind == "vbd":  # a qdisk has no hotplug script
        back.append(("script", dev.script))
    back += [
        ("frontend-id", str(dev.domid)),
        ("online", "1"),
        ("removable", "1" if dev.removable else "0"),
        ("bootable", "1"),
        ("state", str(INITIALISING)),
        ("dev", dev.vdev),
        ("type", dev.backend_type),
        ("mode", dev.mode),
        ("device-type", dev.device_type),
        ("discard-enable", "1" if dev.discard_enable else "0"),
        ("specification", "xen"),
    ]
    front = [
        ("backend-id", str(dev.backend_domid)),
        ("state", str(INITIALISING)),
        ("virtual-device", str(dev.devid)),
        ("device-type", dev.device_type),
        ("trusted", "1" if dev.trusted else "0"),
    ]
    if dev.protocol:  # PV guests: "Old PV kernel disk frontends before 2.6.26 rely on ..."
        front.append(("protocol", dev.protocol))
    ops = _generic_add_ops(
        "vbd", dev.domid, dev.devid, dev.backend_domid, back, front, [], dev.backend_kind
    )
    return step(Actor.LIBXL, ops, tx=True, what=f"device_disk_add vbd {dev.devid}")


def vif_add_step(dev: VifDevice) -> Step:
    """libxl__device_add_async + libxl__set_xenstore_nic (libxl_device.c, libxl_nic.c)."""
    back = [("frontend-id", str(dev.domid)), ("online", "1"), ("state", str(INITIALISING))]
    back.append(("script", dev.script))
    if dev.vifname:
        back.append(("vifname", dev.vifname))
    back.append(("mac", dev.mac))
    if dev.ip:
        back.append(("ip", dev.ip))
    if dev.gatewaydev:
        back.append(("gatewaydev", dev.gatewaydev))
    if dev.rate:
        back.append(("rate", dev.rate))
    if dev.mtu != 1500:
        back.append(("mtu", str(dev.mtu)))
    back += [("bridge", dev.bridge), ("handle", str(dev.devid)), ("type", dev.nictype)]
    # "Force backend to wait for hotplug script execution before switching to connected."
    back.append(("hotplug-status", ""))
    front = [
        ("backend-id", str(dev.backend_domid)),
        ("state", str(INITIALISING)),
        ("handle", str(dev.devid)),
        ("mac", dev.mac),
        ("trusted", "1" if dev.trusted else "0"),
    ]
    ro_front = [("mtu", str(dev.mtu))]
    ops = _generic_add_ops("vif", dev.domid, dev.devid, dev.backend_domid, back, front, ro_front)
    return step(Actor.LIBXL, ops, tx=True, what=f"libxl__device_add_async vif {dev.devid}")


def console_add_step(
    domid: int, console_port: int, console_mfn: int, backend_domid: int = 0
) -> Step:
    """libxl__device_console_add (libxl_console.c) for console 0 of a PV guest: xenconsoled
    backend, its frontend at <dom>/console with tty empty until xenconsoled fills it."""
    back = [
        ("frontend-id", str(domid)),
        ("online", "1"),
        ("state", str(INITIALISING)),
        ("protocol", "vt100"),
    ]
    front = [("backend-id", str(backend_domid))]
    ro_front = [
        ("limit", "1048576"),
        ("type", "xenconsoled"),
        ("output", "pty"),
        ("tty", ""),
        ("port", str(console_port)),
        ("ring-ref", str(console_mfn)),
    ]
    ops = _generic_add_ops("console", domid, 0, backend_domid, back, front, ro_front)
    # The console has no libxl__device_exists read in the capture.
    ops = [op for op in ops if not isinstance(op, Read)]
    return step(Actor.LIBXL, ops, tx=True, what="libxl__device_console_add")


# -- devices: what the dom0 backends and hotplug scripts write ------------------------------


def blkback_probe_steps(dev: VbdDevice) -> list[Step]:
    """Linux xen-blkback xenbus.c xen_blkbk_probe: feature keys (plain writes), then
    frontend_changed(Initialising) -> InitWait in its own transaction (xenbus_switch_state)."""
    be = dev.backend
    plain = step(
        Actor.DOM0_KERNEL,
        [
            Write(f"{be}/feature-max-indirect-segments", "256"),
            Write(f"{be}/multi-queue-max-queues", "1"),
            Write(f"{be}/max-ring-page-order", "4"),
        ],
        tx=False,
        what="blkback probe",
    )
    return [plain, state_step(Actor.DOM0_KERNEL, be, INIT_WAIT, what="blkback InitWait")]


def block_hotplug_steps(dev: VbdDevice, node: str | None, major_minor: str) -> list[Step]:
    """/etc/xen/scripts/block add: a file gets a loop device (`node`), then write_dev
    (block-common.sh) writes physical-device, physical-device-path and success() writes
    hotplug-status.  Each xenstore-write is a separate process, hence a separate connection."""
    be = dev.backend
    writes: list[Op] = []
    if node is not None:
        writes.append(Write(f"{be}/node", node))
    writes += [
        Write(f"{be}/physical-device", major_minor),
        Write(f"{be}/physical-device-path", node or dev.params),
        Write(f"{be}/hotplug-status", "connected"),
    ]
    return [step(Actor.HOTPLUG, [op], tx=False, what="block add") for op in writes]


def netback_probe_steps(dev: VifDevice) -> list[Step]:
    """Linux xen-netback xenbus.c netback_probe: features in one transaction, optional
    features as plain writes, then InitWait in its own transaction."""
    be = dev.backend
    features = [
        ("feature-sg", "1"),
        ("feature-gso-tcpv4", "1"),
        ("feature-gso-tcpv6", "1"),
        ("feature-ipv6-csum-offload", "1"),
        ("feature-rx-copy", "1"),
        ("feature-xdp-headroom", "1"),
        ("feature-rx-flip", "0"),
        ("feature-multicast-control", "1"),
        ("feature-dynamic-multicast-control", "1"),
    ]
    tx_features = step(
        Actor.DOM0_KERNEL,
        [Write(f"{be}/{k}", v) for k, v in features],
        tx=True,
        what="netback probe features",
    )
    optional = step(
        Actor.DOM0_KERNEL,
        [
            Write(f"{be}/feature-split-event-channels", "1"),
            Write(f"{be}/multi-queue-max-queues", "1"),
            Write(f"{be}/feature-ctrl-ring", "1"),
        ],
        tx=False,
        what="netback optional features",
    )
    return [
        tx_features,
        optional,
        state_step(Actor.DOM0_KERNEL, be, INIT_WAIT, what="netback InitWait"),
    ]


def vif_hotplug_steps(dev: VifDevice) -> list[Step]:
    """/etc/xen/scripts/vif-bridge online: the frontend's mtu (vif-common.sh) and
    success()'s hotplug-status, one xenstore-write process each."""
    return [
        step(Actor.HOTPLUG, [Write(f"{dev.frontend}/mtu", str(dev.mtu))], tx=False, what="vif"),
        step(
            Actor.HOTPLUG,
            [Write(f"{dev.backend}/hotplug-status", "connected")],
            tx=False,
            what="vif-bridge online",
        ),
    ]


def vif_hotplug_failed_steps(dev: VifDevice, error: str) -> list[Step]:
    """vif-bridge online failing (xen-hotplug-common.sh fatal): hotplug-error, then
    hotplug-status "error", one xenstore-write process each; the script exits 1."""
    return [
        step(Actor.HOTPLUG, [Write(f"{dev.backend}/{key}", value)], tx=False, what="vif fatal")
        for key, value in (("hotplug-error", error), ("hotplug-status", "error"))
    ]


def xenconsoled_tty_step(domid: int, tty: str) -> Step:
    """xenconsoled (tools/console/daemon/io.c domain_create_tty) publishes the pty."""
    return step(
        Actor.XENCONSOLED,
        [Write(f"{dom_path(domid)}/console/tty", tty)],
        tx=False,
        what="xenconsoled tty",
    )


def state_step(actor: Actor, node: str, state: int, *, what: str, domid: int = 0) -> Step:
    """xenbus_switch_state (Linux drivers/xen/xenbus/xenbus_client.c): one transaction per
    state change, as the capture shows for every driver."""
    return step(actor, [Write(f"{node}/state", str(state))], tx=True, what=what, domid=domid)


# -- guest frontends -----------------------------------------------------------------------


def guest_boot_step(domid: int) -> Step:
    """The guest kernel's drivers/xen/manage.c: control features, plain writes."""
    d = dom_path(domid)
    return step(
        Actor.GUEST_KERNEL,
        [Write(f"{d}/control/feature-{f}", "1") for f in ("poweroff", "reboot", "suspend")],
        tx=False,
        what="guest kernel: control features",
        domid=domid,
    )


def netfront_connect_steps(
    dev: VifDevice,
    *,
    tx_ring_ref: int,
    rx_ring_ref: int,
    evtchn_tx: int,
    evtchn_rx: int | None,
    xdp_headroom: bool = True,
) -> list[Step]:
    """Linux xen-netfront.c talk_to_netback on backend InitWait: xdp-headroom (plain), then
    rings, event channels and features in one transaction, then Connected (4) directly --
    netfront never writes Initialised (3).  `evtchn_rx=None` = one shared event-channel."""
    fe = dev.frontend
    steps: list[Step] = []
    if xdp_headroom:
        steps.append(
            step(
                Actor.GUEST_KERNEL,
                [Write(f"{fe}/xdp-headroom", "0")],
                tx=False,
                what="netfront xdp-headroom",
                domid=dev.domid,
            )
        )
    ops: list[Op] = [
        Write(f"{fe}/multi-queue-num-queues", "1"),
        Write(f"{fe}/tx-ring-ref", str(tx_ring_ref)),
        Write(f"{fe}/rx-ring-ref", str(rx_ring_ref)),
    ]
    if evtchn_rx is None:
        ops.append(Write(f"{fe}/event-channel", str(evtchn_tx)))
    else:
        ops += [
            Write(f"{fe}/event-channel-tx", str(evtchn_tx)),
            Write(f"{fe}/event-channel-rx", str(evtchn_rx)),
        ]
    for key in (
        "request-rx-copy",
        "feature-rx-notify",
        "feature-sg",
        "feature-gso-tcpv4",
        "feature-gso-tcpv6",
        "feature-ipv6-csum-offload",
    ):
        ops.append(Write(f"{fe}/{key}", "1"))
    steps.append(step(Actor.GUEST_KERNEL, ops, tx=True, what="netfront rings", domid=dev.domid))
    steps.append(
        state_step(Actor.GUEST_KERNEL, fe, CONNECTED, what="netfront Connected", domid=dev.domid)
    )
    return steps


def blkfront_connect_steps(dev: VbdDevice, *, ring_ref: int, evtchn: int) -> list[Step]:
    """Linux xen-blkfront.c talk_to_blkback: ring-ref, event-channel, protocol and
    feature-persistent in one transaction, then Initialised (3)."""
    fe = dev.frontend
    ops: list[Op] = [
        Write(f"{fe}/ring-ref", str(ring_ref)),
        Write(f"{fe}/event-channel", str(evtchn)),
        Write(f"{fe}/protocol", "x86_64-abi"),
        Write(f"{fe}/feature-persistent", "1"),
    ]
    return [
        step(Actor.GUEST_KERNEL, ops, tx=True, what="blkfront rings", domid=dev.domid),
        state_step(
            Actor.GUEST_KERNEL, fe, INITIALISED, what="blkfront Initialised", domid=dev.domid
        ),
    ]


def blkback_connect_steps(dev: VbdDevice, *, sectors: int, sector_size: int = 512) -> list[Step]:
    """Linux xen-blkback xenbus.c connect(): flush/discard/barrier/persistent and the disk
    geometry in one transaction, then Connected in its own."""
    be = dev.backend
    info = (1 if dev.cdrom else 0) | (0 if dev.readwrite else 4)  # VDISK_CDROM, VDISK_READONLY
    ops: list[Op] = [Write(f"{be}/feature-flush-cache", "1")]
    if dev.discard_enable:
        ops += [
            Write(f"{be}/discard-granularity", "4096"),
            Write(f"{be}/discard-alignment", "0"),
            Write(f"{be}/discard-secure", "0"),
            Write(f"{be}/feature-discard", "1"),
        ]
    ops += [
        Write(f"{be}/feature-barrier", "1"),
        Write(f"{be}/feature-persistent", "1"),
        Write(f"{be}/sectors", str(sectors)),
        Write(f"{be}/info", str(info)),
        Write(f"{be}/sector-size", str(sector_size)),
        Write(f"{be}/physical-sector-size", str(sector_size)),
    ]
    return [
        step(Actor.DOM0_KERNEL, ops, tx=True, what="blkback connect"),
        state_step(Actor.DOM0_KERNEL, be, CONNECTED, what="blkback Connected"),
    ]


# -- removal -------------------------------------------------------------------------------


def device_remove_ops(
    dev_kind: str,
    domid: int,
    devid: int,
    backend_domid: int,
    backend_state: str | None,
    *,
    force: bool,
    backend_kind: str | None = None,
) -> list[Op]:
    """libxl__initiate_device_generic_remove (libxl_device.c), the body of its transaction
    after reading the backend state: forced removal (destroy, or after the 10 s timeout) first
    cleans the frontend path; online=0; state=5 unless already Closed.  No state: the backend
    is gone, nothing to write."""
    be = backend_path(backend_domid, backend_kind or dev_kind, domid, devid)
    ops: list[Op] = []
    if force:
        ops.append(PathCleanup(frontend_path(domid, dev_kind, devid)))
    ops.append(Read(f"{be}/state"))
    if backend_state is None:
        return ops
    ops.append(Write(f"{be}/online", "0"))
    if backend_state != str(CLOSED):
        ops.append(Write(f"{be}/state", str(CLOSING)))
    return ops


def device_destroy_step(
    dev_kind: str, domid: int, devid: int, backend_domid: int, backend_kind: str | None = None
) -> Step:
    """libxl__device_destroy (libxl_device.c) run by the toolstack domain: frontend, libxl and
    backend paths cleaned up (empty parents removed) in one transaction."""
    ops: list[Op] = [
        PathCleanup(frontend_path(domid, dev_kind, devid)),
        PathCleanup(libxl_device_path(domid, dev_kind, devid)),
        PathCleanup(backend_path(backend_domid, backend_kind or dev_kind, domid, devid)),
    ]
    return step(Actor.LIBXL, ops, tx=True, what=f"libxl__device_destroy {dev_kind} {devid}")


def netback_walk(current: int, target: int) -> list[int]:
    """States netback writes going from ``current`` to ``target`` (Linux xen-netback xenbus.c
    set_backend_state: the shortest path through its state graph)."""
    graph = {
        (INITIALISING, INIT_WAIT): INIT_WAIT,
        (INITIALISING, CONNECTED): INIT_WAIT,
        (INITIALISING, CLOSING): INIT_WAIT,
        (INITIALISING, CLOSED): CLOSED,
        (CLOSED, INIT_WAIT): INIT_WAIT,
        (CLOSED, CONNECTED): INIT_WAIT,
        (CLOSED, CLOSING): CLOSING,
        (INIT_WAIT, CONNECTED): CONNECTED,
        (INIT_WAIT, CLOSING): CLOSING,
        (INIT_WAIT, CLOSED): CLOSING,
        (CONNECTED, INIT_WAIT): CLOSING,
        (CONNECTED, CLOSING): CLOSING,
        (CONNECTED, CLOSED): CLOSING,
        (CLOSING, INIT_WAIT): CLOSED,
        (CLOSING, CONNECTED): CLOSED,
        (CLOSING, CLOSED): CLOSED,
    }
    path: list[int] = []
    state = current
    while state != target:
        state = graph[(state, target)]
        path.append(state)
    return path


def _virtdisk(vdev: str, prefix: str, max_index: int, max_part: int) -> tuple[int, int] | None:
    """device_virtdisk_matches (libxl_device.c): drive letters in base 26, then a partition."""
    if not vdev.startswith(prefix):
        return None
    rest = vdev[len(prefix) :]
    index = -1
    pos = 0
    while pos < len(rest) and "a" <= rest[pos] <= "z":
        index = (index + 1) * 26 + (ord(rest[pos]) - ord("a"))
        if index > max_index:
            return None
        pos += 1
    if index < 0:
        return None
    tail = rest[pos:]
    if not tail:
        return index, 0
    if not tail.isdigit() or tail.startswith("0"):
        return None
    part = int(tail)
    if part > max_part:
        return None
    return index, part


def disk_devid(vdev: str) -> int:
    """libxl__device_disk_dev_number: xvda -> 51712 (202<<8), hda -> 768, sda -> 2048...
    Raises ValueError for names libxl rejects."""
    import re

    m = re.fullmatch(r"d(\d+)p(\d+)", vdev)
    xvd = (int(m.group(1)), int(m.group(2))) if m else _virtdisk(vdev, "xvd", (1 << 20) - 1, 255)
    if xvd is not None and xvd[0] < (1 << 20) and xvd[1] < 256:
        disk, part = xvd
        if disk <= 15 and part <= 15:
            return (202 << 8) | (disk << 4) | part
        return (1 << 28) | (disk << 8) | part
    if vdev.isdigit():
        return int(vdev)
    hd = _virtdisk(vdev, "hd", 3, 63)
    if hd is not None:
        disk, part = hd
        return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part
    sd = _virtdisk(vdev, "sd", 15, 15)
    if sd is not None:
        disk, part = sd
        return (8 << 8) | (disk << 4) | part
    raise ValueError(f"invalid or unsupported virtual disk identifier {vdev!r}")
