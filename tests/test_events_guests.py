"""The assembler on PVH/HVM guests and PCI passthrough (issue 19), pure: libxl's
``/libxl/pci/<bdf>/domid`` record, ``/libxl/<d>/type``, a vif's ``type``; what a guest writes
in nodes it owns (device/pci/0, its frontends) changes no decision."""

from __future__ import annotations

import pytest
from test_events import CONNECTED, VBD, VIF, connected, of

from shyped.core.assembler import EventAssembler
from shyped.core.assembler.state import pci_record_key
from shyped.core.events import (
    DeviceAdded,
    DeviceKey,
    DeviceRemoved,
    DomainAppeared,
    Garbage,
)
from shyped.core.labelstore import LabelStoreError, pci_resource, resource_id
from shyped.core.outcome import resource_of

PCI = DeviceKey("pci", 1, 0x0300)


def test_a_libxl_pci_record_is_device_pci_of_its_domain_served_by_dom0() -> None:
    asm = connected()
    out = asm.feed("/libxl/pci/0000-03-00-0/domid", b"1")
    assert of(out, DeviceAdded) == [DeviceAdded(PCI, 0, "pci", "0000:03:00.0", True, True)]
    # The name and driver_path libxl keeps there are not ours to judge.
    assert asm.feed("/libxl/pci/0000-03-00-0/driver_path", b"/sys/bus/pci/drivers/e1000") == []
    # Released (pci-detach, destroy): the device is gone.
    out = asm.feed("/libxl/pci/0000-03-00-0/domid", None)
    assert of(out, DeviceRemoved) == [DeviceRemoved(PCI, 0)]


def test_a_pci_record_moving_to_another_domain_leaves_the_first() -> None:
    asm = connected()
    asm.feed("/libxl/pci/0000-03-00-0/domid", b"1")
    out = asm.feed("/libxl/pci/0000-03-00-0/domid", b"7")  # domain 7 is not there
    assert of(out, DeviceRemoved) == [DeviceRemoved(PCI, 0)]
    assert of(out, DeviceAdded) == []


def test_libxl_device_cleanup_does_not_drop_pci_records() -> None:
    """libxl__device_destroy's path clean-up removes an emptied /libxl/<d>/device: PCI
    devices, which have no record there, stay decided."""
    asm = connected()
    asm.feed("/libxl/pci/0000-03-00-0/domid", b"1")
    out = asm.feed("/libxl/1/device", None)
    assert PCI not in [e.device for e in of(out, DeviceRemoved)]  # type: ignore[attr-defined]
    assert VIF in [e.device for e in of(out, DeviceRemoved)]  # type: ignore[attr-defined]


def test_reconcile_sees_a_pci_release_made_while_the_daemon_was_down() -> None:
    snap = dict(CONNECTED)
    snap["/libxl/pci"] = (b"", [b"n0"])
    snap["/libxl/pci/0000-03-00-0"] = (b"", [b"n0"])
    snap["/libxl/pci/0000-03-00-0/domid"] = (b"1", [b"n0"])
    asm = EventAssembler()
    out = asm.reconcile(snap)
    assert DeviceAdded(PCI, 0, "pci", "0000:03:00.0", True, True) in out
    assert asm.reconcile(snap) == []
    out = asm.reconcile(CONNECTED)
    assert of(out, DeviceRemoved) == [DeviceRemoved(PCI, 0)]


@pytest.mark.parametrize(
    "component",
    [
        "0000-03-00-00",
        "0000-03-20-0",
        "0000-03-00-8",
        "0000-3-00-0",
        "0000-03-0a-0x",
        "7fff-00-00-0",
    ],
)
def test_a_pci_component_that_is_no_bdf_is_still_decided_and_denied(component: str) -> None:
    """libxl never writes these; dom0 alone can. Fail closed: the device is there, its
    resource is unreadable (the engine denies an invalid resource id)."""
    asm = connected()
    out = of(asm.feed(f"/libxl/pci/{component}/domid", b"1"), DeviceAdded)
    assert len(out) == 1 and out[0].device.kind == "pci"  # type: ignore[attr-defined]
    assert out[0].device.devid >= 0x7FFF0000  # type: ignore[attr-defined]
    assert resource_of("pci", out[0].resource) is None  # type: ignore[attr-defined, arg-type]


