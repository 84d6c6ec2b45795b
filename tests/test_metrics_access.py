"""Who may scrape the metrics endpoint, and what a client may hold (shyped.service.metricsweb): the
``[metrics]`` access keys, the credentials files' ownership and mode, 401 before the
collector runs, TLS, the connection caps, a connection's lifetime and the descriptor reserve."""

from __future__ import annotations

import base64
import os
import re
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import attrs
import bcrypt
import pytest
import pytest_twisted
from daemon_helpers import eventually
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.internet import reactor, threads

from shyped.service.config import ConfigError, MetricsConfig, parse_config
from shyped.service.metricsweb import FdBudget, load_access, read_secret_file, start_metrics_server

PASSWORD = b"correct horse battery staple"
HASH = bcrypt.hashpw(PASSWORD, bcrypt.gensalt(4)).decode()
TOKEN = "9c1e3f0b6a7d4e2f8a5b0c9d1e2f3a4b"


class Probe(Collector):
    """A collector that counts how often it ran."""

    def __init__(self) -> None:
        self.runs = 0

    def collect(self) -> Iterable[Metric]:
        self.runs += 1
        g = GaugeMetricFamily("shyped_probe", "a test series")
        g.add_metric([], 42)
        return [g]


def secret(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    return path


@attrs.frozen
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def get(url: str, headers: dict[str, str] | None = None, context: Any = None) -> Answer:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20, context=context) as resp:
            return Answer(resp.status, dict(resp.headers), resp.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, dict(exc.headers), exc.read())


def basic(user: str, password: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(user.encode() + b":" + password).decode()}


@pytest.fixture
def served() -> Iterator[list[Any]]:
    ports: list[Any] = []
    yield ports
    for p in ports:
        p.stopListening()


def serve(served: list[Any], config: MetricsConfig) -> tuple[Any, Probe, str]:
    registry = CollectorRegistry(auto_describe=False)
    probe = Probe()
    registry.register(probe)
    port = start_metrics_server(reactor, config, registry)
    served.append(port)
    scheme = "https" if config.tls_cert_file else "http"
    return port, probe, f"{scheme}://127.0.0.1:{port.getHost().port}/metrics"


# ---- configuration --------------------------------------------------------------------------

BASE = '[policy]\npath = "p.toml"\n[metrics]\nenabled = true\n'


def test_enabled_metrics_need_access_control_or_an_explicit_opt_out() -> None:
    with pytest.raises(ConfigError, match=r"enabled without access control.*allow_unauthenticated"):
        parse_config(BASE)
    assert parse_config(BASE + "allow_unauthenticated = true\n").metrics.allow_unauthenticated
    cfg = parse_config(BASE + f'[metrics.basic_auth_users]\nprom = "{HASH}"\n').metrics
    assert cfg.basic_auth_users == (("prom", HASH),) and cfg.authenticated
    # off (the default) needs nothing
    assert not parse_config('[policy]\npath = "p.toml"\n').metrics.enabled


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[metrics.basic_auth_users]\nprom = "secret"\n', "must be a bcrypt hash"),
        ('[metrics.basic_auth_users]\n"a:b" = "' + HASH + '"\n', "is not a user name"),
        ('bearer_token_file = ""\n', "must name a file"),
        ('allow_unauthenticated = true\n[metrics.tls_server_config]\ncert_file = "c"\n', "both"),
        ("allow_unauthenticated = true\nmax_connections = 0\n", "max_connections"),
        ("allow_unauthenticated = true\nfd_reserve = 1\n", "fd_reserve"),
        ("allow_unauthenticated = true\nidle_timeout = 0\n", "idle_timeout"),
        ("allow_unauthenticated = true\npassword = 1\n", "unknown key"),
    ],
)
def test_bad_metrics_keys_are_refused(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(BASE + extra)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o602])
def test_a_token_file_others_may_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path / "token", TOKEN, mode)
    with pytest.raises(ConfigError, match=f"mode {mode:04o} lets other users.*chmod 600"):
        read_secret_file(path, "metrics.bearer_token_file")
    os.chmod(path, 0o600)
    assert read_secret_file(path, "metrics.bearer_token_file") == TOKEN.encode()
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError, match="owned by uid 65534; it must be owned by root"):
        read_secret_file(path, "metrics.bearer_token_file")


