"""Typed-event parsing (shyped.core.events, shyped.core.xsparse) against the Xen 4.17 reference
capture."""

from __future__ import annotations

import pytest
from hostmodel_helpers import UUID, VCHAN_PATH, load_layout, replay_log
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shyped.core.assembler import EventAssembler
from shyped.core.channels import ChannelShared, ChannelUnshared
from shyped.core.events import (
    BackendStateChanged,
    DeviceAdded,
    DeviceKey,
    DeviceRemoved,
    DomainAppeared,
    DomainResources,
    DomainVanished,
    Event,
    FrontendStateChanged,
    Garbage,
    Limits,
    RescanHint,
    RingsPublished,
    RingsWithdrawn,
    VchanPublished,
    VchanRemoved,
    frontend_dir,
    needs_perms,
)
from shyped.core.xsparse import (
    U32_MAX,
    Perms,
    parse_path,
    parse_perms,
    parse_uint,
    parse_uint_component,
)

VIF = DeviceKey("vif", 1, 0)
VBD = DeviceKey("vbd", 1, 51712)
CONSOLE = DeviceKey("console", 1, 0)
DISK = "/var/lib/xen/images/xsgold-xvda.img"
LAYOUTS = (
    "layout-before-create.txt",
    "layout-paused.txt",
    "layout-connected.txt",
    "layout-after-detach.txt",
    "layout-after-netdetach.txt",
    "layout-after-destroy.txt",
)
CONNECTED = load_layout("layout-connected.txt", "vchan.txt")


def connected() -> EventAssembler:
    asm = EventAssembler()
    asm.reconcile(CONNECTED)
    return asm


def of(events: list[Event], cls: type) -> list[Event]:
    return [e for e in events if isinstance(e, cls)]


# ---- strict values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"1_000",
        b" 5",
        b"5 ",
        b"5\n",
        "٣".encode(),
        b"+5",
        b"-1",
        b"05",
        b"",
        b"0x10",
        b"4294967296",
        b"12345678901",
        b"5\x00",
    ],
)
def test_parse_uint_rejects_what_int_would_accept_or_misread(raw: bytes) -> None:
    assert parse_uint(raw, U32_MAX) is None


def test_parse_uint_accepts_canonical_decimals_within_range() -> None:
    assert parse_uint(b"0", U32_MAX) == 0
    assert parse_uint(b"521", U32_MAX) == 521
    assert parse_uint(b"4294967295", U32_MAX) == U32_MAX
    assert parse_uint(b"9", 8) is None


def test_path_components_reject_unicode_digits() -> None:
    assert "٣".isdigit()  # the trap: str.isdigit() says yes
    assert parse_uint_component("٣", 10) is None
    assert parse_uint_component("3", 10) == 3


@pytest.mark.parametrize(
    "raw",
    ["relative/path", "/a//b", "/a/", "/a b", "/é", b"/\xff", "/x" * 2000, "", "@other"],
)
def test_invalid_paths_are_refused(raw: str | bytes) -> None:
    assert parse_path(raw) is None


def test_valid_and_special_paths() -> None:
    assert parse_path(b"/local/domain/1/device/vif/0") == "/local/domain/1/device/vif/0"
    assert parse_path("/") == "/"
    assert parse_path("@releaseDomain") == "@releaseDomain"


def test_parse_perms_reads_owner_default_and_acl() -> None:
    p = parse_perms([b"n0", b"r1", b""])
    assert p == Perms(owner=0, default="n", acl=((1, "r"),))
    assert p.readers() == frozenset({0, 1})
    assert not p.world_readable
    assert parse_perms(["r3"]) == Perms(3, "r", ())
    assert parse_perms(["r3"]).world_readable  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "raw", [[], [b"x1"], [b"n"], [b"n-1"], [b"n99999"], [b"r 1"], [b"n0"] * 100, ["n٣"]]
)
def test_parse_perms_refuses_malformed_lists(raw: list[bytes | str]) -> None:
    assert parse_perms(raw) is None


