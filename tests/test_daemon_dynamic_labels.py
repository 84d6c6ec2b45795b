"""Dynamic labels end to end, as an operator meets them (docs/policy.md, "Dynamic labels"): the
``shyped`` process on a sandbox host (real oxenstored), domains created with ``shype-xl``,
``shypectl list``/``getlabel``, the audit trail.

Two domains of one dynamic template cannot share a vchan or each other's disk; both reach the
shared service the template may talk to; each shows its own instance, which is released at
destruction (same UUID again: same instance; a new UUID: another one).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from control_daemon_helpers import Host, audit_records, image, sandbox_host, uuid_of
from process_helpers import wait_until
from test_dynamic_labels import POLICY_TEXT

from shyped.core.instances import Instance
from shyped.sandbox.xenstored import SandboxXenstored
from shyped.sandbox.xsconn import XsConn


def acm(label: str) -> str:
    return f"ACM:dyn:{label}"


def instance(name: str) -> str:
    return Instance.of("tenant", uuid_of(name)).name


def disk_id(name: str) -> str:
    return f"disk:/srv/xen/images/{name}.img"


@pytest.fixture
def host(xenstored: SandboxXenstored) -> Iterator[Host]:
    with sandbox_host(xenstored) as h:
        h.policy.write_text(POLICY_TEXT)
        resources = {disk_id(n): f"tenant_disk@{uuid_of(n)}" for n in ("t1", "t2")}
        store = {
            "version": 1,
            "domains": {"name": {"t1": "tenant", "t2": "tenant", "t3": "tenant", "dns": "dns"}},
            "resources": resources,
        }
        h.labels.write_text(json.dumps(store))
        h.extra = f'[audit]\ndirectory = "{h.directory / "audit"}"\n'
        yield h


def ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    return r.stdout


def create(host: Host, name: str, *disks: str) -> int:
    r = host.shype_xl("create", str(host.cfg(name, disks=disks)))
    assert r.returncode == 0 and "admitted" in r.stderr, r.stderr
    if name != "dns":
        assert f"admitted (unlabelled, instance {instance(name)})" in r.stderr, r.stderr
    return host.domid(name)


def records(host: Host) -> list[dict[str, Any]]:
    return [r for r in audit_records(host) if r["kind"] == "decision"]


def decided(host: Host, what: str) -> bool:
    return any(body(r).get("what") == what for r in records(host))


def body(rec: dict[str, Any]) -> dict[str, Any]:
    inner = rec.get("body", rec)
    assert isinstance(inner, dict)
    return inner


def guest_shares(host: Host, owner: int, path: str, peer: int) -> None:
    """What guest `owner` may do on real Xen: write below a node it owns, then SET_PERMS."""
    with XsConn(str(host.xsd.socket_path)) as xs:
        xs.write(path, "hello")
        assert (xs.get_perms(path) or ("?",))[0] == f"n{owner}", "not a node the guest owns"
        xs.set_perms(path, (f"n{owner}", f"r{peer}"))


def perms(host: Host, path: str) -> tuple[str, ...] | None:
    with XsConn(str(host.xsd.socket_path)) as xs:
        return xs.get_perms(path)


def test_instances_of_one_template_are_kept_apart_end_to_end(host: Host) -> None:
    host.start()
    t1 = create(host, "t1", image("t1"))
    # t2 asking for t1's disk too: shype-xl says why, and t2 does not start
    cfg = host.cfg("t2", disks=(image("t2"), image("t1", vdev="xvdb")))
    dry = host.ctl("dry-run", str(cfg))
    assert dry.returncode == 1 and "DENIED" in dry.stdout, (dry.stdout, dry.stderr)
    verdicts = [line for line in dry.stdout.splitlines() if "t1.img" in line]
    assert len(verdicts) == 1 and "is assigned to the instance of domain" in verdicts[0]
    assert "t2.img" in dry.stdout and "t2.img) deny" not in dry.stdout
    r = host.shype_xl("create", str(cfg))
    assert r.returncode != 0 and "DENIED by shyped (nothing created)" in r.stderr, r.stderr
    assert "is assigned to the instance of domain" in r.stderr
    assert "t2" not in host.xl_list()
    t2 = create(host, "t2", image("t2"))
    dns = create(host, "dns")
    # hot-plugged behind shype-xl's back (plain xl): the daemon cuts it
    ok(host.xl("block-attach", "t2", image("t1", vdev="xvdb")))
    wait_until(lambda: decided(host, f"device vbd {t2}/51728"), what="t1's disk decided")
    # cut: offline at once, then removed after the close timeout
    online = f"/local/domain/0/backend/vbd/{t2}/51728/online"
    wait_until(lambda: host.read(online) in ("0", None), what="t1's disk cut")

    # list and getlabel show each domain's instance
    rows = {r.split()[0]: r for r in ok(host.ctl("list")).splitlines()[1:]}
    assert rows["t1"].endswith(f"{acm('tenant')} [{instance('t1')}]")
    assert rows["t2"].endswith(f"{acm('tenant')} [{instance('t2')}]")
    assert rows["dns"].endswith(acm("dns"))
    assert instance("t1") != instance("t2")
    got = ok(host.ctl("getlabel", "dom", "t1")).strip()
    assert got == f"{acm('tenant')} [{instance('t1')}]"
    listed = json.loads(ok(host.ctl("--json", "list")))["domains"]
    assert {d["name"]: d["instance"] for d in listed}["t2"] == instance("t2")

    # each instance's own disk is connected
    assert host.read(f"/local/domain/0/backend/vbd/{t2}/51712/online") == "1"
    assert host.read(f"/local/domain/0/backend/vbd/{t1}/51712/online") == "1"

    # a vchan between the two instances is removed; with the shared service it stays
    apart = host.ts.vchan_listen(t1, t2, port=7)
    with_dns = host.ts.vchan_listen(t1, dns, port=8)
    served = host.ts.vchan_listen(dns, t2, port=9)
    wait_until(lambda: host.read(f"{apart.path}/ring-ref") is None, what="vchan removed")
    for ep in (apart, with_dns, served):
        wait_until(lambda ep=ep: decided(host, f"vchan {ep.path}"), what=f"{ep.path} audited")
    assert host.read(f"{with_dns.path}/ring-ref") is not None
    assert host.read(f"{served.path}/ring-ref") is not None

    decisions = {body(r).get("what"): body(r) for r in records(host)}
    vchan = decisions[f"vchan {apart.path}"]
    assert vchan["decision"] == "deny" and vchan["rule"] == "ste"
    assert "private to each instance" in vchan["reason"]
    assert vchan["subject"]["instance"] == instance("t1")
    assert vchan["object"]["instance"] == instance("t2")
    assert decisions[f"vchan {with_dns.path}"]["decision"] == "permit"
    disk = next(b for r in records(host) if (b := body(r)).get("what") == f"device vbd {t2}/51728")
    assert disk["decision"] == "deny"
    assert disk["subject"]["instance"] == instance("t2")
    assert disk["resource"]["label"] == f"tenant_disk@{uuid_of('t1')}"
    assert "is assigned to the instance of domain" in disk["reason"]
    # hostile t1, writing only what it owns: a node of its own shared with t2 (SET_PERMS) is
    # reset; the same with the shared service stays
    to_t2, to_dns = f"/local/domain/{t1}/data/x2", f"/local/domain/{t1}/data/xd"
    guest_shares(host, t1, to_t2, t2)
    guest_shares(host, t1, to_dns, dns)
    wait_until(lambda: perms(host, to_t2) == (f"n{t1}",), what="permissions reset")
    wait_until(lambda: decided(host, f"xs-channel {to_dns}"), what="the node for dns decided")
    assert perms(host, to_dns) == (f"n{t1}", f"r{dns}")
    admit = decisions[f"domain {t1}"]
    assert admit["decision"] == "permit" and admit["subject"]["instance"] == instance("t1")


def test_an_instance_is_released_at_destruction(host: Host) -> None:
    host.start()
    create(host, "t1")
    t1 = host.domid("t1")
    ok(host.shype_xl("destroy", "t1"))
    wait_until(lambda: "t1" not in ok(host.ctl("list")), what="t1 gone")
    wait_until(
        lambda: any(r["kind"] == "instance-release" for r in audit_records(host)),
        what="the release audited",
    )
    (released,) = [body(r) for r in audit_records(host) if r["kind"] == "instance-release"]
    assert released["instance"] == instance("t1") and released["domid"] == t1
    assert released["uuid"] == uuid_of("t1")
    # another UUID: another instance; the same UUID again: the same instance
    create(host, "t3")
    assert ok(host.ctl("getlabel", "dom", "t3")).strip().endswith(f"[{instance('t3')}]")
    create(host, "t1")
    assert ok(host.ctl("getlabel", "dom", "t1")).strip().endswith(f"[{instance('t1')}]")
    assert instance("t3") != instance("t1")


def test_addlabel_assigns_a_disk_to_an_instance_and_never_away_from_its_user(
    host: Host,
) -> None:
    host.start()
    long = ok(host.ctl("labels", "--type", "any", "-l")).splitlines()
    assert "vm  tenant  ste=svc,tenant cw= dynamic" in long
    assert "vm  lab  ste=lab,svc cw= dynamic shared=lab" in long
    assert "res tenant_disk  ste=tenant per-instance" in long
    create(host, "t1", image("t1"))
    t3_disk = "file:/srv/xen/images/t3.img"
    out = ok(host.ctl("addlabel", f"tenant_disk@{uuid_of('t3')}", "res", t3_disk))
    bound = f"{acm('tenant_disk')}@{uuid_of('t3')}"
    assert out.strip() == f"disk:/srv/xen/images/t3.img: {bound} (was unlabelled)"
    assert ok(host.ctl("getlabel", "res", t3_disk)).strip() == bound
    create(host, "t3", image("t3"))  # its own disk: admitted

    bad = host.ctl("addlabel", "tenant_disk@not-a-uuid", "res", t3_disk)
    assert bad.returncode == 2 and "is not a domain UUID" in bad.stderr, bad.stderr
    # t1 uses its disk: assigning it to t3 instead is refused, and nothing changes
    t1_disk = "file:/srv/xen/images/t1.img"
    moved = host.ctl("addlabel", f"tenant_disk@{uuid_of('t3')}", "res", t1_disk)
    assert moved.returncode != 0 and "is assigned to the instance of domain" in moved.stderr
    assert ok(host.ctl("getlabel", "res", t1_disk)).strip().endswith(f"@{uuid_of('t1')}")
