"""The sandbox toolstack against the real oxenstored: the reference domain's replay must give
the capture's layouts node for node and permission for permission, with libxl's, the drivers'
and the hotplug scripts' writes grouped in the capture's transactions."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from sandbox_toolstack_helpers import (
    XSGOLD_CFG,
    AccessLogCursor,
    normalize_layout,
    normalize_units,
    reference_layout,
    reference_phase,
    state_sequences,
    units,
    xenstore_ls,
)

from shyped.core.xlcfg import (
    DomainConfig,
    domain_config_from_text,
    parse_disk_spec,
    parse_vif_spec,
)
from shyped.sandbox import devices as D
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import HypervisorStore
from shyped.sandbox.toolstack import Toolstack, ToolstackError
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn, XsError


def xsgold() -> DomainConfig:
    return domain_config_from_text(XSGOLD_CFG.read_text(), str(XSGOLD_CFG))


@pytest.fixture
def ts(xenstored: SandboxXenstored) -> Toolstack:
    toolstack = Toolstack(xenstored.socket_path)
    toolstack.boot_host()
    return toolstack


def assert_layout(xsd: SandboxXenstored, reference: str) -> None:
    assert normalize_layout(xenstore_ls(xsd)) == reference_layout(reference)


def test_reference_domain_replay_matches_every_captured_layout(
    xenstored: SandboxXenstored,
) -> None:
    ts = Toolstack(xenstored.socket_path)
    ts.boot_host()
    assert_layout(xenstored, "layout-before-create.txt")

    domid = ts.create(xsgold(), paused=True)
    assert domid == 1
    assert_layout(xenstored, "layout-paused.txt")

    ts.unpause(domid)
    assert_layout(xenstored, "layout-connected.txt")

    # Between the two dumps the capture ran `xl list -l` (libxl fills dom0's memory keys)
    # and a vchan test (its server in dom0 leaves an empty data/ directory behind).
    ts.list_long()
    endpoint = ts.vchan_listen(0, domid, path="data/vchan-test")
    ts.vchan_close(0, endpoint.path)
    ts.detach_disk(domid, "xvda")
    assert_layout(xenstored, "layout-after-detach.txt")

    ts.detach_nic(domid, "0")
    assert_layout(xenstored, "layout-after-netdetach.txt")

    ts.destroy("xsgold")
    assert_layout(xenstored, "layout-after-destroy.txt")


def test_vchan_rendezvous_values_and_permissions_match_the_capture(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    domid = ts.create(xsgold())
    ts.unpause(domid)
    endpoint = ts.vchan_listen(0, domid, path="data/vchan-test")
    # vchan.txt: ring-ref 8 (dom0's first free grant), event-channel 23, readable by the client.
    lines = [ln for ln in xenstore_ls(xenstored).splitlines() if "/data/vchan-test" in ln]
    assert lines == [
        '/local/domain/0/data/vchan-test = ""   (n0)',
        '/local/domain/0/data/vchan-test/event-channel = "23"   (n0,r1)',
        '/local/domain/0/data/vchan-test/ring-ref = "8"   (n0,r1)',
    ]
    assert (endpoint.ring_ref, endpoint.evtchn) == (8, 23)


PHASES = [
    ("xl-create-p", lambda ts: ts.create(xsgold(), paused=True)),
    ("xl-unpause", lambda ts: ts.unpause(1)),
    ("block-detach", lambda ts: ts.detach_disk(1, "xvda")),
    ("network-detach", lambda ts: ts.detach_nic(1, "00:16:3e:5a:11:01")),
    ("xl-destroy", lambda ts: ts.destroy(1)),
]


def test_writes_are_grouped_in_the_captured_transactions(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    """Phase by phase, the committed transactions and plain writes (with their order, values
    and setperms) equal the capture's; watches and the unsendable XS_INTRODUCE aside."""
    cursor = AccessLogCursor(xenstored)
    cursor.take()
    for phase, action in PHASES:
        action(ts)
        got = normalize_units(units(cursor.take()))
        want = normalize_units(units(reference_phase(phase)))
        assert want, f"no reference writes parsed for {phase}"
        assert got == want, phase


