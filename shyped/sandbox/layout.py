"""What a Xen 4.17 host writes into xenstore, as pure data: (actor, transaction?, operations).

Why a separate, pure module: the sandbox toolstack replays these steps against a real
oxenstored, and the daemon reuses the same knowledge (which paths, values and permissions mark
a domain or a device, who writes them, in which transaction) without doing any I/O.

Ground truth is the capture in shared/xen-4.17-reference (access-log.txt: every op with its
connection and transaction).  Where the capture does not cover a case we follow the sources,
cited per function: libxl = xen-project/xen RELEASE-4.17.x tools/libs/light, Linux = v6.1
drivers (the capture's dom0 and domU kernels).

Each builder returns :class:`Step` objects; a step is one program's connection (``actor``)
doing ``ops`` either inside one transaction or as plain requests.  Permission lists are
xenstore's strings, owner first: ``("n1", "r0")`` = owned by domain 1, domain 0 may read.
"""

from __future__ import annotations

import enum

import attrs

# XenbusState (xen/include/public/io/xenbus.h)
INITIALISING = 1
INIT_WAIT = 2
INITIALISED = 3
CONNECTED = 4
CLOSING = 5
CLOSED = 6

Perms = tuple[str, ...]


@attrs.frozen
class Write:
    """XS_WRITE: create (inheriting the parent's permissions) or overwrite a value."""

    path: str
    value: str = ""


@attrs.frozen
class SetPerms:
    """XS_SET_PERMS."""

    path: str
    perms: Perms


@attrs.frozen
class Mkdir:
    """XS_MKDIR."""

    path: str


@attrs.frozen
class Rm:
    """XS_RM; callers ignore ENOENT, as libxl's xs_rm users and libxl__xs_rm_checked do."""

    path: str


@attrs.frozen
class Read:
    """XS_READ whose only purpose is to put the path in the transaction's read set."""

    path: str


@attrs.frozen
class PathCleanup:
    """libxl__xs_path_cleanup (libxl_xshelp.c): rm the path, then each parent while it has an
    empty value and no children."""

    path: str


Op = Write | SetPerms | Mkdir | Rm | Read | PathCleanup


class Actor(enum.Enum):
    """The program that owns a connection on a real host (connections.txt of the capture)."""

    XEN_INIT_DOM0 = "xen-init-dom0"
    LIBXL = "libxl"  # one connection per xl command
    DOM0_KERNEL = "dom0-kernel"  # netback/blkback and dom0's own xenbus client
    GUEST_KERNEL = "guest-kernel"  # the domU's frontends, through its ring
    HOTPLUG = "hotplug"  # /etc/xen/scripts/*: every xenstore-write is its own connection
    XENCONSOLED = "xenconsoled"
    VCHAN = "vchan"  # a libxenvchan server: one connection to set up, another to remove
    QEMU = "qemu"  # dom0's device model (HVM emulation, qdisk backends): its own connection


@attrs.frozen
class Step:
    """One program doing ``ops`` on its connection, in one transaction or as plain requests."""

    actor: Actor
    ops: tuple[Op, ...]
    transaction: bool = False
    #: Whose kernel for GUEST_KERNEL (connections are per domain).
    domid: int = 0
    what: str = ""


def step(actor: Actor, ops: list[Op], *, tx: bool, what: str, domid: int = 0) -> Step:
    return Step(actor=actor, ops=tuple(ops), transaction=tx, domid=domid, what=what)


# -- paths ---------------------------------------------------------------------------------


def dom_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def libxl_path(domid: int) -> str:
    return f"/libxl/{domid}"


def vm_path(uuid: str) -> str:
    return f"/vm/{uuid}"


def frontend_path(domid: int, kind: str, devid: int) -> str:
    """libxl__device_frontend_path: console 0 lives at <dom>/console, others under device/."""
    if kind == "console" and devid == 0:
        return f"{dom_path(domid)}/console"
    return f"{dom_path(domid)}/device/{kind}/{devid}"


def backend_path(backend_domid: int, kind: str, domid: int, devid: int) -> str:
    return f"{dom_path(backend_domid)}/backend/{kind}/{domid}/{devid}"


def libxl_device_path(domid: int, kind: str, devid: int) -> str:
    return f"{libxl_path(domid)}/device/{kind}/{devid}"


# -- boot of the host ----------------------------------------------------------------------


