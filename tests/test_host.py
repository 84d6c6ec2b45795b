"""The host model (shyped.core.host), fed by events parsed from the Xen 4.17 reference capture."""

from __future__ import annotations

import pytest
from hostmodel_helpers import (
    UUID,
    VCHAN_PATH,
    allow_all,
    from_snapshot,
    load_layout,
    replay_log,
    summary,
)

from shyped.core.assembler import EventAssembler
from shyped.core.events import (
    DeviceAdded,
    DeviceKey,
    DomainAppeared,
    DomainVanished,
    Garbage,
    VchanPublished,
)
from shyped.core.host import HostModel
from shyped.core.hostfacts import (
    DomainReleased,
    DomainState,
    LiveChannel,
    NeedsDecision,
    ResourceUse,
    RunningDomain,
    VchanKey,
)

VIF = DeviceKey("vif", 1, 0)
VBD = DeviceKey("vbd", 1, 51712)
CONSOLE = DeviceKey("console", 1, 0)
DISK = "/var/lib/xen/images/xsgold-xvda.img"
CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
VCHAN = VchanKey(0, VCHAN_PATH)


def needs(outputs: list[object]) -> list[NeedsDecision]:
    return [o for o in outputs if isinstance(o, NeedsDecision)]


# ---- the reference domain -----------------------------------------------------------------


def test_reference_snapshot_builds_the_reference_host() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    dom = model.domain(1)
    assert dom is not None
    assert (dom.uuid, dom.name, dom.state, dom.label) == (
        UUID,
        "xsgold",
        DomainState.ADMITTED,
        "guest",
    )
    assert model.domain_by_uuid(UUID) is dom
    vif, vbd, console = model.device(VIF), model.device(VBD), model.device(CONSOLE)
    assert vif is not None and vbd is not None and console is not None
    assert (vif.backend, vif.resource, vif.frontend_state, vif.backend_state) == (0, "xenbr0", 4, 4)
    assert vif.grant_refs == (("rx-ring-ref", 521), ("tx-ring-ref", 520))
    assert vif.event_channels == (("event-channel-rx", 9), ("event-channel-tx", 8))
    assert (vbd.backend, vbd.resource, vbd.writable, vbd.online) == (0, DISK, True, True)
    assert vbd.grant_refs == (("ring-ref", 522),) and vbd.event_channels == (("event-channel", 10),)
    assert console.grant_refs == (("ring-ref", 260098),) and console.event_channels == (
        ("port", 2),
    )
    assert [d.key for d in model.devices_of(1)] == [CONSOLE, VBD, VIF]
    assert [d.key for d in model.devices_of(0)] == [CONSOLE, VBD, VIF]
    vchan = model.vchan(VCHAN)
    assert vchan is not None
    assert (vchan.clients, vchan.any_domain, vchan.ring_ref, vchan.port) == ((1,), False, 8, 23)
    assert model.vchans_of(1) == model.vchans_of(0) == [vchan]
    assert model.running_system().domains == (
        RunningDomain(0, None, "Domain-0", "dom0"),
        RunningDomain(1, UUID, "xsgold", "guest"),
    )
    assert model.running_system().channels == (
        LiveChannel(0, 1, "vchan"),
        LiveChannel(1, 0, "console"),
        LiveChannel(1, 0, "vbd"),
        LiveChannel(1, 0, "vif"),
    )
    assert model.running_system().resources == (
        ResourceUse(1, "vbd", DISK, True),
        ResourceUse(1, "vif", "xenbr0", True),
    )


def test_devices_and_vchans_are_asked_about_once_the_domain_is_decided() -> None:
    events = EventAssembler().reconcile(CONNECTED)
    model = HostModel(dom0_label="dom0")
    first = needs(model.apply_all(events))
    assert first == [
        NeedsDecision("domain", 1, 1, uuid=UUID, name="xsgold", facts=(UUID,)),
    ]
    assert model.domain(1).state is DomainState.SEEN  # type: ignore[union-attr]
    assert model.running_system().channels == ()
    ready = model.record_decision(first[0], True, label="guest")
    assert [(n.kind, n.key, n.domid, n.peers, n.resource) for n in ready] == [
        ("device", CONSOLE, 1, (0,), None),
        ("device", VBD, 1, (0,), ResourceUse(1, "vbd", DISK, True)),
        ("device", VIF, 1, (0,), ResourceUse(1, "vif", "xenbr0", True)),
        ("vchan", VCHAN, 0, (1,), None),
    ]
    for n in ready:
        assert model.record_decision(n, True) == []
    assert len(model.running_system().channels) == 4


