"""A pool for the tests: a real 3-member etcd cluster on loopback (`etcd_helpers`) and three
sandbox hosts (three oxenstoreds, three in-process daemons in pool mode on one prefix)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from daemon_helpers import HOSTING, Harness
from etcd_helpers import EtcdCluster, running_cluster
from twisted.internet import defer

from shyped.control.daemon_backend import DaemonControlBackend
from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir
from shyped.service.daemon import Daemon
from shyped.service.poolconfig import PoolConfig
from shyped.service.poolstore import PoolStore, attach_pool, start_with_pool, stop_with_pool

PREFIX = "/shyped/test-pool"
HOSTS = ("host-a", "host-b", "host-c")


class PoolHost:
    """One host of the pool: its sandbox (`harness`) and its daemon's pool settings."""

    def __init__(self, name: str, xsd: SandboxXenstored, cluster: EtcdCluster) -> None:
        self.name = name
        self.xsd = xsd
        self.harness = Harness.boot(xsd)
        self.cluster = cluster
        self.labels = xsd.instance_dir / "labels.json"
        self.labels.write_text('{"version": 1}\n')
        self.backend: DaemonControlBackend | None = None
        self.pool_config = PoolConfig(
            enabled=True,
            endpoints=tuple(cluster.endpoints),
            prefix=PREFIX,
            host=name,
            cache=xsd.instance_dir / "pool-cache.json",
            lease_ttl=2,
            timeout=1.0,
        )

    async def start(self) -> Daemon:
        """Start the daemon in pool mode with a private copy of the example policy (a pool
        switch rewrites it) and its control backend (which answers pool proposals)."""
        policy = self.xsd.instance_dir / "policy.toml"
        if not policy.exists():
            shutil.copy(HOSTING, policy)
        config = self.harness.config(labels=self.labels, policy=policy)
        config = type(config)(**{**_fields(config), "pool": self.pool_config})

        async def starter(daemon: Daemon) -> None:
            attach_pool(daemon)
            self.backend = DaemonControlBackend(daemon)
            await start_with_pool(daemon)

        return await self.harness.start(config, starter=starter)

    @property
    def daemon(self) -> Daemon:
        assert self.harness.daemon is not None
        return self.harness.daemon

    @property
    def pool(self) -> PoolStore:
        assert self.daemon.pool is not None
        return self.daemon.pool

    async def stop(self) -> None:
        h = self.harness
        if h.daemon is not None:
            await h.daemon.settled()
            await stop_with_pool(h.daemon)
            h.daemon = None

    @property
    def ctl(self) -> DaemonControlBackend:
        assert self.backend is not None
        return self.backend

    def label(self, uuid: str) -> str | None:
        return self.daemon.engine.labels.domain_label(uuid, None)


def _fields(obj: Any) -> dict[str, Any]:
    import attrs

    return {f.name: getattr(obj, f.name) for f in attrs.fields(type(obj))}


@pytest.fixture(name="pool_hosts")
def pool_hosts_fixture(tmp_path: Path) -> Iterator[list[PoolHost]]:
    """Three sandbox hosts on one 3-member etcd cluster (daemons not started:
    ``await h.start()``)."""
    xsds = []
    hosts: list[PoolHost] = []
    with running_cluster(tmp_path) as cluster:
        yield from _hosts(cluster, xsds, hosts)


def _hosts(
    etcd_cluster: EtcdCluster, xsds: list[SandboxXenstored], hosts: list[PoolHost]
) -> Iterator[list[PoolHost]]:
    try:
        for name in HOSTS:
            xsd = SandboxXenstored(short_instance_dir())
            xsd.start()
            xsds.append(xsd)
            hosts.append(PoolHost(name, xsd, etcd_cluster))
        yield hosts
    finally:
        for h in hosts:
            pytest_twisted.blockon(defer.ensureDeferred(h.stop()))
        for xsd in xsds:
            xsd.stop()
            shutil.rmtree(xsd.instance_dir, ignore_errors=True)


def host_entry(cluster: EtcdCluster, host: str) -> dict[str, Any] | None:
    """The host's published membership entry, read straight from etcd (None: expired)."""
    import base64

    key = base64.b64encode(f"{PREFIX}/hosts/{host}".encode()).decode()
    for endpoint in cluster.endpoints:
        try:
            doc = cluster.post(endpoint, "/v3/kv/range", {"key": key})
        except OSError:
            continue
        kvs = doc.get("kvs") or []
        return json.loads(base64.b64decode(kvs[0]["value"])) if kvs else None
    raise AssertionError("no etcd member answered")


def cache_of(host: PoolHost) -> dict[str, Any]:
    return json.loads(Path(host.pool_config.cache).read_text())
