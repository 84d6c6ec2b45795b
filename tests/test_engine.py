"""The pure decision engine (shyped.core.engine) over the host model, on the example hosting policy.

No xenstore here: events are built by hand, as the assembler would emit them."""

from __future__ import annotations

import attrs
from daemon_helpers import HOSTING, LABELS
from hypothesis import given, settings
from hypothesis import strategies as st

from shyped.core.actions import CutDevice, RemoveVchan, VetoDomain, WriteLabel, label_node
from shyped.core.engine import Engine, Outcome, adapt_running_system, resource_of
from shyped.core.events import (
    DeviceAdded,
    DeviceKey,
    DomainAppeared,
    DomainVanished,
    VchanPublished,
)
from shyped.core.host import HostModel
from shyped.core.hostfacts import DomainReleased, DomainState, NeedsDecision
from shyped.core.labelstore import LabelStore, load_label_store
from shyped.policy import update
from shyped.policy.decisions import Hook, PolicyEngine, Rule
from shyped.policy.model import Defaults
from shyped.policy.toml_format import load
from shyped.service.config import DomainVeto, Mode

POLICY = load(HOSTING)
STORE = load_label_store(LABELS)


def uuid(domid: int) -> str:
    return f"00000000-0000-4000-8000-{domid:012d}"


class Host:
    """A host model and an engine, with the daemon's loop (decide, record, release)."""

    def __init__(
        self,
        *,
        mode: Mode = Mode.ENFORCING,
        veto: DomainVeto = DomainVeto.DESTROY,
        labels: LabelStore = STORE,
        policy: PolicyEngine | None = None,
    ) -> None:
        self.engine = Engine(policy or PolicyEngine(POLICY), labels, mode=mode, domain_veto=veto)
        self.model = HostModel(POLICY.bootstrap)
        self.out: list[Outcome] = []

    def feed(self, *events: object) -> list[Outcome]:
        start = len(self.out)
        queue: list[NeedsDecision] = []
        for e in events:
            for o in self.model.apply(e):  # type: ignore[arg-type]
                if isinstance(o, DomainReleased):
                    self.engine.release(o)
                else:
                    queue.append(o)
        self.decide(queue)
        return self.out[start:]

    def decide(self, queue: list[NeedsDecision]) -> None:
        while queue:
            need = queue.pop(0)
            o = self.engine.decide(need, self.model)
            queue.extend(
                self.model.record_decision(need, o.allowed, label=o.label, reason=o.decision.reason)
            )
            self.out.append(o)

    def domain(self, domid: int, name: str) -> Outcome:
        (o,) = self.feed(DomainAppeared(domid, uuid(domid), name))
        return o

    def device(
        self, kind: str, fe: int, devid: int, resource: str | None, *, be: int = 0, w: bool = True
    ) -> Outcome:
        (o,) = self.feed(DeviceAdded(DeviceKey(kind, fe, devid), be, kind, resource, w))
        return o

    def vchan(self, server: int, clients: tuple[int, ...], *, world: bool = False) -> Outcome:
        path = f"/local/domain/{server}/data/vchan/{clients[0] if clients else 'x'}/0"
        (o,) = self.feed(VchanPublished(server, path, clients, world, 8, 23))
        return o


# ---- domains -------------------------------------------------------------------------------


def test_admission_publishes_the_label_and_counts_the_domain() -> None:
    h = Host()
    o = h.domain(1, "web-a1")
    assert o.allowed and o.label == "bank-a-web" and o.decision.hook is Hook.DOMAIN_ADMIT
    assert o.actions == (WriteLabel(1, uuid(1), "ACM:example.hosting:bank-a-web"),)
    assert o.actions[0].path == label_node(1) == "/local/domain/1/shyped/label"  # type: ignore[union-attr]
    assert h.engine.counted() == {1: "bank-a-web"}
    assert h.model.domain(1).state is DomainState.ADMITTED  # type: ignore[union-attr]


