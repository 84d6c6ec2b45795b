"""PVH and HVM guests, qdisk backends and PCI passthrough against the daemon on the sandbox
(real oxenstored): permitted with the right labels, vetoed with the wrong ones, the xenstore
state after enforcement checked as for PV. What an HVM guest has outside the PV handshake (its
emulated NIC's tap on the bridge, its disks opened by QEMU, a PCI device) cannot be cut: a
denial destroys the domain. Hostile guests write only nodes they own."""

from __future__ import annotations

import pytest
import pytest_twisted
from daemon_helpers import Harness, eventually, host_fixture, uuid_of

from shyped.core.actions import CutDevice, VetoDomain
from shyped.core.labelstore import LabelStore, load_label_store
from shyped.core.xlcfg import DomainConfig, domain_config_from_text, parse_disk_spec
from shyped.policy.decisions import Rule
from shyped.sandbox import layout as L
from shyped.sandbox.toolstack_base import apply_ops
from shyped.sandbox.xsconn import XsConn

__all__ = ["host_fixture"]

XVDA = 51712
HDA = 768
BANK_A_PCI = "0000:03:00.0"
BANK_B_PCI = "0000:04:00.0"
UNLABELLED_PCI = "0000:05:00.0"


def guestcfg(
    name: str,
    dom_type: str,
    *,
    vifs: tuple[str, ...] = (),
    disks: tuple[str, ...] = (),
    pcis: tuple[str, ...] = (),
) -> DomainConfig:
    lines = [f'name = "{name}"', f'uuid = "{uuid_of(name)}"', f'type = "{dom_type}"']
    lines.append("memory = 128")
    for key, items in (("vif", vifs), ("disk", disks), ("pci", pcis)):
        if items:
            lines.append(f"{key} = [" + ", ".join(f"'{i}'" for i in items) + "]")
    return domain_config_from_text("\n".join(lines) + "\n", f"{name}.cfg")


def disk(name: str, vdev: str = "xvda", extra: str = "") -> str:
    return f"format=raw,vdev={vdev},access=rw,{extra}target=/srv/xen/images/{name}.img"


def labels(host: Harness) -> LabelStore:
    """The example label store with two PCI devices labelled (one per bank)."""
    store = load_label_store(host.config().labels)
    store = store.with_resource(f"pci:{BANK_A_PCI}", "bank-a-disk")
    return store.with_resource(f"pci:{BANK_B_PCI}", "bank-b-disk")


def guest_write(host: Harness, domid: int, writes: list[tuple[str, str]]) -> None:
    """A hostile guest writing nodes of its own (the sandbox's clients are all privileged, so
    only paths the guest owns on real Xen are written)."""
    with XsConn(str(host.xsd.socket_path)) as xs:
        for path, value in writes:
            assert path.startswith(f"/local/domain/{domid}/"), path
            xs.write(path, value)


# ---- HVM ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_hvm_guest_with_emulated_nic_disk_and_pci_of_its_own_is_admitted(
    host: Harness,
) -> None:
    await host.start(labels=labels(host))
    d = await host.call(
        host.ts.create,
        guestcfg(
            "web-a1",
            "hvm",
            vifs=("bridge=xenbr-bank-a",),
            disks=(disk("web-a1", "hda"),),
            pcis=(BANK_A_PCI,),
        ),
    )
    await host.settle()
    assert host.last(f"domain {d}").allowed
    vif = host.last(f"device vif {d}/0")
    assert vif.allowed and vif.resource is not None
    assert vif.resource.resource == "bridge:xenbr-bank-a"
    vbd = host.last(f"device vbd {d}/{HDA}")
    assert vbd.allowed and vbd.resource is not None
    assert vbd.resource.resource == "disk:/srv/xen/images/web-a1.img"
    pci = host.last(f"device pci {d}/{0x0300}")  # pci_encode_bdf: bus 3, devfn 0
    assert pci.allowed and pci.resource is not None
    assert pci.resource.resource == f"pci:{BANK_A_PCI}" and pci.resource.label == "bank-a-disk"
    # What libxl writes for it is there and untouched.
    assert host.read(f"/libxl/{d}/type") == "hvm"
    assert host.read(f"/local/domain/0/backend/vif/{d}/0/type") == "vif_ioemu"
    assert host.read(f"/local/domain/0/backend/vif/{d}/0/online") == "1"
    assert host.read("/libxl/pci/0000-03-00-0/domid") == str(d)
    assert host.read(f"/local/domain/0/backend/pci/{d}/0/dev-0") == BANK_A_PCI
    assert host.read(f"/local/domain/0/device-model/{d}/state") == "running"
    await host.call(host.ts.unpause, d)
    await host.settle()
    assert host.read(f"/local/domain/{d}/device/vif/0/state") == "4"
    assert host.read(f"/local/domain/{d}/device/vbd/{HDA}/state") == "4"
    assert "web-a1" in host.domains()


