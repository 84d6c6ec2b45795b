"""Hostile guests against the daemon on real oxenstored: every cross-domain xenstore channel is
decided (issue 11 #3, #4, #9; issue 20 #4).

In the sandbox every client is dom0, so each test writes only what the guest itself could write
on real Xen: nodes below nodes it owns (oxenstored's new nodes inherit the parent's permission
list, owner included), with a permission list whose owner is the guest (xenstored refuses an
unprivileged owner change: ``store.ml`` ``setperms``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from daemon_helpers import HOSTING, Harness, domcfg, host_fixture, image
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, threads
from twisted.internet.threads import blockingCallFromThread

from shyped.core.channels import reach
from shyped.core.xlcfg import parse_vif_spec
from shyped.policy.decisions import Hook, PolicyEngine, Rule
from shyped.policy.toml_format import load
from shyped.sandbox.xsconn import XsConn
from shyped.service.config import DomainVeto
from shyped.xenstore import Transaction
from shyped.xenstore.blocking import _run_transaction

__all__ = ["host_fixture"]  # the `host` fixture

T = TypeVar("T")


def guest_writes(h: Harness, owner: int, nodes: dict[str, str], perms: tuple[str, ...]) -> None:
    """What guest `owner` does: write nodes below a node it owns, then SET_PERMS them."""
    with XsConn(str(h.xsd.socket_path)) as xs:
        for path, value in nodes.items():
            xs.write(path, value)
            assert (xs.get_perms(path) or ("?",))[0] == f"n{owner}", "not a node the guest owns"
            xs.set_perms(path, perms)


async def _web_and_shop(h: Harness) -> tuple[int, int]:
    """The daemon started, then web-a1 (a vif on bank-a's bridge) and shop-1, which share no
    STE type: every channel between them is denied."""
    await h.start()
    a = await h.call(h.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-a"]))
    s = await h.call(h.ts.create, domcfg("shop-1"))
    await h.settle()
    return a, s


# ------------------------------------------------------------------ issue 11 #3: hidden vchan


@pytest.mark.parametrize(
    "where",
    [
        "device/vif/0/v",
        "device/suspend/event-channel/v",
        "console/backend-id/v",  # console/backend-id is guest-owned on real Xen (n<d>,r0)
    ],
)
@pytest_twisted.ensureDeferred
async def test_hidden_vchan_outside_data_is_decided_and_its_grant_revoked(
    host: Harness, where: str
) -> None:
    a, s = await _web_and_shop(host)
    base = f"/local/domain/{a}/{where}"
    guest_writes(
        host,
        a,
        {f"{base}/ring-ref": "8", f"{base}/event-channel": "23"},
        (f"n{a}", f"r{s}"),
    )
    await host.settle()
    for key in ("ring-ref", "event-channel"):
        out = host.last(f"xs-channel {base}/{key}")
        assert not out.allowed and out.enforced
        assert out.decision.hook is Hook.XS_CHANNEL and out.decision.rule is Rule.STE
        assert [c.domid for c in out.clients] == [s]
        # The guest keeps its node; the peer may no longer read it.
        assert host.perms(f"{base}/{key}") == (f"n{a}",)
    # The device it hid in is untouched (its own decision stands).
    assert host.last(f"device vif {a}/0").allowed
    assert host.perms(f"/local/domain/{a}/device/vif/0") == (f"n{a}", "r0")


@pytest_twisted.ensureDeferred
async def test_a_node_shared_with_a_permitted_peer_stays_and_a_world_readable_one_is_reset(
    host: Harness,
) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("batch-a1"))  # shares bank-a, same MLS level
    await host.settle()
    ok = f"/local/domain/{a}/data/anything/x"
    world = f"/local/domain/{a}/attr/y"
    guest_writes(host, a, {ok: "hello"}, (f"n{a}", f"b{b}"))
    guest_writes(host, a, {world: "hello"}, (f"r{a}",))
    await host.settle()
    assert host.last(f"xs-channel {ok}").allowed
    assert host.perms(ok) == (f"n{a}", f"b{b}")
    out = host.last(f"xs-channel {world}")
    assert not out.allowed and "every domain" in out.decision.reason
    assert host.perms(world) == (f"n{a}",)
    # Granting again is decided again (the reset fired the watch once and decided nothing).
    n_before = len(host.decided(f"xs-channel {world}"))
    guest_writes(host, a, {world: "again"}, (f"r{a}",))
    await host.settle()
    assert len(host.decided(f"xs-channel {world}")) == n_before + 1
    assert host.perms(world) == (f"n{a}",)


@pytest_twisted.ensureDeferred
async def test_a_driver_domain_handshake_is_left_to_the_device_hook(host: Harness) -> None:
    """Frontend keys readable by the backend domain, backend keys readable by the frontend,
    both per the trusted record: the device decision covers them, no xs-channel one."""
    await host.start()
    n = await host.call(host.ts.create, domcfg("netdom"))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.call(host.ts.attach_nic, a, parse_vif_spec(f"bridge=xenbr-bank-a,backend={n}"))
    await host.settle()
    assert host.last(f"device vif {a}/0").allowed
    assert host.perms(f"/local/domain/{a}/device/vif/0") == (f"n{a}", f"r{n}")
    assert host.perms(f"/local/domain/{n}/backend/vif/{a}/0") == (f"n{n}", f"r{a}")
    # libxl's read-only frontend keys are the backend domain's (ro_frontend_perms)
    assert host.perms(f"/local/domain/{a}/device/vif/0/mtu") == (f"n{n}", f"r{a}")
    assert [o.what for o in host.outcomes if o.what.startswith("xs-channel")] == []
    # A third domain named on a frontend key is not the backend: decided.
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    key = f"/local/domain/{a}/device/vif/0/mac"
    guest_writes(host, a, {key: "00:16:3e:00:00:01"}, (f"n{a}", f"r{n}", f"r{s}"))
    await host.settle()
    out = host.last(f"xs-channel {key}")
    assert not out.allowed and [c.domid for c in out.clients] == [s]
    assert host.perms(key) == (f"n{a}",)


# ------------------------------- a grant made again right after its veto, before the daemon reads


def _guest_acts_right_after_the_veto(h: Harness, veto: str, act: Callable[[], None]) -> list[str]:
    """From now on, the daemon's `veto` transaction (``_reset_perms`` or ``_remove_path``) runs
    on the reactor thread and the guest does `act` right after it commits, before the reactor
    can read anything: the veto's watch event and the guest's coalesce, and the daemon's next
    read shows only the guest's new state. Returns the vetoes run so far (appended to)."""
    assert h.daemon is not None
    gw = h.daemon.gateway
    ran: list[str] = []

    def transaction(fn: Callable[[Transaction], T], **kw: Any) -> defer.Deferred[T]:
        if veto not in fn.__qualname__:
            return orig(fn, **kw)
        assert gw._router is not None
        result = _run_transaction(gw._router, gw.config, fn, gw.config.tx_max_attempts)
        ran.append(f"{veto}: {result}")
        if len(ran) == 1:
            act()
        return defer.succeed(result)

    orig = gw.transaction
    gw.transaction = transaction  # type: ignore[method-assign]
    return ran


@pytest.mark.parametrize("where", ["data/p/x", "device/vif/0/x"])
@pytest_twisted.ensureDeferred
async def test_a_grant_made_again_right_after_its_reset_is_decided_again(
    host: Harness, where: str
) -> None:
    a, s = await _web_and_shop(host)
    node = f"/local/domain/{a}/{where}"
    grant = (f"n{a}", f"r{s}")
    ran = _guest_acts_right_after_the_veto(
        host, "_reset_perms", lambda: guest_writes(host, a, {node: "again"}, grant)
    )
    guest_writes(host, a, {node: "hello"}, grant)
    await host.settle()
    assert ran[0] == "_reset_perms: done"
    verdicts = host.decided(f"xs-channel {node}")
    # Two grants, each decided and reset: the second is not hidden behind the first's facts.
    assert [(o.allowed, [c.domid for c in o.clients]) for o in verdicts] == [(False, [s])] * 2
    assert host.perms(node) == (f"n{a}",)
    assert host.read(node) == "again"


@pytest_twisted.ensureDeferred
async def test_a_rendezvous_published_again_right_after_its_removal_is_decided_again(
    host: Harness,
) -> None:
    a, s = await _web_and_shop(host)
    vpath = f"/local/domain/{a}/data/vchan/{s}/1"
    keys = {f"{vpath}/ring-ref": "8", f"{vpath}/event-channel": "23"}
    ran = _guest_acts_right_after_the_veto(
        host, "_remove_path", lambda: guest_writes(host, a, keys, (f"n{a}", f"r{s}"))
    )
    guest_writes(host, a, keys, (f"n{a}", f"r{s}"))
    await host.settle()
    assert ran[0] == "_remove_path: True"
    verdicts = host.decided(f"vchan {vpath}")
    assert [(o.allowed, [c.domid for c in o.clients]) for o in verdicts] == [(False, [s])] * 2
    assert not host.exists(f"{vpath}/ring-ref") and not host.exists(f"{vpath}/event-channel")


# ------------------------------------------------------------ issue 11 #4: slot exhaustion


@pytest_twisted.ensureDeferred
async def test_a_rendezvous_past_the_slot_limit_is_denied_and_removed(host: Harness) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("batch-a1"))  # a permitted peer
    await host.settle()
    home = f"/local/domain/{a}/data"
    pads = {f"{home}/pad{i}/ring-ref": "1" for i in range(64)}
    guest_writes(host, a, pads, (f"n{a}",))
    await host.settle()
    real = f"{home}/vchan/{b}/1"
    guest_writes(
        host, a, {f"{real}/ring-ref": "8", f"{real}/event-channel": "23"}, (f"n{a}", f"r{b}")
    )
    await host.settle()
    for key in ("ring-ref", "event-channel"):
        out = host.last(f"xs-channel {real}/{key}")
        assert not out.allowed and out.enforced and out.decision.rule is Rule.QUOTA
        assert not host.exists(f"{real}/{key}")