def test_chinese_wall_conflict_is_vetoed_as_configured() -> None:
    for veto in DomainVeto:
        h = Host(veto=veto)
        h.domain(1, "web-a1")
        o = h.domain(2, "web-b1")
        assert not o.allowed and o.decision.rule is Rule.CHINESE_WALL
        assert o.actions == (VetoDomain(2, veto),) and o.enforced
        assert o.label == "bank-b-web"  # kept for reporting
        assert h.engine.counted() == {1: "bank-a-web"}
        assert o.log_line().endswith(f"-> {veto.value} domain 2")


def test_permissive_counts_a_denied_domain_that_keeps_running() -> None:
    h = Host(mode=Mode.PERMISSIVE)
    h.domain(1, "web-a1")
    o = h.domain(2, "web-b1")
    assert not o.allowed and not o.enforced
    assert o.planned == (VetoDomain(2, DomainVeto.DESTROY),)
    assert o.actions == (WriteLabel(2, uuid(2), "ACM:example.hosting:bank-b-web"),)
    assert "(permissive: not enforced)" in o.log_line()
    assert h.engine.counted() == {1: "bank-a-web", 2: "bank-b-web"}
    # Both banks run: neither may start another domain.
    assert not h.domain(3, "batch-a1").allowed
    assert not h.domain(4, "web-b2").allowed  # unlabelled: the example policy denies


def test_labels_come_from_uuid_then_name_then_the_policy_default() -> None:
    store = STORE.with_domain(uuid=uuid(5), label="shop").with_domain(name="odd", label="nope")
    h = Host(labels=store)
    assert h.domain(5, "web-a1").label == "shop"  # uuid wins over the name
    unknown = h.domain(6, "odd")
    assert not unknown.allowed and unknown.decision.rule is Rule.LABEL
    assert "unknown VM label 'nope'" in unknown.decision.reason
    nobody = h.domain(7, "nobody")
    assert not nobody.allowed and nobody.decision.rule is Rule.DEFAULT
    lenient = attrs.evolve(POLICY, defaults=Defaults(unlabelled_domain="shop"))
    h2 = Host(policy=PolicyEngine(lenient))
    assert h2.domain(7, "nobody").label == "shop"


def test_release_frees_the_wall_for_the_competitor() -> None:
    h = Host()
    h.domain(1, "web-a1")
    assert not h.domain(2, "web-b1").allowed
    h.feed(DomainVanished(2), DomainVanished(1))
    assert h.engine.counted() == {}
    assert h.domain(3, "web-b1").allowed


# ---- devices -------------------------------------------------------------------------------


def test_device_needs_a_common_type_with_its_backend_and_its_resource() -> None:
    h = Host()
    h.domain(1, "web-a1")
    h.domain(2, "shop-1")
    ok = h.device("vbd", 1, 51712, "/srv/xen/images/web-a1.img")
    assert ok.allowed and [c.hook for c in ok.checks] == [Hook.DEVICE_CHANNEL, Hook.RESOURCE]
    assert ok.resource is not None and ok.resource.resource == "disk:/srv/xen/images/web-a1.img"
    bridge = h.device("vif", 1, 0, "xenbr-public")
    assert not bridge.allowed and bridge.decision.hook is Hook.RESOURCE
    assert bridge.actions == (CutDevice(DeviceKey("vif", 1, 0), 0, "vif"),)
    assert bridge.actions[0].backend_dir == "/local/domain/0/backend/vif/1/0"  # type: ignore[union-attr]
    assert bridge.actions[0].libxl_dir == "/libxl/1/device/vif/0"  # type: ignore[union-attr]
    fe_be = h.device("vif", 2, 0, "xenbr-public", be=1)
    assert not fe_be.allowed and fe_be.decision.hook is Hook.DEVICE_CHANNEL
    assert len(fe_be.checks) == 1  # the resource is not looked at once the channel is denied
    assert fe_be.peer is not None and fe_be.peer.name == "web-a1"


def test_read_only_use_is_checked_as_read_only() -> None:
    h = Host()
    h.domain(1, "reports-a1")
    image = "/srv/xen/images/web-a1.img"  # confidential
    assert not h.device("vbd", 1, 51712, image, w=True).allowed
    assert not h.device("vbd", 1, 51728, image, w=False).allowed  # no read up either
    archive = "/srv/xen/images/archive-a.img"  # internal
    assert h.device("vbd", 1, 51744, archive, w=True).allowed


