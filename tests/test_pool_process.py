"""Pool mode in the real `shyped` process (``[pool]`` in shyped.toml) on a real etcd cluster:
the pool's mutating ops follow the control socket's access rules for real users, and the
off-host audit anchor catches a replaced local log (``shypectl audit verify --pool``)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from control_daemon_helpers import PY, Host, sandbox_host
from etcd_helpers import EtcdCluster, etcd_cluster_fixture  # noqa: F401 (fixture)
from peercred_helpers import Accounts, as_user, code, needs_users, system_accounts
from process_helpers import wait_until

from shyped.pool.anchor import AuditAnchor
from shyped.pool.keys import PoolKeys
from shyped.sandbox.xenstored import SandboxXenstored

PREFIX = "/shyped/proc-pool"


@pytest.fixture
def host(xenstored: SandboxXenstored, etcd_cluster: EtcdCluster) -> Iterator[Host]:
    with sandbox_host(xenstored) as h:
        os.chmod(h.directory, 0o755)
        h.extra = pool_table(h, etcd_cluster)
        yield h


def pool_table(h: Host, cluster: EtcdCluster, *, pool: bool = True) -> str:
    text = f'[audit]\ndirectory = "{h.directory / "audit"}"\n'
    if pool:
        endpoints = ", ".join(f'"{e}"' for e in cluster.endpoints)
        text += (
            f'[pool]\nendpoints = [{endpoints}]\nprefix = "{PREFIX}"\nhost = "proc-1"\n'
            f'cache = "{h.directory / "pool-cache.json"}"\nlease_ttl = 3\n'
        )
    return text


def etcd_keys(cluster: EtcdCluster, prefix: str) -> list[str]:
    out = cluster.etcdctl("get", "--prefix", "--keys-only", prefix)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line.strip()]


def verify(h: Host, *extra: str) -> tuple[int, str]:
    r = h.run([PY, "-m", "shyped.cli.shypectl", "audit", "--dir", str(h.directory / "audit"),
               "verify", *extra])  # fmt: skip
    return r.returncode, r.stdout + r.stderr


@needs_users
def test_pool_writes_follow_the_access_rules_for_real_users(
    host: Host, etcd_cluster: EtcdCluster
) -> None:
    with system_accounts() as acc:
        _check_access(host, etcd_cluster, acc)


def _check_access(h: Host, cluster: EtcdCluster, acc: Accounts) -> None:
    h.extra = f'read_group = "{acc.read_group}"\nadmin_group = "{acc.admin_group}"\n' + h.extra
    h.start()
    policy = h.policy.read_text().replace('version = "1.0"', 'version = "1.1"', 1)
    load = json.dumps({"version": 1, "op": "policy_load", "args": {"source": {"text": policy}}})
    register = json.dumps({"version": 1, "op": "register_domain", "args": {
        "uuid": "9a000000-0000-4000-8000-0000000000c1", "label": "shop"}})  # fmt: skip
    place = json.dumps({"version": 1, "op": "placement", "args": {"label": "shop"}})
    for who in (acc.reader, acc.outsider):
        answers = as_user(who, h.socket, load, register, place)
        assert [code(a) for a in answers[:2]] == ["permission-denied", "permission-denied"]
    reader_place = as_user(acc.reader, h.socket, place)[0]
    assert reader_place["ok"], reader_place
    hosts = {x["host"]: x for x in reader_place["result"]["hosts"]}
    assert hosts["proc-1"]["admitted"]
    # Nothing was proposed or labelled in the pool by the refused requests.
    keys = etcd_keys(cluster, PREFIX)
    assert not [k for k in keys if "/policy/" in k or "/labels/" in k], keys
    # The admin group may: the label lands in etcd.
    admin = as_user(acc.admin, h.socket, register)[0]
    assert admin["ok"], admin
    assert f"{PREFIX}/labels/uuid/9a000000-0000-4000-8000-0000000000c1" in etcd_keys(
        cluster, PREFIX
    )


def test_a_replaced_audit_log_is_caught_by_the_pool_anchor(
    host: Host, etcd_cluster: EtcdCluster
) -> None:
    h = host
    assert etcd_cluster.etcdctl("put", f"{PREFIX}/labels/name/web-a1", "bank-a-web").returncode == 0
    h.start()
    h.xl("create", str(h.cfg("web-a1")))
    wait_until(lambda: h.label_node("web-a1") is not None, what="web-a1 labelled")
    assert h.stop() == 0
    status, text = verify(h, "--pool", "--config", str(h.config))
    assert status == 0 and "POOL ANCHOR OK" in text, text
    assert [k for k in etcd_keys(etcd_cluster, f"{PREFIX}/audit/proc-1/")]
    # Root on this host replaces the log and its state file with a fresh, valid chain.
    shutil.rmtree(h.directory / "audit")
    h.extra = pool_table(h, etcd_cluster, pool=False)
    h.start()
    h.xl("create", str(h.cfg("shop-1")))
    wait_until(lambda: h.label_node("shop-1") is not None, what="shop-1 labelled")
    assert h.stop() == 0
    status, text = verify(h)
    assert status == 0 and "OK" in text, text  # the local chain alone looks intact
    h.extra = pool_table(h, etcd_cluster)
    h.write_config()
    status, text = verify(h, "--pool", "--config", str(h.config))
    assert status == 1 and "POOL ANCHOR BROKEN" in text and "log was replaced" in text, text


def test_verify_pool_without_a_pool_table_says_so(host: Host, tmp_path: Path) -> None:
    host.extra = ""
    host.write_config()
    (host.directory / "audit").mkdir()
    status, text = verify(host, "--pool", "--config", str(host.config))
    assert status == 2 and "no [pool] table" in text
    del tmp_path


def test_verify_pool_takes_no_anchor_naming_another_host(
    host: Host, etcd_cluster: EtcdCluster
) -> None:
    """An anchor filed in this host's range that names another host (copied there by a writer
    of the prefix) is named as such, not checked as this host's head."""
    forged = AuditAnchor("proc-2", "a" * 32, 3, "b" * 64, 1.0)
    key = PoolKeys(PREFIX, "proc-1").audit_anchor(forged.log)
    assert etcd_cluster.etcdctl("put", key, forged.to_json()).returncode == 0
    host.write_config()
    (host.directory / "audit").mkdir()
    status, text = verify(host, "--pool", "--config", str(host.config))
    assert status == 1 and "names host 'proc-2': not this host's" in text, text
