"""The ``shyped`` command as a process: exit codes, logs, signals (SIGHUP reload, SIGTERM stop,
SIGKILL then restart), the sandbox actuator, and the README's demo."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import HOSTING, LABELS, POLICY, domcfg, image
from process_helpers import SHYPED, ShypedProcess, wait_until

from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SHYPED, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def write_config(tmp: Path, socket: Path, *, policy: Path = HOSTING, extra: str = "") -> Path:
    path = tmp / "shyped.toml"
    labels = tmp / "labels.json"  # a private copy: the daemon rewrites it on a rename
    if not labels.exists():
        shutil.copy(LABELS, labels)
    path.write_text(
        f'[policy]\npath = "{policy}"\nlabels = "{labels}"\n'
        f'[enforcement]\nmode = "enforcing"\ndevice_close_timeout = 60.0\n{extra}'
        f'[xenstore]\nsocket = "{socket}"\n'
        '[actuator]\nkind = "sandbox"\n'
        f'[control]\nsocket = "{socket.parent / "control.sock"}"\n'
    )
    return path


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Toolstack]:
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    yield ts


def read(xsd: SandboxXenstored, path: str) -> str | None:
    with XsConn(str(xsd.socket_path)) as xs:
        return xs.read(path)


def test_help_names_the_config_option_and_the_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    assert "--config" in result.stdout and "demo" in result.stdout and "check" in result.stdout


def test_check_reports_the_example_configuration() -> None:
    result = run("--config", "conf/shyped.toml", "check")
    assert result.returncode == 0, result.stderr
    assert f"policy {POLICY} 1.0 (toml" in result.stdout


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[policy]\npath = "p.toml"\n[enforcement]\nmode = "lax"\n', "enforcement.mode"),
        ("[policy\n", "shyped.toml"),
        ('[policy]\npath = "missing.toml"\n', "cannot read policy"),
        ('[policy]\npath = "bad.toml"\n', "bad.toml:2"),
        ('[policy]\npath = "bad.xml"\n', "bad.xml"),
    ],
)
def test_unusable_configuration_or_policy_exits_2_without_a_traceback(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "bad.toml").write_text('[policy]\nname = 3\nversion = "1.0"\n')
    (tmp_path / "bad.xml").write_text("<SecurityPolicyDefinition>")
    config = tmp_path / "shyped.toml"
    config.write_text(text)
    for command in ((), ("check",)):
        result = run("--config", str(config), *command)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("shyped: error:")
        assert message in result.stderr
        assert "Traceback" not in result.stderr


def test_no_xenstored_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    config = write_config(tmp_path, tmp_path / "no-such-socket")
    result = run("--config", str(config))
    assert result.returncode == 1
    assert "cannot reach xenstored" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_daemon_process_logs_decisions_reloads_on_sighup_and_stops_on_sigterm(
    xenstored: SandboxXenstored, host: Toolstack, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(HOSTING.read_text())
    daemon = ShypedProcess.start(
        write_config(tmp_path, xenstored.socket_path, policy=policy), tmp_path / "log"
    )
    try:
        a = host.create(domcfg("web-a1"))
        b = host.create(domcfg("web-b1"))
        wait_until(lambda: all(d.domid != b for d in host.list_domains()))  # destroyed via the CLI
        text = daemon.text()
        assert f"decision: permit domain {a} dom=web-a1({a}, " in text
        assert f"decision: deny domain {b} dom=web-b1({b}, " in text
        assert f"-> destroy domain {b}" in text
        assert read(xenstored, f"/local/domain/{a}/shyped/label") == f"ACM:{POLICY}:bank-a-web"
        # SIGHUP: a policy that deletes the running domain's label is refused, with reasons.
        policy.write_text(
            HOSTING.read_text()
            .replace(
                'version = "1.0"',
                'version = "1.1"\nfrom = { name = "example.hosting", version = "1.0" }',
            )
            .replace('name = "bank-a-web"', 'name = "bank-a-frontend"')
        )
        daemon.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "refused" in daemon.text())
        assert "which the new policy deletes" in daemon.text()
        # … and one that renames it with from= is applied and relabels the domain.
        policy.write_text(
            policy.read_text().replace(
                'name = "bank-a-frontend"', 'name = "bank-a-frontend"\nfrom = "bank-a-web"'
            )
        )
        daemon.proc.send_signal(signal.SIGHUP)
        relabelled = f"ACM:{POLICY}:bank-a-frontend"
        wait_until(lambda: read(xenstored, f"/local/domain/{a}/shyped/label") == relabelled)
        assert "example.hosting 1.1 applied" in daemon.text()
    finally:
        code = daemon.stop()
    assert code == 0
    assert "Traceback" not in daemon.text()


def test_a_daemon_killed_mid_veto_finishes_the_job_after_restart(
    xenstored: SandboxXenstored, host: Toolstack, tmp_path: Path
) -> None:
    config = write_config(tmp_path, xenstored.socket_path)
    first = ShypedProcess.start(config, tmp_path / "log1")
    try:
        d = host.create(domcfg("web-a1", vifs=["bridge=xenbr-bank-b"], disks=[image("web-a1")]))
        backend = f"/local/domain/0/backend/vif/{d}/0"
        # The cut is done; the daemon waits (60 s) for the backend to close. Kill it there.
        wait_until(lambda: read(xenstored, backend + "/state") == "5")
    finally:
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    # While it is down, a competitor appears.
    b = host.create(domcfg("web-b1"))
    second = ShypedProcess.start(config, tmp_path / "log2")
    try:
        host.unpause(d)  # the guest runs: netfront closes, netback reaches Closed
        wait_until(lambda: read(xenstored, f"/libxl/{d}/device/vif/0/frontend") is None)
        wait_until(lambda: all(x.domid != b for x in host.list_domains()))
        assert read(xenstored, backend + "/state") is None
        assert read(xenstored, f"/local/domain/{d}/device/vbd/51712/state") == "4"
        text = second.text()
        assert f"decision: deny device vif {d}/0" in text
        assert f"decision: deny domain {b}" in text
    finally:
        assert second.stop() == 0


def test_the_readme_demo_runs_the_scenario_and_exits_by_itself() -> None:
    env = dict(os.environ)
    result = subprocess.run(
        [sys.executable, "-m", "shyped.cli.main", "demo"],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "every decision was the expected one" in out
    for expected in (
        "[chinese-wall] 'bank-b-web' may not start",
        "'shop' and 'bank-a-web' share no STE type",
        "lacks STE type 'bank-b' of resource 'bank-b-disk'",
        "-> remove vchan rendezvous",
        "-> destroy domain",
    ):
        assert expected in out, expected
