"""Generic xenstore channels (`shyped.core.channels`), pure: the tracker, and a property over the
whole pure pipeline (assembler -> host model -> engine -> vetoes applied to an in-memory store):
after it settles, no guest-owned node lets another guest reach it unless the policy permits
that pair."""

from __future__ import annotations

from collections.abc import Iterable

from daemon_helpers import HOSTING, LABELS
from hypothesis import given, settings
from hypothesis import strategies as st

from shyped.core.actions import RemoveNode, RemoveVchan, ResetPerms
from shyped.core.assembler import EventAssembler
from shyped.core.channels import (
    ChannelShared,
    ChannelUnshared,
    SharedNodeTracker,
    TrackerLimits,
    guest_path,
    reach,
)
from shyped.core.engine import Engine
from shyped.core.events import Event, Limits, VchanPublished, VchanRemoved
from shyped.core.host import HostModel
from shyped.core.hostfacts import DomainReleased, NeedsDecision
from shyped.core.labelstore import load_label_store
from shyped.policy.decisions import Hook, PolicyEngine
from shyped.policy.toml_format import load

POLICY = load(HOSTING)
STORE = load_label_store(LABELS)
#: domid -> name (labels: bank-a-web, bank-a-batch, shop, bank-a-reports).
GUESTS = {1: "web-a1", 2: "batch-a1", 3: "shop-1", 4: "reports-a1"}


def _none(owner: int, path: str) -> tuple[frozenset[int], bool]:
    return frozenset(), False


def test_reach_follows_xenstored_permission_rules() -> None:
    assert reach([b"n0", b"r1"]) is None  # dom0 owns it: not a guest's channel
    assert reach([b"n1"]) is None
    assert reach([b"n1", b"r0"]) is None  # dom0 may read everything anyway
    assert reach([b"n1", b"r1"]) is None  # the owner itself
    assert reach([b"n1", b"r2", b"w3", b"b4", b"n5"]) == (1, frozenset({2, 3, 4}), False)
    assert reach([b"r1"]) == (1, frozenset(), True)  # default r: every domain
    assert reach([b"w1", b"n2"]) == (1, frozenset(), True)
    assert reach([b"zz"]) == (-1, frozenset(), True)  # unreadable: every domain


def test_guest_path_skips_dom0_only_subtrees_and_dom0s_home() -> None:
    assert guest_path("/local/domain/3/data/x")
    assert guest_path(b"/local/domain/3/device/vif/0/v/ring-ref")
    assert not guest_path("/local/domain/3")
    assert not guest_path("/local/domain/3/memory/target")
    assert not guest_path("/local/domain/0/data/x")
    assert not guest_path("/vm/x")


def test_tracker_emits_once_follows_setperms_and_forgets_removed_subtrees() -> None:
    t = SharedNodeTracker()
    t.note(1, "/local/domain/1/data/a", b"x", [b"n1", b"r2"])
    t.note(1, "/local/domain/1/data/a/b", b"x", [b"n1", b"w3"])
    assert t.flush(_none) == [
        ChannelShared(1, "/local/domain/1/data/a", (2,), False),
        ChannelShared(1, "/local/domain/1/data/a/b", (3,), False),
    ]
    t.note(1, "/local/domain/1/data/a", b"y", [b"n1", b"r2"])
    assert t.flush(_none) == []  # same facts: nothing again
    t.note(1, "/local/domain/1/data/a", b"y", [b"n1"])  # the daemon's reset
    assert t.flush(_none) == [ChannelUnshared(1, "/local/domain/1/data/a")]
    t.note(1, "/local/domain/1/data", None, None)
    assert t.flush(_none) == [ChannelUnshared(1, "/local/domain/1/data/a/b")]
    assert t.tracked(1) == 0 and list(t.paths()) == []


def test_tracker_bound_reports_further_nodes_as_over_limit() -> None:
    t = SharedNodeTracker(TrackerLimits(shared_per_domain=1))
    t.note(1, "/local/domain/1/data/a", b"x", [b"n1", b"r2"])
    t.note(1, "/local/domain/1/data/b", b"x", [b"n1", b"r2"])
    assert t.flush(_none) == [
        ChannelShared(1, "/local/domain/1/data/b", (2,), False, over_limit=True),
        ChannelShared(1, "/local/domain/1/data/a", (2,), False),
    ]
    assert t.tracked(1) == 1


def test_exempt_parties_are_left_to_the_other_hook() -> None:
    t = SharedNodeTracker()
    t.note(1, "/local/domain/1/device/vif/0/x", b"x", [b"n1", b"r5", b"r2"])
    events = t.flush(lambda o, p: (frozenset({5}), False))
    assert events == [ChannelShared(1, "/local/domain/1/device/vif/0/x", (2,), False)]


def test_a_dead_domain_reaches_nothing_any_more() -> None:
    t = SharedNodeTracker()
    t.note(1, "/local/domain/1/data/a", b"x", [b"n1", b"r2"])
    t.flush(_none)
    t.domain_gone(2)
    assert t.flush(_none) == [ChannelUnshared(1, "/local/domain/1/data/a")]


