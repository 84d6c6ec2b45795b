"""A device denied while ``xl create`` still adds it: the daemon lets libxl's hotplug script
finish before it cuts, so the domain is created and runs on without the device. A cut under
the script makes the script fail, and libxl then fails the add and destroys the whole domain
(seen on real Xen 4.17; the sandbox toolstack plays it, see test_sandbox_toolstack)."""

from __future__ import annotations

import time

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture, image

from shyped.sandbox.toolstack import ToolstackError
from shyped.sandbox.xsconn import XsConn
from shyped.service.cuttx import hotplug_pending

host = host_fixture

#: How long the sandbox's libxl gives a daemon to cut before it runs the hotplug script
#: (a bound on a poll: a daemon that cuts at once is seen long before it).
WINDOW = 2.0


def cut_seen_before_hotplug(host: Harness, seen: list[str]) -> None:
    """Before each hotplug script: wait (bounded) for a cut of that backend (online=0)."""

    def before(backend: str) -> None:
        deadline = time.monotonic() + WINDOW
        with XsConn(str(host.xsd.socket_path)) as xs:
            while time.monotonic() < deadline:
                if xs.read(f"{backend}/online") == "0":
                    seen.append(backend)
                    return
                time.sleep(0.02)

    host.ts.before_hotplug = before


@pytest_twisted.ensureDeferred
async def test_a_vif_denied_at_create_is_cut_after_its_hotplug_script(host: Harness) -> None:
    await host.start(host.config(close_timeout=60.0))
    early: list[str] = []
    cut_seen_before_hotplug(host, early)
    d = await host.call(
        host.ts.create,
        domcfg(
            "web-a1", vifs=["bridge=xenbr-bank-a", "bridge=xenbr-bank-b"], disks=[image("web-a1")]
        ),
    )
    assert early == []  # nothing was cut under a hotplug script
    backend = f"/local/domain/0/backend/vif/{d}/1"
    await eventually(lambda: host.read(backend + "/state") == "5")  # cut once the script ran
    assert host.read(backend + "/hotplug-status") == "connected"
    assert host.read(backend + "/online") == "0"
    assert not host.last(f"device vif {d}/1").allowed
    assert host.last(f"domain {d}").allowed
    # The guest runs: the denied vif closes and goes, the permitted one connects.
    await host.call(host.ts.unpause, d)
    await eventually(lambda: host.read(backend) is None)
    await host.settle()
    assert host.read(f"/local/domain/0/backend/vif/{d}/0/state") == "4"
    assert host.read(f"/local/domain/{d}/device/vbd/51712/state") == "4"
    assert [dom.name for dom in host.ts.list_domains()] == ["Domain-0", "web-a1"]


@pytest_twisted.ensureDeferred
async def test_a_disk_denied_at_create_is_cut_after_its_hotplug_script(host: Harness) -> None:
    await host.start(host.config(close_timeout=60.0))
    early: list[str] = []
    cut_seen_before_hotplug(host, early)
    d = await host.call(host.ts.create, domcfg("web-a1", disks=[image("web-b1")]))
    assert early == []
    backend = f"/local/domain/0/backend/vbd/{d}/51712"
    await eventually(lambda: host.read(backend + "/state") == "5")
    assert host.read(backend + "/hotplug-status") == "connected"
    assert not host.last(f"device vbd {d}/51712").allowed
    await host.call(host.ts.unpause, d)
    await eventually(lambda: host.read(backend) is None)
    assert [dom.name for dom in host.ts.list_domains()] == ["Domain-0", "web-a1"]


BE, FE = "/local/domain/0/backend/vif/3/0", "/local/domain/3/device/vif/0"


def pending(**nodes: bytes | None) -> bool:
    values = {
        f"{BE}/script": b"/etc/xen/scripts/vif-bridge",
        f"{BE}/hotplug-status": b"",
        f"{BE}/state": b"2",
        f"{FE}/state": b"1",
    }
    names = {"script": f"{BE}/script", "status": f"{BE}/hotplug-status"}
    names |= {"be_state": f"{BE}/state", "fe_state": f"{FE}/state"}
    values.update({names[k]: v for k, v in nodes.items()})
    return hotplug_pending(values, BE, FE)


def test_hotplug_pending_only_while_the_add_is_under_way() -> None:
    assert pending()  # libxl's "" for a vif: the script has not finished
    assert pending(status=None, be_state=b"1")  # a vbd before blkback's probe
    assert not pending(status=b"connected")
    assert not pending(status=b"error")  # the script failed by itself: cut now
    assert not pending(script=None)  # no script (qdisk, console): nothing to wait for
    assert not pending(be_state=None)  # the backend is gone
    assert not pending(be_state=b"4")
    assert not pending(be_state=b"5")
    assert not pending(fe_state=b"4")  # the guest moved on: cut at once
    assert not pending(fe_state=None)
    assert not pending(fe_state=b"junk")


@pytest_twisted.ensureDeferred
async def test_a_hotplug_script_that_never_finishes_does_not_hold_the_cut_forever(
    host: Harness,
) -> None:
    """The wait is bounded: past it the device is cut anyway (here libxl's script then finds
    the backend Closing and the create fails: fail closed)."""
    daemon = await host.start(host.config(close_timeout=60.0))
    daemon.enforcer.hotplug_wait = 0.5
    early: list[str] = []
    cut_seen_before_hotplug(host, early)  # holds the script up to WINDOW seconds
    with pytest.raises(ToolstackError, match="unable to add vif devices"):
        await host.call(host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-b"]))
    assert early == ["/local/domain/0/backend/vif/1/0"]
    await host.settle()
    assert [dom.name for dom in host.ts.list_domains()] == ["Domain-0"]