def host_boot_steps(dom0_name: str = "Domain-0", pool_name: str = "Pool-0") -> list[Step]:
    """The fresh host (layout-before-create.txt): dom0's kernel advertises its control features
    (Linux drivers/xen/manage.c), then xen-init-dom0 names dom0 and the pool
    (tools/helpers/xen-init-dom0.c).  The capture's D0 writes are plain (its transaction only
    reads control/shutdown)."""
    d0 = dom_path(0)
    kernel = step(
        Actor.DOM0_KERNEL,
        [Write(f"{d0}/control/feature-{f}", "1") for f in ("poweroff", "reboot", "suspend")],
        tx=False,
        what="dom0 kernel: control features",
    )
    init = step(
        Actor.XEN_INIT_DOM0,
        [
            Write(f"{d0}/domid", "0"),
            Write(f"{d0}/name", dom0_name),
            Write("/local/pool/0/name", pool_name),
        ],
        tx=False,
        what="xen-init-dom0",
    )
    return [kernel, init]


# -- domain creation (libxl) ---------------------------------------------------------------


def domain_make_step(
    domid: int, name: str, uuid: str, dom_type: str = "pv", driver_domain: bool = False
) -> Step:
    """libxl__domain_make (libxl_create.c): one transaction creating the domain's home, its
    /vm and /libxl records, with roperm = (n0, r<domid>) and rwperm = (n<domid>).
    The order of ops is the capture's (A9.1)."""
    d, v, lx = dom_path(domid), vm_path(uuid), libxl_path(domid)
    ro: Perms = ("n0", f"r{domid}")
    rw: Perms = (f"n{domid}",)
    no: Perms = ("n0",)

    def mknod(path: str, perms: Perms) -> list[Op]:  # libxl__xs_mknod: write "" + set perms
        return [Write(path, ""), SetPerms(path, perms)]

    ops: list[Op] = [Rm(d), *mknod(d, ro), Rm(v), *mknod(v, ro), Rm(lx)]
    ops += [*mknod(lx, no), *mknod(f"{lx}/device", no)]
    ops.append(Write(f"{d}/vm", v))
    # libxl__domain_rename inside the same transaction writes both names.
    ops += [Write(f"{d}/name", name), Write(f"{v}/name", name)]
    ops += [*mknod(f"{d}/cpu", ro), *mknod(f"{d}/memory", ro), *mknod(f"{d}/device", ro)]
    ops += mknod(f"{d}/device/suspend/event-channel", rw)  # !xend_suspend_evtchn_compat
    ops += mknod(f"{d}/control", ro)
    if dom_type == "hvm":  # hvmloader's directory, read-only for the guest
        ops += mknod(f"{d}/hvmloader", ro)
    leaves = ["shutdown", "feature-poweroff", "feature-reboot", "feature-suspend"]
    if dom_type == "hvm":
        leaves += ["feature-s3", "feature-s4"]
    for leaf in [*leaves, "sysrq"]:
        ops += mknod(f"{d}/control/{leaf}", rw)
    for leaf in ("data", "drivers", "feature", "attr", "error"):
        ops += mknod(f"{d}/{leaf}", rw)
    if driver_domain:
        ops += mknod(f"{d}/libxl", rw) + mknod(f"{d}/device-model", rw)
    ops += [Write(f"{v}/uuid", uuid), Write(f"{v}/name", name)]
    ops += [
        Write(f"{d}/control/platform-feature-multiprocessor-suspend", "1"),
        Write(f"{d}/control/platform-feature-xs_reset_watches", "1"),
        Write(f"{lx}/type", dom_type),
    ]
    return step(Actor.LIBXL, ops, tx=True, what="libxl__domain_make")


def dm_version_step(domid: int) -> Step:
    """store_libxl_entry (libxl_create.c): /libxl/<domid>/dm-version, outside any transaction.
    The capture shows it written twice (before build and after introduce)."""
    return step(
        Actor.LIBXL,
        [Write(f"{libxl_path(domid)}/dm-version", "qemu_xen")],
        tx=False,
        what="store_libxl_entry",
    )


