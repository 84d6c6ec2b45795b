"""Pool policy switch and placement on a real 3-member etcd cluster and three sandbox hosts."""

from __future__ import annotations

import base64
from typing import Any

import pytest
import pytest_twisted
from daemon_helpers import HOSTING, domcfg, eventually
from pool_helpers import PREFIX, PoolHost, pool_hosts_fixture  # noqa: F401 (fixture)
from twisted.internet import reactor, task

from shyped.control import backend as b
from shyped.control import poolpolicy
from shyped.control.protocol import ControlError, ErrorCode
from shyped.pool import records

UA = "9a000000-0000-4000-8000-0000000000a1"
UB = "9a000000-0000-4000-8000-0000000000b1"


def _put(host: PoolHost, key: str, value: str) -> None:
    def enc(s: str) -> str:
        return base64.b64encode(s.encode()).decode()

    host.cluster.post(
        host.cluster.endpoints[0], "/v3/kv/put", {"key": enc(key), "value": enc(value)}
    )


def _policy(version: str, drop_label: str | None = None) -> str:
    text = HOSTING.read_text().replace(
        'version = "1.0"',
        f'version = "{version}"\nfrom = {{ name = "example.hosting", version = "1.0" }}',
        1,
    )
    if drop_label is None:
        return text
    blocks = text.split("[[label]]")
    kept = [blk for blk in blocks if f'name = "{drop_label}"' not in blk.split("\n", 3)[1]]
    assert len(kept) == len(blocks) - 1
    return "[[label]]".join(kept)


async def _start_all(hosts: list[PoolHost]) -> None:
    for h in hosts:
        await h.start()
    names = {f"{PREFIX}/hosts/{h.name}" for h in hosts}
    for h in hosts:
        await eventually(lambda h=h: names <= set(h.pool.entries), timeout=15)


async def _run(host: PoolHost, uuid: str, name: str, label: str) -> int:
    _put(host, f"{PREFIX}/labels/uuid/{uuid}", label)
    await eventually(lambda: host.label(uuid) == label, timeout=10)
    h = host.harness
    domid = await h.call(h.ts.create, domcfg(name, uuid=uuid))
    await h.settle()
    assert h.last(f"domain {domid}").allowed
    return domid


async def _load(host: PoolHost, text: str) -> Any:
    return await host.ctl.policy_load(b.PolicyLoadArgs(b.PolicySource(text, "pool.toml")))


@pytest_twisted.ensureDeferred
async def test_a_switch_one_host_forbids_is_refused_everywhere_with_its_reasons(
    pool_hosts: list[PoolHost],
) -> None:
    a, bh, c = pool_hosts
    await _start_all(pool_hosts)
    await _run(bh, UB, "web-b-1", "bank-b-web")
    try:
        await _load(a, _policy("1.1", drop_label="bank-b-web"))
    except ControlError as exc:
        assert exc.code is ErrorCode.POLICY_REJECTED
        assert set(exc.details["hosts"]) == {"host-b"}
        assert any("bank-b-web" in r for r in exc.details["hosts"]["host-b"])
    else:
        raise AssertionError("a switch host-b's running set forbids was committed")
    for h in pool_hosts:
        assert str(h.daemon.loaded.policy.version) == "1.0"
    assert f"{PREFIX}/policy/current" not in a.pool.entries
    # An allowed switch: all three hosts run it.
    result = await _load(c, _policy("1.1"))
    assert result.policy.version == "1.1"
    for h in pool_hosts:
        await eventually(lambda h=h: str(h.daemon.loaded.policy.version) == "1.1", timeout=15)
    # No proposal or answer is left behind.
    await eventually(lambda: not any("/policy/proposals/" in k or "/answers/" in k
                                     for k in a.pool.entries), timeout=10)  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_placement_excludes_the_host_running_the_rival_with_the_reason(
    pool_hosts: list[PoolHost],
) -> None:
    a, _bh, c = pool_hosts
    await _start_all(pool_hosts)
    await _run(a, UA, "web-a-1", "bank-a-web")
    await eventually(
        lambda: '"bank-a-web": 1' in c.pool.entries.get(f"{PREFIX}/hosts/host-a", ""), timeout=10
    )
    result = c.ctl.placement(b.PlacementArgs("bank-b-web"))
    verdicts = {h.host: h for h in result.hosts}
    assert set(verdicts) == {"host-a", "host-b", "host-c"}
    assert not verdicts["host-a"].admitted
    assert "conflicts with running type 'bank-a'" in verdicts["host-a"].reason
    assert verdicts["host-b"].admitted and verdicts["host-c"].admitted
    # A hostile host state cannot place a label: it is excluded with the reason.
    _put(c, f"{PREFIX}/hosts/host-x", '{"host": "host-x", "running_labels": {"x": "many"}}')
    await eventually(lambda: f"{PREFIX}/hosts/host-x" in c.pool.entries, timeout=10)
    verdicts = {h.host: h for h in c.ctl.placement(b.PlacementArgs("bank-b-web")).hosts}
    assert not verdicts["host-x"].admitted and "unusable host state" in verdicts["host-x"].reason


