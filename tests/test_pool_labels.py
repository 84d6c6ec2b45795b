"""Pool mode on a real 3-member etcd cluster and three sandbox hosts: labels set on one host
are enforced on another (watch), the untrusted entries are bounded, membership lives under a
lease, and a host keeps enforcing from its cache when etcd is gone."""

from __future__ import annotations

import base64
import json
import signal

import pytest
import pytest_twisted
from daemon_helpers import domcfg, eventually
from etcd_helpers import EtcdCluster, etcd_cluster_fixture  # noqa: F401 (fixture)
from pool_helpers import PREFIX, PoolHost, cache_of, host_entry, pool_hosts_fixture  # noqa: F401
from twisted.internet import reactor

from shyped.control import backend as b
from shyped.control.protocol import ControlError, ErrorCode
from shyped.service.etcd import EtcdClient, EtcdUnavailable
from shyped.service.poolmetrics import PoolCollector

U1 = "9a000000-0000-4000-8000-0000000000b1"
U2 = "9a000000-0000-4000-8000-0000000000b2"
U3 = "9a000000-0000-4000-8000-0000000000b3"


def _connected(host: PoolHost) -> float:
    """``shyped_pool_connected`` as the metrics endpoint would export it."""
    for family in PoolCollector(host.pool).collect():
        if family.name == "shyped_pool_connected":
            return float(family.samples[0].value)
    raise AssertionError("no shyped_pool_connected")


def _put(cluster: EtcdCluster, key: str, value: str) -> None:
    enc = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    cluster.post(cluster.endpoints[0], "/v3/kv/put", {"key": enc(key), "value": enc(value)})


@pytest_twisted.ensureDeferred
async def test_etcd_client_reads_writes_and_watches_across_members(
    etcd_cluster: EtcdCluster,
) -> None:
    a = EtcdClient(reactor, etcd_cluster.endpoints[:1])
    c = EtcdClient(reactor, etcd_cluster.endpoints[2:])
    seen: list[tuple[str, str, str]] = []
    rev = await a.put("/t/x", "1")
    watch = c.watch("/t/", rev + 1, lambda evs: seen.extend((e.kind, e.key, e.value) for e in evs))
    await a.put("/t/y", "2")
    await a.delete("/t/x")
    await eventually(lambda: len(seen) == 2, timeout=10)
    assert seen == [("put", "/t/y", "2"), ("delete", "/t/x", "")]
    revision, kvs = await c.range_prefix("/t/")
    assert revision >= rev + 2 and [(kv.key, kv.value) for kv in kvs] == [("/t/y", "2")]
    current = await c.get("/t/y")
    assert current is not None
    assert not await a.put_if_version("/t/y", "3", current.mod_revision - 1)
    assert await a.put_if_version("/t/y", "3", current.mod_revision)
    watch.cancel()
    await a.close()
    await c.close()


@pytest_twisted.ensureDeferred
async def test_label_set_on_host_a_is_enforced_on_host_b(pool_hosts: list[PoolHost]) -> None:
    a, bh, _ = pool_hosts
    await a.start()
    await bh.start()
    assert a.pool.state == bh.pool.state == "connected"
    # Without the pool entry, host B refuses the unlisted domain (no label).
    backend = a.ctl
    result = backend.register_domain(b.RegisterDomainArgs(uuid=U1, label="bank-b-web"))
    assert not hasattr(result, "addCallback")
    await eventually(lambda: bh.label(U1) == "bank-b-web", timeout=10)
    domid = await bh.harness.call(bh.harness.ts.create, domcfg("unlisted-1", uuid=U1))
    await bh.harness.settle()
    out = bh.harness.last(f"domain {domid}")
    assert out.allowed and out.label == "bank-b-web"
    # B's cache holds the entry, under the pool's revision.
    assert cache_of(bh)["entries"][f"{PREFIX}/labels/uuid/{U1}"] == "bank-b-web"