def test_parse_perms_accepts_parsed_entries() -> None:
    class P:
        def __init__(self, access: str, domid: int) -> None:
            self.access, self.domid = access, domid

    assert parse_perms([P("n", 0), P("b", 2)]) == Perms(0, "n", ((2, "b"),))
    assert parse_perms([P("n", 0), P("q", 2)]) is None


def test_needs_perms_for_vchan_keys_and_every_node_a_guest_could_own() -> None:
    assert needs_perms("/local/domain/0/data/vchan-test/ring-ref")
    assert needs_perms(b"/local/domain/3/data/vchan/0/7/event-channel")
    # A guest owns its frontend dirs, data/, control keys …: every such node is a channel
    # candidate, whatever its name.
    assert needs_perms("/local/domain/1/device/vbd/51712/ring-ref")
    assert needs_perms("/local/domain/1/device/vif/0/v/anything")
    assert needs_perms("/local/domain/1/console/backend-id")
    assert needs_perms("/local/domain/1/data/x")
    # dom0's own home outside vchan keys, dom0-only subtrees of a guest's home, other trees.
    assert not needs_perms("/local/domain/0/data/vchan-test/other")
    assert not needs_perms("/local/domain/1")
    for sub in ("name", "vm", "domid", "memory/target", "cpu/0/availability", "store/port"):
        assert not needs_perms(f"/local/domain/1/{sub}")
    assert not needs_perms("/vm/x/ring-ref")


def test_frontend_dir_follows_libxl() -> None:
    assert frontend_dir(CONSOLE) == "/local/domain/1/console"
    assert frontend_dir(DeviceKey("console", 1, 2)) == "/local/domain/1/device/console/2"
    assert frontend_dir(DeviceKey("vuart", 1, 0)) == "/local/domain/1/vuart/0"
    assert frontend_dir(VIF) == "/local/domain/1/device/vif/0"


# ---- the reference snapshots --------------------------------------------------------------


def test_connected_snapshot_yields_the_reference_domain_devices_and_vchan() -> None:
    events = EventAssembler().reconcile(CONNECTED)
    assert of(events, Garbage) == []
    assert events[0] == DomainAppeared(1, UUID, "xsgold")
    assert {e.device: e for e in of(events, DeviceAdded)} == {  # type: ignore[attr-defined]
        VIF: DeviceAdded(VIF, 0, "vif", "xenbr0", True),
        VBD: DeviceAdded(VBD, 0, "vbd", DISK, True),
        CONSOLE: DeviceAdded(CONSOLE, 0, "console", None, True),
    }
    assert set(of(events, RingsPublished)) == {
        RingsPublished(
            VIF,
            (("rx-ring-ref", 521), ("tx-ring-ref", 520)),
            (("event-channel-rx", 9), ("event-channel-tx", 8)),
        ),
        RingsPublished(VBD, (("ring-ref", 522),), (("event-channel", 10),)),
        RingsPublished(CONSOLE, (("ring-ref", 260098),), (("port", 2),)),
    }
    assert set(of(events, FrontendStateChanged)) == {
        FrontendStateChanged(VIF, 4),
        FrontendStateChanged(VBD, 4),
    }
    assert set(of(events, BackendStateChanged)) == {
        BackendStateChanged(VIF, 0, 4, True),
        BackendStateChanged(VBD, 0, 4, True),
        BackendStateChanged(CONSOLE, 0, 1, True),
    }
    assert of(events, VchanPublished) == [VchanPublished(0, VCHAN_PATH, (1,), False, 8, 23)]
    # every device is announced before anything else is said about it
    for dev in (VIF, VBD, CONSOLE):
        idx = [i for i, e in enumerate(events) if getattr(e, "device", None) == dev]
        assert isinstance(events[idx[0]], DeviceAdded)


