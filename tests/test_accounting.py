"""Per-domain accounting: the dom0-written sizes (`DomainResources`) and `shyped.accounting`,
fed by the real event parser from the Xen 4.17 reference capture."""

from __future__ import annotations

from hostmodel_helpers import UUID, from_snapshot, load_layout, model_from, replay_log

from shyped.events import (
    DomainAppeared,
    DomainResources,
    EventAssembler,
    Garbage,
)
from shyped.host import HostModel

CONNECTED = load_layout("layout-connected.txt", "vchan.txt")
KIB_128M = 131072


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
