"""A real etcd cluster on loopback for the pool tests (Debian's ``etcd-server`` 3.4).

`EtcdCluster` starts N members (3 by default) on free loopback ports with their data in a
temporary folder, waits until the cluster is healthy, and can kill, stop and restart single
members (the fault tests: one member down keeps quorum; two down lose it). Nothing listens
beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdMember:
    def __init__(self, name: str, client_port: int, peer_port: int, data: Path, log: Path) -> None:
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data = data
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, state: str) -> None:
        self._stderr = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                ETCD,
                "--name", self.name,
                "--data-dir", str(self.data),
                "--listen-client-urls", self.client_url,
                "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url,
                "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", initial_cluster,
                "--initial-cluster-state", state,
                "--initial-cluster-token", "shyped-test",
                # Small timings: a lost leader is replaced in well under a second.
                "--heartbeat-interval", "50",
                "--election-timeout", "500",
            ],
            stdout=self._stderr,
            stderr=self._stderr,
        )  # fmt: skip

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


class EtcdCluster:
    """N etcd members on loopback; `endpoints` are their client URLs."""

    def __init__(self, tmp: Path, size: int = 3) -> None:
        ports = free_ports(2 * size)
        self.members = [
            EtcdMember(
                f"m{i + 1}",
                ports[2 * i],
                ports[2 * i + 1],
                tmp / f"m{i + 1}.etcd",
                tmp / f"m{i + 1}.log",
            )
            for i in range(size)
        ]
        self.initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self) -> None:
        for m in self.members:
            m.start(self.initial, "new")
        self.wait_healthy()

    def restart(self, member: EtcdMember) -> None:
        member.start(self.initial, "existing")

    def stop(self) -> None:
        for m in self.members:
            m.stop()

    def post(self, endpoint: str, path: str, body: dict[str, Any], timeout: float = 2.0) -> Any:
        req = urllib.request.Request(
            endpoint + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())

    def healthy(self, endpoint: str) -> bool:
        try:
            with urllib.request.urlopen(endpoint + "/health", timeout=1) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        live = [m for m in self.members if m.running]
        while not all(self.healthy(m.client_url) for m in live):
            for m in live:
                if m.proc is not None and m.proc.poll() is not None:
                    raise AssertionError(f"etcd {m.name} exited: {m.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("etcd cluster not healthy in time")
            time.sleep(0.1)

    def etcdctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ETCDCTL, "--endpoints", ",".join(self.endpoints), *args],
            capture_output=True, text=True, timeout=30, env={"ETCDCTL_API": "3"},
        )  # fmt: skip


@contextlib.contextmanager
def running_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A healthy 3-member etcd cluster on loopback, stopped at the end."""
    if not Path(ETCD).exists():
        pytest.fail("etcd is not installed (scripts/install-deps.sh installs etcd-server)")
    d = tmp_path / "etcd"
    d.mkdir()
    cluster = EtcdCluster(d)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(name="etcd_cluster")
def etcd_cluster_fixture(tmp_path: Path) -> Iterator[EtcdCluster]:
    """Fixture: `running_cluster` for one test."""
    with running_cluster(tmp_path) as cluster:
        yield cluster