@pytest_twisted.ensureDeferred
async def test_pool_entries_cannot_make_a_host_admit_what_its_policy_forbids(
    pool_hosts: list[PoolHost],
) -> None:
    """Hostile or wrong entries: a label unknown to the policy is denied, a malformed entry is
    refused and named while the rest applies, and a pool label does not lift B's Chinese Wall."""
    _, bh, _ = pool_hosts
    await bh.start()
    cluster = bh.cluster
    _put(cluster, f"{PREFIX}/labels/uuid/not-a-uuid", "bank-a-web")
    _put(cluster, f"{PREFIX}/labels/uuid/{U1}", "no-such-label")
    _put(cluster, f"{PREFIX}/labels/uuid/{U2}", "bank-b-web")
    _put(cluster, f"{PREFIX}/labels/uuid/{U3}", "bank-a-web")
    await eventually(lambda: bh.label(U3) == "bank-a-web", timeout=10)
    assert bh.pool.status()["refused_entries"] == 1
    assert bh.label(U1) == "no-such-label"  # named, but this host's policy has no such label
    h = bh.harness
    d1 = await h.call(h.ts.create, domcfg("hostile-1", uuid=U1))
    d2 = await h.call(h.ts.create, domcfg("rival-b", uuid=U2))
    d3 = await h.call(h.ts.create, domcfg("rival-a", uuid=U3))
    await h.settle()
    assert not h.last(f"domain {d1}").allowed
    assert h.last(f"domain {d2}").allowed
    out = h.last(f"domain {d3}")
    assert not out.allowed and "conflicts with running type" in out.decision.reason


@pytest_twisted.ensureDeferred
async def test_membership_expires_with_the_lease_of_a_dead_host(pool_hosts: list[PoolHost]) -> None:
    a, bh, _ = pool_hosts
    await a.start()
    await bh.start()
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U2}", "bank-b-web")
    await eventually(lambda: bh.label(U2) == "bank-b-web", timeout=10)
    h = bh.harness
    await h.call(h.ts.create, domcfg("web-b1", uuid=U2))
    await h.settle()
    await eventually(
        lambda: (
            (host_entry(bh.cluster, "host-b") or {}).get("running_labels", {}).get("bank-b-web")
            == 1
        ),  # dom0's label counts too, as every running domain's (ACM)
        timeout=10,
    )
    entry = host_entry(bh.cluster, "host-b")
    assert entry is not None and entry["blocked_types"].get("bank-a") == 1
    # The daemon dies without a word (its heartbeat stops, its lease is not revoked).
    bh.pool._heartbeat.stop()
    bh.pool.lease = 0
    await eventually(lambda: host_entry(bh.cluster, "host-b") is None, timeout=15)
    assert host_entry(a.cluster, "host-a") is not None
    # Placement no longer offers the dead host.
    await eventually(lambda: f"{PREFIX}/hosts/host-b" not in a.pool.entries, timeout=10)
    placed = a.ctl.placement(b.PlacementArgs("bank-a-web"))
    assert [h.host for h in placed.hosts] == ["host-a"]


@pytest_twisted.ensureDeferred
async def test_member_loss_then_quorum_loss_then_recovery(pool_hosts: list[PoolHost]) -> None:
    """One etcd member killed: everything works. Two: no quorum; every host keeps enforcing
    from its state, pool writes are refused clearly; all recovers when quorum returns."""
    a, bh, _ = pool_hosts
    cluster = a.cluster
    await a.start()
    await bh.start()
    cluster.members[0].stop(signal.SIGKILL)
    a.ctl.register_domain(b.RegisterDomainArgs(uuid=U1, label="bank-b-web"))
    await eventually(lambda: bh.label(U1) == "bank-b-web", timeout=20)
    assert a.pool.state == bh.pool.state == "connected"
    cluster.members[1].stop(signal.SIGKILL)
    await eventually(lambda: a.pool.state == bh.pool.state == "cached", timeout=30)
    assert _connected(a) == 0.0 and a.daemon.status().pool["error"]
    try:
        a.ctl.register_domain(b.RegisterDomainArgs(uuid=U2, label="bank-b-web"))
    except ControlError as exc:
        assert exc.code is ErrorCode.UNAVAILABLE and "until etcd has quorum" in exc.message
    else:
        raise AssertionError("a pool write without quorum was accepted")
    h = bh.harness
    domid = await h.call(h.ts.create, domcfg("noquorum-1", uuid=U1))
    await h.settle()
    assert h.last(f"domain {domid}").allowed  # enforcing with the last known labels
    rival = await h.call(h.ts.create, domcfg("noquorum-2", uuid=U3))
    await h.settle()
    assert not h.last(f"domain {rival}").allowed  # no label: still denied
    for m in cluster.members[:2]:
        cluster.restart(m)
    cluster.wait_healthy()
    await eventually(lambda: a.pool.state == bh.pool.state == "connected", timeout=60)
    assert _connected(a) == 1.0
    a.ctl.register_domain(b.RegisterDomainArgs(uuid=U2, label="bank-b-web"))
    await eventually(lambda: bh.label(U2) == "bank-b-web", timeout=20)