def test_paused_snapshot_has_no_rings_until_the_guest_runs() -> None:
    events = EventAssembler().reconcile(load_layout("layout-paused.txt"))
    assert of(events, Garbage) == []
    assert set(of(events, FrontendStateChanged)) == {
        FrontendStateChanged(VIF, 1),
        FrontendStateChanged(VBD, 1),
    }
    assert BackendStateChanged(VBD, 0, 2, True) in events
    assert [e.device for e in of(events, RingsPublished)] == [CONSOLE]  # type: ignore[attr-defined]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_reference_node_parses_and_order_does_not_matter(layout: str) -> None:
    snap = load_layout(layout)
    asm = EventAssembler()
    events = [e for path in reversed(list(snap)) for e in asm.feed(path, *snap[path])]
    assert of(events, Garbage) == []
    assert asm.reconcile(snap) == []  # already in line with the snapshot


def test_reconcile_takes_gateway_snapshot_nodes_with_parsed_perms() -> None:
    class Perm:
        def __init__(self, text: bytes) -> None:
            self.access, self.domid = chr(text[0]), int(text[1:])

    class SnapNode:
        def __init__(self, value: bytes, perms: list[bytes] | None) -> None:
            self.value, self.children = value, ()
            self.perms = None if perms is None else tuple(Perm(p) for p in perms)

    snap = {p.encode(): SnapNode(*v) for p, v in CONNECTED.items()}
    events = EventAssembler().reconcile(snap)
    assert events == EventAssembler().reconcile(CONNECTED)
    assert VchanPublished(0, VCHAN_PATH, (1,), False, 8, 23) in events


def test_reconcile_replays_nothing_when_nothing_changed() -> None:
    asm = connected()
    assert asm.reconcile(CONNECTED) == []
    assert asm.reconcile(CONNECTED, root="/local/domain/1") == []


def test_reconcile_between_layouts_gives_the_removal_sequences() -> None:
    asm = connected()
    assert asm.reconcile(load_layout("layout-after-detach.txt")) == [
        DomainResources(0, 1048576, 1048576, None, None),  # libxl filled in dom0's memory
        DeviceRemoved(VBD, 0),
        VchanRemoved(0, VCHAN_PATH),
    ]
    assert asm.reconcile(load_layout("layout-after-netdetach.txt")) == [DeviceRemoved(VIF, 0)]
    assert asm.reconcile(load_layout("layout-after-destroy.txt")) == [
        DeviceRemoved(CONSOLE, 0),
        DomainVanished(1),
    ]
    assert asm.tracked_domains() == 1  # everything about domain 1 is freed
    assert asm.present_domains() == [0]


def test_reconcile_of_a_subtree_only_touches_that_subtree() -> None:
    asm = connected()
    sub = {p: v for p, v in CONNECTED.items() if p.startswith("/local/domain/1/device/vif")}
    assert asm.reconcile(sub, root="/local/domain/1/device/vif") == []
    assert asm.reconcile({}, root="/local/domain/1/device/vif") == [
        FrontendStateChanged(VIF, None),
        RingsWithdrawn(VIF),
    ]


# ---- the live stream (operation log) ------------------------------------------------------


def run_log(batched: bool) -> tuple[EventAssembler, dict[str, list[Event]]]:
    """Replay the capture; check the state at every dump against that dump's layout."""
    asm = EventAssembler()
    by_phase: dict[str, list[Event]] = {}
    phase = "boot"
    for step in replay_log():
        if step.phase is not None:
            phase = step.phase
            if phase.startswith("dump-"):
                layout = load_layout(f"layout-{phase.removeprefix('dump-')}.txt")
                assert asm.reconcile(layout) == [], f"state differs from the layout at {phase}"
            continue
        if batched:
            events = asm.feed_batch(step.nodes)
        else:
            events = [e for node in step.nodes for e in asm.feed(*node)]
        by_phase.setdefault(phase, []).extend(events)
    return asm, by_phase


