"""`python -m shyped.sandbox` as a subprocess, the way tests and XlActuator use it as `xl`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox_toolstack_helpers import XSGOLD_CFG, normalize_layout, reference_layout, xenstore_ls

from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn

SUBCOMMANDS = [
    "create",
    "unpause",
    "pause",
    "destroy",
    "list",
    "block-attach",
    "network-attach",
    "block-detach",
    "network-detach",
    "boot-host",
    "vchan-listen",
    "vchan-close",
    "demo",
]


def xl(
    *args: str, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "shyped.sandbox", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_everywhere(command: str | None) -> None:
    result = xl(*([command] if command else []), "--help")
    assert "usage:" in result.stdout


def test_xl_lifecycle_as_subprocesses(xenstored: SandboxXenstored) -> None:
    env = xenstored.env()
    xl("boot-host", env=env)
    created = xl("create", "-p", str(XSGOLD_CFG), env=env)
    assert f"Parsing config from {XSGOLD_CFG}" in created.stderr
    assert normalize_layout(xenstore_ls(xenstored)) == reference_layout("layout-paused.txt")

    listing = xl("list", env=env).stdout.splitlines()
    assert listing[0].startswith("Name") and "State" in listing[0]
    assert listing[1].split()[:4] == ["Domain-0", "0", "1024", "1"]
    assert listing[2].split()[:5] == ["xsgold", "1", "128", "1", "--p---"]

    xl("xl", "unpause", "xsgold", env=env)  # a leading "xl" word is accepted
    assert normalize_layout(xenstore_ls(xenstored)) == reference_layout("layout-connected.txt")
    assert xl("list", "1", env=env).stdout.splitlines()[1].split()[4] == "-b----"

    long = xl("list", "-l", env=env).stdout
    assert '"name": "xsgold"' in long

    out = xl("vchan-listen", "--client", "1", "--port", "9", env=env).stdout
    assert out.split()[0] == "/local/domain/0/data/vchan/1/9"
    xl("vchan-close", "data/vchan/1/9", env=env)

    xl("network-attach", "1", "mac=00:16:3e:00:00:02", "bridge=xenbr0", env=env)
    xl("block-attach", "xsgold", "/dev/vg0/extra,raw,xvdb,r", env=env)
    with XsConn(env["XENSTORED_PATH"]) as xs:
        assert xs.read("/local/domain/1/device/vif/1/state") == "4"
        assert xs.read("/local/domain/0/backend/vbd/1/51728/mode") == "r"
        assert xs.read("/local/domain/0/data/vchan/1/9") is None
    xl("network-detach", "1", "1", env=env)
    xl("block-detach", "1", "xvdb", env=env)
    xl("block-detach", "1", "xvda", env=env)
    xl("network-detach", "xsgold", "00:16:3e:5a:11:01", env=env)
    xl("pause", "1", env=env)
    xl("destroy", "xsgold", env=env)
    assert [ln.split()[0] for ln in xl("list", env=env).stdout.splitlines()[1:]] == ["Domain-0"]


def test_socket_option_and_errors(xenstored: SandboxXenstored) -> None:
    env = {k: v for k, v in os.environ.items() if k != "XENSTORED_PATH"}
    missing = xl("boot-host", env=env, check=False)
    assert missing.returncode == 2 and "XENSTORED_PATH" in missing.stderr
    xl("--socket", str(xenstored.socket_path), "boot-host", env=env)
    unknown = xl("--socket", str(xenstored.socket_path), "unpause", "ghost", env=env, check=False)
    assert unknown.returncode == 1 and "invalid domain identifier" in unknown.stderr
    gone = Path(str(xenstored.socket_path) + "-gone")
    no_daemon = xl("--socket", str(gone / "socket"), "list", env=env, check=False)
    assert no_daemon.returncode == 1 and "no xenstored socket" in no_daemon.stderr
    assert not gone.exists()  # no state file is left where no xenstored runs
    bad_cfg = xl("--socket", str(xenstored.socket_path), "create", "/nonexistent.cfg", check=False)
    assert bad_cfg.returncode == 1 and "error:" in bad_cfg.stderr


def test_demo_prints_the_paused_reference_layout() -> None:
    result = xl("demo")
    assert normalize_layout(result.stdout) == reference_layout("layout-paused.txt")


@pytest.mark.parametrize(
    ("label_line", "warns"),
    [('seclabel="ACM:sHype:green"', True), ("access_control=['policy=sHype,label=green']", False)],
)
def test_labels_write_no_xenstore_node(
    xenstored: SandboxXenstored, label_line: str, warns: bool
) -> None:
    """libxl 4.17 without XSM only warns about seclabel; xl ignores access_control."""
    env = xenstored.env()
    xl("boot-host", env=env)
    result = xl("create", "-p", str(XSGOLD_CFG), label_line, env=env)
    assert ("XSM Disabled" in result.stderr) is warns
    assert normalize_layout(xenstore_ls(xenstored)) == reference_layout("layout-paused.txt")
    # libxl stores what xl passed it: seclabel as c_info.ssid_label, access_control not at all.
    assert ('"ssid_label": "ACM:sHype:green"' in xl("list", "-l", env=env).stdout) is warns