# ------------------------------------------------------- issue 11 #9: max_vchans for clients


@pytest_twisted.ensureDeferred
async def test_max_vchans_counts_rendezvous_a_domain_joins_as_client(
    host: Harness, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(_quota_after_keys(HOSTING.read_text(), "bank-a-batch", "max_vchans = 2"))
    await host.start(host.config(policy=policy))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("batch-a1"))
    await host.settle()
    eps = [await host.call(host.ts.vchan_listen, a, b, port=p) for p in range(4)]
    await host.settle()
    verdicts = [host.last(f"vchan {ep.path}") for ep in eps]
    assert [v.allowed for v in verdicts] == [True, True, False, False]
    for v in verdicts[2:]:
        assert v.decision.rule is Rule.QUOTA and "max_vchans" in v.decision.reason
        assert v.peer is not None and v.peer.domid == b
    assert [host.exists(ep.path) for ep in eps] == [True, True, False, False]


def _quota_after_keys(text: str, label: str, line: str) -> str:
    """The policy text with ``[label.quota] <line>`` added to VM label `label`."""
    lines = text.splitlines(keepends=True)
    start = lines.index(f'name = "{label}"\n')
    end = start + 1
    while end < len(lines) and lines[end].strip() and not lines[end].startswith("["):
        end += 1
    return "".join([*lines[:end], "[label.quota]\n", line + "\n", *lines[end:]])


