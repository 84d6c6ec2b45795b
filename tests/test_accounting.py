"""Per-domain accounting: the dom0-written sizes (`DomainResources`) and `shyped.core.accounting`,
fed by the real event parser from the Xen 4.17 reference capture."""

from __future__ import annotations

from hostmodel_helpers import UUID, from_snapshot, load_layout, model_from, replay_log

from shyped.core.accounting import (
    KIB,
    AccountCache,
    account_domain,
    account_host,
    touched_domains,
)
from shyped.core.assembler import EventAssembler
from shyped.core.events import (
    DomainAppeared,
    DomainResources,
    Garbage,
)
from shyped.core.host import HostModel

CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
KIB_128M = 131072
MIB = 1024 * 1024


def resources(events: list[object]) -> list[DomainResources]:
    return [e for e in events if isinstance(e, DomainResources)]


# ---- DomainResources from the trusted memory/ and cpu/ nodes --------------------------------


def test_connected_snapshot_gives_the_domains_size_after_it_appears() -> None:
    events = EventAssembler().reconcile(CONNECTED)
    assert resources(events) == [DomainResources(1, KIB_128M, KIB_128M, 1, 1)]
    assert events.index(DomainAppeared(1, UUID, "xsgold")) < events.index(resources(events)[0])
    assert [e for e in events if isinstance(e, Garbage)] == []


def test_log_replay_reports_sizes_once_libxl_has_built_the_domain() -> None:
    asm = EventAssembler()
    seen: list[DomainResources] = []
    for step in replay_log():
        for e in asm.feed_batch(step.nodes):
            if isinstance(e, DomainResources):
                seen.append(e)
    # build_post writes domain 1's sizes; later libxl fills in dom0's memory (libxl_mem.c)
    assert seen == [
        DomainResources(1, KIB_128M, KIB_128M, 1, 1),
        DomainResources(0, 1048576, 1048576, None, None),
    ]


def test_mem_set_and_vcpu_set_are_upserts_and_bad_values_are_garbage() -> None:
    asm = EventAssembler()
    asm.reconcile(CONNECTED)
    home = "/local/domain/1"
    assert asm.feed(f"{home}/memory/target", b"65536") == [
        DomainResources(1, 65536, KIB_128M, 1, 1)
    ]
    out = asm.feed_batch(
        [
            (f"{home}/cpu/1/availability", b"offline", None),
            (f"{home}/cpu/2/availability", b"online", None),
        ]
    )
    assert out == [DomainResources(1, 65536, KIB_128M, 3, 2)]
    assert asm.feed(f"{home}/cpu/2/availability", b"online") == []  # nothing changed
    out = asm.feed(f"{home}/memory/target", b"64M")
    assert out == [
        Garbage(1, f"{home}/memory/target", "memory size is not a KiB count"),
        DomainResources(1, None, KIB_128M, 3, 2),
    ]
    assert asm.feed(f"{home}/cpu/2", None) == [DomainResources(1, None, KIB_128M, 2, 1)]
    # the rest of the tree is untouched by these nodes: no vchan, no device change
    assert asm.feed(f"{home}/memory/videoram", b"0") == []


def test_sizes_are_forgotten_with_the_domain_and_reconcile_stays_idempotent() -> None:
    asm = EventAssembler()
    asm.reconcile(CONNECTED)
    asm.feed("/local/domain/1/memory/target", b"65536")
    # reconcile against the snapshot puts the captured value back
    assert resources(asm.reconcile(CONNECTED)) == [DomainResources(1, KIB_128M, KIB_128M, 1, 1)]
    assert asm.reconcile(CONNECTED) == []
    asm.reconcile(load_layout("layout-after-destroy.txt"))
    assert asm.tracked_domains() == 1


def test_host_model_keeps_the_sizes_and_the_decisions_per_kind() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    dom = model.domain(1)
    assert dom is not None
    assert (dom.memory_target_kib, dom.memory_static_max_kib, dom.vcpus, dom.vcpus_online) == (
        KIB_128M,
        KIB_128M,
        1,
        1,
    )
    # every decision is counted against the domain it is about
    assert dom.decisions == {("domain", True): 1, ("device", True): 3}
    dom0 = model.domain(0)
    assert dom0 is not None and dom0.decisions == {("vchan", True): 1}


def test_sizes_of_an_unknown_domain_are_ignored_by_the_model() -> None:
    model = model_from([DomainResources(7, 1, 2, 3, 4)], HostModel())
    assert model.domain(7) is None


