"""A real etcd cluster on loopback for the pool tests (Debian's ``etcd-server`` 3.4).

`EtcdCluster` starts N members (3 by default) on free loopback ports with their data in a
temporary folder, waits until the cluster is healthy, and can kill, stop and restart single
members (the fault tests: one member down keeps quorum; two down lose it). Nothing listens
beyond 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import shutil
import signal
import socket
import ssl
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


class TlsFiles:
    """A test CA, a server certificate for 127.0.0.1 and a client certificate (cryptography)."""

    def __init__(self, directory: Path, *, client_auth: bool = True) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        self.client_auth = client_auth
        now = datetime.datetime.now(datetime.UTC)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def cert(cn: str, key: Any, issuer: Any, issuer_key: Any, **ext: Any) -> Any:
            b = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(issuer)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
            )
            for value, critical in ext.values():
                b = b.add_extension(value, critical=critical)
            return b.sign(issuer_key, hashes.SHA256())

        def write(path: Path, data: bytes) -> Path:
            path.write_bytes(data)
            return path

        def pem_key(key: Any) -> bytes:
            return key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )

        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = cert(
            "shyped test CA",
            ca_key,
            name("shyped test CA"),
            ca_key,
            bc=(x509.BasicConstraints(ca=True, path_length=None), True),
        )
        server_key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        )
        server = cert("127.0.0.1", server_key, ca.subject, ca_key, san=(san, False))
        client_key = ec.generate_private_key(ec.SECP256R1())
        client = cert("shyped", client_key, ca.subject, ca_key)
        pem = serialization.Encoding.PEM
        self.ca = write(directory / "ca.pem", ca.public_bytes(pem))
        self.server_cert = write(directory / "server.pem", server.public_bytes(pem))
        self.server_key = write(directory / "server-key.pem", pem_key(server_key))
        self.client_cert = write(directory / "client.pem", client.public_bytes(pem))
        self.client_key = write(directory / "client-key.pem", pem_key(client_key))

    def server_args(self) -> list[str]:
        args = ["--cert-file", str(self.server_cert), "--key-file", str(self.server_key)]
        if self.client_auth:
            args += ["--client-cert-auth", "--trusted-ca-file", str(self.ca)]
        return args

    def etcdctl_args(self) -> list[str]:
        return [
            "--cacert",
            str(self.ca),
            "--cert",
            str(self.client_cert),
            "--key",
            str(self.client_key),
        ]


class EtcdMember:
    def __init__(
        self,
        name: str,
        client_port: int,
        peer_port: int,
        data: Path,
        log: Path,
        tls: list[str] | None = None,
    ) -> None:
        self.tls = tls  # extra etcd arguments for client TLS (then the client URL is https)
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.data = data
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    @property
    def client_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    def start(self, initial_cluster: str, state: str) -> None:
        self._stderr = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                ETCD,
                "--name",
                self.name,
                "--data-dir",
                str(self.data),
                "--listen-client-urls",
                self.client_url,
                "--advertise-client-urls",
                self.client_url,
                "--listen-peer-urls",
                self.peer_url,
                "--initial-advertise-peer-urls",
                self.peer_url,
                "--initial-cluster",
                initial_cluster,
                "--initial-cluster-state",
                state,
                "--initial-cluster-token",
                "shyped-test",
                # Small timings: a lost leader is replaced in well under a second.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
                *(self.tls or []),
            ],
            stdout=self._stderr,
            stderr=self._stderr,
        )

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

    def __init__(self, tmp: Path, size: int = 3, tls: TlsFiles | None = None) -> None:
        ports = free_ports(2 * size)
        self.tls = tls
        self.members = [
            EtcdMember(
                f"m{i + 1}",
                ports[2 * i],
                ports[2 * i + 1],
                tmp / f"m{i + 1}.etcd",
                tmp / f"m{i + 1}.log",
                None if tls is None else tls.server_args(),
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
            endpoint + path,
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self._context()) as resp:
            return json.loads(resp.read())

    def _context(self) -> ssl.SSLContext | None:
        if self.tls is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.tls.ca))
        ctx.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        return ctx

    def healthy(self, endpoint: str) -> bool:
        try:
            with urllib.request.urlopen(
                endpoint + "/health", timeout=1, context=self._context()
            ) as resp:
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
        tls = [] if self.tls is None else self.tls.etcdctl_args()
        return subprocess.run(
            [ETCDCTL, "--endpoints", ",".join(self.endpoints), *tls, *args],
            capture_output=True,
            text=True,
            timeout=30,
            env={"ETCDCTL_API": "3"},
        )


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
