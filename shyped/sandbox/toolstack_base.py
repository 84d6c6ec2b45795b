"""The sandbox toolstack's plumbing: its settings, one connection per simulated program,
transactions retried as libxl retries them, driver states and libxl's device records.

`shyped.sandbox.toolstack.Toolstack` is the whole (see its module for what it plays)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs

from shyped.core.xlcfg import DomainConfig
from shyped.sandbox import devices as D
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import (
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


# -- helpers --------------------------------------------------------------------------------


def _backend_kind(dev: D.Device) -> str:
    """The backend's kind: ``qdisk`` for a disk QEMU serves, else the device's kind."""
    return dev.backend_kind if isinstance(dev, D.VbdDevice) else dev.kind


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


@attrs.define
class ToolstackBase:
    """The toolstack's settings and plumbing."""

    socket_path: Path = attrs.field(converter=Path)
    store: HypervisorStore = attrs.field()
    #: Test hook run inside every transaction just before commit (provoke EAGAIN).
    before_commit: CommitHook | None = None
    #: Test hook run before a device's hotplug script, with its backend path: the time
    #: libxl's wait for the backend and the script's start leave a daemon to act in.
    before_hotplug: Callable[[str], None] | None = None
    clock: Callable[[], float] = time.time

    @store.default
    def _store_default(self) -> HypervisorStore:
        return HypervisorStore.beside(self.socket_path)

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
            apply_ops(conn, st.ops)

    def _transact(self, conn: XsConn, body: Callable[[], list[Op]], what: str) -> None:
        """Run ``body``'s ops in a transaction, retrying on EAGAIN as libxl does
        (`if (errno == EAGAIN) goto retry_transaction`)."""
        for attempt in range(1, MAX_TX_ATTEMPTS + 1):
            conn.start()
            try:
                apply_ops(conn, body())
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

    @staticmethod
    def _guest_responsive(dom: DomainState) -> bool:
        return dom.booted and not dom.paused

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
            backend_kind="qdisk" if "/backend/qdisk/" in rec.get("backend", "") else "vbd",
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
            nictype=rec.get("type", "vif"),
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


def apply_ops(conn: XsConn, ops: Sequence[Op]) -> None:
    """Carry out layout ops on `conn` as the program that owns them would (tests and
    benchmarks replay libxl's writes through this too)."""
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
            _path_cleanup(conn, op.path)


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