def test_a_short_token_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    short = secret(tmp_path / "short", "abc\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_access(MetricsConfig(True, bearer_token_file=short))
    with pytest.raises(ConfigError, match="cannot open"):
        load_access(MetricsConfig(True, bearer_token_file=tmp_path / "missing"))


# ---- 401 before the collector ---------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_without_valid_credentials_the_answer_is_401_and_no_series(
    tmp_path: Path, served: list[Any]
) -> None:
    token = secret(tmp_path / "token", TOKEN + "\n")
    config = MetricsConfig(
        True, "127.0.0.1", 0, basic_auth_users=(("prom", HASH),), bearer_token_file=token
    )
    _, probe, url = serve(served, config)
    refused = [
        {},
        basic("prom", b"wrong"),
        basic("nobody", PASSWORD),
        basic("prom", b"x" * 100),  # over bcrypt's 72 bytes
        {"Authorization": "Bearer " + TOKEN[:-1] + "0"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Digest x"},
    ]
    for headers in refused:
        answer = await threads.deferToThread(get, url, headers)
        assert answer.status == 401, headers
        assert b"shyped_probe" not in answer.body
        challenge = answer.headers["WWW-Authenticate"]
        assert "basic" in challenge.lower() and 'realm="shyped"' in challenge
    index = await threads.deferToThread(get, url.removesuffix("metrics"), {})
    assert index.status == 401
    assert probe.runs == 0  # the collector never ran for any of them

    for headers in (basic("prom", PASSWORD), {"Authorization": f"Bearer {TOKEN}"}):
        answer = await threads.deferToThread(get, url, headers)
        assert answer.status == 200 and b"shyped_probe 42.0" in answer.body
    assert probe.runs == 2
    again = await threads.deferToThread(get, url, basic("prom", PASSWORD))  # remembered
    assert again.status == 200


@pytest_twisted.ensureDeferred
async def test_tls_serves_https_with_the_configured_certificate(
    tmp_path: Path, served: list[Any]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def make(cert: Path, key: Path) -> None:
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt"),
                *("ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"),
                *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
            ],
            check=True,
            capture_output=True,
        )

    make(cert, key)
    make(tmp_path / "other.pem", tmp_path / "other.key")
    mismatch = MetricsConfig(
        True, "127.0.0.1", 0, basic_auth_users=(("prom", HASH),), tls_cert_file=cert,
        tls_key_file=tmp_path / "other.key",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="are not a PEM certificate"):
        load_access(mismatch)
    os.chmod(key, 0o644)
    config = MetricsConfig(
        True, "127.0.0.1", 0, basic_auth_users=(("prom", HASH),), tls_cert_file=cert,
        tls_key_file=key,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"key_file .*lets other users"):
        load_access(config)
    os.chmod(key, 0o600)
    _, probe, url = serve(served, config)
    assert url.startswith("https://")
    ctx = ssl.create_default_context(cafile=str(cert))
    ok = await threads.deferToThread(get, url, basic("prom", PASSWORD), ctx)
    assert ok.status == 200 and b"shyped_probe" in ok.body
    denied = await threads.deferToThread(get, url, {}, ctx)
    assert denied.status == 401 and probe.runs == 1
    # the budgets wrap the TLS layer: a refused client is closed before any handshake
    port = served[-1]
    port.factory.max_per_peer = 0
    refused = await threads.deferToThread(connect, "127.0.0.1", port.getHost().port)
    assert await threads.deferToThread(closed_at_once, refused)
    assert port.factory.refused["peer"] == 1
    refused.close()
    port.factory.max_per_peer = 8
    plain = url.replace("https", "http")
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        await threads.deferToThread(get, plain, basic("prom", PASSWORD))


# ---- connection budgets ---------------------------------------------------------------------