def test_replaying_the_same_facts_asks_nothing_again() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    before = summary(model)
    assert model.apply_all(EventAssembler().reconcile(CONNECTED)) == []  # restart-style replay
    assert model.apply_all(asm.reconcile(CONNECTED)) == []  # reconnect-style reconcile
    assert summary(model) == before


def test_changed_trusted_facts_ask_again_and_stale_answers_are_ignored() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    out = model.apply(DeviceAdded(VBD, 0, "vbd", "/srv/other.img", False))
    (need,) = needs(out)
    assert need.resource == ResourceUse(1, "vbd", "/srv/other.img", False)
    assert model.apply(DeviceAdded(VBD, 0, "vbd", "/srv/other.img", False)) == []  # asked once
    model.apply(DeviceAdded(VBD, 0, "vbd", "/srv/third.img", False))
    assert not model.is_current(need)
    assert model.record_decision(need, False) == []
    decided = ((1, False), (0, False))  # both parties decided, neither denied
    assert model.device(VBD).decision.facts == (0, "vbd", DISK, True, False, decided)  # type: ignore[union-attr]


def test_denied_domain_is_not_running_and_its_devices_are_still_asked_about() -> None:
    model = HostModel(dom0_label="dom0")
    (need,) = needs(model.apply_all(EventAssembler().reconcile(CONNECTED)))
    ready = model.record_decision(need, False, label="secret", reason="conflict set")
    assert model.domain(1).state is DomainState.DENIED  # type: ignore[union-attr]
    assert model.domain(1).label == "secret"  # type: ignore[union-attr]
    assert len(ready) == 4
    allow_all(model, list(ready))
    running = model.running_system()
    assert [d.domid for d in running.domains] == [0]
    assert running.channels == running.resources == ()


def test_paused_domains_still_count_as_running() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    model.set_state(1, DomainState.PAUSED)
    assert [d.domid for d in model.running_system().domains] == [0, 1]
    with pytest.raises(ValueError):
        model.set_state(1, DomainState.GONE)
    with pytest.raises(KeyError):
        model.set_state(9, DomainState.PAUSED)


def test_vanishing_frees_the_domain_and_reports_what_it_held() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    dom = model.domain(1)
    out = model.apply_all(asm.reconcile(load_layout("layout-after-destroy.txt")))
    assert out == [DomainReleased(1, UUID, "xsgold", "guest", DomainState.ADMITTED)]
    assert dom is not None and dom.state is DomainState.GONE
    assert model.domain(1) is None and model.domain_by_uuid(UUID) is None
    assert model.devices() == [] and model.vchans() == []
    assert model.devices_of(0) == model.devices_of(1) == []
    assert [d.domid for d in model.running_system().domains] == [0]


def test_a_new_domain_under_an_old_id_is_released_and_asked_about_again() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    other = "00000000-0000-4000-8000-000000000001"
    out = model.apply(DomainAppeared(1, other, "reborn"))
    assert out[0] == DomainReleased(1, UUID, "xsgold", "guest", DomainState.ADMITTED)
    assert needs(out) == [NeedsDecision("domain", 1, 1, uuid=other, name="reborn", facts=(other,))]
    assert model.apply(DomainAppeared(1, other, "renamed")) == []  # a rename asks nothing
    assert model.domain(1).name == "renamed"  # type: ignore[union-attr]


def test_a_duplicate_uuid_is_an_identity_problem_of_the_newcomer_only() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    (twin,) = needs(model.apply(DomainAppeared(7, UUID, "twin")))
    assert twin.identity == f"UUID {UUID} is already held by domain 1"
    assert model.domain_by_uuid(UUID) is model.domain(1)
    assert [d.domid for d in model.domains_by_uuid(UUID)] == [1, 7]
    model.record_decision(twin, False, reason=twin.identity)
    out = model.apply(DomainVanished(7))
    assert out == [DomainReleased(7, UUID, "twin", None, DomainState.DENIED)]
    assert model.domain_by_uuid(UUID) is model.domain(1)  # the holder keeps it
    bad = model.apply(DomainAppeared(1, UUID, None, "name is not printable"))
    assert bad == [] and model.domain(1).identity == "name is not printable"  # type: ignore[union-attr]
    assert model.domain(1).state is DomainState.ADMITTED  # type: ignore[union-attr]