def test_pci_record_keys_follow_pci_encode_bdf() -> None:
    assert pci_record_key("0000-00-00-0") == (0, "0000:00:00.0")
    assert pci_record_key("0001-0a-1f-7") == (0x10A00 | (0x1F << 3) | 7, "0001:0a:1f.7")


def test_a_garbage_domid_in_a_pci_record_is_counted() -> None:
    asm = connected()
    out = asm.feed("/libxl/pci/0000-03-00-0/domid", b"one")
    assert of(out, Garbage) and not of(out, DeviceAdded)


def test_guest_writes_in_its_pcifront_directory_change_nothing() -> None:
    """device/pci/0 is owned by the guest (libxl__create_pci_backend): its backend pointer,
    invented dev-N keys, rings and states are not decisions' inputs."""
    asm = connected()
    asm.feed("/libxl/pci/0000-03-00-0/domid", b"1")
    fe = "/local/domain/1/device/pci/0"
    for path, value in (
        (f"{fe}/backend", b"/local/domain/0/backend/pci/5/0"),
        (f"{fe}/backend-id", b"5"),
        (f"{fe}/state", b"4"),
        (f"{fe}/dev-0", b"0000:04:00.0"),
        (f"{fe}/pci-op-ref", b"8"),
        (f"{fe}/event-channel", b"9"),
        ("/local/domain/1/device/pci/768/ring-ref", b"10"),
        ("/local/domain/1/device/pci/768/state", b"9999"),
    ):
        out = asm.feed(path, value, [b"n1", b"r0"])
        assert not of(out, DeviceAdded) and not of(out, DeviceRemoved), path
    assert asm.tracked_items(1) == connected().tracked_items(1) + 1  # the pci record only


def test_guest_type_decides_which_devices_are_emulated() -> None:
    asm = connected()
    out = asm.feed("/libxl/1/type", b"hvm")
    added = {e.device: e for e in of(out, DeviceAdded)}  # type: ignore[attr-defined]
    assert added[VBD].emulated  # type: ignore[attr-defined]
    assert VIF not in added  # the vif's record says type=vif: PV only
    out = asm.feed("/libxl/1/device/vif/0/type", b"vif_ioemu")
    assert of(out, DeviceAdded) == [
        DeviceAdded(VIF, 0, "vif", "xenbr0", True, True),
    ]
    # The guest writing a type into its own frontend changes nothing.
    assert not of(asm.feed("/local/domain/1/device/vif/0/type", b"vif"), DeviceAdded)
    out = asm.feed("/libxl/1/type", b"pvh")
    assert [e.emulated for e in of(out, DeviceAdded) if e.device == VBD] == [False]  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [b"arm_pv", b"", b"\xff", b"hvm\x00"])
def test_a_guest_type_shyped_does_not_know_is_an_identity_problem(dtype: bytes) -> None:
    asm = EventAssembler()
    snap = dict(CONNECTED)
    snap["/libxl/1/type"] = (dtype, [b"n0"])
    out = of(asm.reconcile(snap), DomainAppeared)
    assert len(out) == 1 and "guest type" in out[0].name_problem  # type: ignore[attr-defined]
    snap["/libxl/1/type"] = (b"pv", [b"n0"])
    out = of(asm.reconcile(snap), DomainAppeared)
    assert out and out[0].name_problem == ""  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "bad",
    [
        "03:00.0",
        "0000:03:00.0 ",
        " 0000:03:00.0",
        "0000:03:00.0\n",
        "0000:03:00.8",
        "0000:03:20.0",
        "0000:0A:00.0",
        "0000:03:00.0@5",
        "0000:03:00.0,permissive=1",
        "00000:03:00.0",
        "0000:003:00.0",
        "0000-03-00-0",
        "",
        "../0000:03:00.0",
    ],
)
def test_pci_resource_ids_accept_the_canonical_form_only(bad: str) -> None:
    with pytest.raises(LabelStoreError):
        pci_resource(bad)
    with pytest.raises(LabelStoreError):
        resource_id("pci:" + bad)


def test_pci_resource_ids_round_trip() -> None:
    assert resource_id("pci:0000:03:1f.7") == "pci:0000:03:1f.7"
    assert resource_of("pci", "0000:03:1f.7") == "pci:0000:03:1f.7"
