"""Migration/restore reservations granted or refused by the destination's daemon, on a real
3-member etcd cluster and three sandbox hosts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import pytest_twisted
from daemon_helpers import domcfg, eventually
from pool_helpers import PREFIX, PoolHost, pool_hosts_fixture  # noqa: F401 (fixture)
from test_pool_policy import UA, UB, _put, _run, _start_all
from twisted.internet import defer, threads

from shyped.control import backend as b
from shyped.control.protocol import ControlError, ErrorCode
from shyped.control.server import ControlServer
from shyped.pool.reservation import Request, State, TransitionError, advance
from shyped.sandbox import migration
from shyped.service.config import ControlConfig


async def _reserve(host: PoolHost, uuid: str, dest: str, label: str | None = None) -> object:
    try:
        return await defer.maybeDeferred(
            host.ctl.reserve, b.ReserveArgs(uuid, dest, "migrate", label)
        )
    except ControlError as exc:
        return exc


async def _rivals_running(hosts: list[PoolHost]) -> None:
    """All three hosts up; bank A's web domain on host-a, bank B's on host-b."""
    a, bh, _ = hosts
    await _start_all(hosts)
    await _run(a, UA, "web-a-1", "bank-a-web")
    await _run(bh, UB, "web-b-1", "bank-b-web")


def test_reservation_states_move_one_way() -> None:
    assert advance(State.REQUESTED, State.GRANTED) is State.GRANTED
    assert advance(State.GRANTED, State.CONSUMED) is State.CONSUMED
    for frm, to in ((State.REFUSED, State.CONSUMED), (State.CONSUMED, State.GRANTED),
                    (State.REQUESTED, State.CONSUMED)):  # fmt: skip
        try:
            advance(frm, to)
        except TransitionError:
            continue
        raise AssertionError(f"{frm} -> {to} was allowed")


@pytest_twisted.ensureDeferred
async def test_two_concurrent_rival_migrations_to_one_empty_host_exactly_one_wins(
    pool_hosts: list[PoolHost],
) -> None:
    a, bh, c = pool_hosts
    await _rivals_running(pool_hosts)
    first, second = await defer.gatherResults(
        [
            defer.ensureDeferred(_reserve(a, UA, "host-c")),
            defer.ensureDeferred(_reserve(bh, UB, "host-c")),
        ]
    )
    results = [first, second]
    granted = [r for r in results if isinstance(r, b.ReserveResult)]
    refused = [r for r in results if isinstance(r, ControlError)]
    assert len(granted) == 1 and len(refused) == 1, results
    assert refused[0].code is ErrorCode.DENIED
    assert "conflicts with running type" in refused[0].message
    # Nothing moved: both domains still run where they were.
    assert "web-a-1" in a.harness.domains() and "web-b-1" in bh.harness.domains()
    # The grant is consumed once the incoming domain is admitted on host-c.
    winner = UA if granted[0].label == "bank-a-web" else UB
    reservations = c.ctl.reservations
    assert reservations is not None and len(reservations.held) == 1
    h = c.harness
    domid = await h.call(h.ts.create, domcfg("incoming", uuid=winner))
    await h.settle()
    assert h.last(f"domain {domid}").allowed
    await eventually(lambda: not reservations.held, timeout=15)


@pytest_twisted.ensureDeferred
async def test_migration_to_a_host_running_the_rival_is_refused_before_anything_moves(
    pool_hosts: list[PoolHost],
) -> None:
    a, _, _ = pool_hosts
    await _rivals_running(pool_hosts)
    refused = await _reserve(a, UA, "host-b")
    assert isinstance(refused, ControlError) and refused.code is ErrorCode.DENIED
    assert refused.details["host"] == "host-b"
    assert "web-a-1" in a.harness.domains()
    ok = await _reserve(a, UA, "host-c")
    assert isinstance(ok, b.ReserveResult) and ok.granted
    gone = await _reserve(a, UA, "host-x")
    assert isinstance(gone, ControlError) and "not a live member" in gone.message


def _label_node(host: PoolHost, name: str) -> str | None:
    doms = [d for d in host.harness.ts.list_domains() if d.name == name]
    return host.harness.read(f"/local/domain/{doms[0].domid}/shyped/label") if doms else None


@pytest_twisted.ensureDeferred
async def test_shype_xl_migrate_reserves_first_then_the_domain_lands_labelled(
    pool_hosts: list[PoolHost],
) -> None:
    a, bh, c = pool_hosts
    await _rivals_running(pool_hosts)
    await a.harness.call(a.harness.ts.unpause, "web-a-1")
    sock = a.xsd.instance_dir / "control.sock"
    server = ControlServer(a.ctl, ControlConfig(socket=sock))
    server.start()
    try:
        xl = f"{sys.executable} -m shyped.sandbox --socket {a.xsd.socket_path}"

        def shype_xl(*args: str) -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "shyped.cli.shypexl", "--socket", str(sock)]
            argv += ["--xl", xl, *args]
            return subprocess.run(argv, capture_output=True, text=True, timeout=120)

        # To the rival's host: refused by host-b's daemon before anything moves.
        r = await threads.deferToThread(
            shype_xl, "migrate", "web-a-1", "host-b", "--xl-host", str(bh.xsd.socket_path)
        )
        assert r.returncode == 1 and "refused" in r.stderr and "bank-a" in r.stderr, r.stderr
        assert "web-a-1" in a.harness.domains() and "web-a-1" not in bh.harness.domains()
        # To the empty host: granted, migrated, admitted and labelled there.
        r = await threads.deferToThread(
            shype_xl, "migrate", "web-a-1", "host-c", "--xl-host", str(c.xsd.socket_path)
        )
        assert r.returncode == 0, r.stderr
        assert "host-c granted a place" in r.stderr
    finally:
        await server.stop()
    assert "web-a-1" not in a.harness.domains()
    assert "web-a-1" in c.harness.domains()
    await c.harness.settle()
    await eventually(
        lambda: _label_node(c, "web-a-1") == "ACM:example.hosting:bank-a-web", timeout=15
    )
    reservations = c.ctl.reservations
    assert reservations is not None
    await eventually(lambda: not reservations.held, timeout=15)


@pytest_twisted.ensureDeferred
async def test_shype_xl_restore_is_admitted_by_this_hosts_reservation_first(
    pool_hosts: list[PoolHost], tmp_path: Path
) -> None:
    a, bh, c = pool_hosts
    await _rivals_running(pool_hosts)
    save = tmp_path / "web-b-1.save"
    await bh.harness.call(migration.save, bh.harness.ts, "web-b-1", save)
    await bh.harness.settle()

    async def shype_xl(host: PoolHost, *args: str) -> subprocess.CompletedProcess[str]:
        sock = host.xsd.instance_dir / "control.sock"
        server = ControlServer(host.ctl, ControlConfig(socket=sock))
        server.start()
        xl = f"{sys.executable} -m shyped.sandbox --socket {host.xsd.socket_path}"
        argv = [sys.executable, "-m", "shyped.cli.shypexl", "--socket", str(sock), "--xl", xl]
        try:
            return await threads.deferToThread(
                subprocess.run, [*argv, *args], capture_output=True, text=True, timeout=120
            )
        finally:
            await server.stop()

    refused = await shype_xl(a, "restore", "-p", str(save))
    assert refused.returncode == 1 and "bank-a" in refused.stderr, refused.stderr
    assert "web-b-1" not in a.harness.domains()
    done = await shype_xl(c, "restore", "-p", str(save))
    assert done.returncode == 0 and "host-c granted a place" in done.stderr, done.stderr
    await eventually(
        lambda: _label_node(c, "web-b-1") == "ACM:example.hosting:bank-b-web", timeout=15
    )


@pytest_twisted.ensureDeferred
async def test_requests_not_from_a_live_member_get_no_answer(pool_hosts: list[PoolHost]) -> None:
    _, _, c = pool_hosts
    await _start_all(pool_hosts)
    reservations = c.ctl.reservations
    assert reservations is not None
    for n in range(5):
        rid = f"{n:032x}"
        req = Request(rid, UA, "bank-a-web", "host-z", "host-c", "migrate")
        _put(c, f"{PREFIX}/reservations/host-z/host-c/{rid}", req.to_json())
    await eventually(lambda: reservations.ignored == 5, timeout=20)
    assert not reservations.held and reservations.granted == 0
    assert not [k for k in c.pool.entries if "/grants/" in k]


@pytest_twisted.ensureDeferred
async def test_a_domain_started_by_hand_counts_the_places_held_for_incoming_ones(
    pool_hosts: list[PoolHost],
) -> None:
    """host-c granted bank A's web domain a place; bank B's web domain started on host-c by
    hand meanwhile is refused (the held place counts as running), and the incoming domain
    then takes its place (before, the hand-started rival was admitted and the incoming one
    refused)."""
    a, _, c = pool_hosts
    await _start_all(pool_hosts)
    got = await _reserve(a, UA, "host-c", "bank-a-web")
    assert isinstance(got, b.ReserveResult) and got.granted, got
    rival = "cccccccc-0000-4000-8000-00000000000c"
    _put(c, f"{PREFIX}/labels/uuid/{rival}", "bank-b-web")
    _put(c, f"{PREFIX}/labels/uuid/{UA}", "bank-a-web")
    await eventually(lambda: c.label(rival) == "bank-b-web" and c.label(UA) == "bank-a-web")
    h = c.harness
    domid = await h.call(h.ts.create, domcfg("by-hand", uuid=rival))
    await h.settle()
    out = h.last(f"domain {domid}")
    assert not out.allowed and "held for incoming" in str(out.checks), out
    incoming = await h.call(h.ts.create, domcfg("web-a-1--incoming", uuid=UA))
    await h.settle()
    assert h.last(f"domain {incoming}").allowed


@pytest_twisted.ensureDeferred
async def test_a_lapsed_grant_stops_holding_its_place_on_a_quiet_pool(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grant never used lapses after GRANT_TTL even if nothing else changes in the pool; a
    rival started by hand is then admitted (before, the engine kept the place held until some
    other pool entry changed)."""
    from shyped.service import poolreserve

    monkeypatch.setattr(poolreserve, "GRANT_TTL", 1.0)
    a, _, c = pool_hosts
    await _start_all(pool_hosts)
    got = await _reserve(a, UA, "host-c", "bank-a-web")
    assert isinstance(got, b.ReserveResult) and got.granted, got
    assert c.daemon.engine.held == {UA: "bank-a-web"}
    await eventually(lambda: not c.daemon.engine.held, timeout=10)
    rival = "cccccccc-0000-4000-8000-00000000000c"
    _put(c, f"{PREFIX}/labels/uuid/{rival}", "bank-b-web")
    await eventually(lambda: c.label(rival) == "bank-b-web")
    domid = await c.harness.call(c.harness.ts.create, domcfg("by-hand", uuid=rival))
    await c.harness.settle()
    assert c.harness.last(f"domain {domid}").allowed