# ------------------------------------------------ issue 20 #4: denied domains fail closed


@pytest_twisted.ensureDeferred
async def test_everything_a_denied_domain_is_party_to_is_denied(host: Harness) -> None:
    # Paused, not destroyed: the denied domain stays, as it does while a destroy is pending.
    await host.start(host.config(veto=DomainVeto.PAUSE))
    await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("web-b1", disks=[image("web-b1")]))
    await host.settle()
    assert not host.last(f"domain {b}").allowed  # Chinese Wall: bank-a runs
    ep = await host.call(host.ts.vchan_listen, b, 0)  # STE alone would permit (dom0)
    await host.settle()
    vbd = host.last(f"device vbd {b}/51712")
    assert not vbd.allowed and vbd.decision.rule is Rule.DENIED_DOMAIN
    vchan = host.last(f"vchan {ep.path}")
    assert not vchan.allowed and vchan.decision.rule is Rule.DENIED_DOMAIN
    assert not host.exists(ep.path)


# ------------------------------------------- property: random guest trees on real oxenstored

GUEST_NAMES = ("web-a1", "batch-a1", "shop-1", "reports-a1")


def _tree() -> st.SearchStrategy[list[tuple[int, str, str, tuple[tuple[str, int], ...]]]]:
    """(owner index, default letter, relative path, ACL as (letter, peer index | 9 = no domain))."""
    letter = st.sampled_from("nrwb")
    rel = st.lists(st.sampled_from(["a", "ring-ref", "event-channel", "v"]), min_size=1, max_size=3)
    acl = st.lists(st.tuples(letter, st.sampled_from([0, 1, 2, 3, 9])), max_size=3)
    node = st.tuples(st.integers(0, 3), letter, rel.map("/".join), acl.map(tuple))
    return st.lists(node, min_size=1, max_size=6)


