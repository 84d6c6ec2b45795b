"""shype-xl's pre-checks for PVH/HVM cfgs, PCI passthrough and the other attach commands
(issue 19), against the sandbox toolstack as xl and the control server's stand-in backend
(see tests/test_shypexl.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import pytest_twisted
from control_helpers import run_cli
from test_shypexl import Env, env

from shyped.control import backend as b
from shyped.control.xlitems import summarize
from shyped.core.xlcfg import XlConfigError

__all__ = ["env"]

WEB_PCI = "0000:03:00.0"
BANK_PCI = "0000:04:00.0"


def label_pcis(env: Env) -> None:
    store = env.backend.store.with_resource(f"pci:{WEB_PCI}", "public-net")
    env.backend.store = store.with_resource(f"pci:{BANK_PCI}", "bank-b-disk")


def xs_exists(env: Env, path: str) -> bool:
    r = subprocess.run(["xenstore-read", path], env=env.xsd.env(), capture_output=True)
    return r.returncode == 0


@pytest_twisted.ensureDeferred
async def test_pci_attach_is_dry_run_first(env: Env) -> None:
    label_pcis(env)
    assert (await env.shype_xl("create", str(env.cfg("web-2", "web")))).returncode == 0
    r = await env.shype_xl("pci-attach", "web-2", "04:00.0")
    assert r.returncode == 1 and "DENIED" in r.stderr and f"pci {BANK_PCI}" in r.stderr
    assert not xs_exists(env, "/libxl/pci/0000-04-00-0/domid")
    r = await env.shype_xl("pci-attach", "web-2", "05:00.0")  # unlabelled
    assert r.returncode == 1 and "unlabelled" in r.stderr
    r = await env.shype_xl("pci-attach", "web-2", "03:00.0,permissive=1")
    assert r.returncode == 0, r.stderr
    assert xs_exists(env, "/libxl/pci/0000-03-00-0/domid")
    for bad in ("name=gpu0", "03:00.0:1", "03:20.0", "0000:03:00.0 "):
        r = await env.shype_xl("pci-attach", "web-2", bad)
        assert r.returncode == 2, (bad, r.stderr)


@pytest_twisted.ensureDeferred
async def test_usb_vtpm_and_vkb_attaches_are_dry_run_first(env: Env) -> None:
    assert (await env.shype_xl("create", str(env.cfg("web-2", "web")))).returncode == 0
    r = await env.shype_xl("usbdev-attach", "web-2", "hostbus=1", "hostaddr=2")
    assert r.returncode == 1 and "not understood" in r.stderr, r.stderr
    r = await env.shype_xl("vtpm-attach", "web-2", "backend=no-such-vtpmmgr")
    assert r.returncode == 1 and "DENIED" in r.stderr
    r = await env.shype_xl("vkb-attach", "web-2", "backend=no-such-domain", "backend-type=qemu")
    assert r.returncode == 1 and "DENIED" in r.stderr
    # With dom0 as backend (STE: dom0 shares web) the command goes on to xl (which the
    # sandbox does not implement: xl's own usage error, not shyped's denial).
    r = await env.shype_xl("vtpm-attach", "web-2", "backend=0")
    assert r.returncode != 1 and "DENIED" not in r.stderr


@pytest_twisted.ensureDeferred
async def test_create_with_pci_is_decided_not_refused(env: Env) -> None:
    """b79039c refused ``pci`` in cfgs while PCI was undecided; now the device's label
    decides it."""
    label_pcis(env)
    r = await env.shype_xl("create", str(env.cfg("web-2", "web", extra=f"pci = ['{BANK_PCI}']\n")))
    assert r.returncode == 1 and "DENIED" in r.stderr and "nothing created" in r.stderr
    assert "web-2" not in env.xl_list()
    r = await env.shype_xl("create", str(env.cfg("web-2", "web", extra="pci = ['03:00.0']\n")))
    assert r.returncode == 0, r.stderr
    assert xs_exists(env, "/libxl/pci/0000-03-00-0/domid")


@pytest_twisted.ensureDeferred
async def test_hvm_and_pvh_cfgs_are_read_and_dry_run(env: Env) -> None:
    hvm = 'type = "hvm"\nvif = [ "bridge=xenbr0,type=ioemu" ]\n'
    r = await env.shype_xl("create", str(env.cfg("web-2", "web", extra=hvm)))
    assert r.returncode == 0, r.stderr
    cfg = env.cfg("web-3", "web", n=2, extra='type = "pvh"\nvif = [ "bridge=xenbr0,type=ioemu" ]\n')
    r = await env.shype_xl("create", str(cfg))
    assert r.returncode == 2 and "cannot have type=ioemu" in r.stderr
    cfg = env.cfg("web-3", "web", n=2, extra='type = "hvm2"\n')
    r = await env.shype_xl("create", str(cfg))
    assert r.returncode == 2 and "invalid domain type" in r.stderr
    socket = "channel = [ 'name=org.qemu.guest_agent.0,connection=socket,path=/run/qga' ]\n"
    r = await env.shype_xl("create", str(env.cfg("web-3", "web", n=2, extra=socket)))
    assert r.returncode == 2 and "host socket" in r.stderr
    assert "web-3" not in env.xl_list()


# ---- the cfg reader, pure ---------------------------------------------------------------


def test_summary_of_an_hvm_cfg() -> None:
    text = """name = "h"