@pytest_twisted.ensureDeferred
async def test_reservations_past_a_labels_max_domains_are_refused(
    pool_hosts: list[PoolHost],
) -> None:
    """bank-a-web has max_domains = 4: host-c grants four places (held, counted as running)
    and refuses the fifth with the quota (before, the fifth was granted and the incoming
    domain then vetoed by the quota at admission)."""
    a, _, c = pool_hosts
    await _start_all(pool_hosts)
    uuids = [f"dddddddd-0000-4000-8000-00000000000{n}" for n in range(5)]
    for u in uuids[:4]:
        got = await _reserve(a, u, "host-c", "bank-a-web")
        assert isinstance(got, b.ReserveResult) and got.granted, got
    refused = await _reserve(a, uuids[4], "host-c", "bank-a-web")
    assert isinstance(refused, ControlError) and refused.code is ErrorCode.DENIED, refused
    assert "max_domains = 4" in refused.message
    reservations = c.ctl.reservations
    assert reservations is not None and len(reservations.held) == 4


@pytest_twisted.ensureDeferred
async def test_a_request_filed_in_another_hosts_range_is_refused(
    pool_hosts: list[PoolHost],
) -> None:
    """The source is taken from the key (the range only the source's etcd user may write): a
    request in host-b's range that names host-a as its source is refused, not held."""
    _, _, c = pool_hosts
    await _start_all(pool_hosts)
    reservations = c.ctl.reservations
    assert reservations is not None
    rid = "e" * 32
    req = Request(rid, UA, "bank-a-web", "host-a", "host-c", "migrate")
    _put(c, f"{PREFIX}/reservations/host-b/host-c/{rid}", req.to_json())
    grant = f"{PREFIX}/grants/host-c/host-b/{rid}"  # answered in the range it is filed in
    await eventually(lambda: grant in c.pool.entries, timeout=20)
    assert '"refused"' in c.pool.entries[grant] and "range it is filed in" in c.pool.entries[grant]
    assert not reservations.held and reservations.granted == 0