@pytest_twisted.ensureDeferred
async def test_property_no_guest_node_reaches_a_guest_the_policy_keeps_apart(
    host: Harness,
) -> None:
    await host.start()
    doms = [await host.call(host.ts.create, domcfg(n)) for n in GUEST_NAMES]
    await host.settle()
    policy = PolicyEngine(load(HOSTING))
    labels = {d: host.daemon.host.domain(d).label for d in doms}  # type: ignore[union-attr]

    def settle() -> None:
        blockingCallFromThread(reactor, lambda: defer.ensureDeferred(host.settle()))

    @settings(
        max_examples=10,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(_tree())
    # The same node granted twice: the second grant came right after the first's reset and
    # hid behind the first's facts in a coalesced watch event (EventAssembler.withdraw).
    @example(
        tree=[
            (0, "w", "a/a/event-channel", (("b", 0), ("n", 3), ("b", 9))),
            (2, "r", "a/v/a", ()),
            (0, "w", "ring-ref/v/a", ()),
            (2, "r", "v/event-channel/a", (("r", 3), ("b", 3), ("n", 3))),
            (2, "n", "ring-ref/a/event-channel", (("b", 0), ("b", 3), ("b", 1))),
            (0, "b", "a/a/event-channel", (("b", 1), ("b", 2))),
        ]
    )
    def prop(tree: list[tuple[int, str, str, tuple[tuple[str, int], ...]]]) -> None:
        written = []
        with XsConn(str(host.xsd.socket_path)) as xs:
            for d in doms:  # housekeeping (dom0): last example's tree goes
                xs.rm(f"/local/domain/{d}/data/p")
            for oi, default, rel, acl in tree:
                o = doms[oi]
                path = f"/local/domain/{o}/data/p/{rel}"
                xs.write(path, "7")  # below data/ (n<o>): the guest owns what it creates
                entries = [f"{x}{doms[p] if p < 4 else 60}" for x, p in acl]
                xs.set_perms(path, (f"{default}{o}", *entries))
                written.append(path)
        settle()
        with XsConn(str(host.xsd.socket_path)) as xs:
            for path in written:
                perms = xs.get_perms(path)
                if perms is None:
                    continue  # removed (over a limit) or replaced by a later write's parent rm
                r = reach(perms)
                if r is None:
                    continue
                owner, peers, world = r
                seen = [o.log_line() for o in host.outcomes if path in o.what]
                assert not world, f"{path} {perms} reaches every domain; decided: {seen}"
                for p in peers & set(doms):
                    d = policy.channel(Hook.XS_CHANNEL, labels[owner], labels[p])
                    assert d.permitted, f"{path} {perms}: {d}"

    await threads.deferToThread(prop)


@pytest_twisted.ensureDeferred
async def test_filling_the_rendezvous_slots_never_removes_libxls_own_nodes(host: Harness) -> None:
    """Red team: with the daemon down, a guest filled its 64 rendezvous slots with lone
    `data/padNN/ring-ref`; at restart the sorted replay put the dom0-owned `store/ring-ref`
    (n0,r<d>) past the bound, and the daemon removed it (the guest's xenstore ring)."""
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    store = f"/local/domain/{a}/store/ring-ref"
    before = (host.read(store), host.perms(store))
    assert before[0] is not None and before[1] is not None and before[1][0] == "n0"
    await host.stop()
    pads = {f"/local/domain/{a}/data/pad{i:02d}/ring-ref": "1" for i in range(64)}
    guest_writes(host, a, pads, (f"n{a}",))
    await host.start()
    await host.settle()
    assert (host.read(store), host.perms(store)) == before
    assert not [o for o in host.outcomes if "store" in o.what]