builder = "hvm"
disk = [ 'format=raw,vdev=hda,backendtype=qdisk,target=/img/h.img',
         'format=qcow2,vdev=hdb,target=/img/h2.qcow2' ]
vif = [ 'bridge=br1,type=ioemu', 'bridge=br2' ]
pci = [ '3:0.1@5', 'bdf=0001:0a:1f.7,permissive=1,rdm_policy=relaxed' ]
vtpm = [ 'backend=vtpmmgr,uuid=6f1b1c9e-2a4d-4c55-9e0e-000000000001' ]
vkb = [ 'backend-type=qemu' ]
channel = [ 'name=org.qemu.guest_agent.0,connection=pty' ]
usbctrl = [ 'version=2,ports=4' ]
"""
    s = summarize(text, "h.cfg")
    assert s.type == "hvm"
    assert [d.target for d in s.disks] == ["/img/h.img", "qcow2:/img/h2.qcow2"]
    assert [v.bridge for v in s.vifs] == ["br1", "br2"]
    assert s.pcis == (b.PciItem("0000:03:00.1"), b.PciItem("0001:0a:1f.7"))
    assert s.channels == (
        b.ChannelItem("console", "0"),
        b.ChannelItem("vtpm", "vtpmmgr"),
        b.ChannelItem("vkbd", "0"),
        b.ChannelItem("vusb", "0"),
    )


@pytest.mark.parametrize(
    "extra",
    [
        "pci = [ 'name=gpu' ]",
        "pci = [ '03:00.0,bdf=04:00.0' ]",
        "pci = [ '03:00.0,frobnicate=1' ]",
        "pci = [ 'permissive=1' ]",
        "pci = [ '03:00.8' ]",
        "vif = [ 'bridge=br1,type=tap' ]",
        "type = 'pvh'\nvif = [ 'bridge=br1,type=ioemu' ]",
        "builder = 'linux'",
        "channel = [ 'name=x,connection=socket,path=/run/x' ]",
        "device_model_args = [ '-usb' ]",
    ],
)
def test_cfgs_the_pre_check_refuses(extra: str) -> None:
    with pytest.raises(XlConfigError):
        summarize(f'name = "h"\n{extra}\n', "h.cfg")


@pytest_twisted.ensureDeferred
async def test_shypectl_dry_run_shows_the_pci_and_other_devices(env: Env) -> None:
    label_pcis(env)
    extra = f"pci = [ '{BANK_PCI}' ]\nvtpm = [ 'backend=0' ]\n"
    r = await run_cli(
        [
            sys.executable,
            "-m",
            "shyped.cli.shypectl",
            "--socket",
            str(env.ctl),
            "dry-run",
            str(env.cfg("web-2", "web", extra=extra)),
        ]
    )
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert f"pci {BANK_PCI}" in out and "vtpm (backend 0)" in out
