"""Per-host identities on a real 3-member etcd cluster with authentication on: each host is its
own etcd user with the role `shyped.pool.rbac` makes (the recipe `shypectl pool-roles` prints).
A hostile host A (its own credentials) forging host B's reservation grant, overwriting B's
audit anchor, vetoing with B's policy answer or withdrawing B's proposal is refused by etcd;
the daemons still work (a policy switch and a reservation) under those roles."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import pytest_twisted
from daemon_helpers import eventually
from etcd_helpers import EtcdCluster, running_cluster
from pool_helpers import HOSTS, PREFIX, PoolHost, _hosts
from test_pool_policy import _policy
from twisted.internet import defer, reactor

from shyped.cli.shypectl import run
from shyped.control import backend as b
from shyped.pool import records
from shyped.pool.anchor import AuditAnchor
from shyped.pool.keys import PoolKeys
from shyped.pool.rbac import etcdctl_argv, etcdctl_commands
from shyped.pool.reservation import Grant, Request, State
from shyped.service.etcd import EtcdClient, EtcdError
from shyped.service.etcdtls import EtcdSecurity

UA = "aaaaaaaa-0000-4000-8000-00000000000a"


def _secure(cluster: EtcdCluster, tmp: Path) -> dict[str, Path]:
    """Users and roles from the recipe (each host its own password), then `auth enable`."""
    passwords = {}
    for cmd in (
        ["user", "add", "root:rootpw", "--interactive=false"],
        ["role", "add", "root"],
        ["user", "grant-role", "root", "root"],
    ):
        r = cluster.etcdctl(*cmd)
        assert r.returncode == 0, (cmd, r.stderr)
    for argv in etcdctl_argv(PREFIX, HOSTS):
        if argv[:2] == ["user", "add"]:
            host = argv[2].removeprefix("shyped-")
            passwords[host] = tmp / f"{host}.password"
            passwords[host].write_text(f"pw-{host}\n")
            argv = [*argv[:2], f"{argv[2]}:pw-{host}", "--interactive=false"]
        r = cluster.etcdctl(*argv)
        assert r.returncode == 0, (argv, r.stderr)
    r = cluster.etcdctl("auth", "enable")
    assert r.returncode == 0, r.stderr
    return passwords


def _client(cluster: EtcdCluster, host: str, passwords: dict[str, Path]) -> EtcdClient:
    sec = EtcdSecurity.from_files(user=f"shyped-{host}", password_file=passwords[host])
    return EtcdClient(reactor, cluster.endpoints, 2.0, security=sec)


@pytest.fixture(name="secured")
def secured_fixture(tmp_path: Path) -> Iterator[tuple[EtcdCluster, dict[str, Path]]]:
    with running_cluster(tmp_path) as cluster:
        yield cluster, _secure(cluster, tmp_path)


def test_the_recipe_names_each_hosts_own_ranges() -> None:
    lines = etcdctl_commands("/shyped/pool1", ["xen-07"])
    assert "etcdctl user add shyped-xen-07" in lines
    assert (
        "etcdctl role grant-permission shyped-xen-07 readwrite --prefix=true "
        "/shyped/pool1/grants/xen-07/" in lines
    )
    assert "etcdctl role grant-permission shyped-xen-07 readwrite /shyped/pool1/hosts/xen-07" in (
        lines
    )
    assert not any("readwrite --prefix=true /shyped/pool1/ " in x + " " for x in lines)


def test_shypectl_pool_roles_prints_the_recipe_and_refuses_bad_names() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert run(["pool-roles", "--prefix", "/shyped/pool1", "xen-07", "xen-08"], out, err) == 0
    assert out.getvalue().splitlines() == etcdctl_commands("/shyped/pool1", ["xen-07", "xen-08"])
    out = io.StringIO()
    assert run(["pool-roles", "--json", "--prefix", "/p", "h1"], out, err) == 0
    assert json.loads(out.getvalue())["commands"] == etcdctl_commands("/p", ["h1"])
    for bad in (["--prefix", "/p", "../h"], ["--prefix", "p/", "h1"]):
        out, err = io.StringIO(), io.StringIO()
        assert run(["pool-roles", *bad], out, err) == 2
        assert err.getvalue().startswith("pool-roles: ") and not out.getvalue()


@pytest_twisted.ensureDeferred
async def test_a_host_cannot_write_another_hosts_ranges(
    secured: tuple[EtcdCluster, dict[str, Path]],
) -> None:
    cluster, passwords = secured
    a = _client(cluster, "host-a", passwords)
    bc = _client(cluster, "host-b", passwords)
    ka, kb = PoolKeys(PREFIX, "host-a"), PoolKeys(PREFIX, "host-b")
    rid, pid, log = "1" * 32, "2" * 32, "3" * 32
    anchor = AuditAnchor("host-b", log, 7, "4" * 64, 1.0)
    try:
        # B's own writes: its anchor, a proposal, its membership.
        await bc.put(kb.audit_anchor(log), anchor.to_json())
        await bc.put(kb.proposal(pid), "{}")
        await bc.put(kb.host_state(), "{}")
        # A's own ranges and the pool-wide ones work.
        await a.put(ka.host_state(), "{}")
        await a.put(ka.audit_anchor(log), "{}")
        await a.put(ka.answer(pid, "host-a"), "{}")
        await a.put(ka.request("host-b", rid), "{}")
        await a.put(ka.grant(rid), "{}")
        await a.put(ka.resource("vif-1"), "x")
        await a.put(ka.domain_uuid(UA), "bank-a-web")
        await a.put(ka.policy_current, "{}")
        # A forging B: every write and delete of B's ranges is refused by etcd.
        forged = Grant(rid, State.GRANTED, "forged", "host-b").to_json()
        req = Request(rid, UA, "bank-a-web", "host-b", "host-c", "migrate").to_json()
        veto = records.Answer("host-b", False, ("forged veto",)).to_json()
        attacks = [
            a.put(kb.grant(rid), forged),
            a.put(kb.audit_anchor(log), AuditAnchor("host-b", log, 7, "5" * 64, 2.0).to_json()),
            a.put(kb.answer(pid), veto),
            a.put(kb.host_state(), "{}"),
            a.put(kb.request("host-c", rid), req),
            a.put(kb.resource("vif-1"), "x"),
            a.delete(kb.proposal(pid)),
            a.delete(kb.audit_anchor(log)),
        ]
        for attack in attacks:
            with pytest.raises(EtcdError, match="permission denied"):
                await attack
        kv = await bc.get(kb.audit_anchor(log))
        assert kv is not None and kv.value == anchor.to_json()
        assert await bc.get(kb.proposal(pid)) is not None
        assert await bc.get(kb.grant(rid)) is None
    finally:
        await a.close()
        await bc.close()


@pytest.fixture(name="secured_hosts")
def secured_hosts_fixture(tmp_path: Path) -> Iterator[list[PoolHost]]:
    """Three sandbox hosts (not started), each with its own etcd user, on a secured cluster."""
    with running_cluster(tmp_path) as cluster:
        passwords = _secure(cluster, tmp_path)
        hosts: list[PoolHost] = []
        for listed in _hosts(cluster, [], hosts):
            for h in listed:
                h.pool_config = attrs.evolve(
                    h.pool_config, user=f"shyped-{h.name}", password_file=passwords[h.name]
                )
            yield listed


@pytest_twisted.ensureDeferred
async def test_the_pool_works_with_per_host_users(secured_hosts: list[PoolHost]) -> None:
    """Three daemons, each its own etcd user: a switch commits (answers under each host's
    range, withdrawn by each host) and a reservation is granted."""
    for h in secured_hosts:
        await h.start()
    a, _, c = secured_hosts
    names = {f"{PREFIX}/hosts/{n}" for n in HOSTS}
    await eventually(lambda: names <= set(a.pool.entries), timeout=20)
    result = await a.ctl.policy_load(b.PolicyLoadArgs(b.PolicySource(_policy("1.1"), "pool.toml")))
    assert result.policy.version == "1.1"
    for h in secured_hosts:
        await eventually(lambda h=h: str(h.daemon.loaded.policy.version) == "1.1", timeout=15)
    await eventually(
        lambda: not any("/policy/" in k and "current" not in k for k in a.pool.entries),
        timeout=15,
    )
    got = await defer.maybeDeferred(
        a.ctl.reserve, b.ReserveArgs(UA, "host-c", "migrate", "bank-a-web")
    )
    assert isinstance(got, b.ReserveResult) and got.granted, got
    assert c.ctl.reservations is not None and c.ctl.reservations.granted == 1