@pytest_twisted.ensureDeferred
async def test_without_etcd_a_host_starts_from_its_cache_and_refuses_pool_writes(
    pool_hosts: list[PoolHost],
) -> None:
    a, bh, _ = pool_hosts
    await bh.start()
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U2}", "bank-b-web")
    await eventually(lambda: bh.label(U2) == "bank-b-web", timeout=10)
    await bh.stop()
    bh.cluster.stop()
    await bh.start()
    status = bh.daemon.status().pool
    assert status is not None and status["state"] == "cached" and status["error"]
    assert bh.label(U2) == "bank-b-web"
    h = bh.harness
    domid = await h.call(h.ts.create, domcfg("cached-1", uuid=U2))
    await h.settle()
    assert h.last(f"domain {domid}").allowed
    backend = bh.ctl
    try:
        backend.register_domain(b.RegisterDomainArgs(uuid=U3, label="bank-b-web"))
    except ControlError as exc:
        assert exc.code is ErrorCode.UNAVAILABLE and "pool writes are refused" in exc.message
    else:
        raise AssertionError("a pool write without etcd was accepted")
    assert bh.label(U3) is None
    # etcd comes back: the host reconnects by itself and writes are accepted again.
    for m in bh.cluster.members:
        bh.cluster.restart(m)
    bh.cluster.wait_healthy()
    await eventually(lambda: bh.pool.state == "connected", timeout=30)
    backend.register_domain(b.RegisterDomainArgs(uuid=U3, label="bank-b-web"))
    await eventually(lambda: bh.label(U3) == "bank-b-web", timeout=10)
    del a


@pytest_twisted.ensureDeferred
async def test_a_stalled_watch_is_found_and_replaced(pool_hosts: list[PoolHost]) -> None:
    """A watch stream that stops delivering (here: dropped without a word) is found by the
    heartbeat's check of the newest revision under the prefix, and replaced."""
    _, bh, _ = pool_hosts
    await bh.start()
    watch = bh.pool._watch
    assert watch is not None
    watch.cancel()  # silently: the store still believes it is watching
    assert bh.pool.state == "connected"
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U3}", "bank-b-web")
    await eventually(lambda: bh.label(U3) == "bank-b-web", timeout=20)
    assert bh.pool.watch_restarts == 1