@pytest_twisted.ensureDeferred
async def test_a_flood_of_proposals_is_bounded_and_dead_proposers_are_ignored(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone who can write the prefix may file proposals: those naming a proposer that is
    not a live member are not even parsed, and the rest are parsed a few at a time."""
    a, _, _ = pool_hosts
    await a.start()
    running = {"now": 0, "most": 0}
    real = poolpolicy.parse_isolated

    async def counting(*args: Any) -> Any:
        running["now"] += 1
        running["most"] = max(running["most"], running["now"])
        try:
            await task.deferLater(reactor, 0.05, lambda: None)
            return await real(*args)
        finally:
            running["now"] -= 1

    monkeypatch.setattr(poolpolicy, "parse_isolated", counting)
    text = _policy("1.1")

    def propose(n: int, proposer: str) -> None:
        pid = f"{n:032x}"
        doc = records.Proposal(pid, records.sha256_text(text), text, "f.toml", proposer, 0)
        _put(a, f"{PREFIX}/policy/proposals/{proposer}/{pid}", doc.to_json())

    pp = a.ctl.pool_policy
    assert pp is not None
    for n in range(12):
        propose(n, "host-z")  # not a member
    await eventually(lambda: pp.ignored == 12, timeout=20)
    for n in range(100, 112):
        propose(n, "host-a")
    answers = f"{PREFIX}/policy/answers/"
    await eventually(lambda: sum(k.startswith(answers) for k in a.pool.entries) == 12, timeout=60)
    assert 1 <= running["most"] <= poolpolicy.MAX_OPEN_PROPOSALS
    assert pp.ignored == 12


@pytest_twisted.ensureDeferred
async def test_a_past_flood_of_proposals_does_not_stop_a_host_answering(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefix writer files junk proposals up to the bound of remembered ids (lowered here
    so that a few play the many), then withdraws them: the hosts answer the next real switch
    (before, the ids were never forgotten and every later switch went unanswered: refused)."""
    monkeypatch.setattr(poolpolicy, "MAX_ANSWERED", 4)
    monkeypatch.setattr(poolpolicy, "ANSWER_TIMEOUT", 5.0)
    a, bh, _ = pool_hosts
    await a.start()
    await bh.start()
    names = {f"{PREFIX}/hosts/{h.name}" for h in (a, bh)}
    for h in (a, bh):
        await eventually(lambda h=h: names <= set(h.pool.entries), timeout=15)
    pp = bh.ctl.pool_policy
    assert pp is not None
    junk = [f"{PREFIX}/policy/proposals/host-a/{n:032x}" for n in range(4)]
    for key in junk:
        _put(bh, key, "not a proposal")
    await eventually(lambda: pp.ignored >= 4, timeout=20)
    for key in junk:
        enc = base64.b64encode(key.encode()).decode()
        bh.cluster.post(bh.cluster.endpoints[0], "/v3/kv/deleterange", {"key": enc})
    await eventually(lambda: not any(k in bh.pool.entries for k in junk), timeout=10)
    result = await _load(a, _policy("1.1"))
    assert result.policy.version == "1.1"
    await eventually(lambda: str(bh.daemon.loaded.policy.version) == "1.1", timeout=15)


@pytest_twisted.ensureDeferred
async def test_a_proposal_reusing_another_proposers_id_cannot_answer_for_it(
    pool_hosts: list[PoolHost], monkeypatch: pytest.MonkeyPatch
) -> None:
    """host-b (hostile, writing only its own ranges) files a harmless proposal under the id
    of host-a's pending one: host-c's answer to it must not count as host-c's answer to
    host-a's proposal (before, answers were keyed by id alone, so host-c's "accepted" to b's
    text overwrote its "refused" to a's and host-a would commit what host-c refused)."""
    monkeypatch.setattr(poolpolicy, "ANSWER_TIMEOUT", 2.0)
    a, _, c = pool_hosts
    await _start_all(pool_hosts)
    pid = "f" * 32
    text = _policy("1.1")
    doc = records.Proposal(pid, records.sha256_text(text), text, "f.toml", "host-b", 0)
    _put(c, f"{PREFIX}/policy/proposals/host-b/{pid}", doc.to_json())
    await eventually(
        lambda: any("/policy/answers/host-c/" in k and pid in k for k in a.pool.entries),
        timeout=20,
    )
    pp = a.ctl.pool_policy
    assert pp is not None
    answers = await pp._collect(pid, frozenset({"host-c"}))  # host-a's own proposal `pid`
    assert answers == {}, answers