@pytest.mark.parametrize("batched", [True, False], ids=["per-transaction", "node-by-node"])
def test_log_replay_matches_every_layout_and_frees_the_domain(batched: bool) -> None:
    asm, by_phase = run_log(batched)
    assert all(of(events, Garbage) == [] for events in by_phase.values())
    create = by_phase["xl-create-p"]
    assert of(create, DomainAppeared) == [DomainAppeared(1, UUID, "xsgold")]
    assert RescanHint("@introduceDomain") in create
    # the vchan: published with the permission naming domain 1, removed by the server
    assert of(by_phase["vchan-server-start"], VchanPublished) == [
        VchanPublished(0, VCHAN_PATH, (1,), False, 8, 23)
    ]
    assert of(by_phase["vchan-server-start"], VchanRemoved) == [VchanRemoved(0, VCHAN_PATH)]
    destroy = by_phase["xl-destroy"]
    assert destroy[-2:] == [DeviceRemoved(CONSOLE, 0), DomainVanished(1)]
    assert asm.tracked_domains() == 1


def test_log_replay_per_transaction_gives_one_event_per_fact() -> None:
    _, by_phase = run_log(batched=True)
    create = by_phase["xl-create-p"]
    assert of(create, DeviceAdded) == [
        DeviceAdded(VBD, 0, "vbd", DISK, True),
        DeviceAdded(CONSOLE, 0, "console", None, True),
        DeviceAdded(VIF, 0, "vif", "xenbr0", True),
    ]
    # detach: online=0 + Closing, frontend Closed, backend Closed, then the device is gone
    detach = [e for e in by_phase["block-detach"] if getattr(e, "device", None) == VBD]
    assert detach == [
        BackendStateChanged(VBD, 0, 5, False),
        FrontendStateChanged(VBD, 6),
        RingsWithdrawn(VBD),
        BackendStateChanged(VBD, 0, 6, False),
        DeviceRemoved(VBD, 0),
    ]


def test_log_replay_sees_the_frontends_publish_their_rings() -> None:
    _, by_phase = run_log(batched=True)
    unpause = by_phase["xl-unpause"]
    vif = [e for e in unpause if getattr(e, "device", None) == VIF]
    assert vif[:2] == [  # netfront goes 1 -> 4 without 3, rings written before the state
        FrontendStateChanged(VIF, 4),
        RingsPublished(
            VIF,
            (("rx-ring-ref", 521), ("tx-ring-ref", 520)),
            (("event-channel-rx", 9), ("event-channel-tx", 8)),
        ),
    ]
    vbd = [e for e in unpause if getattr(e, "device", None) == VBD]
    assert vbd[:2] == [  # blkfront goes 1 -> 3 -> 4 and publishes at Initialised
        FrontendStateChanged(VBD, 3),
        RingsPublished(VBD, (("ring-ref", 522),), (("event-channel", 10),)),
    ]
    assert FrontendStateChanged(VBD, 4) in vbd


def test_domain_appears_with_the_first_transaction_of_xl_create() -> None:
    first_tx = next(s for s in replay_log() if s.nodes and len(s.nodes) > 20)
    assert of(EventAssembler().feed_batch(first_tx.nodes), DomainAppeared) == [
        DomainAppeared(1, UUID, "xsgold")
    ]


# ---- appearance rules ---------------------------------------------------------------------

BASE: list[tuple[str, bytes]] = [
    ("/local/domain/5/name", b"five"),
    ("/local/domain/5/vm", f"/vm/{UUID}".encode()),
    ("/libxl/5/type", b"pv"),
    (f"/vm/{UUID}", b""),
]


@pytest.mark.parametrize("missing", range(len(BASE)))
def test_a_domain_needs_name_vm_pointer_vm_dir_and_libxl_dir(missing: int) -> None:
    asm = EventAssembler()
    nodes = [(p, v, None) for i, (p, v) in enumerate(BASE) if i != missing]
    assert of(asm.feed_batch(nodes), DomainAppeared) == []
    p, v = BASE[missing]
    assert asm.feed(p, v) == [DomainAppeared(5, UUID, "five")]