# ------------------------------------------------------------------ the pipeline, simulated

Perms = tuple[str, ...]
Store = dict[str, tuple[bytes, Perms]]


def _domain_nodes(store: Store) -> None:
    for d, name in GUESTS.items():
        uuid = f"00000000-0000-4000-8000-{d:012d}"
        home = f"/local/domain/{d}"
        store[home] = (b"", ("n0", f"r{d}"))
        store[f"{home}/name"] = (name.encode(), ("n0", f"r{d}"))
        store[f"{home}/vm"] = (f"/vm/{uuid}".encode(), ("n0", f"r{d}"))
        store[f"/vm/{uuid}"] = (b"", ("n0",))
        store[f"/libxl/{d}"] = (b"", ("n0",))


class Sim:
    """The daemon's pure pipeline with vetoes applied to `store` and fed back."""

    def __init__(self, limits: Limits) -> None:
        self.asm = EventAssembler(limits)
        self.model = HostModel(POLICY.bootstrap)
        self.engine = Engine(PolicyEngine(POLICY), STORE)

    def feed(self, store: Store, paths: Iterable[str]) -> list[str]:
        """One watch batch: `paths` read from `store` (their latest state only); returns the
        paths to read next (the vetoes' watch events and `EventAssembler.withdraw`'s)."""
        nodes = []
        for p in paths:
            v = store.get(p)
            nodes.append((p, v[0], v[1]) if v is not None else (p, None, None))
        queue: list[NeedsDecision] = []
        self._apply(self.asm.feed_batch(nodes), queue)
        changed: list[str] = []
        while queue:
            need = queue.pop(0)
            if not self.model.is_current(need):
                continue
            out = self.engine.decide(need, self.model)
            queue.extend(self.model.record_decision(need, out.allowed, label=out.label))
            for a in out.actions:
                if isinstance(a, ResetPerms):
                    cur = store.get(a.path)
                    if cur is not None and cur[1][0][1:] == str(a.owner):
                        store[a.path] = (cur[0], (f"n{a.owner}",))
                elif isinstance(a, RemoveNode | RemoveVchan):
                    for p in [p for p in store if p == a.path or p.startswith(a.path + "/")]:
                        del store[p]
                else:
                    continue
                changed.append(a.path)
                # the daemon's Enforcer.on_changed -> Daemon._veto_changed
                events, again = self.asm.withdraw(a.path, subtree=not isinstance(a, ResetPerms))
                self._apply(events, queue)
                changed.extend(again)
        return changed

    def _apply(self, events: Iterable[Event], queue: list[NeedsDecision]) -> None:
        for e in events:
            queue.extend(o for o in self.model.apply(e) if not isinstance(o, DomainReleased))

    def settle(self, store: Store, changed: list[str]) -> None:
        for _ in range(20):
            if not changed:
                return
            changed = self.feed(store, changed)
        raise AssertionError("the vetoes did not settle")


def _guest_tree() -> st.SearchStrategy[list[tuple[int, str, str, Perms]]]:
    owner = st.sampled_from(sorted(GUESTS))
    where = st.sampled_from(["data", "attr", "device/vif/0", "device/suspend/event-channel"])
    leaf = st.lists(
        st.sampled_from(["ring-ref", "event-channel", "v", "x", "q-1"]), min_size=1, max_size=3
    )
    letter = st.sampled_from("nrwb")
    other = st.sampled_from([0, 1, 2, 3, 4, 9])
    acl = st.lists(st.tuples(letter, other), max_size=3)

    def node(o: int, w: str, parts: list[str], default: str, entries: list[tuple[str, int]]):  # type: ignore[no-untyped-def]
        return (o, w, "/".join(parts), (f"{default}{o}", *(f"{x}{d}" for x, d in entries)))

    one = st.builds(node, owner, where, leaf, letter, acl)
    return st.lists(one, min_size=1, max_size=12)


def _violations(store: Store) -> list[str]:
    policy = PolicyEngine(POLICY)
    bad = []
    for path, (_, perms) in store.items():
        r = reach(perms)
        if r is None or not guest_path(path):
            continue
        owner, peers, world = r
        if owner not in GUESTS:
            continue
        if world:
            bad.append(f"{path} {perms}: every domain")
        for p in peers & set(GUESTS):
            d = policy.channel(
                Hook.XS_CHANNEL,
                STORE.domain_label(None, GUESTS[owner]),
                STORE.domain_label(None, GUESTS[p]),
            )
            if not d.permitted:
                bad.append(f"{path} {perms}: {owner}<->{p}")
    return bad


