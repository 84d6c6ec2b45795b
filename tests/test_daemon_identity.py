"""Domain identity against real oxenstored (issue 11, findings 6 and 7): a domain is gone only
when its xenstore home is, never because a value failed to parse; a name that does not parse or
a UUID another domain holds is decided (denied) and listed, and the Chinese Wall keeps counting
the domain that runs. dom0 plays ``xl rename`` (``name`` is dom0-only on real Xen: ``n0,r<d>``
in ``layout-paused.txt``); the sandbox toolstack plays ``xl create``/``destroy``."""

from __future__ import annotations

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg

from shyped.core.hostfacts import DomainState
from shyped.policy.decisions import Rule
from shyped.sandbox.xsconn import XsConn
from shyped.service.config import DomainVeto

#: Names xl would write but the daemon cannot parse: too long, and a zero-width space (not
#: printable).
BAD_NAMES = ["w" * 300, "web-a1\u200b"]


def xl_rename(h: Harness, domid: int, uuid: str, name: str) -> None:
    """``libxl_domain_rename``: both name nodes in one transaction, as dom0."""
    with XsConn(str(h.xsd.socket_path)) as xs:
        xs.write(f"/local/domain/{domid}/name", name)
        xs.write(f"/vm/{uuid}/name", name)


@pytest.mark.parametrize("bad", BAD_NAMES, ids=["300-chars", "zero-width-space"])
@pytest_twisted.ensureDeferred
async def test_renaming_a_running_domain_to_an_unparsable_name_keeps_its_chinese_wall(
    harness: Harness, bad: str
) -> None:
    daemon = await harness.start()
    a = await harness.call(harness.ts.create, domcfg("web-a1"))
    await harness.settle()
    assert harness.last(f"domain {a}").allowed
    await harness.call(xl_rename, harness, a, domcfg("web-a1").uuid, bad)
    await harness.settle()
    dom = daemon.host.domain(a)
    assert dom is not None and dom.state is DomainState.ADMITTED  # still there, still counted
    assert dom.name is None and "not printable UTF-8" in dom.identity
    assert daemon.engine.running.running_labels() == {"dom0": 1, "bank-a-web": 1}
    b = await harness.call(harness.ts.create, domcfg("web-b1"))
    await harness.settle()
    out = harness.last(f"domain {b}")
    assert not out.allowed and out.decision.rule is Rule.CHINESE_WALL
    assert "web-b1" not in harness.domains()


@pytest.mark.parametrize("bad", BAD_NAMES, ids=["300-chars", "zero-width-space"])
@pytest_twisted.ensureDeferred
async def test_a_domain_with_an_unparsable_name_created_while_down_is_decided_and_listed(
    harness: Harness, bad: str
) -> None:
    a = await harness.call(harness.ts.create, domcfg("web-a1"))
    await harness.call(xl_rename, harness, a, domcfg("web-a1").uuid, bad)
    daemon = await harness.start(harness.config(veto=DomainVeto.PAUSE))  # keep it to list it
    dom = daemon.host.domain(a)
    assert dom is not None and dom.state is DomainState.DENIED and dom.name is None
    out = harness.last(f"domain {a}")
    assert not out.allowed and "not printable UTF-8" in out.decision.reason
    assert out.enforced and harness.domains()["web-a1"].paused  # the hypervisor's own name


@pytest_twisted.ensureDeferred
async def test_a_duplicate_uuid_is_denied_and_destroying_it_keeps_the_holder_counted(
    harness: Harness,
) -> None:
    daemon = await harness.start(harness.config(veto=DomainVeto.PAUSE))
    uuid = domcfg("web-a1").uuid
    a = await harness.call(harness.ts.create, domcfg("web-a1"))
    twin = await harness.call(harness.ts.create, domcfg("batch-a1", uuid=uuid))
    await harness.settle()
    out = harness.last(f"domain {twin}")
    assert not out.allowed and f"UUID {uuid} is already held by domain {a}" in out.decision.reason
    listed = {d.domid: d for d in daemon.host.domains()}
    assert listed[twin].state is DomainState.DENIED and listed[a].state is DomainState.ADMITTED
    # xl destroy of the twin removes /vm/<uuid>, which both name: the holder still runs.
    await harness.call(harness.ts.destroy, twin)
    await harness.settle()
    assert daemon.host.domain(a) is not None
    assert daemon.engine.running.running_labels() == {"dom0": 1, "bank-a-web": 1}
    b = await harness.call(harness.ts.create, domcfg("web-b1"))
    await harness.settle()
    assert harness.last(f"domain {b}").decision.rule is Rule.CHINESE_WALL
    assert not harness.last(f"domain {b}").allowed


@pytest_twisted.ensureDeferred
async def test_a_rename_while_the_daemon_is_down_does_not_relabel_the_running_domain(
    harness: Harness,
) -> None:
    host = harness
    """Red team (second round): `xl rename web-b1 shop-1`, then a daemon restart: the
    domain was looked up again by its new name, ran on as `shop`, and bank-a's web-a1 was
    admitted beside bank-b's running web-b1. A running domain keeps the label it was
    admitted with (its dom0-owned label node); relabelling it goes through relabel."""
    await host.start()
    b = await host.call(host.ts.create, domcfg("web-b1"))  # bank-b-web, by name
    await host.settle()
    assert host.last(f"domain {b}").label == "bank-b-web"
    await host.stop()
    with XsConn(str(host.xsd.socket_path)) as xs:  # what libxl_domain_rename writes
        xs.write(f"/local/domain/{b}/name", "shop-1")
        xs.write(f"/vm/{domcfg('web-b1').uuid}/name", "shop-1")
    host.outcomes.clear()
    await host.start()
    await host.settle()
    again = host.last(f"domain {b}")
    assert again.allowed and again.label == "bank-b-web", again.log_line()
    rival = await host.call(host.ts.create, domcfg("web-a1"))  # bank-a: Chinese Wall
    await host.settle()
    assert not host.last(f"domain {rival}").allowed
    assert "web-a1" not in host.domains()
