"""The daemon against real oxenstored: PV devices and vchans, permitted and denied, in both
modes, with the xenstore state after enforcement checked."""

from __future__ import annotations

import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture, image

from shyped.core.xlcfg import parse_disk_spec, parse_vif_spec
from shyped.policy.decisions import Hook, Rule
from shyped.sandbox.xsconn import XsConn
from shyped.service.config import Mode

__all__ = ["host_fixture"]  # the `host` fixture


def fe(domid: int, kind: str, devid: int) -> str:
    return f"/local/domain/{domid}/device/{kind}/{devid}"


def be(domid: int, kind: str, devid: int, backend: int = 0) -> str:
    return f"/local/domain/{backend}/backend/{kind}/{domid}/{devid}"


def record(domid: int, kind: str, devid: int) -> str:
    return f"/libxl/{domid}/device/{kind}/{devid}"


XVDA = 51712


@pytest_twisted.ensureDeferred
async def test_denied_vif_is_cut_before_the_guest_runs_then_removed_once_closed(
    host: Harness,
) -> None:
    await host.start(host.config(close_timeout=60.0))
    d = await host.call(
        host.ts.create,
        domcfg("web-a1", vifs=["bridge=xenbr-bank-b"], disks=[image("web-a1")]),
    )
    # The handshake is cut while the domain is still paused (the veto waits for the backend).
    await eventually(lambda: host.read(be(d, "vif", 0) + "/state") == "5")
    out = host.last(f"device vif {d}/0")
    assert not out.allowed and out.enforced
    assert out.decision.hook is Hook.RESOURCE and out.decision.rule is Rule.STE
    assert out.resource is not None and out.resource.resource == "bridge:xenbr-bank-b"
    assert "lacks STE type 'bank-b'" in out.decision.reason
    assert host.read(be(d, "vif", 0) + "/online") == "0"
    # Only the guest may read its frontend nodes now, the directory and every key in it.
    assert host.perms(fe(d, "vif", 0)) == (f"n{d}",)
    assert host.perms(fe(d, "vif", 0) + "/backend-id") == (f"n{d}",)
    assert host.perms(fe(d, "vif", 0) + "/state") == (f"n{d}",)
    # The permitted disk is untouched.
    assert host.last(f"device vbd {d}/{XVDA}").allowed
    assert host.perms(fe(d, "vbd", XVDA)) == (f"n{d}", "r0")
    assert host.read(be(d, "vbd", XVDA) + "/online") == "1"

    # The guest boots: netfront sees Closing and closes, netback reaches Closed (6), and the
    # daemon removes the device as libxl__device_destroy does.
    await host.call(host.ts.unpause, d)
    await host.settle()
    assert not host.exists(fe(d, "vif", 0))
    assert not host.exists(be(d, "vif", 0))
    assert not host.exists(record(d, "vif", 0))
    assert host.read(fe(d, "vbd", XVDA) + "/state") == "4"  # the disk connected
    assert host.daemon is not None and host.daemon.enforcer.stats.close_timeouts == 0
    assert host.daemon.host.device(out.need.key) is None  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_backend_that_never_closes_is_removed_after_the_timeout(host: Harness) -> None:
    daemon = await host.start(host.config(close_timeout=0.3))
    # The domain stays paused: its netfront never answers the Closing.
    d = await host.call(host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-public"]))
    await host.settle()
    assert not host.last(f"device vif {d}/0").allowed
    assert daemon.enforcer.stats.close_timeouts == 1
    for path in (fe(d, "vif", 0), be(d, "vif", 0), record(d, "vif", 0)):
        assert not host.exists(path), path
    # libxl's path clean-up removed the emptied parents too, not the domain.
    assert not host.exists(f"/local/domain/{d}/device/vif")
    assert host.exists(f"/local/domain/{d}/name")


@pytest_twisted.ensureDeferred
async def test_permissive_device_denial_changes_nothing(host: Harness) -> None:
    await host.start(host.config(mode=Mode.PERMISSIVE))
    d = await host.call(host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-b"]))
    await host.settle()
    out = host.last(f"device vif {d}/0")
    assert not out.allowed and not out.enforced and out.planned
    assert host.perms(fe(d, "vif", 0)) == (f"n{d}", "r0")
    assert host.read(be(d, "vif", 0) + "/online") == "1"
    assert host.read(be(d, "vif", 0) + "/state") == "2"


@pytest_twisted.ensureDeferred
async def test_frontend_and_backend_domains_must_share_an_ste_type(host: Harness) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    # A shop vif served by the bank's domain (a driver domain it must not talk to).
    await host.call(host.ts.attach_nic, s, parse_vif_spec(f"bridge=xenbr-public,backend={a}"))
    await host.settle()
    out = host.last(f"device vif {s}/0")
    assert not out.allowed and out.decision.hook is Hook.DEVICE_CHANNEL
    assert out.decision.reason == "'shop' and 'bank-a-web' share no STE type"
    assert out.peer is not None and out.peer.domid == a
    assert not host.exists(be(s, "vif", 0, backend=a))
    assert not host.exists(record(s, "vif", 0))


@pytest_twisted.ensureDeferred
async def test_disks_are_checked_against_their_image_labels(host: Harness) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    r = await host.call(host.ts.create, domcfg("reports-a1"))
    await host.settle()
    attach = host.ts.attach_disk
    # Another customer's image: STE.
    await host.call(attach, a, parse_disk_spec(image("web-b1")))
    # A confidential image written by an internal domain: MLS.
    await host.call(attach, r, parse_disk_spec(image("web-a1")))
    # An internal archive read by a confidential domain (read down) is fine; written, not.
    await host.call(attach, a, parse_disk_spec(image("archive-a", "ro").replace("xvda", "xvdb")))
    await host.call(attach, r, parse_disk_spec(image("archive-a").replace("xvda", "xvdb")))
    await host.settle()
    wrong = host.last(f"device vbd {a}/{XVDA}")
    assert not wrong.allowed and wrong.decision.rule is Rule.STE
    assert "lacks STE type 'bank-b'" in wrong.decision.reason
    mls = host.last(f"device vbd {r}/{XVDA}")
    assert not mls.allowed and mls.decision.rule is Rule.MLS
    assert "read-write use needs equal MLS labels" in mls.decision.reason
    assert host.last(f"device vbd {a}/51728").allowed
    assert host.last(f"device vbd {r}/51728").allowed  # internal writes internal
    assert not host.exists(record(a, "vbd", XVDA)) and not host.exists(record(r, "vbd", XVDA))
    assert host.exists(record(a, "vbd", 51728)) and host.exists(record(r, "vbd", 51728))


@pytest_twisted.ensureDeferred
async def test_permitted_devices_connect_untouched(host: Harness) -> None:
    await host.start()
    d = await host.call(
        host.ts.create,
        domcfg("web-a1", vifs=["bridge=xenbr-bank-a"], disks=[image("web-a1")]),
    )
    await host.call(host.ts.unpause, d)
    await host.settle()
    for what in (f"device vif {d}/0", f"device vbd {d}/{XVDA}", f"device console {d}/0"):
        assert host.last(what).allowed, what
    assert host.read(fe(d, "vif", 0) + "/state") == "4"
    assert host.read(be(d, "vbd", XVDA) + "/state") == "4"
    assert host.perms(fe(d, "vif", 0)) == (f"n{d}", "r0")


# ---------------------------------------------------------------------------- vchans


def publish_world_readable(h: Harness, server: int, path: str) -> None:
    with XsConn(str(h.xsd.socket_path)) as xs:
        xs.start()
        for key, value in (("ring-ref", "9"), ("event-channel", "30")):
            xs.write(f"{path}/{key}", value)
            xs.set_perms(f"{path}/{key}", (f"r{server}",))  # default access r: everyone
        assert xs.commit()


@pytest_twisted.ensureDeferred
async def test_vchans_need_a_common_type_and_a_named_client(host: Harness) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    ok = await host.call(host.ts.vchan_listen, 0, a)
    bad = await host.call(host.ts.vchan_listen, a, s)
    world = f"/local/domain/{a}/data/vchan/any/7"
    publish_world_readable(host, a, world)
    await host.settle()

    permit = host.last(f"vchan {ok.path}")
    assert permit.allowed and permit.decision.hook is Hook.VCHAN
    assert host.read(ok.path + "/ring-ref") == str(ok.ring_ref)

    deny = host.last(f"vchan {bad.path}")
    assert not deny.allowed and deny.enforced
    assert deny.decision.reason == "'bank-a-web' and 'shop' share no STE type"
    assert not host.exists(bad.path + "/ring-ref") and not host.exists(bad.path)

    anyone = host.last(f"vchan {world}")
    assert not anyone.allowed and "readable by every domain" in anyone.decision.reason
    assert not host.exists(world)


@pytest_twisted.ensureDeferred
async def test_permissive_vchan_denial_leaves_the_rendezvous(host: Harness) -> None:
    await host.start(host.config(mode=Mode.PERMISSIVE))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    bad = await host.call(host.ts.vchan_listen, a, s)
    await host.settle()
    out = host.last(f"vchan {bad.path}")
    assert not out.allowed and not out.enforced
    assert host.read(bad.path + "/event-channel") == str(bad.evtchn)


@pytest_twisted.ensureDeferred
async def test_a_vchan_for_a_domain_not_there_yet_is_decided_when_it_appears(
    host: Harness,
) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    path = f"/local/domain/{a}/data/vchan/{a + 1}/0"
    with XsConn(str(host.xsd.socket_path)) as xs:
        for key in ("ring-ref", "event-channel"):
            xs.write(f"{path}/{key}", "9")
            xs.set_perms(f"{path}/{key}", (f"n{a}", f"r{a + 1}"))
    await host.settle()
    first = host.last(f"vchan {path}")
    assert first.allowed and "no named client exists yet" in first.decision.reason
    s = await host.call(host.ts.create, domcfg("shop-1"))  # takes the named domid
    assert s == a + 1
    await host.settle()
    assert not host.last(f"vchan {path}").allowed
    assert not host.exists(path)


@pytest_twisted.ensureDeferred
async def test_closing_is_said_again_when_the_backend_probe_overwrites_it(host: Harness) -> None:
    """A backend driver's probe (InitWait) may land after the cut: Closing is written again."""
    await host.start(host.config(close_timeout=60.0))
    d = await host.call(host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-b"]))
    state = be(d, "vif", 0) + "/state"
    await eventually(lambda: host.read(state) == "5")
    with XsConn(str(host.xsd.socket_path)) as backend:
        backend.write(state, "2")
    await eventually(lambda: host.read(state) == "5")
    assert host.read(be(d, "vif", 0) + "/online") == "0"
    await host.call(host.ts.unpause, d)
    await host.settle()
    assert not host.exists(record(d, "vif", 0))
    assert host.daemon is not None and host.daemon.enforcer.stats.close_timeouts == 0
