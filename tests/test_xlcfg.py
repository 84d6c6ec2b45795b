"""xl.cfg and device-spec parsing (pure)."""

from __future__ import annotations

import pytest
from sandbox_toolstack_helpers import XSGOLD_CFG

from shyped.core.xlcfg import (
    SecurityLabel,
    XlConfigError,
    domain_config_from_text,
    parse_assignments,
    parse_disk_spec,
    parse_vif_spec,
)
from shyped.sandbox import devices as D
from shyped.sandbox import layout as L


def test_reference_cfg() -> None:
    cfg = domain_config_from_text(XSGOLD_CFG.read_text())
    assert (cfg.name, cfg.uuid, cfg.memory_mb, cfg.vcpus) == (
        "xsgold",
        "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001",
        128,
        1,
    )
    assert cfg.cmdline == "console=hvc0 rdinit=/init loglevel=4"
    assert cfg.disks[0].target == "/var/lib/xen/images/xsgold-xvda.img"
    assert cfg.disks[0].vdev == "xvda" and cfg.disks[0].readwrite
    assert cfg.vifs[0].mac == "00:16:3e:5a:11:01" and cfg.vifs[0].bridge == "xenbr0"
    assert cfg.on_crash == "preserve" and cfg.label is None


@pytest.mark.parametrize(
    "text",
    [
        'name = "x"\nimport os\n',
        'name = __import__("os").system("true")\n',
        'name = "x"\nmemory = 1 + 1\n',
        'name = "x"; x = {"a": 1}\n',
        "name = 'x'\nmemory = [[1]]\n",
        'name = "x"\nf(1)\n',
    ],
)
def test_anything_but_literal_assignments_is_refused(text: str) -> None:
    with pytest.raises(XlConfigError):
        parse_assignments(text)


def test_comments_semicolons_and_lists() -> None:
    values = parse_assignments(
        "# c\nname='a'; memory=64  # trailing\nvif=['mac=00:16:3e:00:00:01',]\n"
    )
    assert values == {"name": "a", "memory": 64, "vif": ["mac=00:16:3e:00:00:01"]}


def test_acm_labels_from_seclabel_or_access_control() -> None:
    a = domain_config_from_text('name="a"\nseclabel="ACM:sHype:green"\n')
    b = domain_config_from_text("name='b'\naccess_control=['policy=sHype,label=green']\n")
    assert a.label == b.label == SecurityLabel("sHype", "green")
    assert str(a.label) == "ACM:sHype:green"
    flask = domain_config_from_text('name="c"\nseclabel="system_u:system_r:domU_t"\n')
    assert flask.label is None and flask.seclabel == "system_u:system_r:domU_t"
    with pytest.raises(XlConfigError, match="different labels"):
        domain_config_from_text(
            'name="d"\nseclabel="ACM:p:red"\naccess_control=["policy=p,label=blue"]\n'
        )
    with pytest.raises(XlConfigError):
        domain_config_from_text('name="e"\nseclabel="ACM:p"\n')
    with pytest.raises(XlConfigError):
        domain_config_from_text('name="e"\naccess_control=["policy=p"]\n')


def test_domain_config_errors() -> None:
    with pytest.raises(XlConfigError, match="name"):
        domain_config_from_text("memory = 64\n")
    with pytest.raises(XlConfigError, match="invalid domain type"):
        domain_config_from_text('name="h"\ntype="hvm2"\n')
    with pytest.raises(XlConfigError, match="invalid builder"):
        domain_config_from_text('name="h"\nbuilder="linux"\n')
    with pytest.raises(XlConfigError, match="uuid"):
        domain_config_from_text('name="h"\nuuid="nope"\n')
    with pytest.raises(XlConfigError, match="memory"):
        domain_config_from_text('name="h"\nmemory="lots"\n')


@pytest.mark.parametrize(
    ("spec", "target", "vdev", "rw", "cdrom"),
    [
        (
            "format=raw,vdev=xvda,access=rw,target=/img,with,commas",
            "/img,with,commas",
            "xvda",
            True,
            False,
        ),
        ("/dev/vg/guest,raw,xvdb,w", "/dev/vg/guest", "xvdb", True, False),
        ("phy:/dev/sda,xvdc,r", "/dev/sda", "xvdc", False, False),
        ("file:/img.iso,hdc:cdrom,r", "/img.iso", "hdc", False, True),
        ("/dev/vg/guest,,hda", "/dev/vg/guest", "hda", True, False),
    ],
)
def test_disk_specs(spec: str, target: str, vdev: str, rw: bool, cdrom: bool) -> None:
    disk = parse_disk_spec(spec)
    assert (disk.target, disk.vdev, disk.readwrite, disk.cdrom) == (target, vdev, rw, cdrom)


@pytest.mark.parametrize(
    "spec",
    ["/img", "/img,raw,xvda,rw,extra", "/img,bogusfmt,xvda", "vdev=xvda,colour=red,target=/x"],
)
def test_bad_disk_specs(spec: str) -> None:
    with pytest.raises(XlConfigError):
        parse_disk_spec(spec)


def test_vif_specs() -> None:
    vif = parse_vif_spec("mac=00:16:3E:AA:BB:CC, bridge=br1,ip=10.0.0.2,backend=2,mtu=9000")
    assert (vif.mac, vif.bridge, vif.ip, vif.backend_domid, vif.mtu) == (
        "00:16:3e:aa:bb:cc",
        "br1",
        "10.0.0.2",
        2,
        9000,
    )
    for bad in ("mac=zz", "bridge", "colour=red", "mtu=-1"):
        with pytest.raises(XlConfigError):
            parse_vif_spec(bad)


@pytest.mark.parametrize(
    ("vdev", "devid"),
    [
        ("xvda", 51712),
        ("xvdb", 51728),
        ("xvda1", 51713),
        ("xvdq", (1 << 28) | (16 << 8)),
        ("hda", 768),
        ("hdc", 5632),
        ("sda", 2048),
        ("sdb2", 2066),
        ("d0p0", 51712),
        ("51712", 51712),
    ],
)
def test_disk_devid_follows_libxl(vdev: str, devid: int) -> None:
    assert D.disk_devid(vdev) == devid


@pytest.mark.parametrize("vdev", ["xvd", "xvda01", "hde", "foo", "sdq"])
def test_disk_devid_rejects_what_libxl_rejects(vdev: str) -> None:
    with pytest.raises(ValueError):
        D.disk_devid(vdev)


def test_netback_walk_follows_set_backend_state() -> None:
    assert D.netback_walk(L.CONNECTED, L.CLOSED) == [L.CLOSING, L.CLOSED]
    assert D.netback_walk(L.INIT_WAIT, L.CLOSED) == [L.CLOSING, L.CLOSED]
    assert D.netback_walk(L.INIT_WAIT, L.CONNECTED) == [L.CONNECTED]
    assert D.netback_walk(L.CLOSED, L.CONNECTED) == [L.INIT_WAIT, L.CONNECTED]
