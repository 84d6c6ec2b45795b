"""One guest's write flood must not delay the decisions about others (red-team finding B;
DESIGN.md §2 "Trust").

The guest writes only in its own ``data/`` (which it owns on real Xen). The reactor is held
while the guest writes and the rival is created, so the whole flood is queued ahead of the
rival's creation: the worst case of a flood the daemon has not caught up with, made
deterministic. What is asserted is the order of decisions, not time.
"""

from __future__ import annotations

import pytest_twisted
from daemon_helpers import Harness, domcfg, host_fixture

from shyped.core.engine import Outcome
from shyped.core.fairbatch import FairBatches
from shyped.policy.decisions import Rule
from shyped.sandbox.xsconn import XsConn

__all__ = ["host_fixture"]  # the `host` fixture

FLOOD = 3000
#: Every GRANT_EVERY-th flood node grants shop-1 read access: a denied xs-channel, so it is
#: decided (and reset) and its decision shows where the daemon is in the flood.
GRANT_EVERY = 250


@pytest_twisted.ensureDeferred
async def test_a_rivals_veto_is_not_queued_behind_another_guests_flood(host: Harness) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: the flooding guest
    s = await host.call(host.ts.create, domcfg("shop-1"))  # no STE type shared with web-a1
    await host.settle()
    grants = [
        f"/local/domain/{a}/data/f{i}/ring-ref" for i in range(GRANT_EVERY - 1, FLOOD, GRANT_EVERY)
    ]
    flood = [f"/local/domain/{a}/data/f{i}/ring-ref" for i in range(FLOOD)]
    daemon = host.daemon
    assert daemon is not None
    unread_at_veto: list[int] = []

    def at_veto(outcome: Outcome) -> None:
        if outcome.what == f"domain {rival}":  # how much of the flood the daemon has not read
            unread_at_veto.append(sum(p in daemon._pending for p in flood))

    daemon.add_listener(at_veto)
    # Held reactor: the guest's flood (write, then its grants), then the rival's creation.
    with XsConn(str(host.xsd.socket_path)) as xs:
        for i, path in enumerate(flood):
            xs.write(path, str(i))
            if path in grants:
                assert (xs.get_perms(path) or ("?",))[0] == f"n{a}"  # the guest's own node
                xs.set_perms(path, (f"n{a}", f"r{s}"))
    rival = host.ts.create(domcfg("web-b1"))  # bank-b: conflicts with running bank-a
    await host.settle()

    whats = [o.what for o in host.outcomes]
    veto = whats.index(f"domain {rival}")
    out = host.outcomes[veto]
    assert not out.allowed and out.decision.rule is Rule.CHINESE_WALL
    assert "web-b1" not in host.domains()
    # Vetoed before the daemon had read most of the flood queued ahead of it: the flood
    # waits for later batches, the rival does not wait for the flood.
    assert len(unread_at_veto) == 1 and unread_at_veto[0] > FLOOD // 2, unread_at_veto
    # Nothing of the flood was left behind: every grant was decided and reset.
    for path in grants:
        assert host.last(f"xs-channel {path}").allowed is False
        assert host.perms(path) in (None, (f"n{a}",))  # reset, or removed past a bound


@pytest_twisted.ensureDeferred
async def test_a_backlog_past_its_bound_is_read_again_whole_and_nothing_is_missed(
    host: Harness,
) -> None:
    await host.start()
    daemon = host.daemon
    assert daemon is not None
    daemon._pending = FairBatches(per_domain=8, max_waiting=100)
    a = await host.call(host.ts.create, domcfg("web-a1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    early = f"/local/domain/{a}/data/early/ring-ref"  # granted first: among the dropped paths
    with XsConn(str(host.xsd.socket_path)) as xs:  # held reactor: one burst past the bound
        xs.write(early, "1")
        xs.set_perms(early, (f"n{a}", f"r{s}"))
        for i in range(300):
            xs.write(f"/local/domain/{a}/data/f{i}", str(i))
    await host.settle()
    assert daemon._pending.overflows == 1 and not daemon._pending
    out = host.last(f"xs-channel {early}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(early) == (f"n{a}",)
    # Later changes are queued as before.
    late = f"/local/domain/{a}/data/late"
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.write(late, "1")
        xs.set_perms(late, (f"n{a}", f"r{s}"))
    await host.settle()
    assert not host.last(f"xs-channel {late}").allowed and daemon._pending.overflows == 1