@pytest_twisted.ensureDeferred
async def test_a_request_reusing_another_sources_id_cannot_answer_for_it(
    pool_hosts: list[PoolHost],
) -> None:
    """host-b (hostile, writing only its own ranges) files a harmless request to host-c under
    the id of host-a's pending one: host-c's grant to it is not what host-a reads as the
    answer to its own request (before, grants were keyed by destination and id alone, so a
    grant to b's request answered a's too, and a refusal to a could be turned into a grant)."""
    a, _, c = pool_hosts
    await _start_all(pool_hosts)
    rid = "a" * 32
    req = Request(rid, UB, "shop", "host-b", "host-c", "migrate")
    _put(c, f"{PREFIX}/reservations/host-b/host-c/{rid}", req.to_json())
    reservations = c.ctl.reservations
    assert reservations is not None
    await eventually(lambda: reservations.granted == 1, timeout=20)
    await eventually(lambda: any("/grants/host-c/" in k and rid in k for k in a.pool.entries))
    assert a.pool.keys.grant(rid, "host-c") not in a.pool.entries  # host-a's answer for `rid`


@pytest_twisted.ensureDeferred
async def test_a_past_flood_of_requests_does_not_stop_a_destination_answering(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix writer files junk requests for host-c up to the bound of remembered ids
    (lowered here so that a few play the many), then they are gone: host-c answers the next
    real request (before, the ids were never forgotten and it went silent: refused)."""
    import base64

    from shyped.service import poolreserve

    monkeypatch.setattr(poolreserve, "MAX_ANSWERED", 3)
    monkeypatch.setattr(poolreserve, "ANSWER_TIMEOUT", 5.0)
    a, _, c = pool_hosts
    await _start_all(pool_hosts)
    junk = [f"{PREFIX}/reservations/host-a/host-c/{n:032x}" for n in range(3)]
    for key in junk:
        _put(c, key, "not a request")
    await eventually(lambda: all(k in c.pool.entries for k in junk), timeout=10)
    for key in junk:
        enc = base64.b64encode(key.encode()).decode()
        c.cluster.post(c.cluster.endpoints[0], "/v3/kv/deleterange", {"key": enc})
    await eventually(lambda: not any(k in c.pool.entries for k in junk), timeout=10)
    result = await _reserve(a, UA, "host-c", "bank-a-web")
    assert isinstance(result, b.ReserveResult), result