def test_vchan_to_an_absent_client_is_asked_again_when_it_arrives() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    out = model.apply(VchanPublished(1, "/local/domain/1/data/v", (7,), False, 3, 4))
    (first,) = needs(out)
    assert (first.domid, first.peers) == (1, (7,))
    model.record_decision(first, True)
    other = "00000000-0000-4000-8000-000000000007"
    (need7,) = needs(model.apply(DomainAppeared(7, other, "seven")))
    again = model.record_decision(need7, True, label="guest")
    assert [(n.kind, n.peers) for n in again] == [("vchan", (7,))]
    assert not model.is_current(first)


def test_vchan_waits_for_a_present_client_to_be_decided() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    other = "00000000-0000-4000-8000-000000000007"
    (need7,) = needs(model.apply(DomainAppeared(7, other, "seven")))
    assert model.apply(VchanPublished(1, "/local/domain/1/data/v", (7,), False, 3, 4)) == []
    assert [n.kind for n in model.record_decision(need7, True, label="x")] == ["vchan"]


def test_all_needs_asks_everything_again_domains_first() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    again = model.all_needs()
    assert [n.kind for n in again] == ["domain", "device", "device", "device", "vchan"]
    assert all(model.is_current(n) for n in again)


# ---- hostile input in the model -----------------------------------------------------------


def test_garbage_is_counted_per_domain_with_a_bounded_ring() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    for i in range(500):
        model.apply_all(asm.feed("/local/domain/1/device/vif/0/tx-ring-ref", f" {i}".encode()))
    model.apply_all(asm.feed(b"/local/domain/1/\xff", b""))
    model.apply(Garbage(42, "/local/domain/42/x", "nobody"))
    g = model.garbage(1)
    assert g.count == 500 and len(g.last) == 16
    assert g.last[-1] == (
        "/local/domain/1/device/vif/0/tx-ring-ref",
        "grant ref or port is not a uint32",
    )
    assert model.unattributed.count == 2
    assert model.counters["Garbage"] == 502


def test_backend_id_rewrite_does_not_move_the_channel() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    out = model.apply_all(
        asm.feed_batch(
            [
                ("/local/domain/1/device/vif/0/backend-id", b"2", None),
                ("/local/domain/1/device/vif/0/backend", b"/local/domain/2/backend/vif/1/0", None),
            ]
        )
    )
    assert out == []
    assert model.device(VIF).backend == 0  # type: ignore[union-attr]
    assert LiveChannel(1, 0, "vif") in model.running_system().channels
    assert model.garbage(1).count == 2


# ---- the live stream ----------------------------------------------------------------------


@pytest.mark.parametrize("batched", [True, False], ids=["per-transaction", "node-by-node"])
def test_log_replay_model_matches_the_snapshot_model_at_every_dump(batched: bool) -> None:
    asm = EventAssembler()
    model = HostModel(dom0_label="dom0")
    checked = []
    for step in replay_log():
        if step.phase is not None and step.phase.startswith("dump-"):
            layout = f"layout-{step.phase.removeprefix('dump-')}.txt"
            _, reference, _ = from_snapshot(load_layout(layout))
            assert summary(model) == summary(reference), step.phase
            checked.append(step.phase)
            if step.phase == "dump-connected":
                assert {d.key for d in model.devices()} == {VIF, VBD, CONSOLE}
            if step.phase == "dump-after-detach":
                assert {d.key for d in model.devices()} == {VIF, CONSOLE}
            if step.phase == "dump-after-destroy":
                assert [d.domid for d in model.domains()] == [0]
            continue
        if batched:
            events = asm.feed_batch(step.nodes)
        else:
            events = [e for node in step.nodes for e in asm.feed(*node)]
        allow_all(model, model.apply_all(events))
        if any(isinstance(e, VchanPublished) for e in events):
            assert LiveChannel(0, 1, "vchan") in model.running_system().channels
    assert len(checked) == 6
    assert model.garbage(1).count == 0 and model.unattributed.count == 0
    assert model.counters["DomainVanished"] == 1
