"""``register_domain`` is no side door for a running domain's label (issue 11, finding 8, and
finding 7's "label assignment by UUID refuses a UUID already held by another running domain").
The daemon runs as a child process; the admin talks to its control socket as shype-xl does."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from control_daemon_helpers import Host, acm, image, sandbox_host, uuid_of

from shyped.control.client import ControlClient
from shyped.control.protocol import ControlError, ErrorCode
from shyped.sandbox.xenstored import SandboxXenstored


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Host]:
    with sandbox_host(xenstored) as h:
        yield h


def create(host: Host, name: str, label: str, **kw: tuple[str, ...]) -> None:
    r = host.shype_xl("create", str(host.cfg(name, label, **kw)))
    assert r.returncode == 0 and "admitted" in r.stderr, r.stderr


def refused(host: Host, uuid: str, name: str | None, label: str | None) -> ControlError:
    with ControlClient(host.socket) as client, pytest.raises(ControlError) as caught:
        client.register_domain(uuid, name, label)
    assert caught.value.code is ErrorCode.DENIED
    return caught.value


def test_a_refused_relabel_is_not_done_through_register_domain(host: Host) -> None:
    host.start()
    create(host, "web-a1", "bank-a-web", disks=(image("web-a1"),), vifs=("bridge=xenbr-bank-a",))
    create(host, "batch-a1", "bank-a-batch")
    r = host.ctl("addlabel", "bank-b-web", "mgt", "web-a1")
    assert r.returncode == 1 and r.stderr.count("[") >= 3, r.stderr  # CW, disk, bridge
    before = host.labels.read_bytes()

    err = refused(host, uuid_of("web-a1"), "web-a1", "bank-b-web")
    assert "relabel of running domain web-a1" in str(err)
    reasons = " ".join(err.details["reasons"])
    assert "conflicts with running type 'bank-a'" in reasons and "bank-a-disk" in reasons
    assert host.labels.read_bytes() == before
    # After a restart the running domain still carries its label, keeps its disk and its
    # Chinese Wall peer.
    host.stop()
    host.start()
    assert host.label_node("web-a1") == acm("bank-a-web")
    assert host.read(f"/local/domain/{host.domid('web-a1')}/device/vbd/51712/state") is not None
    assert "batch-a1" in host.xl_list()
    # Forgetting the label of a running domain is refused too.
    refused(host, uuid_of("web-a1"), None, None)
    stored = json.loads(host.labels.read_text())["domains"]["uuid"]
    assert stored[uuid_of("web-a1")] == "bank-a-web"


def test_a_create_with_a_colliding_uuid_never_erases_the_running_domains_entry(
    host: Host,
) -> None:
    host.start()
    create(host, "web-a1", "bank-a-web")
    cfg = host.cfg("web-a2", "bank-a-web", uuid=uuid_of("web-a1"))
    r = host.shype_xl("create", str(cfg))
    assert r.returncode != 0
    assert f"UUID {uuid_of('web-a1')} is already held by running domain web-a1" in r.stderr
    assert "web-a2" not in host.xl_list()
    stored = json.loads(host.labels.read_text())["domains"]["uuid"]
    assert stored[uuid_of("web-a1")] == "bank-a-web"
    assert host.label_node("web-a1") == acm("bank-a-web")
    assert "web-a1" in host.xl_list()
