"""PVH guests under the daemon on real Xen (issue 19): tests/e2e/scenarios/pvh.sh boots the
e2e kernel as PVH guests (the tier's Xen has HAP) with the policy and daemon config of
tests/e2e/daemon and the cfgs of tests/e2e/pvh. pvh-green (shype-xl) is admitted with its
label and its vif and vbd connect; pvh-red (Chinese Wall) is destroyed; pvh-blue's vif on a
bridge of another type is cut and removed while pvh-blue runs. pvh-green's layouts (created
paused and admitted, then connected) are the capture in tests/reference/pvh, which the sandbox
toolstack is held to (tests/test_sandbox_guests.py).

HVM under TCG is not attempted (see docs/operations.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from runner import RunResult
from sandbox_toolstack_helpers import normalize_layout, reference_layout
from test_e2e_boot import layout_values, xl_list
from test_e2e_daemon import assert_clean_log, assert_connected, decisions, domid, states

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

E2E = Path(__file__).parent
DAEMON_FILES = E2E / "daemon"
PVH_FILES = E2E / "pvh"


@pytest.fixture(scope="module")
def run(e2e_run: Callable[..., RunResult]) -> RunResult:
    files = {
        p.name: p.read_bytes()
        for d in (DAEMON_FILES, PVH_FILES)
        for p in sorted(d.iterdir())
        if p.is_file()
    }
    return e2e_run("pvh", files)


def test_pvh_green_is_admitted_labelled_and_its_devices_connect(run: RunResult) -> None:
    g = domid(run, "green")
    assert run.text("green-create.log.rc").strip() == "0", run.text("green-create.log")
    assert "hvm" in run.text("xl-info.txt")  # virt_caps: the tier can run PVH
    assert "p" in xl_list(run.text("xl-list-green-paused.txt"))["pvh-green"]["state"]
    assert "p" not in xl_list(run.text("xl-list-green.txt"))["pvh-green"]["state"]
    assert_connected(run, "green-vif.txt")
    assert_connected(run, "green-vbd.txt")
    values = layout_values(run.text("layout-green-connected.txt"))
    assert values[f"/libxl/{g}/type"] == "pvh"
    assert values[f"/local/domain/{g}/shyped/label"] == "ACM:e2e.daemon:green"
    log = run.text("daemon-pvh.log")
    assert any(d.startswith(f"permit domain {g} dom=pvh-green({g},") for d in decisions(log))
    assert any(d.startswith(f"permit device vbd {g}/51712 ") for d in decisions(log))
    assert_clean_log(log)


def test_a_conflicting_pvh_domain_is_destroyed(run: RunResult) -> None:
    g = domid(run, "green")
    after = xl_list(run.text("xl-list-after-red.txt"))
    assert "pvh-red" not in after and after["pvh-green"]["id"] == str(g)
    assert_connected(run, "green-vif-after-red.txt")
    (denied,) = [d for d in decisions(run.text("daemon-pvh.log")) if "dom=pvh-red(" in d]
    assert "[chinese-wall]" in denied and "-> destroy domain" in denied, denied


def test_a_pvh_vif_on_a_foreign_bridge_is_cut(run: RunResult) -> None:
    """The vif is denied and cut. Usually pvh-blue runs on without it; when the cut lands
    while libxl's vif-bridge still runs, the script fails and xl create destroys pvh-blue
    (docs/operations.md): the vif never connects either way."""
    (denied,) = [
        d
        for d in decisions(run.text("daemon-pvh.log"))
        if d.startswith("deny device vif ") and "fe=pvh-blue(" in d
    ]
    assert "res=bridge:xenbr0" in denied and "lacks STE type 'green'" in denied, denied
    if run.text("blue-create.log.rc").strip() == "0":
        assert set(states(run, "blue-vif.txt").values()) == {"absent"}
        assert "p" not in xl_list(run.text("xl-list-blue.txt"))["pvh-blue"]["state"]
    else:
        assert "unable to add vif devices" in run.text("blue-create.log")
        assert "pvh-blue" not in xl_list(run.text("xl-list-blue.txt"))


@pytest.mark.parametrize("phase", ["paused", "connected"])
def test_pvh_greens_layouts_are_the_reference_capture(run: RunResult, phase: str) -> None:
    """This run's layouts are tests/reference/pvh's (taken from this scenario), which
    tests/test_sandbox_guests.py holds the sandbox toolstack to: a drift of real Xen or of the
    sandbox fails one of the two."""
    assert normalize_layout(run.text(f"layout-green-{phase}.txt")) == reference_layout(
        f"pvh/layout-pvh-green-{phase}.txt"
    )
