"""The etcd client over TLS (client certificates) and with etcd's authentication on, against
a real etcd member on loopback with a test CA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from daemon_helpers import eventually
from etcd_helpers import EtcdCluster, TlsFiles
from twisted.internet import reactor

from shyped.service.config import ConfigError, parse_config
from shyped.service.etcd import EtcdClient, EtcdError, EtcdUnavailable
from shyped.service.etcdtls import EtcdSecurity


@contextlib.contextmanager
def _cluster(tmp: Path, tls: TlsFiles) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp, size=1, tls=tls)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def mtls(tmp_path: Path) -> Iterator[tuple[EtcdCluster, TlsFiles]]:
    tls = TlsFiles(tmp_path)
    with _cluster(tmp_path, tls) as cluster:
        yield cluster, tls


@pytest_twisted.ensureDeferred
async def test_client_certificates_are_required_and_used(
    mtls: tuple[EtcdCluster, TlsFiles],
) -> None:
    cluster, tls = mtls
    good = EtcdClient(
        reactor,
        cluster.endpoints,
        2.0,
        security=EtcdSecurity.from_files(tls.ca, tls.client_cert, tls.client_key),
    )
    await good.put("/t/a", "1")
    kv = await good.get("/t/a")
    assert kv is not None and kv.value == "1"
    no_cert = EtcdClient(reactor, cluster.endpoints, 2.0, security=EtcdSecurity.from_files(tls.ca))
    with pytest.raises(EtcdUnavailable):
        await no_cert.get("/t/a")
    (tls.ca.parent / "other").mkdir()
    other_ca = TlsFiles(tls.ca.parent / "other")
    wrong_ca = EtcdClient(
        reactor,
        cluster.endpoints,
        2.0,
        security=EtcdSecurity.from_files(other_ca.ca, tls.client_cert, tls.client_key),
    )
    with pytest.raises(EtcdUnavailable):  # the server's certificate does not verify
        await wrong_ca.get("/t/a")
    for c in (good, no_cert, wrong_ca):
        await c.close()


@pytest_twisted.ensureDeferred
async def test_etcd_authentication_with_a_user_and_password(tmp_path: Path) -> None:
    tls = TlsFiles(tmp_path, client_auth=False)
    with _cluster(tmp_path, tls) as cluster:
        for cmd in (
            ["user", "add", "root:rootpw", "--interactive=false"],
            ["role", "add", "root"],
            ["user", "grant-role", "root", "root"],
            ["user", "add", "shyped:s3cret", "--interactive=false"],
            ["role", "add", "pool"],
            ["role", "grant-permission", "pool", "readwrite", "--prefix=true", "/shyped/"],
            ["user", "grant-role", "shyped", "pool"],
            ["auth", "enable"],
        ):
            r = cluster.etcdctl(*cmd)
            assert r.returncode == 0, (cmd, r.stderr)
        password = tmp_path / "password"
        password.write_text("s3cret\n")
        sec = EtcdSecurity.from_files(tls.ca, user="shyped", password_file=password)
        client = EtcdClient(reactor, cluster.endpoints, 2.0, security=sec)
        await client.put("/shyped/p/x", "1")
        seen: list[object] = []
        rev = (await client.get("/shyped/p/x")).mod_revision  # type: ignore[union-attr]
        watch = client.watch("/shyped/p/", rev + 1, seen.extend)
        await client.put("/shyped/p/y", "2")
        await eventually(lambda: len(seen) == 1, timeout=10)
        watch.cancel()
        with pytest.raises(EtcdError, match="permission denied"):
            await client.put("/elsewhere", "1")  # RBAC: the role covers the prefix only
        password.write_text("wrong\n")
        bad = EtcdClient(
            reactor,
            cluster.endpoints,
            2.0,
            security=EtcdSecurity.from_files(tls.ca, user="shyped", password_file=password),
        )
        with pytest.raises(EtcdError, match="authentication failed"):
            await bad.get("/shyped/p/x")
        anonymous = EtcdClient(
            reactor, cluster.endpoints, 2.0, security=EtcdSecurity.from_files(tls.ca)
        )
        with pytest.raises(EtcdError, match="user name is empty"):
            await anonymous.get("/shyped/p/x")
        for c in (client, bad, anonymous):
            await c.close()


def test_tls_and_auth_keys_go_together() -> None:
    base = '[policy]\npath = "p.toml"\n[pool]\nhost = "h"\n'
    ok = parse_config(
        base + 'endpoints = ["https://127.0.0.1:2379"]\nca_file = "ca.pem"\n'
        'user = "shyped"\npassword_file = "pw"\n'
    )
    assert ok.pool.ca_file is not None and ok.pool.user == "shyped"
    for bad, what in (
        ('endpoints = ["https://127.0.0.1:2379"]\n', "go with pool.ca_file"),
        ('ca_file = "ca.pem"\n', "go with pool.ca_file"),
        ('cert_file = "c.pem"\n', "go together"),
        ('user = "u"\n', "go together"),
    ):
        with pytest.raises(ConfigError, match=what):
            parse_config(base + bad)