@pytest_twisted.ensureDeferred
async def test_hvm_emulated_nic_on_a_foreign_bridge_destroys_the_domain(host: Harness) -> None:
    """Red team: cutting the PV vif of a vif_ioemu NIC leaves QEMU's emulated NIC, whose tap
    vif-bridge put on the same bridge: the guest would reach bank B's network once unpaused.
    The denial destroys the domain."""
    await host.start()
    d = await host.call(
        host.ts.create,
        guestcfg("web-a1", "hvm", vifs=("bridge=xenbr-bank-b",), disks=(disk("web-a1", "hda"),)),
    )
    await host.settle()
    out = host.last(f"device vif {d}/0")
    assert not out.allowed and out.enforced
    assert out.decision.rule is Rule.STE
    assert out.actions == (VetoDomain(d, host.daemon.engine.domain_veto),)  # type: ignore[union-attr]
    assert "web-a1" not in host.domains()
    assert not host.exists(f"/local/domain/{d}")
    assert not host.exists(f"/local/domain/0/device-model/{d}")


@pytest_twisted.ensureDeferred
async def test_an_hvm_guests_pv_only_nic_on_a_foreign_bridge_is_only_cut(host: Harness) -> None:
    """``type=vif`` (and any NIC hot-plugged later) has no emulated twin: the cut is enough and
    the domain runs on."""
    await host.start(host.config(close_timeout=60.0))
    d = await host.call(
        host.ts.create,
        guestcfg("web-a1", "hvm", vifs=("bridge=xenbr-bank-b,type=vif",)),
    )
    await eventually(lambda: host.read(f"/local/domain/0/backend/vif/{d}/0/state") == "5")
    out = host.last(f"device vif {d}/0")
    assert not out.allowed and [type(a) for a in out.actions] == [CutDevice]
    assert host.read(f"/local/domain/0/backend/vif/{d}/0/type") == "vif"
    assert host.read(f"/local/domain/0/backend/vif/{d}/0/online") == "0"
    await host.call(host.ts.unpause, d)
    await host.settle()
    assert not host.exists(f"/local/domain/0/backend/vif/{d}/0")
    assert "web-a1" in host.domains()


@pytest_twisted.ensureDeferred
async def test_hvm_disk_of_another_tenant_destroys_the_domain(host: Harness) -> None:
    """Red team: QEMU opens an HVM guest's disk for its emulated IDE controller too; cutting
    the PV vbd leaves that open."""
    await host.start()
    d = await host.call(host.ts.create, guestcfg("web-a1", "hvm", disks=(disk("web-b1", "hda"),)))
    await host.settle()
    out = host.last(f"device vbd {d}/{HDA}")
    assert not out.allowed and out.enforced
    assert any(isinstance(a, VetoDomain) for a in out.actions)
    assert "web-a1" not in host.domains()


# ---- PVH and qdisk --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pvh_guest_is_decided_like_pv_and_a_foreign_vif_is_cut(host: Harness) -> None:
    await host.start(host.config(close_timeout=60.0))
    d = await host.call(
        host.ts.create,
        guestcfg("web-a1", "pvh", vifs=("bridge=xenbr-bank-b",), disks=(disk("web-a1"),)),
    )
    await eventually(lambda: host.read(f"/local/domain/0/backend/vif/{d}/0/state") == "5")
    assert host.read(f"/libxl/{d}/type") == "pvh"
    assert host.last(f"domain {d}").allowed
    assert host.last(f"device vbd {d}/{XVDA}").allowed
    out = host.last(f"device vif {d}/0")
    assert not out.allowed and out.enforced
    assert [type(a) for a in out.actions] == [CutDevice]  # no emulation: the cut is enough
    assert host.read(f"/local/domain/0/backend/vif/{d}/0/online") == "0"
    await host.call(host.ts.unpause, d)
    await host.settle()
    assert not host.exists(f"/local/domain/{d}/device/vif/{0}")
    assert host.read(f"/local/domain/{d}/device/vbd/{XVDA}/state") == "4"
    assert "web-a1" in host.domains()


