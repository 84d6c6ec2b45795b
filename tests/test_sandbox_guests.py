"""The sandbox toolstack's PVH, HVM, qdisk and PCI layouts against what libxl 4.17 writes
(xen-project/xen RELEASE-4.17.7 tools/libs/light, read: the PV reference capture does not
cover them, so these expectations come from the sources, cited per test), on the real
oxenstored; and a PVH guest against the e2e tier's real capture (tests/reference/pvh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from control_daemon_helpers import sandbox_host
from process_helpers import wait_until
from sandbox_toolstack_helpers import normalize_layout, reference_layout, xenstore_ls

from shyped.core.xlcfg import DomainConfig, XlConfigError, domain_config_from_text
from shyped.sandbox import devices as D
from shyped.sandbox import guests as G
from shyped.sandbox import layout as L
from shyped.sandbox.toolstack import Toolstack, ToolstackError
from shyped.sandbox.xenstored import SandboxXenstored

UUID = "6f1b1c9e-2a4d-4c55-9e0e-000000000042"


@pytest.fixture
def ts(xenstored: SandboxXenstored) -> Toolstack:
    toolstack = Toolstack(xenstored.socket_path)
    toolstack.boot_host()
    return toolstack


def cfg(text: str) -> DomainConfig:
    return domain_config_from_text(f'name = "g"\nuuid = "{UUID}"\n{text}', "g.cfg")


def layout(xsd: SandboxXenstored) -> dict[str, tuple[str, str]]:
    """path -> (value, perms) of `xenstore-ls -fp`."""
    out = {}
    for line in xenstore_ls(xsd).splitlines():
        path, _, rest = line.partition(" = ")
        value, _, perms = rest.rpartition("   (")
        out[path] = (value.strip('"'), perms.rstrip(")"))
    return out


def writes(st: L.Step) -> dict[str, str]:
    return {op.path: op.value for op in st.ops if isinstance(op, L.Write)}


def perms(st: L.Step) -> dict[str, tuple[str, ...]]:
    return {op.path: op.perms for op in st.ops if isinstance(op, L.SetPerms)}


# ---- the builders (pure) ----------------------------------------------------------------


def test_domain_make_of_an_hvm_guest() -> None:
    """libxl__domain_make: HVM adds <home>/hvmloader (roperm) after control and
    control/feature-s3, -s4 (rwperm) after feature-suspend; /libxl/<d>/type is the type."""
    st = L.domain_make_step(3, "g", UUID, "hvm")
    p = perms(st)
    assert p["/local/domain/3/hvmloader"] == ("n0", "r3")
    assert p["/local/domain/3/control/feature-s3"] == ("n3",)
    assert p["/local/domain/3/control/feature-s4"] == ("n3",)
    order = [op.path for op in st.ops if isinstance(op, L.SetPerms)]
    assert order.index("/local/domain/3/control") < order.index("/local/domain/3/hvmloader")
    assert order.index("/local/domain/3/hvmloader") < order.index(
        "/local/domain/3/control/shutdown"
    )
    assert order.index("/local/domain/3/control/feature-suspend") < order.index(
        "/local/domain/3/control/feature-s3"
    )
    assert writes(st)["/libxl/3/type"] == "hvm"
    pvh = L.domain_make_step(3, "g", UUID, "pvh")
    assert "/local/domain/3/hvmloader" not in perms(pvh)
    assert "/local/domain/3/control/feature-s3" not in perms(pvh)
    assert writes(pvh)["/libxl/3/type"] == "pvh"


def test_build_post_per_guest_type() -> None:
    """libxl__domain_build's vm/local entries and libxl__build_post's memory target
    (libxl__get_targetmem_fudge: videoram, plus LIBXL_MAXMEM_CONSTANT for HVM with maxmem
    above memory)."""
    common = dict(
        max_memkb=524288,
        target_memkb=262144,
        vcpus=1,
        max_vcpus=1,
        store_port=1,
        store_mfn=5,
        start_time="1.00",
        kernel="/k",
        ramdisk=None,
        cmdline="root=/dev/xvda",
    )
    hvm = writes(L.build_post_step(3, UUID, **common, dom_type="hvm", video_memkb=8192))  # type: ignore[arg-type]
    assert hvm["/local/domain/3/memory/target"] == str(262144 - 8192 - 1024)
    assert hvm["/local/domain/3/memory/videoram"] == "8192"
    for key, value in (("acpi", "1"), ("acpi_s3", "1"), ("acpi_s4", "1")):
        assert hvm[f"/local/domain/3/platform/{key}"] == value
    assert hvm["/local/domain/3/platform/acpi_laptop_slate"] == "0"
    assert hvm["/local/domain/3/platform/device-model"] == "qemu_xen"
    assert hvm[f"/vm/{UUID}/image/ostype"] == "hvm"
    assert hvm[f"/vm/{UUID}/rtc/timeoffset"] == ""
    assert f"/vm/{UUID}/image/kernel" not in hvm
    pvh = writes(L.build_post_step(3, UUID, **common, dom_type="pvh"))  # type: ignore[arg-type]
    assert [p for p in pvh if p.startswith("/vm/")] == [f"/vm/{UUID}/start_time"]
    assert pvh["/local/domain/3/memory/target"] == "262144"
    assert not [p for p in pvh if "/platform/" in p]


def test_pci_backend_layout_has_no_libxl_device_record() -> None:
    """libxl__device_pci_add_xenstore / libxl__create_pci_backend: backend (n0, r<d>) and
    frontend (n<d>, r0) written directly, never /libxl/<d>/device/pci."""
    first = G.pci_backend_step(3, "g", "0000:03:00.0", 0)
    assert first.transaction
    p = perms(first)
    assert p["/local/domain/0/backend/pci/3/0"] == ("n0", "r3")
    assert p["/local/domain/3/device/pci/0"] == ("n3", "r0")
    w = writes(first)
    assert w["/local/domain/0/backend/pci/3/0/dev-0"] == "0000:03:00.0"
    assert w["/local/domain/0/backend/pci/3/0/key-0"] == "0000:03:00.0"
    assert w["/local/domain/0/backend/pci/3/0/num_devs"] == "1"
    assert w["/local/domain/0/backend/pci/3/0/domain"] == "g"
    assert w["/local/domain/3/device/pci/0/backend"] == "/local/domain/0/backend/pci/3/0"
    assert not [op for op in first.ops if op.path.startswith("/libxl/")]
    second = G.pci_backend_step(3, "g", "0000:04:00.0", 1, starting=False)
    assert perms(second) == {}
    assert writes(second)["/local/domain/0/backend/pci/3/0/dev-1"] == "0000:04:00.0"
    assert writes(second)["/local/domain/0/backend/pci/3/0/state"] == "7"  # Reconfiguring
    assert writes(G.pci_assign_step("0000:03:00.0", 3)) == {"/libxl/pci/0000-03-00-0/domid": "3"}


def test_vif_ioemu_and_qdisk_records() -> None:
    """libxl__set_xenstore_nic writes libxl_nic_type_to_string as ``type``; a qdisk's backend
    is under backend/qdisk with params ``<format>:<target>`` and no script
    (libxl__device_from_disk, device_disk_add)."""
    vif = D.VifDevice(domid=3, devid=0, mac="00:16:3e:00:00:01", nictype="vif_ioemu")
    w = writes(D.vif_add_step(vif))
    assert w["/local/domain/0/backend/vif/3/0/type"] == "vif_ioemu"
    assert w["/libxl/3/device/vif/0/type"] == "vif_ioemu"
    vbd = D.VbdDevice(
        domid=3,
        devid=51712,
        vdev="xvda",
        params="raw:/srv/g.img",
        backend_type="qdisk",
        backend_kind="qdisk",
        protocol=None,
    )
    w = writes(D.vbd_add_step(vbd))
    be = "/local/domain/0/backend/qdisk/3/51712"
    assert w[f"{be}/params"] == "raw:/srv/g.img" and w[f"{be}/type"] == "qdisk"
    assert w["/libxl/3/device/vbd/51712/backend"] == be
    assert w["/local/domain/3/device/vbd/51712/backend"] == be
    assert f"{be}/script" not in w
    assert "/local/domain/3/device/vbd/51712/protocol" not in w  # HVM/PVH: not written


# ---- on the real oxenstored ---------------------------------------------------------------


def test_hvm_guest_layout(xenstored: SandboxXenstored, ts: Toolstack) -> None:
    d = ts.create(
        cfg(
            'type = "hvm"\nmemory = 256\nmaxmem = 512\n'
            'disk = [ "/srv/g.img,raw,hda,w" ]\nvif = [ "bridge=xenbr1" ]\npci = [ "03:00.0" ]\n'
        )
    )
    x = layout(xenstored)
    h = f"/local/domain/{d}"
    assert x[f"/libxl/{d}/type"] == ("hvm", "n0")
    assert x[f"{h}/hvmloader"] == ("", f"n0,r{d}")
    assert x[f"{h}/hvmloader/bios"] == ("seabios", f"n0,r{d}")
    assert x[f"{h}/platform/device-model"] == ("qemu_xen", f"n0,r{d}")
    assert x[f"{h}/memory/target"][0] == str(256 * 1024 - 8192 - 1024)
    assert x[f"/local/domain/0/device-model/{d}/state"] == ("running", "n0")
    assert x[f"/local/domain/0/backend/vif/{d}/0/type"] == ("vif_ioemu", f"n0,r{d}")
    assert x[f"/libxl/{d}/device/vbd/768/backend"][0] == f"/local/domain/0/backend/vbd/{d}/768"
    assert f"{h}/device/vbd/768/protocol" not in x
    assert x["/libxl/pci/0000-03-00-0/domid"] == (str(d), "n0")
    assert x[f"/local/domain/0/backend/pci/{d}/0"] == ("", f"n0,r{d}")
    assert x[f"{h}/device/pci/0"] == ("", f"n{d},r0")
    assert x[f"{h}/device/pci/0/state"] == ("1", f"n{d},r0")
    assert not [p for p in x if p.startswith(f"/libxl/{d}/device/pci")]
    ts.destroy(d)
    x = layout(xenstored)
    assert not [p for p in x if f"/{d}/" in p or p.endswith(f"/{d}")]
    assert "/libxl/pci/0000-03-00-0/domid" not in x


def test_pvh_guest_with_qdisk_connects(xenstored: SandboxXenstored, ts: Toolstack) -> None:
    d = ts.create(
        cfg(
            'type = "pvh"\nkernel = "/k"\n'
            'disk = [ "backendtype=qdisk,vdev=xvda,target=/srv/g.img" ]\nvif = [ "bridge=br0" ]\n'
        )
    )
    x = layout(xenstored)
    assert x[f"/libxl/{d}/type"] == ("pvh", "n0")
    assert f"/local/domain/{d}/hvmloader" not in x
    assert x[f"/local/domain/0/device-model/{d}/state"] == ("running", "n0")  # QEMU for qdisk
    assert x[f"/local/domain/0/backend/vif/{d}/0/type"][0] == "vif"
    ts.unpause(d)
    x = layout(xenstored)
    assert x[f"/local/domain/0/backend/qdisk/{d}/51712/state"][0] == "4"
    assert x[f"/local/domain/{d}/device/vbd/51712/state"][0] == "4"
    assert x[f"/local/domain/{d}/device/vif/0/state"][0] == "4"
    ts.detach_disk(d, "xvda")
    assert not [p for p in layout(xenstored) if "/qdisk/" in p and f"/{d}/" in p]


def test_pci_attach_and_exclusive_assignment(xenstored: SandboxXenstored, ts: Toolstack) -> None:
    a = ts.create(cfg('type = "pvh"\npci = [ "03:00.0" ]\n'))
    ts.unpause(a)
    ts.attach_pci(a, "0000:04:00.0")
    x = layout(xenstored)
    be = f"/local/domain/0/backend/pci/{a}/0"
    assert x[f"{be}/num_devs"][0] == "2" and x[f"{be}/dev-1"][0] == "0000:04:00.0"
    assert x[f"{be}/state"][0] == "7"
    b = ts.create(domain_config_from_text('name = "h"\ntype = "hvm"\n', "h.cfg"))
    with pytest.raises(ToolstackError, match="already assigned"):
        ts.attach_pci(b, "0000:03:00.0")


def test_what_libxl_refuses_the_sandbox_refuses(ts: Toolstack) -> None:
    with pytest.raises(ToolstackError, match="emulated interface"):
        ts.create(cfg('type = "pvh"\nvif = [ "type=ioemu" ]\n'))
    with pytest.raises(XlConfigError):
        cfg('type = "pvh2"\n')
    with pytest.raises(XlConfigError, match="name="):
        cfg('pci = [ "name=gpu" ]\n')
    hvm_vif = ts.create(cfg('type = "hvm"\nvif = [ "type=vif" ]\n'))
    assert hvm_vif > 0


# ---- against a real PVH capture ---------------------------------------------------------------


def test_pvh_layouts_match_the_real_capture(xenstored: SandboxXenstored) -> None:
    """The e2e tier's PVH capture (tests/reference/pvh): the same daemon, policy, labels and
    shype-xl on the sandbox write what real Xen 4.17 wrote, created paused and connected."""
    e2e = Path(__file__).parent / "e2e"
    with sandbox_host(xenstored) as host:
        shutil.copy(e2e / "daemon" / "policy.toml", host.policy)
        shutil.copy(e2e / "pvh" / "labels.json", host.labels)
        host.start()
        cfg = host.directory / "pvh-green.cfg"
        cfg.write_text((e2e / "pvh" / "pvh-green.cfg").read_text())
        created = host.shype_xl("create", "-p", str(cfg))
        assert created.returncode == 0, (created.stdout, created.stderr)
        wait_until(lambda: host.read("/local/domain/1/device/vbd/51712/state") is not None)
        assert normalize_layout(xenstore_ls(xenstored)) == reference_layout(
            "pvh/layout-pvh-green-paused.txt"
        )
        unpaused = subprocess.run(
            [*host.xl_argv(), "unpause", "pvh-green"], capture_output=True, text=True, check=False
        )
        assert unpaused.returncode == 0, unpaused.stderr
        assert normalize_layout(xenstore_ls(xenstored)) == reference_layout(
            "pvh/layout-pvh-green-connected.txt"
        )
