"""Proof on real Xen: Debian's Xen 4.17 boots under QEMU with a busybox PV dom0, `xl` creates
the reference domain with a vif and a vbd, both connect, and what real libxl, kernel drivers,
hotplug scripts and xenconsoled write into xenstore is exactly what the sandbox toolstack writes
for the same config (so a drift between the sandbox and real Xen fails here).

Normalisation: only the values in sandbox_toolstack_helpers.VARYING_VALUES, which change from
one real run to the next (start_time: wall clock; store/console ring-ref: frame numbers picked
by the domain builder).  Ports, grant references, the console tty and every permission are
compared as they are: they were identical across repeated real runs.
"""

from __future__ import annotations

import difflib
import json
import re

import pytest
from builder import Images
from runner import REPO, RunResult
from sandbox_toolstack_helpers import XSGOLD_CFG, normalize_layout, xenstore_ls

from shyped.core.xlcfg import domain_config_from_text
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

DEVICE_STATES = (
    "/local/domain/1/device/vif/0/state",
    "/local/domain/0/backend/vif/1/0/state",
    "/local/domain/1/device/vbd/51712/state",
    "/local/domain/0/backend/vbd/1/51712/state",
)


def layout_values(text: str) -> dict[str, str]:
    return {
        m["path"]: m["value"]
        for m in re.finditer(r'^(?P<path>\S+) = "(?P<value>.*)"   \(', text, re.MULTILINE)
    }


def xl_list(text: str) -> dict[str, dict[str, str]]:
    """`xl list` rows by name: id, mem, vcpus, state."""
    rows: dict[str, dict[str, str]] = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 5:
            rows[parts[0]] = {"id": parts[1], "mem": parts[2], "vcpus": parts[3], "state": parts[4]}
    return rows


def assert_same_layout(real: str, sandbox: str, what: str) -> None:
    got, want = normalize_layout(real), normalize_layout(sandbox)
    if got != want:
        diff = "\n".join(
            difflib.unified_diff(want, got, "sandbox toolstack", "real Xen", lineterm="", n=1)
        )
        pytest.fail(f"{what}: real Xen and the sandbox toolstack differ\n{diff}", pytrace=False)


def test_dom0_runs_debians_xen_at_the_packaged_version(
    boot_run: RunResult, e2e_images: Images
) -> None:
    info = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in boot_run.text("xl-info").splitlines())
    )
    packaged = str(e2e_images.manifest["xen_version"]).split("+")[0]
    assert info["xen_version"] == packaged
    assert info["release"] == e2e_images.kernel_release
    assert "pv" in info["virt_caps"].split()


def test_the_domain_is_listed_paused_then_running_then_gone(boot_run: RunResult) -> None:
    paused = xl_list(boot_run.text("xl-list-paused.txt"))
    running = xl_list(boot_run.text("xl-list.txt"))
    after = xl_list(boot_run.text("xl-list-after-destroy.txt"))
    assert paused["xsgold"]["id"] == "1" and "p" in paused["xsgold"]["state"]
    xsgold = running["xsgold"]
    assert (xsgold["id"], xsgold["mem"], xsgold["vcpus"]) == ("1", "128", "1")
    assert "p" not in xsgold["state"]
    assert set(after) == {"Domain-0"}
    (long,) = [d for d in json.loads(boot_run.text("xl-list-l.json")) if d["domid"] == 1]
    assert long["config"]["c_info"]["name"] == "xsgold"


def test_vif_and_vbd_connect_on_both_ends(boot_run: RunResult) -> None:
    paused = layout_values(boot_run.text("layout-paused.txt"))
    connected = layout_values(boot_run.text("layout-connected.txt"))
    # Paused: backends wait for the frontend (InitWait), frontends are Initialising.
    assert [paused[p] for p in DEVICE_STATES] == ["1", "2", "1", "2"]
    assert [connected[p] for p in DEVICE_STATES] == ["4", "4", "4", "4"]
    for line in boot_run.text("states-connected.txt").splitlines():
        assert line.endswith("= 4"), line
    # The hotplug scripts ran for real: a loop device on the image, the vif on the bridge.
    assert connected["/local/domain/0/backend/vbd/1/51712/node"].startswith("/dev/loop")
    assert connected["/local/domain/0/backend/vif/1/0/hotplug-status"] == "connected"


def test_real_layouts_match_the_sandbox_toolstack(
    boot_run: RunResult, xenstored: SandboxXenstored
) -> None:
    cfg = domain_config_from_text(XSGOLD_CFG.read_text(), str(XSGOLD_CFG))
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    assert_same_layout(
        boot_run.text("layout-before-create.txt"), xenstore_ls(xenstored), "fresh host"
    )
    domid = ts.create(cfg, paused=True)
    assert domid == 1
    assert_same_layout(
        boot_run.text("layout-paused.txt"), xenstore_ls(xenstored), "after xl create -p"
    )
    ts.unpause(domid)
    assert_same_layout(
        boot_run.text("layout-connected.txt"), xenstore_ls(xenstored), "after unpause, connected"
    )
    # The scenario ran `xl list -l` (libxl fills dom0's memory keys) before destroying.
    ts.list_long()
    ts.destroy("xsgold")
    assert_same_layout(
        boot_run.text("layout-after-destroy.txt"), xenstore_ls(xenstored), "after xl destroy"
    )


def test_host_venv_python_and_xl_run_in_dom0(boot_run: RunResult) -> None:
    out = boot_run.text("python-in-dom0.txt")
    assert boot_run.text("python-in-dom0.txt.rc").strip() == "0", out
    assert f"shyped {REPO}/shyped/__init__.py" in out
    assert "dom0 name Domain-0" in out
    # ...and so do the host's Xen tools, the daemon's actuator path.
    assert boot_run.text("xl-list-host-userland.txt.rc").strip() == "0"
    assert set(xl_list(boot_run.text("xl-list-host-userland.txt"))) == {"Domain-0"}
