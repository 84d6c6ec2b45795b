"""A domain restarted under its UUID (``xl reboot``, ``on_reboot = "restart"``, a guest's own
reboot) must be admitted, as the same instance of its dynamic label, even when the daemon sees
the old incarnation's removal and the new one's creation in one watch batch (red-team finding,
redteam-guest).

libxl removes the old domain's home and then creates the new domain with the same UUID; a
daemon that is behind (another guest's write flood, a loaded dom0) reads both in one burst.
The assembler announced the new domain before the old one's removal, so the new incarnation
found its UUID "already held" by the dead one and was destroyed: a guest could have its own
reboot, and a flooding guest another's, turned into a veto. The reactor is held while the
toolstack destroys and re-creates, which makes that burst deterministic.
"""

from __future__ import annotations

import json

import pytest_twisted
from daemon_helpers import Harness, domcfg, host_fixture
from test_dynamic_labels import POLICY_TEXT

from shyped.core.instances import Instance

__all__ = ["host_fixture"]  # the `host` fixture


@pytest_twisted.ensureDeferred
async def test_a_restart_seen_in_one_batch_keeps_its_uuid_and_its_instance(host: Harness) -> None:
    policy = host.xsd.instance_dir / "dyn.toml"
    policy.write_text(POLICY_TEXT)
    labels = host.xsd.instance_dir / "labels-dyn.json"
    store = {"version": 1, "domains": {"name": {"t1": "tenant"}}, "resources": {}}
    labels.write_text(json.dumps(store))
    await host.start(host.config(policy=policy, labels=labels))
    daemon = host.daemon
    assert daemon is not None
    cfg = domcfg("t1")
    old = await host.call(host.ts.create, cfg)
    await host.settle()
    inst = daemon.engine.instance_of(old)
    assert host.last(f"domain {old}").allowed and inst is not None
    # Held reactor: the old incarnation goes and the new one comes in one burst.
    host.ts.destroy(old)
    new = host.ts.create(cfg, paused=False)
    await host.settle()
    out = host.last(f"domain {new}")
    assert out.allowed, out.decision.reason
    assert "t1" in host.domains()
    assert daemon.engine.instance_of(new) == inst == Instance.of("tenant", str(cfg.uuid))
    assert daemon.engine.instance_of(old) is None
