"""What a Xen 4.17 host writes for PVH and HVM guests beyond a PV guest's layout, and for PCI
passthrough, as pure data (the `shyped.sandbox.layout` steps' form).

Source reading only: the reference capture (shared/xen-4.17-reference) is a PV guest, so these
layouts rest on xen-project/xen RELEASE-4.17.7 tools/libs/light (cited per builder) and were
never compared with a real host's xenstore. What the guest type changes in the domain's own
layout (``hvmloader``, ``control/feature-s3``/``-s4``, ``platform/*``, the memory target) is in
`shyped.sandbox.layout` (`domain_make_step`, `build_post_step`); the NIC type and the qdisk
backend are fields of `shyped.sandbox.devices.VifDevice` / `VbdDevice`.

Not simulated: QEMU's own nodes once the guest runs (``physmap``, VNC, serial ttys), HVM's vkb
device (``vkb_device``, default on), stub domains, qemu-traditional, pcifront's and pciback's
handshake (``root-N``, the frontend's ``pci-op-ref``), the ``/libxl/pci/<bdf>/driver_path``
and ``name`` of ``pci-assignable-add``.
"""

from __future__ import annotations

import re

from shyped.sandbox.devices import device_destroy_step
from shyped.sandbox.layout import (
    INITIALISING,
    Actor,
    Mkdir,
    Op,
    Perms,
    Rm,
    SetPerms,
    Step,
    Write,
    backend_path,
    dom_path,
    frontend_path,
    step,
)

#: A PCI device as libxl prints it (libxl_pci.c PCI_BDF "%04x:%02x:%02x.%01x").
_BDF = re.compile(r"([0-9a-f]{4}):([0-9a-f]{2}):([01][0-9a-f])\.([0-7])")


def device_model_path(domid: int) -> str:
    """DEVICE_MODEL_XS_PATH (libxl_internal.h) for a device model in dom0."""
    return f"/local/domain/0/device-model/{domid}"


def pci_info_path(bdf: str) -> str:
    """pci_info_xs_path (libxl_pci.c): /libxl/pci/<PCI_BDF_XSPATH "%04x-%02x-%02x-%01x">."""
    m = _BDF.fullmatch(bdf)
    if m is None:
        raise ValueError(f"not a PCI device as libxl prints it: {bdf!r}")
    return "/libxl/pci/{}-{}-{}-{}".format(*m.groups())


def device_model_steps(domid: int, dom_type: str, pid: int) -> list[Step]:
    """libxl__spawn_local_dm (libxl_dm.c) and QEMU's answer, for a device model in dom0 (HVM
    always; PV/PVH when a qdisk backend is needed, libxl__need_xenpv_qemu):

    1. HVM only: ``hvmloader/bios`` (seabios with qemu-xen) and
       ``hvmloader/allow-memory-relocate`` (0 with qemu-xen), plain writes;
    2. xs_mkdir of ``/local/domain/0/device-model/<domid>`` (dom0-owned: inherited);
    3. libxl__spawn_spawn: ``<home>/image/device-model-pid``;
    4. QEMU (xen_hvm / xen-pv machine) writes ``state`` = ``running`` there, which libxl
       waits for."""
    d = dom_path(domid)
    dm = device_model_path(domid)
    steps: list[Step] = []
    if dom_type == "hvm":
        steps.append(
            step(
                Actor.LIBXL,
                [
                    Write(f"{d}/hvmloader/bios", "seabios"),
                    Write(f"{d}/hvmloader/allow-memory-relocate", "0"),
                ],
                tx=False,
                what="libxl__spawn_local_dm hvmloader",
            )
        )
    steps.append(step(Actor.LIBXL, [Mkdir(dm)], tx=False, what="libxl__spawn_local_dm"))
    steps.append(
        step(
            Actor.LIBXL,
            [Write(f"{d}/image/device-model-pid", str(pid))],
            tx=False,
            what="libxl__spawn_spawn pid",
        )
    )
    steps.append(step(Actor.QEMU, [Write(f"{dm}/state", "running")], tx=False, what="qemu running"))
    return steps


def device_model_destroy_step(domid: int) -> Step:
    """libxl__destroy_device_model (libxl_dm.c): the device model's directory goes."""
    return step(
        Actor.LIBXL, [Rm(device_model_path(domid))], tx=False, what="libxl__destroy_device_model"
    )