def test_rename_is_an_upsert_and_bad_vm_pointer_is_garbage() -> None:
    asm = EventAssembler()
    asm.feed_batch([(p, v, None) for p, v in BASE])
    assert asm.feed("/local/domain/5/name", b"renamed") == [DomainAppeared(5, UUID, "renamed")]
    events = asm.feed("/local/domain/5/vm", b"/vm/../../etc")
    # Only counted: a value that does not parse never makes a running domain vanish.
    assert events == [Garbage(5, "/local/domain/5/vm", "vm is not /vm/<uuid>")]
    assert asm.present_domains() == [0, 5]


@pytest.mark.parametrize("bad", [b"x" * 300, "shop\u200b-1".encode()])
def test_an_unparsable_name_is_announced_and_never_vanishes(bad: bytes) -> None:
    asm = EventAssembler()
    asm.feed_batch([(p, v, None) for p, v in BASE])
    events = asm.feed("/local/domain/5/name", bad)
    (appeared,) = of(events, DomainAppeared)
    assert appeared.domid == 5 and appeared.uuid == UUID and appeared.name is None
    assert "not printable UTF-8" in appeared.name_problem
    assert not of(events, DomainVanished)
    assert asm.feed("/local/domain/5/name", b"five") == [DomainAppeared(5, UUID, "five")]
    # Created with such a name (e.g. while the daemon was down): announced all the same.
    fresh = EventAssembler()
    nodes = [(p, bad if p.endswith("/name") else v, None) for p, v in BASE]
    (first,) = of(fresh.feed_batch(nodes), DomainAppeared)
    assert first.name is None and first.name_problem
    assert of(fresh.feed("/local/domain/5", None), DomainVanished) == [DomainVanished(5)]


def test_two_domains_one_uuid_the_vm_dir_removal_vanishes_neither() -> None:
    asm = EventAssembler()
    asm.feed_batch([(p, v, None) for p, v in BASE])
    twin = [(p.replace("/5", "/6"), v, None) for p, v in BASE if "/vm/" not in p[:4]]
    (appeared,) = of(asm.feed_batch(twin), DomainAppeared)
    assert appeared.domid == 6 and appeared.uuid == UUID
    # xl destroy of one: /vm/<uuid> first, then its home; the twin still runs.
    assert of(asm.feed(f"/vm/{UUID}", None), DomainVanished) == []
    assert of(asm.feed("/local/domain/5", None), DomainVanished) == [DomainVanished(5)]
    assert asm.present_domains() == [0, 6]


# ---- trust: records decide, guests are only counted ---------------------------------------


def test_guest_rewriting_its_backend_pointers_changes_nothing_but_the_count() -> None:
    asm = connected()
    events = asm.feed_batch(
        [
            ("/local/domain/1/device/vif/0/backend-id", b"2", None),
            ("/local/domain/1/device/vif/0/backend", b"/local/domain/2/backend/vif/1/0", None),
        ]
    )
    assert events == [
        Garbage(
            1,
            "/local/domain/1/device/vif/0/backend-id",
            "frontend backend-id disagrees with the libxl record",
        ),
        Garbage(
            1,
            "/local/domain/1/device/vif/0/backend",
            "frontend backend path disagrees with the libxl record",
        ),
    ]
    # a second domain claiming to serve it gets nowhere without a libxl record naming it
    extra = [(p.replace("/5", "/2"), v, None) for p, v in BASE]
    extra += [
        ("/local/domain/2/backend/vif/1/0/frontend-id", b"1", None),
        ("/local/domain/2/backend/vif/1/0/state", b"4", None),
    ]
    assert [type(e) for e in asm.feed_batch(extra)] == [DomainAppeared]
    assert records_changed(asm) == []


def test_record_with_a_foreign_frontend_or_backend_is_refused() -> None:
    asm = connected()
    events = asm.feed_batch(
        [
            ("/libxl/1/device/vbd/768/frontend", b"/local/domain/2/device/vbd/768", None),
            ("/libxl/1/device/vbd/768/backend", b"/local/domain/0/backend/vbd/1/768", None),
            ("/libxl/1/device/vif/1/frontend", b"/local/domain/1/device/vif/1", None),
            ("/libxl/1/device/vif/1/backend", b"/local/domain/0/backend/vif/2/1", None),
        ]
    )
    assert [type(e) for e in events] == [Garbage, Garbage]
    assert of(events, DeviceAdded) == []