def connect(host: str, port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.settimeout(20)
    s.bind((source, 0))
    s.connect((host, port))
    return s


def closed_at_once(s: socket.socket) -> bool:
    """True when the server closed the connection (EOF or reset) before any request."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def scrape_on(s: socket.socket) -> bytes:
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


@pytest_twisted.ensureDeferred
async def test_connections_past_the_total_or_per_peer_cap_are_closed_at_once(
    served: list[Any],
) -> None:
    config = MetricsConfig(
        True, "127.0.0.1", 0, allow_unauthenticated=True, max_connections=3,
        max_connections_per_peer=2,
    )  # fmt: skip
    port, _, _ = serve(served, config)
    factory = port.factory
    n = port.getHost().port
    # the peer is the uid owning the client socket, so another loopback source address does
    # not count as another peer
    peer = "uid 0" if factory.uids.available else "127.0.0.1"
    sources = ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
    if not factory.uids.available:
        sources = ("127.0.0.1",) * 4

    def run() -> tuple[list[bytes], bool, bool]:
        held = [connect("127.0.0.1", n, sources[0]), connect("127.0.0.1", n, sources[1])]
        over_peer = connect("127.0.0.1", n, sources[2])
        peer_closed = closed_at_once(over_peer)
        peers.update(dict(factory.per_peer))
        factory.max_per_peer = 10  # (from this thread: a plain attribute, read on accept)
        held.append(connect("127.0.0.1", n, sources[2]))
        over_total = connect("127.0.0.1", n, sources[3])
        total_closed = closed_at_once(over_total)
        answers = [scrape_on(s) for s in held]
        for s in [*held, over_peer, over_total]:
            s.close()
        return answers, peer_closed, total_closed

    peers: dict[str, int] = {}
    answers, peer_closed, total_closed = await threads.deferToThread(run)
    assert peers == {peer: 2}
    assert peer_closed and total_closed
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    assert factory.refused["peer"] == 1 and factory.refused["total"] == 1
    await eventually(lambda: not factory.protocols and not factory.per_peer)
    # freed slots are usable again
    again = await threads.deferToThread(lambda: scrape_on(connect("127.0.0.1", n)))
    assert again.startswith(b"HTTP/1.1 200")


@pytest_twisted.ensureDeferred
async def test_a_slow_client_is_cut_after_the_connection_lifetime(served: list[Any]) -> None:
    config = MetricsConfig(
        True, "127.0.0.1", 0, allow_unauthenticated=True, idle_timeout=60,
        connection_timeout=0.5,
    )  # fmt: skip
    port, probe, _ = serve(served, config)
    n = port.getHost().port

    def slowloris() -> int:
        s = connect("127.0.0.1", n)
        sent = 0
        try:
            for c in b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-a: b\r\n" * 10_000:
                s.sendall(bytes([c]))  # a byte at a time: the idle timeout never fires
                sent += 1
                s.settimeout(0.05)
                try:
                    if s.recv(1) == b"":
                        return sent
                except TimeoutError:
                    pass
        except (ConnectionResetError, BrokenPipeError):
            return sent
        finally:
            s.close()
        return -1

    sent = await threads.deferToThread(slowloris)
    assert sent > 0  # cut before the request was complete
    assert port.factory.refused["lifetime"] == 1 and probe.runs == 0


@pytest_twisted.ensureDeferred
async def test_the_endpoint_stops_accepting_within_the_descriptor_reserve(
    served: list[Any],
) -> None:
    config = MetricsConfig(True, "127.0.0.1", 0, allow_unauthenticated=True)
    port, _, _ = serve(served, config)
    fds = {"open": 10}
    factory = port.factory
    factory.budget = FdBudget(100, limit=lambda: 1000, count=lambda: fds["open"], interval=0)
    n = port.getHost().port

    ok = await threads.deferToThread(lambda: scrape_on(connect("127.0.0.1", n)))
    assert ok.startswith(b"HTTP/1.1 200")
    fds["open"] = 900  # the daemon is within 100 of its limit of 1000
    first = await threads.deferToThread(connect, "127.0.0.1", n)
    assert await threads.deferToThread(closed_at_once, first)
    assert factory.paused and factory.refused["descriptors"] == 1
    # while paused the kernel queues connections, the endpoint accepts none
    waiting = await threads.deferToThread(connect, "127.0.0.1", n)
    waiting.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert factory.refused["descriptors"] == 1 and not factory.protocols
    fds["open"] = 50
    await eventually(lambda: not factory.paused)

    def rest(s: socket.socket) -> bytes:
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out

    answer = await threads.deferToThread(rest, waiting)
    assert answer.startswith(b"HTTP/1.1 200")
    first.close()
    waiting.close()


def test_the_descriptor_estimate_counts_accepts_between_measurements() -> None:
    fds = {"open": 10, "reads": 0}
    now = {"t": 0.0}

    def count() -> int:
        fds["reads"] += 1
        return fds["open"]

    budget = FdBudget(10, limit=lambda: 30, count=count, clock=lambda: now["t"], interval=1.0)
    assert not budget.exhausted(accepting=1) and fds["reads"] == 1
    for _ in range(8):  # 10 measured + up to 9 accepted: below 20, no new count
        assert not budget.exhausted(accepting=1)
    assert fds["reads"] == 1
    fds["open"] = 11
    assert not budget.exhausted(accepting=1)  # the estimate reached 20: counted again (11+1)
    assert fds["reads"] == 2
    fds["open"] = 19
    now["t"] = 5.0  # the interval passed: counted again
    assert budget.exhausted(accepting=1) and fds["reads"] == 3


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    code = (
        "import resource; from shyped.service.metricsweb import raise_nofile_limit; "
        "print(raise_nofile_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    out = subprocess.run(
        ["prlimit", "--nofile=200:300", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "(300, 300) (300, 300)"


def test_the_unit_sets_one_descriptor_limit_above_what_the_daemon_may_hold() -> None:
    from process_helpers import ROOT

    from shyped.control.server import ServerLimits

    text = (ROOT / "systemd" / "shyped.service").read_text()
    values = re.findall(r"^LimitNOFILE=(\S+)$", text, re.MULTILINE)
    # soft = hard: the unit's SystemCallFilter denies setrlimit, so no lower soft limit
    assert len(values) == 1 and values[0].isdigit(), values
    limit, metrics, control = int(values[0]), MetricsConfig(), ServerLimits()
    assert limit > 1024  # the default soft limit the attack exhausted
    assert limit - metrics.fd_reserve > metrics.max_connections + control.max_descriptors