def build_post_step(
    domid: int,
    uuid: str,
    *,
    max_memkb: int,
    target_memkb: int,
    vcpus: int,
    max_vcpus: int,
    store_port: int,
    store_mfn: int,
    start_time: str,
    kernel: str | None,
    ramdisk: str | None,
    cmdline: str | None,
    dom_type: str = "pv",
    video_memkb: int = 0,
) -> Step:
    """libxl__build_post (libxl_dom.c) with the vm and local entries of libxl__domain_build
    (libxl_create.c) per guest type: one transaction; xs_introduce_domain follows it.

    HVM (source reading only, no capture): memory/target less videoram and, when maxmem is
    above memory, LIBXL_MAXMEM_CONSTANT (libxl__get_targetmem_fudge); vm entries
    rtc/timeoffset, image/ostype=hvm, start_time; local entries platform/acpi, acpi_s3,
    acpi_s4, acpi_laptop_slate and platform/device-model (xl's defaults). PVH: start_time
    only."""
    d, v = dom_path(domid), vm_path(uuid)
    fudge = video_memkb + (1024 if dom_type == "hvm" and max_memkb > target_memkb else 0)
    ops: list[Op] = [
        Write(f"{d}/memory/static-max", str(max_memkb)),
        Write(f"{d}/memory/target", str(target_memkb - fudge)),  # PV: no targetmem fudge
        Write(f"{d}/memory/videoram", str(video_memkb)),
        Write(f"{d}/domid", str(domid)),
        Write(f"{d}/store/port", str(store_port)),
        Write(f"{d}/store/ring-ref", str(store_mfn)),
    ]
    for cpu in range(max_vcpus):
        ops.append(Write(f"{d}/cpu/{cpu}/availability", "online" if cpu < vcpus else "offline"))
    if dom_type == "hvm":
        platform = (("acpi", "1"), ("acpi_s3", "1"), ("acpi_s4", "1"), ("acpi_laptop_slate", "0"))
        ops += [Write(f"{d}/platform/{k}", val) for k, val in platform]
        ops.append(Write(f"{d}/platform/device-model", "qemu_xen"))
        ops += [Write(f"{v}/rtc/timeoffset", ""), Write(f"{v}/image/ostype", "hvm")]
        ops.append(Write(f"{v}/start_time", start_time))
        return step(Actor.LIBXL, ops, tx=True, what="libxl__build_post")
    if dom_type == "pvh":
        ops.append(Write(f"{v}/start_time", start_time))
        return step(Actor.LIBXL, ops, tx=True, what="libxl__build_post")
    ops += [Write(f"{v}/image/ostype", "linux"), Write(f"{v}/image/kernel", kernel or "")]
    ops.append(Write(f"{v}/start_time", start_time))
    if ramdisk:
        ops.append(Write(f"{v}/image/ramdisk", ramdisk))
    if cmdline:
        ops.append(Write(f"{v}/image/cmdline", cmdline))
    return step(Actor.LIBXL, ops, tx=True, what="libxl__build_post")


def domain_destroy_final_steps(domid: int, vm: str | None) -> list[Step]:
    """devices_destroy_cb (libxl_domain.c): plain removals of /vm/<uuid>, the domain's home,
    /libxl/<domid> and <home>/hvmloader, after the devices are gone."""
    ops: list[Op] = []
    if vm:
        ops.append(Rm(vm))
    ops += [Rm(dom_path(domid)), Rm(libxl_path(domid)), Rm(f"{dom_path(domid)}/hvmloader")]
    return [step(Actor.LIBXL, ops, tx=False, what="devices_destroy_cb")]


# -- libxl's dom0 memory bookkeeping -------------------------------------------------------


def dom0_memory_ops(target_kb: int | None, max_kb: int | None, current_kb: int) -> list[Op]:
    """libxl__fill_dom0_memory_info (libxl_mem.c): in one transaction, fill in whichever of
    /local/domain/0/memory/{target,static-max} is missing from dom0's current allocation."""
    ops: list[Op] = [
        Read("/local/domain/0/memory/target"),
        Read("/local/domain/0/memory/static-max"),
    ]
    if target_kb is None:
        ops.append(Write("/local/domain/0/memory/target", str(current_kb)))
    if max_kb is None:
        ops.append(Write("/local/domain/0/memory/static-max", str(current_kb)))
    return ops


# -- libxenvchan ---------------------------------------------------------------------------


def vchan_path(server: int, client: int, port: int) -> str:
    """The libxenvchan convention: /local/domain/<server>/data/vchan/<client>/<port>."""
    return f"{dom_path(server)}/data/vchan/{client}/{port}"


def vchan_server_step(server: int, client: int, path: str, ring_ref: int, evtchn: int) -> Step:
    """tools/libs/vchan/init.c init_xs_srv: ring-ref and event-channel with perms
    (n<server>, r<client>) in one transaction (retried on EAGAIN)."""
    perms: Perms = (f"n{server}", f"r{client}")
    ops: list[Op] = [
        Write(f"{path}/ring-ref", str(ring_ref)),
        SetPerms(f"{path}/ring-ref", perms),
        Write(f"{path}/event-channel", str(evtchn)),
        SetPerms(f"{path}/event-channel", perms),
    ]
    return step(Actor.VCHAN, ops, tx=True, what="libxenvchan_server_init")


def vchan_close_step(path: str) -> Step:
    """tools/libs/vchan/init.c close_xs_srv: a fresh connection removes the directory."""
    return step(Actor.VCHAN, [Rm(path)], tx=False, what="libxenvchan close_xs_srv")


# -- virtual disk numbers ------------------------------------------------------------------