def test_domain_make_is_one_transaction_and_state_walks_are_separate(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    cursor = AccessLogCursor(xenstored)
    cursor.take()
    ts.create(xsgold(), paused=True)
    ts.unpause(1)
    ts.detach_disk(1, "xvda")
    ts.detach_nic(1, "0")
    got = units(cursor.take())

    make = [u for u in got if any(p == "/local/domain/1/control/shutdown" for _, p, _ in u.ops)]
    assert len(make) == 1 and make[0].in_transaction
    made = {p for _, p, _ in make[0].ops}
    assert {"/local/domain/1", "/vm/6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001", "/libxl/1"} <= made
    assert ("setperms", "/local/domain/1", "n0 r1") in make[0].ops

    # Every driver state change is a transaction of its own, except libxl's (it writes state
    # with the device in device add, and with online=0 on removal), and the sequences of
    # values are the capture's.
    want_states = state_sequences(
        units(
            reference_phase("xl-create-p")
            + reference_phase("xl-unpause")
            + reference_phase("block-detach")
            + reference_phase("network-detach")
        )
    )
    assert state_sequences(got) == want_states
    assert [v for v, _ in want_states["/local/domain/1/device/vif/0/state"]] == ["1", "4", "6"]
    assert [v for v, _ in want_states["/local/domain/1/device/vbd/51712/state"]] == [
        "1",
        "3",
        "4",
        "6",
    ]


def test_netfront_writes_rings_and_split_event_channels_in_one_transaction(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    ts.create(xsgold(), paused=True)
    cursor = AccessLogCursor(xenstored)
    cursor.take()
    ts.unpause(1)
    got = units(cursor.take())
    rings = [u for u in got if any(p.endswith("/tx-ring-ref") for _, p, _ in u.ops)]
    assert len(rings) == 1 and rings[0].in_transaction
    keys = {p.rsplit("/", 1)[1] for _, p, _ in rings[0].ops}
    assert {"tx-ring-ref", "rx-ring-ref", "event-channel-tx", "event-channel-rx"} <= keys
    assert "event-channel" not in keys and "state" not in keys


def test_create_retries_when_xenstored_answers_eagain(xenstored: SandboxXenstored) -> None:
    """libxl__domain_make's and the device add's transactions conflict with a concurrent
    writer; xenstored's own replay fails, the client gets EAGAIN and starts over."""
    other = XsConn(str(xenstored.socket_path))
    attempts: list[tuple[str, int]] = []

    def concurrent_writer(what: str, attempt: int) -> None:
        attempts.append((what, attempt))
        if attempt == 1 and what == "libxl__domain_make":
            other.write("/vm", "")  # the transaction's rm /vm/<uuid> now answers differently
        if attempt == 1 and what.startswith("device_disk_add"):
            other.write("/libxl/1/device/vbd", "")  # likewise its rm of the libxl record

    try:
        ts = Toolstack(xenstored.socket_path, before_commit=concurrent_writer)
        ts.boot_host()
        ts.create(xsgold(), paused=True)
    finally:
        other.close()
    assert ("libxl__domain_make", 2) in attempts
    assert ("device_disk_add vbd 51712", 2) in attempts
    assert_layout(xenstored, "layout-paused.txt")
    log = xenstored.access_log_path.read_text()
    assert log.count(" conflict ") >= 2


def test_fill_dom0_memory_rereads_after_eagain(xenstored: SandboxXenstored) -> None:
    """libxl__fill_dom0_memory_info reads target/static-max in its transaction: a concurrent
    write of target makes the retry keep it and fill only static-max."""
    other = XsConn(str(xenstored.socket_path))

    def concurrent_writer(what: str, attempt: int) -> None:
        if what == "libxl__fill_dom0_memory_info" and attempt == 1:
            other.write("/local/domain/0/memory/target", "524288")

    try:
        ts = Toolstack(xenstored.socket_path, before_commit=concurrent_writer)
        ts.boot_host()
        ts.list_long()
        assert other.read("/local/domain/0/memory/target") == "524288"
        assert other.read("/local/domain/0/memory/static-max") == "1048576"
    finally:
        other.close()


def test_random_eagain_from_oxenstored_test_mode_is_retried() -> None:
    """oxenstored's test-eagain fails a third of all commits (and replays): the layouts are
    still the capture's."""
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="xs"))
    try:
        with SandboxXenstored(directory, config={"test-eagain": True}) as xsd:
            ts = Toolstack(xsd.socket_path)
            ts.boot_host()
            ts.create(xsgold(), paused=True)
            assert_layout(xsd, "layout-paused.txt")
            ts.unpause(1)
            assert_layout(xsd, "layout-connected.txt")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_domids_are_not_reused_while_live(ts: Toolstack) -> None:
    cfg = xsgold()
    first = ts.create(cfg)
    second = ts.create(domain_config_from_text('name = "b"\nmemory = 64\n'))
    ts.destroy(first)
    third = ts.create(domain_config_from_text('name = "c"\nmemory = 64\n'))
    live = {d.domid for d in ts.list_domains()}
    assert (first, second) == (1, 2)
    assert third not in {second, 0} and third == 3  # Xen's rover moves on past freed ids
    assert live == {0, second, third}
    with pytest.raises(ToolstackError, match="already exists"):
        ts.create(domain_config_from_text('name = "b"\n'))