def test_device_with_a_driver_domain_backend_waits_for_that_domain() -> None:
    asm = connected()
    dev = DeviceKey("vif", 1, 1)
    events = asm.feed_batch(
        [
            ("/libxl/1/device/vif/1/frontend", b"/local/domain/1/device/vif/1", None),
            ("/libxl/1/device/vif/1/backend", b"/local/domain/7/backend/vif/1/1", None),
            ("/libxl/1/device/vif/1/bridge", b"xenbr1", None),
            ("/local/domain/7/backend/vif/1/1/state", b"2", None),
        ]
    )
    assert events == []
    events = asm.feed_batch([(p.replace("/5", "/7"), v, None) for p, v in BASE])
    assert events == [
        DomainAppeared(7, UUID, "five"),
        DeviceAdded(dev, 7, "vif", "xenbr1", True),
        BackendStateChanged(dev, 7, 2, None),
    ]
    assert asm.feed("/local/domain/7", None) == [DeviceRemoved(dev, 7), DomainVanished(7)]


def test_special_watches_are_hints_only() -> None:
    asm = connected()
    assert asm.feed("@releaseDomain", None) == [RescanHint("@releaseDomain")]
    assert asm.feed(b"@introduceDomain", b"") == [RescanHint("@introduceDomain")]
    assert asm.present_domains() == [0, 1]


# ---- vchans -------------------------------------------------------------------------------

VC = "/local/domain/1/data/vchan/0/5"


def publish(asm: EventAssembler, perms_rr: list[bytes] | None, perms_ec: list[bytes] | None,
            rr: bytes = b"12", ec: bytes = b"7") -> list[Event]:  # fmt: skip
    return asm.feed_batch([(VC + "/ring-ref", rr, perms_rr), (VC + "/event-channel", ec, perms_ec)])


def test_guest_vchan_server_names_its_client_in_the_permissions() -> None:
    asm = connected()
    assert publish(asm, [b"n1", b"r0"], [b"n1", b"r0"]) == [
        VchanPublished(1, VC, (0,), False, 12, 7)
    ]
    assert asm.feed(VC, None) == [VchanRemoved(1, VC)]


def test_vchan_waits_for_permissions_and_follows_setperms() -> None:
    asm = connected()
    assert publish(asm, None, None) == []  # the write events; set_permissions comes next
    # a lone ring-ref domain 2 may read is a channel of its own until the rendezvous is whole
    assert asm.feed(VC + "/ring-ref", b"12", [b"n1", b"r0", b"r2"]) == [
        ChannelShared(1, VC + "/ring-ref", (2,), False)
    ]
    events = asm.feed(VC + "/event-channel", b"7", [b"n1", b"r2", b"r0"])
    assert events == [
        VchanPublished(1, VC, (0, 2), False, 12, 7),
        ChannelUnshared(1, VC + "/ring-ref"),  # the vchan decision covers it now
    ]
    # a client dropped from one node is no longer a client (it needs to read both) …
    events = asm.feed(VC + "/event-channel", b"7", [b"n1", b"r0"])
    # … but it may still read the other node: a channel the vchan decision does not cover
    assert events == [
        VchanPublished(1, VC, (0,), False, 12, 7),
        ChannelShared(1, VC + "/ring-ref", (2,), False),
    ]
    assert asm.feed(VC + "/ring-ref", None) == [
        VchanRemoved(1, VC),
        ChannelUnshared(1, VC + "/ring-ref"),
    ]


