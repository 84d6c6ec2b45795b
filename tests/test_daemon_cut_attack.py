"""A guest against the device cut's permission revoke, with a driver-domain backend that never
closes (red-team finding A). During the cut's wait for the backend (up to ``close_timeout``)
the backend domain must not be able to read the frontend's nodes.

The sandbox's every client is dom0: the guest's writes below are only those it may do on real
Xen (its frontend directory ``/local/domain/<fe>/device/vif/<devid>`` is ``n<fe>,r<be>``: it
owns it and every node it makes below it).
"""

from __future__ import annotations

import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture

from shyped.core.xlcfg import parse_vif_spec
from shyped.sandbox.xsconn import XsConn
from shyped.service.config import Mode
from shyped.service.enforcer import MAX_FRONTEND_NODES

__all__ = ["host_fixture"]  # the `host` fixture

#: Long enough that every check below runs during the wait (the test ends it itself).
CLOSE_TIMEOUT = 30.0
#: Bounded wait for what the enforcer does at once.
AT_ONCE = 5.0


def _fe(domid: int) -> str:
    return f"/local/domain/{domid}/device/vif/0"


def _be(frontend: int, backend: int) -> str:
    return f"/local/domain/{backend}/backend/vif/{frontend}/0"


async def _denied_nic_on_a_driver_domain(host: Harness, mode: Mode) -> tuple[int, int]:
    """netdom (a driver domain) serves web-a1 a vif on a bridge web-a1 may not use."""
    await host.start(host.config(mode=mode, close_timeout=CLOSE_TIMEOUT))
    n = await host.call(host.ts.create, domcfg("netdom"))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.call(host.ts.attach_nic, a, parse_vif_spec(f"bridge=xenbr-bank-b,backend={n}"))
    return a, n


def _cut_waiting(host: Harness, a: int, n: int) -> bool:
    """The cut has said Closing and still waits for the backend (nothing removed yet)."""
    assert host.daemon is not None
    return (
        host.read(_be(a, n) + "/state") == "5"
        and host.daemon.enforcer.stats.close_timeouts == 0
        and host.exists(f"/libxl/{a}/device/vif/0")
    )


async def _end_the_wait(host: Harness, a: int, n: int) -> None:
    """The backend closes at last (what its driver would write): the cut removes the device."""
    host_write = XsConn(str(host.xsd.socket_path))
    with host_write as xs:
        xs.write(_be(a, n) + "/state", "6")
    await host.settle()
    assert not host.exists(f"/libxl/{a}/device/vif/0")


@pytest_twisted.ensureDeferred
async def test_a_grant_given_back_during_the_cut_does_not_reach_the_backend(host: Harness) -> None:
    a, n = await _denied_nic_on_a_driver_domain(host, Mode.ENFORCING)
    fe = _fe(a)
    await eventually(lambda: host.perms(fe) == (f"n{a}",) and _cut_waiting(host, a, n))
    assert not host.last(f"device vif {a}/0").allowed
    # The guest's netfront publishes its ring anyway and gives the backend read access back
    # on the directory and the key (SET_PERMS on nodes it owns).
    ring = fe + "/tx-ring-ref"
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.write(ring, "8")
        assert (xs.get_perms(ring) or ("?",))[0] == f"n{a}"
        for path in (fe, ring):
            xs.set_perms(path, (f"n{a}", f"r{n}"))
    # The backend never gets to read it while the cut waits.
    await eventually(lambda: host.perms(ring) != (f"n{a}", f"r{n}"), timeout=AT_ONCE)
    assert host.perms(ring) in (None, (f"n{a}",))
    assert host.perms(fe) in (None, (f"n{a}",))
    assert _cut_waiting(host, a, n)
    await _end_the_wait(host, a, n)


@pytest_twisted.ensureDeferred
async def test_junk_nodes_past_the_revoke_cap_leave_nothing_readable(host: Harness) -> None:
    # Permissive first: the device is denied but not cut, the guest fills its frontend.
    a, n = await _denied_nic_on_a_driver_domain(host, Mode.PERMISSIVE)
    await host.settle()
    fe = _fe(a)
    assert host.perms(fe) == (f"n{a}", f"r{n}")
    ring = fe + "/queue-0/tx-ring-ref"  # one level below the junk: walked after all of it
    with XsConn(str(host.xsd.socket_path)) as xs:
        for i in range(MAX_FRONTEND_NODES + 50):
            xs.write(f"{fe}/junk-{i:04d}", "x")
        xs.write(ring, "8")
        assert xs.get_perms(ring) == (f"n{a}", f"r{n}")  # inherited from the directory
    await host.settle()
    assert host.daemon is not None
    host.daemon.set_mode(Mode.ENFORCING)  # the denial is carried out now
    await eventually(lambda: _cut_waiting(host, a, n), timeout=AT_ONCE)
    await eventually(lambda: host.perms(ring) != (f"n{a}", f"r{n}"), timeout=AT_ONCE)
    assert host.perms(ring) in (None, (f"n{a}",))
    assert _cut_waiting(host, a, n)
    await _end_the_wait(host, a, n)