def pci_assign_step(bdf: str, domid: int) -> Step:
    """libxl__device_pci_add (libxl_pci.c): pci_info_xs_write(pci, "domid", ...) before the
    device is reset and assigned: a plain write under /libxl (dom0-only, inherited)."""
    return step(
        Actor.LIBXL,
        [Write(f"{pci_info_path(bdf)}/domid", str(domid))],
        tx=False,
        what=f"pci_info_xs_write {bdf}",
    )


def pci_backend_step(domid: int, name: str, bdf: str, num: int, *, starting: bool = True) -> Step:
    """libxl__device_pci_add_xenstore (libxl_pci.c), one transaction. The first device
    (``num`` 0) creates the backend and frontend (libxl__create_pci_backend: backend
    ``/local/domain/0/backend/pci/<domid>/0`` with perms (n0, r<domid>) and frontend, frontend
    ``<home>/device/pci/0`` with perms (n<domid>, r0)); then the device's entries
    (libxl_create_pci_backend_device: ``key-N``, ``dev-N``, ``opts-N``, ``state-N``) and
    ``num_devs``. Written without libxl__device_generic_add: there is **no**
    ``/libxl/<domid>/device/pci`` record (the trusted one is ``/libxl/pci/<bdf>/domid``).
    A later device on a running domain also sets ``state`` = 7 (Reconfiguring)."""
    be = backend_path(0, "pci", domid, 0)
    fe = frontend_path(domid, "pci", 0)
    ops: list[Op] = []
    if num == 0:
        be_perms: Perms = ("n0", f"r{domid}")
        fe_perms: Perms = (f"n{domid}", "r0")
        ops += [Rm(be), Mkdir(be), SetPerms(be, be_perms)]
        ops += [
            Write(f"{be}/frontend", fe),
            Write(f"{be}/frontend-id", str(domid)),
            Write(f"{be}/online", "1"),
            Write(f"{be}/state", str(INITIALISING)),
            Write(f"{be}/domain", name),
        ]
        ops += [Rm(fe), Mkdir(fe), SetPerms(fe, fe_perms)]
        ops += [
            Write(f"{fe}/backend", be),
            Write(f"{fe}/backend-id", "0"),
            Write(f"{fe}/state", str(INITIALISING)),
        ]
    opts = "msitranslate=0,power_mgmt=0,permissive=0,rdm_policy=strict"
    ops += [
        Write(f"{be}/key-{num}", bdf),
        Write(f"{be}/dev-{num}", bdf),
        Write(f"{be}/opts-{num}", opts),
        Write(f"{be}/state-{num}", str(INITIALISING)),
        Write(f"{be}/num_devs", str(num + 1)),
    ]
    if num and not starting:
        ops.append(Write(f"{be}/state", "7"))
    return step(Actor.LIBXL, ops, tx=True, what=f"libxl__device_pci_add_xenstore {bdf}")


def pci_release_steps(domid: int, bdfs: list[str]) -> list[Step]:
    """libxl__device_pci_destroy_all at destroy: each device forced out (do_pci_remove ...
    pci_remove_detached): libxl__device_pci_remove_xenstore drops its ``*-N`` entries and
    decrements ``num_devs`` in one transaction, or, for the last one, libxl__device_destroy
    cleans the frontend, the (absent) libxl path and the backend up; then
    pci_info_xs_remove(pci, "domid"). Devices go last first here, so no entry is renumbered
    (libxl shifts the later ones down)."""
    be = backend_path(0, "pci", domid, 0)
    steps: list[Step] = []
    for num in range(len(bdfs) - 1, -1, -1):
        if num:
            keys = ("state", "key", "dev", "vdev", "opts", "vdevfn", "name")
            ops: list[Op] = [Rm(f"{be}/{k}-{num}") for k in keys]
            ops.append(Write(f"{be}/num_devs", str(num)))
            steps.append(step(Actor.LIBXL, ops, tx=True, what="pci_remove_xenstore"))
        else:
            steps.append(device_destroy_step("pci", domid, 0, 0))
        steps.append(
            step(
                Actor.LIBXL,
                [Rm(f"{pci_info_path(bdfs[num])}/domid")],
                tx=False,
                what=f"pci_info_xs_remove {bdfs[num]}",
            )
        )
    return steps
