"""The metrics endpoint attacked by a real unprivileged local user (useradd + setpriv) while the
daemon runs as a child process against a sandbox oxenstored: reading the series without
credentials (issue 11 #10), and holding idle TCP connections until the daemon runs out of
descriptors, so that a Chinese Wall veto's ``destroy`` fails (issue 20 #1)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import pytest
from daemon_helpers import HOSTING, LABELS, domcfg, uuid_of
from process_helpers import ROOT, SHYPED, ShypedProcess, wait_until
from user_helpers import SYSTEM_PYTHON, Account, needs_users, setpriv, system_users

from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.service.peeruid import PeerUids

pytestmark = needs_users

PASSWORD = b"a long scrape password"
HASH = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
TOKEN = "4f2a9c0e7b1d3a5f6e8c0b2d4f6a8c0e"

#: GET argv[1] with an optional basic-auth password (argv[2]); prints status and body as JSON.
SCRAPER = r"""
import base64, json, sys, urllib.error, urllib.request
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Basic " + base64.b64encode(sys.argv[2].encode()).decode())
try:
    with urllib.request.urlopen(req, timeout=20) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
"""

#: Opens argv[3] non-blocking TCP connections to argv[1]:argv[2] and keeps that many open
#: (reopening any the server closes) until its stdin closes; prints "open N" once.
HOG = r"""
import errno, select, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def opened():
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect((host, port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        return None
    return s
socks = [s for s in (opened() for _ in range(n)) if s]
print("open", len(socks), flush=True)
while not select.select([sys.stdin], [], [], 0.5)[0]:
    kept = []
    for s in socks:
        try:
            gone = s.recv(1, socket.MSG_PEEK) == b""
        except OSError as e:
            gone = e.errno not in (errno.EAGAIN, errno.ENOTCONN)
        if gone:
            s.close()
            s = opened()
        if s:
            kept.append(s)
    socks = kept
"""


@pytest.fixture(scope="module")
def outsider() -> Iterator[Account]:
    with system_users(["shym-o"]) as (account,):
        yield account


def write_config(tmp: Path, xsd: SandboxXenstored, metrics: str) -> Path:
    path = tmp / "shyped.toml"
    path.write_text(
        f'[policy]\npath = "{HOSTING}"\nlabels = "{LABELS}"\n'
        f'[xenstore]\nsocket = "{xsd.socket_path}"\n'
        '[actuator]\nkind = "sandbox"\n'
        f'[control]\nsocket = "{xsd.socket_path.parent / "control.sock"}"\n'
        f'[metrics]\nenabled = true\naddress = "127.0.0.1"\nport = 0\n{metrics}'
    )
    return path


def token_file(tmp: Path, mode: int = 0o600) -> Path:
    path = tmp / "metrics.token"
    path.write_text(TOKEN + "\n")
    os.chmod(path, mode)
    return path


def auth_keys(tmp: Path) -> str:
    return f'bearer_token_file = "{token_file(tmp)}"\n[metrics.basic_auth_users]\nprom = "{HASH}"\n'


def metrics_port(daemon: ShypedProcess) -> int:
    wait_until(lambda: "metrics endpoint on" in daemon.text() or daemon.proc.poll() is not None)
    m = re.search(r"metrics endpoint on https?://127\.0\.0\.1:(\d+)/metrics", daemon.text())
    assert m is not None, daemon.text()
    return int(m[1])


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Toolstack]:
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    yield ts


def scrape_as(account: Account, url: str, *auth: str) -> dict[str, object]:
    argv = [*setpriv(account), SYSTEM_PYTHON, "-c", SCRAPER, url, *auth]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    answer: dict[str, object] = json.loads(done.stdout)
    return answer


def test_a_local_user_without_credentials_gets_401_and_no_series(
    xenstored: SandboxXenstored, host: Toolstack, tmp_path: Path, outsider: Account
) -> None:
    config = write_config(tmp_path, xenstored, auth_keys(tmp_path))
    daemon = ShypedProcess.start(config, tmp_path / "log")
    try:
        daemon.wait_ready()
        url = f"http://127.0.0.1:{metrics_port(daemon)}/metrics"
        a = host.create(domcfg("web-a1"))
        wait_until(lambda: f"decision: permit domain {a}" in daemon.text())
        uuid = uuid_of("web-a1")

        def as_root() -> str:
            req = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(req, timeout=20) as resp:
                text: str = resp.read().decode()
                return text

        # the series name the domain (once the snapshot is published)
        wait_until(lambda: uuid in as_root() and 'domain="web-a1"' in as_root())
        for auth in ((), ("prom:wrong",), ("root:" + PASSWORD.decode(),)):
            answer = scrape_as(outsider, url, *auth)
            assert answer["status"] == 401, auth
            body = str(answer["body"])
            assert "shyped_" not in body and uuid not in body and "web-a1" not in body
        # the operator's Prometheus credentials work, for any uid that holds them
        good = scrape_as(outsider, url, "prom:" + PASSWORD.decode())
        assert good["status"] == 200 and uuid in str(good["body"])
    finally:
        assert daemon.stop() == 0


@pytest.mark.parametrize("mode", [0o644, 0o640])
def test_check_and_start_refuse_a_token_file_others_can_read(
    xenstored: SandboxXenstored, tmp_path: Path, mode: int
) -> None:
    config = write_config(
        tmp_path, xenstored, f'bearer_token_file = "{token_file(tmp_path, mode)}"\n'
    )
    for command in (["check"], []):
        done = subprocess.run(
            [*SHYPED, "--config", str(config), *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )
        assert done.returncode == 2, (command, done.stderr)
        assert done.stderr.startswith("shyped: error:")
        assert f"metrics.bearer_token_file {tmp_path / 'metrics.token'}: mode {mode:04o}" in (
            done.stderr
        )
        assert "chmod 600" in done.stderr and "Traceback" not in done.stderr


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


@pytest.mark.parametrize(
    "budget",
    [
        pytest.param("", id="connection-caps"),
        # caps above the limit: only the descriptor reserve protects the daemon
        pytest.param(
            "max_connections = 5000\nmax_connections_per_peer = 5000\n", id="descriptor-reserve"
        ),
    ],
)
def test_holding_connections_to_the_metrics_port_cannot_stop_a_veto(
    xenstored: SandboxXenstored, host: Toolstack, tmp_path: Path, outsider: Account, budget: str
) -> None:
    config = write_config(tmp_path, xenstored, budget + auth_keys(tmp_path))
    limit = 256
    daemon = ShypedProcess.start(
        config, tmp_path / "log", prefix=["prlimit", f"--nofile={limit}:{limit}"]
    )
    hog = None
    try:
        daemon.wait_ready()
        port = metrics_port(daemon)
        a = host.create(domcfg("web-a1"))
        wait_until(lambda: f"decision: permit domain {a}" in daemon.text())
        # the outsider may hold 4096 descriptors of its own; it opens 1,300 connections
        hog = subprocess.Popen(
            [
                *("prlimit", "--nofile=4096:4096", *setpriv(outsider), SYSTEM_PYTHON, "-c", HOG),
                *("127.0.0.1", str(port), "1300"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert hog.stdout is not None
        assert hog.stdout.readline().startswith("open ")
        # the attack is in effect: the daemon refuses connections, or it ran out of descriptors
        wait_until(
            lambda: "metrics endpoint: " in daemon.text() or open_fds(daemon.proc.pid) >= limit - 8,
            what="the connection flood to reach the daemon",
        )
        if not budget:  # the outsider's uid is at its cap: another uid's scrape still works
            assert f"uid {outsider.uid} holds 8" in daemon.text()
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            with urllib.request.urlopen(req, timeout=20) as resp:
                assert resp.status == 200 and b"shyped_metrics_http_refused" in resp.read()
        b = host.create(domcfg("web-b1"))  # web-a1's Chinese Wall rival: must be destroyed
        wait_until(
            lambda: all(d.domid != b for d in host.list_domains()),
            timeout=60,
            what=f"the veto to destroy web-b1 ({b})",
        )
        status = subprocess.run(
            [sys.executable, "-m", "shyped.cli.shypectl", "--socket", str(
                xenstored.socket_path.parent / "control.sock"), "--json", "status"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["mode"] == "enforcing"
        assert hog.poll() is None  # the attacker was still at it all along
        text = daemon.text()
        assert f"decision: deny domain {b}" in text
        assert "Too many open files" not in text
    finally:
        if hog is not None:
            assert hog.stdin is not None
            hog.stdin.close()
            hog.wait(timeout=30)
        assert daemon.stop() == 0


def test_the_owner_of_a_loopback_client_socket_is_its_uid(outsider: Account) -> None:
    uids = PeerUids()
    if not uids.available:
        pytest.skip("no NETLINK_SOCK_DIAG here")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = subprocess.Popen(
            [*setpriv(outsider), SYSTEM_PYTHON, "-c", "import socket, sys; "
             f"s = socket.create_connection(('127.0.0.1', {port})); sys.stdin.read()"],
            stdin=subprocess.PIPE,
        )  # fmt: skip
        try:
            conn, addr = server.accept()
            with conn:
                assert uids.uid(addr, conn.getsockname()) == outsider.uid
                mine = socket.create_connection(("127.0.0.1", port))
                conn2, addr2 = server.accept()
                with mine, conn2:
                    assert uids.uid(addr2, conn2.getsockname()) == os.geteuid()
                # no such connection: no uid
                assert uids.uid(("127.0.0.9", 1), ("127.0.0.1", port)) is None
        finally:
            assert client.stdin is not None
            client.stdin.close()
            client.wait(timeout=30)
    uids.close()