@pytest_twisted.ensureDeferred
async def test_a_label_write_etcd_did_not_take_is_retried_not_lost(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails after the host said yes (a leader election, a member gone) stays
    queued and reaches the other hosts once etcd takes it."""
    a, bh, _ = pool_hosts
    await a.start()
    await bh.start()
    real_put = a.pool.client.put
    failures = {"left": 3}

    async def flaky_put(key: str, value: str, lease: int = 0) -> int:
        if key.startswith(a.pool.keys.labels) and failures["left"]:
            failures["left"] -= 1
            raise EtcdUnavailable("no etcd endpoint answered (test)")
        return await real_put(key, value, lease)

    monkeypatch.setattr(a.pool.client, "put", flaky_put)
    a.ctl.register_domain(b.RegisterDomainArgs(uuid=U1, label="bank-b-web"))
    assert a.label(U1) == "bank-b-web"  # in force here at once
    assert a.daemon.status().pool["unpublished"] == 1
    await eventually(lambda: bh.label(U1) == "bank-b-web", timeout=20)
    # host-b may see the value before host-a's put returns and leaves the queue
    await eventually(lambda: a.daemon.status().pool["unpublished"] == 0, timeout=10)
    assert failures["left"] == 0


@pytest_twisted.ensureDeferred
async def test_a_pool_label_write_does_not_undo_this_hosts_dom0_relabel(
    pool_hosts: list[PoolHost],
) -> None:
    """dom0's label is this host's (no pool key stands for it): a hostile member writing any
    label entry (a snapshot or a watch event this host applies) must not put dom0 back on the
    bootstrap label, nor lift the Chinese Wall dom0's label now imposes; neither may a restart
    from etcd or from the cache."""
    _, bh, _ = pool_hosts
    await bh.start()
    h = bh.harness
    await bh.ctl.relabel_domain(b.RelabelDomainArgs(domain="0", label="bank-a-web"))
    assert bh.daemon.engine.dom0_label() == "bank-a-web"
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U1}", "bank-b-web")  # the hostile member's write
    await eventually(lambda: bh.label(U1) == "bank-b-web", timeout=10)
    assert bh.daemon.engine.dom0_label() == "bank-a-web"
    d1 = await h.call(h.ts.create, domcfg("rival-b", uuid=U1))
    await h.settle()
    out = h.last(f"domain {d1}")
    assert not out.allowed and "conflicts with running type" in out.decision.reason
    await bh.stop()
    await bh.start()  # from etcd's snapshot (and the cache) again
    assert bh.daemon.engine.dom0_label() == "bank-a-web"


@pytest_twisted.ensureDeferred
async def test_junk_under_the_prefix_cannot_cut_a_host_off_the_pool(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile member fills the prefix with large values of no kind the pool uses (the
    answer bound is lowered so that a few MiB play the 64 MiB of a real attack): a host that
    (re)connects still reads the pool (in pages), sees the labels, and keeps neither the junk
    in memory nor in its cache."""
    import shyped.service.etcd as etcd_mod

    monkeypatch.setattr(etcd_mod, "MAX_RESPONSE", 1 << 20)
    _, bh, _ = pool_hosts
    for n in range(4):
        _put(bh.cluster, f"{PREFIX}/junk/{n:03d}", "x" * (400 * 1024))
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U1}", "y" * (400 * 1024))  # not a label: refused
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U2}", "bank-b-web")
    await bh.start()
    assert bh.pool.state == "connected", bh.pool.error
    assert bh.label(U2) == "bank-b-web" and bh.label(U1) is None
    cached = cache_of(bh)["entries"]
    assert f"{PREFIX}/labels/uuid/{U2}" in cached
    assert not any(k.startswith(f"{PREFIX}/junk/") for k in cached)
    assert f"{PREFIX}/labels/uuid/{U1}" not in cached
    # junk written while it watches is not kept either
    _put(bh.cluster, f"{PREFIX}/junk/late", "x" * (400 * 1024))
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U3}", "bank-a-web")
    await eventually(lambda: bh.label(U3) == "bank-a-web", timeout=10)
    assert not any(k.startswith(f"{PREFIX}/junk/") for k in bh.pool.entries)


