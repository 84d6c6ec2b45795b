"""systemd integration: the unit passes `systemd-analyze verify` and stays hardened, the
tmpfiles entry creates what the daemon needs, and sd_notify/watchdog reach a real socket."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor, task

from shyped.service.auditlog import DEFAULT_DIRECTORY
from shyped.service.config import Config, ControlConfig
from shyped.service.sdnotify import Notifier, Watchdog, watchdog_interval

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "shyped.service"
TMPFILES = ROOT / "systemd" / "shyped.tmpfiles"

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


def directives(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line of a unit file (keys may repeat)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def one(text: str, section: str, key: str) -> str:
    values = [v for s, k, v in directives(text) if (s, k) == (section, key)]
    assert len(values) == 1, (section, key, values)
    return values[0]


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here.

    verify checks that ExecStart's binary exists; the unit names the documented install path
    (/usr/local/bin/shyped). The copy uses the venv's `shyped` when it is installed, else this
    Python, keeping the arguments.
    """
    text = UNIT.read_text()
    exe = shutil.which("shyped", path=str(Path(sys.executable).parent)) or sys.executable
    copied = tmp_path / "shyped.service"
    copied.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", text, flags=re.M))
    return copied


@needs_analyze
def test_unit_verifies(unit_copy: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit_copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    ours = [line for line in result.stderr.splitlines() if "shyped" in line]
    assert ours == [], ours


@needs_analyze
def test_unit_exposure_is_at_most_2_1(unit_copy: Path) -> None:
    """2.1: setpriority allowed (parser workers), host /tmp and read-only /home (disk paths
    resolved as the backend sees them) — see docs/install.md."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit_copy)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for shyped\.service: (\d+\.\d+)", result.stdout)
    assert m, result.stdout + result.stderr
    assert float(m.group(1)) <= 2.1, result.stdout


def test_unit_is_what_the_daemon_expects() -> None:
    text = UNIT.read_text()
    assert one(text, "Service", "Type") == "notify"
    assert one(text, "Service", "NotifyAccess") == "main"
    assert one(text, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(text, "Service", "WatchdogSec").endswith("s")
    # the directories systemd makes are the ones the defaults point into
    run = Path("/run") / one(text, "Service", "RuntimeDirectory")
    assert ControlConfig().socket.parent == run
    state = Path("/var/lib") / one(text, "Service", "StateDirectory")
    assert Config(policy=Path("/x")).labels.parent == state
    logs = Path("/var/log") / one(text, "Service", "LogsDirectory")
    assert DEFAULT_DIRECTORY.is_relative_to(logs)
    # xenstored first (Debian's SysV-generated xen.service, or Xen's xenstored.service)
    assert {"xen.service", "xenstored.service"} <= set(one(text, "Unit", "After").split())
    assert one(text, "Service", "CapabilityBoundingSet") == ""
    assert one(text, "Service", "ProtectSystem") == "strict"
    assert one(text, "Service", "NoNewPrivileges") == "yes"
    # disk paths are resolved as the backend sees them: no private /tmp, no hidden /home
    assert "PrivateTmp=yes" not in text
    assert one(text, "Service", "ProtectHome") == "read-only"


def test_tmpfiles_entry_creates_the_directories(tmp_path: Path) -> None:
    tool = shutil.which("systemd-tmpfiles")
    if tool is None:
        pytest.skip("systemd-tmpfiles not installed")
    subprocess.run([tool, "--create", f"--root={tmp_path}", str(TMPFILES)], check=True)
    modes = {
        d: (tmp_path / d.lstrip("/")).stat().st_mode & 0o7777
        for d in ("/run/shyped", "/var/lib/shyped", "/var/log/shyped")
    }
    assert modes == {"/run/shyped": 0o755, "/var/lib/shyped": 0o750, "/var/log/shyped": 0o750}


# --------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = f"/tmp/shyt-notify-{os.getpid()}-{time.monotonic_ns()}"
    s.bind(path)
    s.settimeout(5)
    try:
        yield s, path
    finally:
        s.close()
        os.unlink(path)


def drain(s: socket.socket) -> list[bytes]:
    out = []
    s.setblocking(False)
    try:
        while True:
            out.append(s.recv(4096))
    except BlockingIOError:
        pass
    finally:
        s.settimeout(5)
    return out


def test_notifier_sends_the_messages(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.ready("serving 3 domains")
    assert s.recv(4096) == f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving 3 domains".encode()
    n.reloading()
    assert s.recv(4096) == b"RELOADING=1"
    n.status("evil\nREADY=1")
    assert s.recv(4096) == b"STATUS=evil READY=1"  # one line: no smuggled assignment
    n.stopping()
    assert s.recv(4096) == b"STOPPING=1"
    n.close()


def test_notifier_abstract_socket() -> None:
    name = f"shyt-abstract-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(b"\0" + name.encode())
    s.settimeout(5)
    with s:
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert s.recv(100) == b"WATCHDOG=1"


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.watchdog()
    assert Watchdog.from_environment(n, {"WATCHDOG_USEC": "1000000"}) is None
    # a socket that went away is logged, never raised
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify"})
    assert gone.enabled and gone.ready() is False


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}) is None
    assert watchdog_interval({}) is None


def test_watchdog_pings_on_the_clock(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    clock = task.Clock()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    wd = Watchdog.from_environment(Notifier(env), env, clock=clock)
    assert wd is not None and wd.interval == 1.0
    wd.start()
    assert drain(s) == [b"WATCHDOG=1"]  # at once
    clock.advance(0.5)
    assert drain(s) == []
    clock.pump([0.5, 1.0, 1.0])
    assert drain(s) == [b"WATCHDOG=1"] * 3
    wd.stop()
    clock.advance(10)
    assert drain(s) == [] and not wd.running


@pytest_twisted.ensureDeferred
async def test_a_blocked_reactor_stops_pinging(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    wd = Watchdog(Notifier({"NOTIFY_SOCKET": path}), 0.02)
    wd.start()
    try:
        await task.deferLater(reactor, 0.2, lambda: None)
        assert len(drain(s)) >= 2  # the reactor runs: pings arrive
        time.sleep(0.5)  # this test body runs on the reactor: it is now wedged
        assert drain(s) == []  # no ping can have been sent meanwhile
        await task.deferLater(reactor, 0.2, lambda: None)
        assert drain(s)  # running again, pinging again
    finally:
        wd.stop()