# ---- shyped.core.accounting ----------------------------------------------------------------------


def test_account_of_the_reference_guest_and_dom0() -> None:
    _, model, _ = from_snapshot(CONNECTED)
    acc = account_domain(model, 1)
    assert acc is not None
    assert (acc.uuid, acc.name, acc.label, acc.state) == (UUID, "xsgold", "guest", "admitted")
    assert (acc.memory_target_bytes, acc.memory_max_bytes) == (128 * MIB, 128 * MIB)
    assert (acc.vcpus, acc.vcpus_online) == (1, 1)
    assert acc.devices == (("console", 1), ("vbd", 1), ("vif", 1))
    # netfront's split channels and two rings, blkfront's one each, console's ring and port
    assert acc.event_channels == (("console", 1), ("vbd", 1), ("vif", 2))
    assert acc.grant_refs == (("console", 1), ("vbd", 1), ("vif", 2))
    assert (acc.vchans_served, acc.vchans_joined) == (0, 1)
    assert acc.decisions == (("device-channel", "permit", 3), ("domain-admit", "permit", 1))
    assert acc.running and acc.device_count == 3 and acc.vchan_count == 1
    dom0 = account_domain(model, 0)
    assert dom0 is not None
    assert dom0.backend_devices == (("console", 1), ("vbd", 1), ("vif", 1))
    assert dom0.devices == ()
    assert dom0.vchans_served == 1
    assert (dom0.event_channels, dom0.grant_refs) == ((("vchan", 1),), (("vchan", 1),))
    assert dom0.memory_bytes is None  # dom0's memory is not in this layout
    assert account_domain(model, 9) is None


def test_host_account_follows_detach_and_destroy() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    host = account_host(model)
    assert [a.domid for a in host.domains] == [0, 1]
    assert host.running_with_label("guest") == 1
    model_from(asm.reconcile(load_layout("layout-after-detach.txt")), model)
    acc = account_domain(model, 1)
    assert acc is not None and acc.devices == (("console", 1), ("vif", 1))
    assert acc.vchans_joined == 0
    dom0 = account_domain(model, 0)
    assert dom0 is not None and dom0.memory_bytes == 1048576 * KIB
    model_from(asm.reconcile(load_layout("layout-after-destroy.txt")), model)
    host = account_host(model)
    assert [a.domid for a in host.domains] == [0]
    assert host.domain(1) is None and host.domain(0) is not None


def test_garbage_is_charged_to_the_writing_domain_and_touched_domains_say_whom() -> None:
    asm, model, _ = from_snapshot(CONNECTED)
    hostile = [
        ("/local/domain/1/device/vbd/51712/ring-ref", b"-1", None),
        ("/local/domain/1/device/vif/0/state", b"9", None),
        ("/libxl/1/device/vbd/51712/mode", b"x", None),
    ]
    events = asm.feed_batch(hostile)
    model_from(events, model)
    acc = account_domain(model, 1)
    assert acc is not None and acc.garbage_writes == 2
    host = account_host(model)
    assert host.unattributed_garbage_writes == 1  # the /libxl record is nobody's write
    assert 1 in touched_domains(events)
    assert touched_domains([DomainResources(4, 1, 1, 1, 1)]) == {4}
    assert touched_domains(EventAssembler().reconcile(CONNECTED)) == {0, 1}


def test_account_cache_always_equals_a_full_recount() -> None:
    """Replay the capture batch by batch (every decision allowed), with hostile writes and a
    vchan whose client set changes: the cache must never serve a stale account."""
    asm, model, cache = EventAssembler(), HostModel(dom0_label="dom0"), AccountCache()
    extra = [
        ("/local/domain/1/device/vbd/51712/ring-ref", b"junk", None),
        ("/local/domain/1/memory/target", b"65536", None),
        ("/local/domain/0/data/v2/ring-ref", b"7", [b"n0", b"r1"]),
        ("/local/domain/0/data/v2/event-channel", b"9", [b"n0", b"r1"]),
        ("/local/domain/0/data/v2/event-channel", b"9", [b"n0"]),
    ]
    steps = [s.nodes for s in replay_log() if s.nodes]
    steps[len(steps) // 2 : len(steps) // 2] = [(n,) for n in extra]
    for nodes in steps:
        model_from(asm.feed_batch(nodes), model)
        assert cache.host(model) == account_host(model)
    other = from_snapshot(CONNECTED)[1]  # another model: the cache starts afresh
    assert cache.host(other) == account_host(other)