@pytest_twisted.ensureDeferred
async def test_qdisk_backends_carry_the_image_label(host: Harness) -> None:
    """A qdisk (QEMU in dom0 opens the image): its params ``raw:<path>`` name the image."""
    await host.start(host.config(close_timeout=60.0))
    own = await host.call(
        host.ts.create,
        guestcfg("web-a1", "pvh", disks=(disk("web-a1", extra="backendtype=qdisk,"),)),
    )
    foreign = await host.call(
        host.ts.create,
        guestcfg("batch-a1", "pv", disks=(disk("web-b1", extra="backendtype=qdisk,"),)),
    )
    qdisk = f"/local/domain/0/backend/qdisk/{foreign}/{XVDA}"
    await eventually(lambda: host.read(f"{qdisk}/state") == "5")
    ok = host.last(f"device vbd {own}/{XVDA}")
    assert ok.allowed and ok.resource is not None
    assert ok.resource.resource == "disk:/srv/xen/images/web-a1.img"
    assert host.read(f"/libxl/{own}/device/vbd/{XVDA}/backend") == (
        f"/local/domain/0/backend/qdisk/{own}/{XVDA}"
    )
    bad = host.last(f"device vbd {foreign}/{XVDA}")
    assert not bad.allowed and bad.enforced
    assert [type(a) for a in bad.actions] == [CutDevice]
    assert host.read(f"{qdisk}/online") == "0"
    # The guest runs: blkfront sees Closing and closes, the backend reaches Closed, and the
    # daemon removes the device; the permitted one connected.
    await host.call(host.ts.unpause, foreign)
    await host.call(host.ts.unpause, own)
    await host.settle()
    assert not host.exists(qdisk)
    assert not host.exists(f"/libxl/{foreign}/device/vbd/{XVDA}")
    assert host.read(f"/local/domain/0/backend/qdisk/{own}/{XVDA}/state") == "4"


@pytest_twisted.ensureDeferred
async def test_a_qcow2_qdisk_is_denied(host: Harness) -> None:
    await host.start()
    spec = "format=qcow2,vdev=xvda,access=rw,target=/srv/xen/images/web-a1.img"
    d = await host.call(host.ts.create, guestcfg("web-a1", "pvh", disks=(spec,)))
    await host.settle()
    out = host.last(f"device vbd {d}/{XVDA}")
    assert not out.allowed and "qcow2" in out.decision.reason


# ---- PCI passthrough ----------------------------------------------------------------------


@pytest.mark.parametrize("dom_type", ["pv", "hvm"])
@pytest_twisted.ensureDeferred
async def test_pci_device_of_another_tenant_destroys_the_domain(
    host: Harness, dom_type: str
) -> None:
    """Red team: libxl writes no /libxl/<d>/device/pci record, so a passed-through PCI device
    was never decided: bank B's device went to bank A's guest."""
    await host.start(labels=labels(host))
    d = await host.call(host.ts.create, guestcfg("web-a1", dom_type, pcis=(BANK_B_PCI,)))
    await host.settle()
    out = host.last(f"device pci {d}/{0x0400}")
    assert not out.allowed and out.enforced
    assert out.resource is not None and out.resource.resource == f"pci:{BANK_B_PCI}"
    assert any(isinstance(a, VetoDomain) for a in out.actions)
    assert "web-a1" not in host.domains()
    assert not host.exists("/libxl/pci/0000-04-00-0/domid")  # released by the destroy


@pytest_twisted.ensureDeferred
async def test_unlabelled_pci_device_is_denied(host: Harness) -> None:
    await host.start(labels=labels(host))
    d = await host.call(host.ts.create, guestcfg("web-a1", "pvh", pcis=(UNLABELLED_PCI,)))
    await host.settle()
    out = host.last(f"device pci {d}/{0x0500}")
    assert not out.allowed and out.decision.rule is Rule.DEFAULT
    assert "unlabelled" in out.decision.reason
    assert "web-a1" not in host.domains()


@pytest_twisted.ensureDeferred
async def test_pci_attach_is_decided_and_a_hostile_pcifront_changes_nothing(
    host: Harness,
) -> None:
    """A running guest owns device/pci/0: it rewrites backend pointers and invents device
    entries there, then the operator attaches bank B's device. The decision follows libxl's
    /libxl/pci record only."""
    await host.start(labels=labels(host))
    d = await host.call(host.ts.create, guestcfg("web-a1", "hvm", pcis=(BANK_A_PCI,)))
    await host.settle()
    await host.call(host.ts.unpause, d)
    await host.settle()
    assert host.last(f"device pci {d}/{0x0300}").allowed
    fe = f"/local/domain/{d}/device/pci/0"
    before = len(host.outcomes)
    await host.call(
        guest_write,
        host,
        d,
        [
            (f"{fe}/backend", f"/local/domain/0/backend/pci/{d + 7}/0"),
            (f"{fe}/backend-id", "3"),
            (f"{fe}/state", "4"),
            (f"{fe}/dev-0", BANK_B_PCI),
            (f"{fe}/pci-op-ref", "8"),
            (f"{fe}/event-channel", "9"),
            (f"/local/domain/{d}/device/pci/1/backend", "/local/domain/0/backend/pci/9/0"),
            (f"/local/domain/{d}/device/pci/1/ring-ref", "10"),
        ],
    )
    await host.settle()
    assert not [o for o in host.outcomes[before:] if "pci" in o.what]
    assert "web-a1" in host.domains()
    await host.call(host.ts.attach_pci, d, BANK_B_PCI)
    await host.settle()
    out = host.last(f"device pci {d}/{0x0400}")
    assert not out.allowed and out.enforced
    assert "web-a1" not in host.domains()


