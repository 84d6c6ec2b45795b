"""The daemon against real oxenstored: domain admission (label node, Chinese Wall, vetoes) in
both modes. The sandbox toolstack plays xl from worker threads; the daemon runs in-process."""

from __future__ import annotations

import pytest
import pytest_twisted
from daemon_helpers import POLICY, Harness, domcfg, eventually, host_fixture
from twisted.internet import defer

from shyped.policy.decisions import Rule
from shyped.service.config import DomainVeto, Mode

__all__ = ["host_fixture"]  # the `host` fixture


def label_of(h: Harness, domid: int) -> str | None:
    return h.read(f"/local/domain/{domid}/shyped/label")


@pytest_twisted.ensureDeferred
async def test_admitted_domain_gets_its_label_readable_by_itself_only(host: Harness) -> None:
    await host.start()
    domid = await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    out = host.last(f"domain {domid}")
    assert out.allowed and out.decision.rule is Rule.CHINESE_WALL
    assert out.label == "bank-a-web" and not out.enforced
    assert label_of(host, domid) == f"ACM:{POLICY}:bank-a-web"
    assert host.perms(f"/local/domain/{domid}/shyped/label") == ("n0", f"r{domid}")
    assert host.perms(f"/local/domain/{domid}/shyped") == ("n0", f"r{domid}")
    # dom0 carries the bootstrap label, readable by nobody but dom0.
    assert label_of(host, 0) == f"ACM:{POLICY}:dom0"
    assert host.perms("/local/domain/0/shyped/label") == ("n0",)
    assert host.domains()["web-a1"].paused  # admission does not unpause: the wrapper does


@pytest_twisted.ensureDeferred
async def test_chinese_wall_conflict_is_destroyed_and_released_types_admit_it_later(
    host: Harness,
) -> None:
    await host.start()
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("web-b1"))
    await host.settle()
    out = host.last(f"domain {b}")
    assert not out.allowed and out.decision.rule is Rule.CHINESE_WALL
    assert "conflicts with running type 'bank-a'" in out.decision.reason
    assert out.enforced
    assert "web-b1" not in host.domains()
    assert not host.exists(f"/local/domain/{b}/name")
    assert host.read(f"/vm/{domcfg('web-b1').uuid}/name") is None
    assert label_of(host, a) == f"ACM:{POLICY}:bank-a-web"

    await host.call(host.ts.destroy, a)
    await host.settle()
    assert host.daemon is not None
    assert host.daemon.engine.running.running_labels() == {"dom0": 1}  # dom0 counts
    b2 = await host.call(host.ts.create, domcfg("web-b1"))
    await host.settle()
    assert host.last(f"domain {b2}").allowed
    assert label_of(host, b2) == f"ACM:{POLICY}:bank-b-web"


@pytest_twisted.ensureDeferred
async def test_pause_veto_keeps_the_refused_domain_paused_and_unlabelled(host: Harness) -> None:
    await host.start(host.config(veto=DomainVeto.PAUSE))
    await host.call(host.ts.create, domcfg("web-a1"), paused=False)
    b = await host.call(host.ts.create, domcfg("web-b1"), paused=False)  # running
    await host.settle()
    assert not host.last(f"domain {b}").allowed
    assert host.domains()["web-b1"].paused
    assert not host.domains()["web-a1"].paused
    assert host.exists(f"/local/domain/{b}/name")
    assert label_of(host, b) is None


@pytest_twisted.ensureDeferred
async def test_unlabelled_and_unknown_labels_are_denied_by_the_example_policy(
    host: Harness,
) -> None:
    await host.start()
    d = await host.call(host.ts.create, domcfg("stranger"))
    await host.settle()
    out = host.last(f"domain {d}")
    assert not out.allowed and out.decision.rule is Rule.DEFAULT
    assert "unlabelled domains are denied" in out.decision.reason
    assert "stranger" not in host.domains()


@pytest_twisted.ensureDeferred
async def test_uuid_assignment_wins_over_the_name(host: Harness) -> None:
    await host.start()
    # conf/labels.json labels this uuid bank-a-web; the name says shop.
    d = await host.call(
        host.ts.create, domcfg("shop-1", uuid="5a0e0000-0000-4000-8000-00000000a001")
    )
    await host.settle()
    assert host.last(f"domain {d}").label == "bank-a-web"


@pytest_twisted.ensureDeferred
async def test_permissive_denied_domain_keeps_running_and_counts_in_the_wall(
    host: Harness,
) -> None:
    await host.start(host.config(mode=Mode.PERMISSIVE))
    await host.call(host.ts.create, domcfg("web-a1"), paused=False)
    b = await host.call(host.ts.create, domcfg("web-b1"), paused=False)
    await host.settle()
    out_b = host.last(f"domain {b}")
    assert not out_b.allowed and not out_b.enforced and out_b.planned
    assert "permissive" in out_b.log_line()
    assert not host.domains()["web-b1"].paused
    assert label_of(host, b) == f"ACM:{POLICY}:bank-b-web"
    # web-b1 runs, so its types block bank-a for the next domain, although web-a1 runs too.
    c = await host.call(host.ts.create, domcfg("batch-a1"))
    await host.settle()
    out_c = host.last(f"domain {c}")
    assert not out_c.allowed
    assert "conflicts with running type 'bank-b'" in out_c.decision.reason
    assert set(host.domains()) >= {"web-a1", "web-b1", "batch-a1"}


@pytest_twisted.ensureDeferred
async def test_switch_to_enforcing_carries_out_past_denials_and_keeps_the_first_comer(
    host: Harness,
) -> None:
    daemon = await host.start(host.config(mode=Mode.PERMISSIVE))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("web-b1"))
    await host.settle()
    assert set(host.domains()) >= {"web-a1", "web-b1"}
    daemon.set_mode(Mode.ENFORCING)
    await host.settle()
    assert "web-b1" not in host.domains()
    assert "web-a1" in host.domains()
    assert host.last(f"domain {a}").allowed
    assert not host.last(f"domain {b}").allowed and host.last(f"domain {b}").enforced
    status = daemon.status()
    assert status.mode == "enforcing" and status.running_labels == {"dom0": 1, "bank-a-web": 1}


@pytest_twisted.ensureDeferred
async def test_a_listener_deferred_holds_the_veto_until_it_fires(host: Harness) -> None:
    daemon = await host.start()
    gate: defer.Deferred[None] = defer.Deferred()
    seen: list[str] = []

    def audit(outcome: object) -> defer.Deferred[None]:
        seen.append(getattr(outcome, "what", ""))
        return gate

    daemon.add_listener(audit)
    await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("web-b1"))
    await eventually(lambda: f"domain {b}" in seen)
    assert "web-b1" in host.domains()  # recorded first, acted on after
    gate.callback(None)
    await host.settle()
    assert "web-b1" not in host.domains()


@pytest.mark.parametrize("actuator", ["sandbox"])
@pytest_twisted.ensureDeferred
async def test_the_configured_sandbox_actuator_runs_the_xl_compatible_cli(
    host: Harness, actuator: str
) -> None:
    await host.start(host.config(actuator=actuator), in_process_actuator=False)
    await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("web-b1"))
    await host.settle()
    assert host.last(f"domain {b}").enforced
    assert "web-b1" not in host.domains()
    assert host.daemon is not None and host.daemon.enforcer.stats.failed == 0