@pytest_twisted.ensureDeferred
async def test_a_value_that_is_not_utf8_cannot_cut_a_host_off_the_pool(
    pool_hosts: list[PoolHost],
) -> None:
    """One key whose value is not UTF-8 (etcd stores bytes): the host still reads the pool
    at start and keeps watching it (the entry itself is unusable, so refused or ignored)."""
    _, bh, _ = pool_hosts
    cluster = bh.cluster

    def put_raw(key: str, value: bytes) -> None:
        enc = base64.b64encode
        body = {"key": enc(key.encode()).decode(), "value": enc(value).decode()}
        cluster.post(cluster.endpoints[0], "/v3/kv/put", body)

    put_raw(f"{PREFIX}/labels/uuid/{U1}", b"bank-b-web\xff")
    _put(cluster, f"{PREFIX}/labels/uuid/{U2}", "bank-b-web")
    await bh.start()
    assert bh.pool.state == "connected", bh.pool.error
    assert bh.label(U2) == "bank-b-web" and bh.label(U1) is None
    put_raw(f"{PREFIX}/hosts/host-x", b"\xc3\x28")  # while it watches
    _put(cluster, f"{PREFIX}/labels/uuid/{U3}", "bank-a-web")
    await eventually(lambda: bh.label(U3) == "bank-a-web", timeout=10)
    assert bh.pool.state == "connected", bh.pool.error


@pytest_twisted.ensureDeferred
async def test_a_pool_bigger_than_its_bound_is_refused_whole_not_held(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hostile member files many large entries of a kind the pool keeps (proposals, each
    within its own bound): past the bound on what a host holds (lowered here so that a few
    hundred KiB play the many MiB), the change is refused whole, the last good state stays
    enforced, and memory and the cache do not grow with it."""
    from shyped.service import poolstore

    monkeypatch.setattr(poolstore, "MAX_POOL_CHARS", 200_000, raising=False)
    _, bh, _ = pool_hosts
    await bh.start()
    _put(bh.cluster, f"{PREFIX}/labels/uuid/{U1}", "bank-b-web")
    await eventually(lambda: bh.label(U1) == "bank-b-web", timeout=10)
    for n in range(3):
        _put(bh.cluster, f"{PREFIX}/policy/proposals/host-x/{n:032x}", "p" * 100_000)
    await eventually(lambda: "characters" in (bh.pool.error or ""), timeout=10)
    assert sum(len(k) + len(v) for k, v in bh.pool.entries.items()) <= 200_000
    assert len(str(cache_of(bh))) <= 200_000
    assert bh.label(U1) == "bank-b-web"


@pytest_twisted.ensureDeferred
async def test_addlabel_in_pool_mode_does_not_overwrite_a_hand_edit_of_the_local_file(
    pool_hosts: list[PoolHost],
) -> None:
    """The local label file is behind the other hosts' changes by design, but a hand edit of it
    since this daemon read or wrote it is not silently overwritten by addlabel: refused as on
    a single host (nothing written to etcd), and the edit stays (before, it was lost)."""
    a, bh, _ = pool_hosts
    await a.start()
    await bh.start()
    bh.ctl.register_domain(b.RegisterDomainArgs(uuid=U2, label="bank-b-web"))
    await eventually(lambda: a.label(U2) == "bank-b-web", timeout=10)
    a.ctl.register_domain(b.RegisterDomainArgs(uuid=U1, label="bank-b-web"))  # file is behind
    await eventually(lambda: a.daemon.status().pool["unpublished"] == 0, timeout=10)
    written = a.labels.read_text()
    doc = json.loads(written)
    doc.setdefault("domains", {}).setdefault("name", {})["hand-1"] = "shop"
    a.labels.write_text(json.dumps(doc))
    with pytest.raises(ControlError) as caught:
        a.ctl.register_domain(b.RegisterDomainArgs(uuid=U3, label="bank-a-web"))
    assert caught.value.code is ErrorCode.INVALID_ARGUMENT
    assert "was changed since the daemon loaded it" in caught.value.message
    assert "pool mode" in caught.value.message
    assert json.loads(a.labels.read_text()) == doc
    assert a.label(U3) is None and a.daemon.status().pool["unpublished"] == 0
    client = EtcdClient(reactor, bh.cluster.endpoints)
    try:
        assert await client.get(f"{PREFIX}/labels/uuid/{U3}") is None
    finally:
        await client.close()
    a.labels.write_text(written)  # put back: the change goes through
    a.ctl.register_domain(b.RegisterDomainArgs(uuid=U3, label="bank-a-web"))
    await eventually(lambda: bh.label(U3) == "bank-a-web", timeout=10)