def test_ports_and_grants_are_not_reused_while_live(ts: Toolstack) -> None:
    ts.create(xsgold())
    ts.unpause(1)
    one = ts.vchan_listen(0, 1, port=5)
    two = ts.vchan_listen(0, 1, port=6)
    assert one.path == "/local/domain/0/data/vchan/1/5"
    assert one.ring_ref != two.ring_ref and one.evtchn != two.evtchn
    ts.vchan_close(0, one.path)
    three = ts.vchan_listen(0, 1, port=7)
    assert three.evtchn not in {two.evtchn} and three.ring_ref != two.ring_ref


def test_state_is_shared_through_the_file_beside_the_socket(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    domid = ts.create(xsgold())
    other_process_view = Toolstack(xenstored.socket_path)
    assert [d.name for d in other_process_view.list_domains()] == ["Domain-0", "xsgold"]
    other_process_view.unpause(domid)
    assert not HypervisorStore.beside(xenstored.socket_path).read().domain(domid).paused
    data = json.loads((Path(xenstored.socket_path).parent / "sandbox-hypervisor.json").read_text())
    assert data["domains"]["1"]["booted"] is True


def test_hotplug_after_boot_connects_both_ends(xenstored: SandboxXenstored, ts: Toolstack) -> None:
    domid = ts.create(domain_config_from_text('name = "hp"\nmemory = 64\n'))
    ts.unpause(domid)
    disk = ts.attach_disk(domid, parse_disk_spec("/dev/vg0/hp-data,raw,xvdb,w"))
    nic = ts.attach_nic(domid, parse_vif_spec("bridge=xenbr1"))
    with XsConn(str(xenstored.socket_path)) as xs:
        for dev in (disk, nic):
            assert xs.read(f"{dev.frontend}/state") == "4"
            assert xs.read(f"{dev.backend}/state") == "4"
        assert disk.devid == 51728
        assert xs.read(f"{disk.backend}/physical-device-path") == "/dev/vg0/hp-data"
        assert xs.read(f"{disk.backend}/node") is None  # a block device gets no loop device
        assert nic.devid == 0 and nic.mac.startswith("00:16:3e:")
        assert xs.read(f"{nic.backend}/bridge") == "xenbr1"
        assert xs.get_perms(disk.frontend) == (f"n{domid}", "r0")
        assert xs.get_perms(disk.backend) == ("n0", f"r{domid}")


def test_detach_while_paused_forces_removal(xenstored: SandboxXenstored, ts: Toolstack) -> None:
    """A paused guest cannot answer: libxl's forced retry removes the frontend first and the
    backend closes on its own; all three trees go."""
    domid = ts.create(xsgold(), paused=True)
    ts.detach_disk(domid, "51712")
    with XsConn(str(xenstored.socket_path)) as xs:
        assert xs.read("/local/domain/1/device/vbd/51712") is None
        assert xs.read("/local/domain/0/backend/vbd/1/51712") is None
        assert xs.read("/libxl/1/device/vbd/51712") is None
        assert xs.read("/local/domain/1/device/vif/0/state") == "1"


def test_destroy_of_a_running_domain_with_devices_leaves_the_fresh_host(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    domid = ts.create(xsgold())
    ts.unpause(domid)
    ts.destroy(domid)
    # Like layout-after-destroy.txt, less what `xl list -l` and the vchan test added there.
    want = [*reference_layout("layout-before-create.txt"), '/libxl = ""   (n0)', '/vm = ""   (n0)']
    assert sorted(normalize_layout(xenstore_ls(xenstored))) == sorted(want)
    assert [d.domid for d in ts.list_domains()] == [0]


def test_unknown_domain_and_device_errors(ts: Toolstack) -> None:
    with pytest.raises(ToolstackError, match="invalid domain identifier"):
        ts.unpause("nosuch")
    ts.create(xsgold())
    with pytest.raises(ToolstackError, match="not connected"):
        ts.detach_disk(1, "xvdz")
    with pytest.raises(ToolstackError, match="Unknown device"):
        ts.detach_nic(1, "7")
    with pytest.raises(ToolstackError, match="already exists"):
        ts.attach_disk(1, parse_disk_spec("vdev=xvda,target=/x.img"))


def test_device_layout_is_pure_data() -> None:
    dev = D.VbdDevice(domid=3, devid=51712, vdev="xvda", params="/img")
    st = D.vbd_add_step(dev)
    assert st.transaction and st.actor is L.Actor.LIBXL
    assert L.SetPerms("/local/domain/3/device/vbd/51712", ("n3", "r0")) in st.ops
    assert L.SetPerms("/local/domain/0/backend/vbd/3/51712", ("n0", "r3")) in st.ops
    assert L.Write("/libxl/3/device/vbd/51712/params", "/img") in st.ops


def test_frontends_react_to_what_a_daemon_did_while_the_domain_was_paused(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    """The simulated drivers read xenstore: a handshake cut before unpause (backend online=0,
    Closing) is answered by the frontend closing, and a removed device is simply absent."""
    domid = ts.create(xsgold(), paused=True)
    with XsConn(str(xenstored.socket_path)) as daemon:
        daemon.start()
        daemon.write("/local/domain/0/backend/vif/1/0/online", "0")
        daemon.write("/local/domain/0/backend/vif/1/0/state", "5")
        assert daemon.commit()
        for path in (
            "/local/domain/1/device/vbd/51712",
            "/local/domain/0/backend/vbd/1/51712",
            "/libxl/1/device/vbd/51712",
        ):
            daemon.rm(path)
    ts.unpause(domid)
    with XsConn(str(xenstored.socket_path)) as xs:
        assert xs.read("/local/domain/1/device/vif/0/state") == "6"
        assert xs.read("/local/domain/0/backend/vif/1/0/state") == "6"
        assert xs.read("/local/domain/1/device/vif/0/tx-ring-ref") is None
        assert xs.read("/local/domain/0/backend/vif/1/0/hotplug-status") is None
        assert xs.directory("/local/domain/1/device/vbd") == []
    # The guest still booted, and the vetoed device can be cleaned up by the toolstack.
    ts.detach_nic(domid, "0")
    with XsConn(str(xenstored.socket_path)) as xs:
        assert xs.read("/local/domain/1/control/feature-poweroff") == "1"
        assert xs.read("/libxl/1/device/vif/0") is None


def test_create_without_pause_connects_like_create_then_unpause(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    ts.create(xsgold(), paused=False)
    assert_layout(xenstored, "layout-connected.txt")
    assert not ts.list_domains()[1].paused


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_xenstored_is_an_error_not_a_hang(xenstored: SandboxXenstored) -> None:
    conn = XsConn(str(xenstored.socket_path), timeout=2.0)
    try:
        xenstored.stop()
        with pytest.raises(XsError):
            conn.read("/local")
    finally:
        conn.close()


def test_a_failed_create_removes_what_it_wrote(xenstored: SandboxXenstored, ts: Toolstack) -> None:
    cfg = domain_config_from_text(
        'name = "twice"\nuuid = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0002"\n'
        "disk = ['/a.img,raw,xvda,w', '/b.img,raw,xvda,w']\nvif = ['bridge=xenbr0']\n"
    )
    with pytest.raises(ToolstackError, match="already exists"):
        ts.create(cfg)
    text = xenstore_ls(xenstored)
    assert "/local/domain/1" not in text and "/vm/6f1b" not in text and "/libxl/1" not in text
    assert "/backend/" not in text
    assert [d.domid for d in ts.list_domains()] == [0]


def test_a_cut_under_vif_bridge_fails_the_create_as_on_real_xen(
    xenstored: SandboxXenstored, ts: Toolstack
) -> None:
    """A veto's online=0 + Closing written while libxl runs vif-bridge: netback drops the vif,
    the script fails (hotplug-error, hotplug-status "error"), libxl fails the add and the
    create destroys the domain (seen on real Xen 4.17, docs/operations.md)."""
    failed: list[str] = []

    def cut(backend: str) -> None:
        if "/backend/vif/" not in backend:
            return
        with XsConn(str(xenstored.socket_path)) as daemon:
            daemon.write(f"{backend}/online", "0")
            daemon.write(f"{backend}/state", "5")
        failed.append(backend)

    ts.before_hotplug = cut
    with pytest.raises(ToolstackError, match=r"unable to add vif devices: script: vif1\.0"):
        ts.create(xsgold())
    assert failed == ["/local/domain/0/backend/vif/1/0"]
    assert [d.domid for d in ts.list_domains()] == [0]
    assert "/local/domain/1" not in xenstore_ls(xenstored)