# ---- guest types ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_guest_type_shyped_does_not_understand_is_denied(host: Harness) -> None:
    """A domain whose /libxl/<d>/type is none of pv, pvh, hvm (a toolstack newer than what
    shyped knows) is denied, logged and audited, never admitted undecided."""
    await host.start()
    uuid = uuid_of("shop-1")
    step = L.domain_make_step(41, "shop-1", uuid, "arm_pv")
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.start()
        apply_ops(xs, step.ops)
        xs.commit()
    await host.settle()
    out = host.last("domain 41")
    assert not out.allowed and out.decision.rule is Rule.LABEL
    assert "guest type 'arm_pv'" in out.decision.reason


@pytest_twisted.ensureDeferred
async def test_a_hostile_guest_cannot_steer_the_cut_of_a_denied_qdisk(host: Harness) -> None:
    """A running guest owns its vbd frontend: once a foreign qdisk is hot-plugged it points
    the frontend's backend/backend-id at another guest's vbd backend. The cut follows libxl's
    record (backend/qdisk/...), the other guest's device is untouched."""
    await host.start()
    other = await host.call(host.ts.create, guestcfg("batch-a1", "pv", disks=(disk("batch-a1"),)))
    a = await host.call(host.ts.create, guestcfg("web-a1", "pvh", disks=(disk("web-a1"),)))
    await host.settle()
    await host.call(host.ts.unpause, a)
    await host.call(host.ts.unpause, other)
    await host.settle()
    xvdb = 51728
    spec = "format=raw,vdev=xvdb,access=rw,backendtype=qdisk,target=/srv/xen/images/web-b1.img"
    await host.call(host.ts.attach_disk, a, parse_disk_spec(spec))
    await host.call(
        guest_write,
        host,
        a,
        [
            (f"/local/domain/{a}/device/vbd/{xvdb}/backend", f"{be_vbd(other, XVDA)}"),
            (f"/local/domain/{a}/device/vbd/{xvdb}/backend-id", str(other)),
        ],
    )
    await host.settle()
    out = host.last(f"device vbd {a}/{xvdb}")
    assert not out.allowed and out.enforced
    assert out.actions == (CutDevice(out.need.key, 0, "qdisk"),)  # type: ignore[arg-type]
    assert not host.exists(f"/local/domain/0/backend/qdisk/{a}/{xvdb}")
    assert host.read(f"{be_vbd(other, XVDA)}/online") == "1"
    assert host.read(f"{be_vbd(other, XVDA)}/state") == "4"
    assert host.perms(f"/local/domain/{other}/device/vbd/{XVDA}") == (f"n{other}", "r0")
    assert host.last(f"device vbd {a}/{XVDA}").allowed


def be_vbd(domid: int, devid: int) -> str:
    return f"/local/domain/0/backend/vbd/{domid}/{devid}"


# ---- USB through the device model --------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_device_model_usb_controller_is_decided_and_destroys_the_hvm_guest(
    host: Harness,
) -> None:
    """Red team: an HVM guest's USB controller of type devicemodel (``usbctrl`` /
    ``usbdev`` with a host device, xl usbctrl-attach / usbdev-attach) is libxl-only
    (libxl_usb.c: backend kind NONE, libxl__device_generic_add writes only
    /libxl/<d>/device/vusb/<n>; QEMU gets the controller and the host's USB device over QMP).
    With no frontend or backend pointer the record was never decided: a host USB device
    reached the guest with no decision. USB is a kind shyped denies, and it cannot be cut:
    the domain goes."""
    await host.start()
    d = await host.call(host.ts.create, guestcfg("web-a1", "hvm", disks=(disk("web-a1", "hda"),)))
    await host.settle()
    assert host.last(f"domain {d}").allowed
    rec = f"/libxl/{d}/device/vusb/0"
    with XsConn(str(host.xsd.socket_path)) as xs:  # what libxl writes, as dom0's toolstack
        xs.start()
        for key, value in (
            ("type", "devicemodel"), ("usb-ver", "2"), ("num-ports", "8"), ("port", ""),
            ("port/1", "3.5"),  # usbdev-attach: hostbus.hostaddr
        ):  # fmt: skip
            xs.write(f"{rec}/{key}", value)
        xs.commit()
    await host.settle()
    out = host.last(f"device vusb {d}/0")
    assert not out.allowed and out.enforced
    assert "'vusb'" in out.decision.reason
    assert out.actions == (VetoDomain(d, host.daemon.engine.domain_veto),)  # type: ignore[union-attr]
    assert "web-a1" not in host.domains()
