"""The label store's validation on a running daemon (real shyped, sandbox host): a store with
errors is not taken in on SIGHUP (the old one stays, the errors are logged and counted), and
addlabel never overwrites a hand edit (bad, or not yet reloaded)."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator

import pytest
from control_daemon_helpers import Host, acm, sandbox_host
from process_helpers import wait_until

from shyped.sandbox.xenstored import SandboxXenstored


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Host]:
    with sandbox_host(xenstored) as h:
        yield h


def test_bad_store_on_sighup_and_addlabel_keep_the_hand_edit(host: Host) -> None:
    daemon = host.start()
    good = json.loads(host.labels.read_text())
    # A hand edit with a typo: "resource" for "resources".
    edited = dict(good, resource={"bridge:xenbr-test": "xenbr-public"})
    host.labels.write_text(json.dumps(edited, indent=2) + "\n")
    bad = host.labels.read_text()
    line = next(i for i, s in enumerate(bad.splitlines(), 1) if '"resource"' in s)

    r = host.ctl("addlabel", "xenbr-public", "res", "bridge:xenbr-new")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert f"{host.labels}:{line}: unknown key 'resource' (did you mean 'resources'?)" in r.stderr
    assert host.labels.read_text() == bad  # the edit is not overwritten

    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "label store not reloaded" in daemon.text(), what="reload logged")
    assert "failure 1" in daemon.text() and "did you mean 'resources'?" in daemon.text()
    r = host.ctl("getlabel", "res", "bridge:xenbr-test")
    assert r.stdout.strip() == "(unlabelled)"  # the old store is still in use

    # Fixed by hand but not reloaded: addlabel refuses rather than overwrite it.
    fixed = dict(good, resources={**good.get("resources", {}), "bridge:xenbr-test": "xenbr-public"})
    host.labels.write_text(json.dumps(fixed, indent=2) + "\n")
    r = host.ctl("addlabel", "xenbr-public", "res", "bridge:xenbr-new")
    assert r.returncode == 2 and "was changed since the daemon loaded it" in r.stderr
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            host.ctl("getlabel", "res", "bridge:xenbr-test").stdout.strip() == acm("xenbr-public")
        ),
        what="store reloaded",
    )
    r = host.ctl("addlabel", "xenbr-public", "res", "bridge:xenbr-new")
    assert r.returncode == 0, r.stderr
    resources = json.loads(host.labels.read_text())["resources"]
    assert resources["bridge:xenbr-test"] == "xenbr-public"  # the hand edit survived
    assert resources["bridge:xenbr-new"] == "xenbr-public"

    # An assignment of a label the policy lacks: taken in (the domain would be denied with
    # rule label), and the reload says so, at its line.
    doc = json.loads(host.labels.read_text())
    doc.setdefault("domains", {}).setdefault("name", {})["ghost"] = "bank-a-webb"
    host.labels.write_text(json.dumps(doc, indent=2) + "\n")
    line = next(i for i, s in enumerate(host.labels.read_text().splitlines(), 1) if "ghost" in s)
    daemon.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "has no VM label 'bank-a-webb'" in daemon.text(), what="warning logged")
    assert f"{host.labels}:{line}: domain ghost: policy" in daemon.text()
    assert "did you mean 'bank-a-web'?" in daemon.text()