def test_unusable_resource_names_are_denied_not_unlabelled() -> None:
    assert resource_of("vbd", "relative/path.img") is None
    assert resource_of("vif", "bad bridge!") is None
    assert resource_of("9pfs", "/srv/share") == "disk:/srv/share"
    h = Host()
    h.domain(1, "web-a1")
    o = h.device("vbd", 1, 51712, "relative/path.img")
    assert not o.allowed and o.decision.rule is Rule.LABEL
    assert "not a valid resource id" in o.decision.reason


def test_devices_of_a_domain_being_destroyed_are_left_to_its_destruction() -> None:
    for veto, cut in ((DomainVeto.DESTROY, False), (DomainVeto.PAUSE, True)):
        h = Host(veto=veto)
        h.domain(1, "web-a1")
        h.domain(2, "web-b1")
        o = h.device("vif", 2, 0, "xenbr-bank-a")
        assert not o.allowed
        assert o.enforced is cut
        if not cut:
            assert o.note == "frontend domain 2 is being destroyed"


# ---- vchans --------------------------------------------------------------------------------


def test_vchan_rules() -> None:
    h = Host()
    h.domain(1, "web-a1")
    h.domain(2, "shop-1")
    assert h.vchan(0, (1,)).allowed
    bad = h.vchan(1, (2,))
    assert not bad.allowed and bad.decision.hook is Hook.VCHAN
    assert bad.actions == (RemoveVchan(1, "/local/domain/1/data/vchan/2/0"),)
    world = h.vchan(1, (), world=True)
    assert not world.allowed and "readable by every domain" in world.decision.reason
    absent = h.vchan(1, (9,))
    assert absent.allowed and "no named client exists yet" in absent.decision.reason
    both = h.vchan(0, (1, 2))
    assert both.allowed and len(both.checks) == 2


# ---- sweeps and policy switches ------------------------------------------------------------


def test_sweep_readmits_running_domains_first_then_judges_the_rest() -> None:
    h = Host(mode=Mode.PERMISSIVE)
    h.domain(1, "web-b1")  # first comer
    h.domain(2, "web-a1")  # denied, but runs and is counted (permissive)
    h.engine.mode = Mode.ENFORCING
    h.engine.begin_sweep(h.model)
    needs = sorted(
        h.model.all_needs(),
        key=lambda n: 0 if h.model.domain(n.domid).state is DomainState.ADMITTED else 1,  # type: ignore[union-attr]
    )
    start = len(h.out)
    h.decide(needs)
    verdicts = {o.what: o.allowed for o in h.out[start:]}
    assert verdicts == {"domain 1": True, "domain 2": False}
    assert h.engine.counted() == {1: "bank-b-web"}


def test_places_held_for_incoming_domains_count_for_new_admissions_only() -> None:
    """Pool mode's granted reservations (`Engine.held`, UUID -> label): a domain started by
    hand meanwhile is admitted as if the incoming ones ran (Chinese Wall, max_domains); the
    holder itself takes its place; a running domain re-admitted by a sweep keeps its place."""
    h2 = Host()
    h2.engine.held = {uuid(9): "bank-a-web"}  # a place held for bank A's incoming web domain
    out = h2.domain(4, "web-b1")  # bank B's, started by hand meanwhile
    assert not out.allowed and "held for incoming domains" in out.decision.reason
    assert h2.domain(3, "batch-a1").allowed  # bank A's batch domain: no conflict
    (incoming,) = h2.feed(DomainAppeared(9, uuid(9), "web-a1"))
    assert incoming.allowed
    h3 = Host()
    h3.domain(5, "web-b1")
    h3.engine.held = {uuid(9): "bank-a-web"}  # granted after a policy change made them rivals
    h3.engine.begin_sweep(h3.model)
    start = len(h3.out)
    h3.decide(list(h3.model.all_needs()))
    assert [o.allowed for o in h3.out[start:]] == [True]  # the running domain keeps its place
    quota = {f"00000000-0000-4000-8000-00000000010{n}": "bank-a-web" for n in range(4)}
    h4 = Host()
    h4.engine.held = quota  # bank-a-web: max_domains = 4, all held
    out = h4.domain(6, "web-a1")
    assert not out.allowed and out.decision.rule is Rule.QUOTA