@settings(max_examples=300, deadline=None)
@given(_guest_tree(), st.integers(1, 6), st.integers(1, 4))
def test_no_guest_node_reaches_another_guest_the_policy_keeps_apart(
    tree: list[tuple[int, str, str, Perms]], shared_bound: int, vchan_bound: int
) -> None:
    store: Store = {}
    _domain_nodes(store)
    sim = Sim(Limits(shared_nodes_per_domain=shared_bound, vchans_per_domain=vchan_bound))
    sim.feed(store, sorted(store))
    written = []
    for owner, where, rel, perms in tree:
        path = f"/local/domain/{owner}/{where}/{rel}"
        store[path] = (b"7", perms)
        written.append(path)
    sim.settle(store, sim.feed(store, written))
    assert _violations(store) == []


@settings(max_examples=200, deadline=None)
@given(_guest_tree())
def test_a_tree_granted_again_right_after_its_vetoes_is_decided_again(
    tree: list[tuple[int, str, str, Perms]],
) -> None:
    """The guest writes its whole tree again right after the daemon's vetoes ran, before the
    daemon reads anything: each veto's watch event and the guest's coalesce, so the next read
    shows the very facts decided before the veto. They are decided (and vetoed) again."""
    store: Store = {}
    _domain_nodes(store)
    sim = Sim(Limits())
    sim.feed(store, sorted(store))
    written = [f"/local/domain/{owner}/{where}/{rel}" for owner, where, rel, _ in tree]
    for path, (_, _, _, perms) in zip(written, tree, strict=True):
        store[path] = (b"7", perms)
    changed = sim.feed(store, written)
    for path, (_, _, _, perms) in zip(written, tree, strict=True):
        store[path] = (b"8", perms)  # the guest grants again
    sim.settle(store, [*changed, *written])
    assert _violations(store) == []


def test_withdraw_makes_the_same_facts_new_again() -> None:
    """`EventAssembler.withdraw` after a reset and after a rendezvous removal: the same
    grant, read once after the guest made it again, is emitted again."""
    asm = EventAssembler()
    node = "/local/domain/1/data/x"
    assert asm.feed(node, b"v", [b"r1"]) == [ChannelShared(1, node, (), True)]
    assert asm.feed(node, b"v", [b"r1"]) == []  # same facts: nothing
    events, again = asm.withdraw(node)
    assert events == [ChannelUnshared(1, node)] and again == [node]
    assert asm.feed(node, b"v", [b"r1"]) == [ChannelShared(1, node, (), True)]
    assert asm.withdraw("/local/domain/1/data/untracked") == ([], [])

    store: Store = {}
    _domain_nodes(store)
    asm.feed_batch((p, v, perms) for p, (v, perms) in sorted(store.items()))
    vpath = "/local/domain/1/data/vchan/2/1"
    keys = [
        (f"{vpath}/ring-ref", b"8", [b"n1", b"r2"]),
        (f"{vpath}/event-channel", b"23", [b"n1", b"r2"]),
    ]
    published = [VchanPublished(1, vpath, (2,), False, 8, 23)]
    assert asm.feed_batch(keys) == published
    assert asm.feed_batch(keys) == []  # same facts: nothing
    events, again = asm.withdraw(vpath, subtree=True)
    assert events == [VchanRemoved(1, vpath)] and again == sorted(k for k, _, _ in keys)
    assert asm.feed_batch(keys) == published


# -------------------------------------------------- denied domains, decided again (20 #4)


def test_a_domain_denied_later_takes_its_permitted_channels_with_it() -> None:
    """A domain first admitted (device, vchan and shared node permitted), then denied (here:
    the daemon's answer to a quota re-check): every one of them is decided again, denied."""
    from test_engine import Host, uuid

    from shyped.core.events import DeviceAdded, DeviceKey, DomainAppeared, VchanPublished

    h = Host()
    h.feed(DomainAppeared(1, uuid(1), "web-a1"), DomainAppeared(2, uuid(2), "batch-a1"))
    vbd = DeviceKey("vbd", 1, 51712)
    first = h.feed(
        DeviceAdded(vbd, 0, "vbd", "/srv/xen/images/web-a1.img", True),
        VchanPublished(2, "/local/domain/2/data/vchan/1/0", (1,), False, 8, 23),
        ChannelShared(2, "/local/domain/2/data/x", (1,), False),
    )
    assert [o.allowed for o in first] == [True, True, True]
    dom = h.model.domain(1)
    assert dom is not None
    need = NeedsDecision("domain", 1, 1, uuid=dom.uuid, name=dom.name, facts=(dom.uuid,))
    again = h.model.record_decision(need, False, label=dom.label)
    start = len(h.out)
    h.decide(again)
    redecided = h.out[start:]
    assert sorted(o.what for o in redecided) == [
        "device vbd 1/51712",
        "vchan /local/domain/2/data/vchan/1/0",
        "xs-channel /local/domain/2/data/x",
    ]
    for o in redecided:
        assert not o.allowed and o.decision.rule == "denied-domain", o.log_line()
    # A channel between a denied domain and another is vetoed even by the other's side.
    assert any(isinstance(a, ResetPerms) for o in redecided for a in o.actions)