def test_world_readable_or_unreadable_permissions_open_the_vchan_to_anyone() -> None:
    asm = connected()
    assert publish(asm, [b"r1"], [b"r1"]) == [VchanPublished(1, VC, (), True, 12, 7)]
    asm.feed(VC, None)
    events = publish(asm, [b"zz"], [b"n1", b"r0"])
    assert events[0] == Garbage(
        1, VC + "/ring-ref", "unreadable permissions: treated as readable by all"
    )
    # the node whose permissions cannot be read reaches every domain: not covered by the vchan
    assert events[1:] == [
        VchanPublished(1, VC, (0,), False, 12, 7),
        ChannelShared(1, VC + "/ring-ref", (), True),
    ]
    asm.feed(VC, None)
    events = publish(asm, [b"zz"], [b"zz"])
    assert events[-1] == VchanPublished(1, VC, (), True, 12, 7)


def test_garbage_values_do_not_hide_a_rendezvous() -> None:
    asm = connected()
    events = publish(asm, [b"n1", b"r0"], [b"n1", b"r0"], rr=b" 12", ec=b"1_0")
    assert [type(e) for e in events] == [Garbage, Garbage, VchanPublished]
    assert events[-1] == VchanPublished(1, VC, (0,), False, None, None)


def test_owner_only_permissions_publish_nothing() -> None:
    asm = connected()
    assert publish(asm, [b"n1"], [b"n1"]) == []


def test_vchan_client_vanishing_removes_the_rendezvous() -> None:
    asm = connected()
    events = asm.feed("/local/domain/1", None)
    assert VchanRemoved(0, VCHAN_PATH) in events
    assert events[-1] == DomainVanished(1)


# ---- hostile input ------------------------------------------------------------------------

INT_KEYS = ["state", "ring-ref", "ring-ref3", "tx-ring-ref", "event-channel", "event-channel-tx"]
BAD_INTS = [b"1_000", b" 5", "٣".encode(), b"+5", b"05", b"4294967296", b"", b"x" * 5000, b"-0"]
GUEST_DIRS = [
    "/local/domain/1/device/vif/0",
    "/local/domain/1/device/vbd/51712",
    "/local/domain/1/device/vif/0/queue-3",
    "/local/domain/1/console",
    "/local/domain/1/data",
    "/local/domain/1/data/vchan/0/7",
    "/local/domain/1/device/vif/7",
    "/local/domain/1",
]
LEAVES = [*INT_KEYS, "port", "backend-id", "backend", "page-gref", "feature-sg", "queue-1"]
guest_paths = st.builds(
    lambda d, leaf: f"{d}/{leaf}", st.sampled_from(GUEST_DIRS), st.sampled_from(LEAVES)
)
values = st.one_of(
    st.none(),
    st.sampled_from(BAD_INTS),
    st.binary(max_size=40),
    st.integers(0, 2**33).map(lambda i: str(i).encode()),
)
perm_lists = st.one_of(
    st.none(),
    st.lists(st.one_of(st.binary(max_size=7), st.sampled_from([b"n1", b"r0", b"b2", b"r1"]))),
)


def records_changed(asm: EventAssembler) -> list[Event]:
    """Device events from re-reading the unchanged libxl records: empty if nothing moved."""
    records = {p: v for p, v in CONNECTED.items() if p.startswith("/libxl")}
    return [
        e
        for e in asm.reconcile(records, root="/libxl")
        if isinstance(e, DeviceAdded | DeviceRemoved)
    ]


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.one_of(st.binary(max_size=80), st.text(max_size=80), guest_paths),
    value=st.one_of(st.none(), st.binary(max_size=5000)),
    perms=st.one_of(st.none(), st.lists(st.one_of(st.binary(max_size=8), st.text(max_size=8)))),
)
def test_random_input_never_raises(path: str | bytes, value: bytes | None, perms: list) -> None:  # type: ignore[type-arg]
    asm = connected()
    events = asm.feed(path, value, perms)
    assert all(isinstance(e, Event) for e in events)  # type: ignore[arg-type,misc]
    for g in of(events, Garbage):
        assert len(g.path) <= 210  # type: ignore[attr-defined]


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(writes=st.lists(st.tuples(guest_paths, values, perm_lists), max_size=40))
def test_guest_writes_never_change_which_devices_exist(writes: list[tuple]) -> None:  # type: ignore[type-arg]
    asm = connected()
    events = asm.feed_batch(writes)
    assert of(events, DeviceAdded) == of(events, DeviceRemoved) == []
    assert not any(isinstance(e, DomainVanished | DomainAppeared) for e in events)
    assert records_changed(asm) == []  # the records still say exactly what they said
    assert all(g.domid == 1 for g in of(events, Garbage))  # type: ignore[attr-defined]
    assert asm.tracked_items(1) <= 4 * (Limits().ring_keys_per_device + 1) + 3 + 64