def test_a_held_place_whose_domain_runs_is_counted_once() -> None:
    """Between the incoming domain's admission and the grant being settled, the place is not
    counted twice (running and held) against the others: bank-a-web has max_domains = 4."""
    h = Host()
    h.engine.held = {uuid(9): "bank-a-web"}
    (incoming,) = h.feed(DomainAppeared(9, uuid(9), "web-a1"))
    assert incoming.allowed
    for domid in (11, 12, 13):  # three more by hand: four run, none held any longer
        (out,) = h.feed(DomainAppeared(domid, uuid(domid), "web-a1"))
        assert out.allowed, out.decision.reason
    (fifth,) = h.feed(DomainAppeared(14, uuid(14), "web-a1"))
    assert not fifth.allowed and fifth.decision.rule is Rule.QUOTA


def test_switch_policy_follows_renames() -> None:
    h = Host()
    h.domain(1, "shop-1")
    h.device("vbd", 1, 51712, "/srv/xen/images/shop-1.img")
    relabelled = attrs.evolve(
        POLICY,
        version=attrs.evolve(POLICY.version, minor=1),
        from_policy=POLICY.ref,
        vm_labels=tuple(
            attrs.evolve(v, name="web-shop", from_name="shop") if v.name == "shop" else v
            for v in POLICY.vm_labels
        ),
    )
    system = h.engine.running_system(h.model)
    assert system.resources == (
        update.ResourceInUse(1, "shop-disk", True, "disk:/srv/xen/images/shop-1.img"),
    )
    check = update.check_update(POLICY, relabelled, system)
    assert check.allowed, str(check)
    h.engine.switch_policy(PolicyEngine(relabelled), check)
    assert h.engine.counted() == {1: "web-shop"}
    h.engine.begin_sweep(h.model)
    start = len(h.out)
    h.decide(h.model.all_needs())
    redone = h.out[start]
    assert redone.allowed and redone.label == "web-shop"
    assert redone.actions == (WriteLabel(1, uuid(1), "ACM:example.hosting:web-shop"),)


def test_running_system_takes_resource_labels_from_the_store() -> None:
    h = Host()
    h.domain(1, "web-a1")
    h.device("vif", 1, 0, "xenbr-bank-a")
    system = adapt_running_system(h.model.running_system(), STORE)
    assert [d.label for d in system.domains] == ["dom0", "bank-a-web"]
    assert system.channels == (update.LiveChannel(1, 0, "vif"),)  # frontend, backend
    assert system.resources == (
        update.ResourceInUse(1, "xenbr-bank-a", True, "bridge:xenbr-bank-a"),
    )


# ---- an invariant --------------------------------------------------------------------------

NAMES = ["web-a1", "batch-a1", "reports-a1", "web-b1", "shop-1", "netdom"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 8), st.sampled_from(NAMES)), max_size=40))
def test_enforcing_never_counts_two_conflicting_domains(ops: list[tuple[bool, int, str]]) -> None:
    """Whatever comes and goes, the counted domains are exactly the admitted running ones and
    no bank A domain is ever counted together with a bank B one."""
    h = Host()
    for create, domid, name in ops:
        dom = h.model.domain(domid)
        if create and dom is None:
            o = h.domain(domid, name)
            if not o.allowed:
                h.feed(DomainVanished(domid))  # the veto destroyed it
        elif not create and dom is not None:
            h.feed(DomainVanished(domid))
        counted = h.engine.counted()
        admitted = {
            d.domid for d in h.model.domains() if d.domid and d.state is DomainState.ADMITTED
        }
        assert set(counted) == admitted
        labels = set(counted.values())
        assert not (
            labels & {"bank-a-web", "bank-a-batch", "bank-a-reports"} and "bank-b-web" in labels
        )