@settings(max_examples=100)
@given(key=st.sampled_from(INT_KEYS), bad=st.sampled_from(BAD_INTS))
def test_every_malformed_integer_is_counted(key: str, bad: bytes) -> None:
    asm = connected()
    path = f"/local/domain/1/device/vif/0/{key}"
    assert [e.path for e in of(asm.feed(path, bad), Garbage)] == [path]  # type: ignore[attr-defined]


def test_floods_are_bounded_per_domain() -> None:
    asm = connected()
    before = asm.tracked_items(1)
    limits = Limits()
    garbage: list[Event] = []
    for i in range(3000):
        garbage += of(asm.feed(f"/local/domain/1/data/v{i}/ring-ref", b"1", [b"n1"]), Garbage)
        garbage += of(
            asm.feed(f"/local/domain/1/device/vif/0/queue-{i}/tx-ring-ref", b"1"), Garbage
        )
    assert asm.tracked_items(1) <= before + limits.vchans_per_domain + limits.ring_keys_per_device
    assert garbage and all(g.limit for g in garbage)  # type: ignore[attr-defined]
    # a removal frees the slots again
    asm.feed("/local/domain/1/data", None)
    assert asm.feed("/local/domain/1/data/late/ring-ref", b"1", [b"n1"]) == []


def test_state_flapping_is_reported_not_collapsed() -> None:
    asm = connected()
    events = []
    for i in range(100):
        events += asm.feed("/local/domain/1/device/vbd/51712/state", b"3" if i % 2 else b"4")
    assert len(of(events, FrontendStateChanged)) == 99  # the first write repeats state 4


def test_snapshot_with_garbage_everywhere_still_finds_the_trusted_facts() -> None:
    snap = dict(CONNECTED)
    spoiled = [
        p
        for p in snap
        if p.startswith(("/local/domain/1/device/vif/", "/local/domain/1/device/vbd/"))
        and p.rsplit("/", 1)[1] in INT_KEYS
    ]
    for p in spoiled:
        snap[p] = (b" 1", None)
    snap["/local/domain/1/data/\u00e9"] = (b"x", None)
    events = EventAssembler().reconcile(snap)
    assert {e.device for e in of(events, DeviceAdded)} == {VIF, VBD, CONSOLE}  # type: ignore[attr-defined]
    assert len(spoiled) == 6
    assert len(of(events, Garbage)) == len(spoiled) + 1


def test_ring_key_names_a_guest_makes_up_are_not_kept_past_a_bound() -> None:
    """A guest naming ring keys at will (``queue-N/…-ring-ref``, written then removed, within the
    per-device limit) must not grow what the assembler shares across domains without end: those
    names are no longer `sys.intern`ed (immortal in CPython 3.12) but kept in a bounded table."""
    from shyped.core.assembler import state

    asm = connected()
    for i in range(3 * state._RING_KEYS_MAX):
        path = f"/local/domain/1/device/vif/0/queue-{i}/tx-ring-ref"
        asm.feed(path, b"8", [b"b1", b"r0"])
        asm.feed(path, None, None)
    assert len(state._RING_KEYS) <= state._RING_KEYS_MAX
    # the names the guest holds now are still read and published
    events = asm.feed("/local/domain/1/device/vif/0/queue-1/tx-ring-ref", b"9", [b"b1", b"r0"])
    assert any(
        ("queue-1/tx-ring-ref", 9) in e.grant_refs  # type: ignore[attr-defined]
        for e in of(events, RingsPublished)
    )
