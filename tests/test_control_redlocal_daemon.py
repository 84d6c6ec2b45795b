"""Red team as hostile local users against the REAL daemon's control socket, after the control
server was cut into connections, arguments, results and policy ops: every op keeps its access
(a read-group member asks every admin op with valid arguments, an outsider every op) and
nothing changes; malformed requests, pipelined on one connection, get clear errors and the
requests after them are still answered."""

from __future__ import annotations

import json

from control_daemon_helpers import HOSTING, Host, acm, image, uuid_of
from control_daemon_helpers import audit_records as records
from peercred_helpers import Accounts, code, needs_users, run_as
from test_control_abuse_daemon import accounts, host

from shyped.control.protocol import OPS

pytestmark = needs_users
__all__ = ["accounts", "host"]  # the fixtures: a sandbox host the test users reach, with groups


#: Sends every argv line on ONE connection at once (pipelined), then prints the answers.
PIPELINED = r"""
import json, socket, sys
path, lines = sys.argv[1], sys.argv[2:]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(60)
s.connect(path)
s.sendall(b"".join(l.encode() + b"\n" for l in lines))
f = s.makefile("rb")
for _ in lines:
    line = f.readline()
    print(json.dumps(json.loads(line) if line else {"eof": True}), flush=True)
"""

NEW_UUID = "22222222-2222-4222-8222-222222222222"
WEB = uuid_of("web-a1")

#: Every op with arguments it accepts (the running domain web-a1, the policy's labels).
ARGS: dict[str, dict[str, object] | None] = {
    "ping": None,
    "status": None,
    "getenforce": None,
    "labels": {"type": "any"},
    "validate_label": {"label": "bank-a-web", "type": "vm"},
    "list": None,
    "get_domain_label": {"domain": "web-a1"},
    "get_resource_label": {"resource": "/srv/xen/images/web-a1.img"},
    "resources": None,
    "dry_run": {"running": "web-a1"},
    "wait_admission": {"uuid": WEB, "timeout": 5},
    "policy_show": {"format": "toml"},
    "policy_check": {"text": HOSTING.read_text(), "filename": "p.toml"},
    "placement": {"label": "bank-a-web"},
    "attest_quote": {"nonce": "n"},
    "attest_ak": None,
    "setenforce": {"mode": "permissive"},
    "register_domain": {"uuid": NEW_UUID, "name": "x1", "label": acm("shop")},
    "relabel_domain": {"domain": "web-a1", "label": acm("bank-a-batch")},
    "set_resource_label": {"resource": "/srv/xen/images/web-a1.img", "label": None},
    "policy_load": {"source": None},
    "policy_reset": None,
    "forget_domain": {"domain": "web-b1"},
    "reserve": {"uuid": NEW_UUID, "host": "h2", "kind": "migrate", "label": None},
}
#: What a read-group member gets for the read ops this single host without a TPM cannot do.
READ_UNAVAILABLE = {"placement", "attest_quote", "attest_ak"}


def line(op: str) -> str:
    args = ARGS[op]
    return json.dumps({"version": 1, "op": op, **({} if args is None else {"args": args})})


def state(host: Host) -> tuple[bytes, bytes, str | None, str]:
    mode = json.loads(host.ctl("--json", "getenforce").stdout)["mode"]
    return host.labels.read_bytes(), host.policy.read_bytes(), host.label_node("web-a1"), mode


def test_every_op_keeps_its_access_on_the_real_daemon(host: Host, accounts: Accounts) -> None:
    assert sorted(ARGS) == sorted(OPS), "a new op: add it here with arguments it accepts"
    host.start()
    cfg = host.cfg("web-a1", "bank-a-web", disks=(image("web-a1"),))
    assert host.shype_xl("create", str(cfg)).returncode == 0
    before = state(host)
    reads = [op for op, o in OPS.items() if o.access == "read"]
    admins = [op for op, o in OPS.items() if o.access == "admin"]
    answers = run_as(accounts.reader, PIPELINED, str(host.socket), *map(line, reads + admins))
    got = dict(zip(reads + admins, map(code, answers), strict=True))
    want = {op: ("unavailable" if op in READ_UNAVAILABLE else None) for op in reads}
    want |= {op: "permission-denied" for op in admins}
    assert got == want
    out = run_as(accounts.outsider, PIPELINED, str(host.socket), *map(line, admins + reads))
    assert [code(a) for a in out] == ["permission-denied"] * len(OPS)
    assert state(host) == before
    users = (accounts.reader.uid, accounts.outsider.uid)
    control = [r for r in records(host) if r["kind"] == "control" and r.get("uid") in users]
    assert not [r for r in control if r.get("allowed") is not False], control
    refused = {(r.get("uid"), r.get("op")) for r in control}
    assert (accounts.reader.uid, admins[0]) in refused, control
    assert (accounts.outsider.uid, admins[0]) in refused, control


def test_malformed_requests_get_clear_errors_and_lose_nothing(
    host: Host, accounts: Accounts
) -> None:
    host.start()
    bad = [
        "{not json",
        json.dumps({"version": 1, "op": "no_such_op"}),
        json.dumps({"version": 2, "op": "status"}),
        json.dumps({"version": 1, "op": "get_domain_label", "args": {"domain": 0}}),
        json.dumps({"version": 1, "op": "wait_admission", "args": {"uuid": WEB, "x": 1}}),
        json.dumps({"version": 1, "op": "setenforce", "args": {"mode": "off"}}),
        json.dumps([1, 2]),
        json.dumps({"version": 1, "op": "status", "id": {"a": 1}}),
    ]
    tail = [json.dumps({"version": 1, "op": "getenforce", "id": 7})]
    answers = run_as(accounts.reader, PIPELINED, str(host.socket), *bad, *tail)
    codes = [code(a) for a in answers]
    assert codes[:-1] == [
        "bad-json", "unknown-op", "unsupported-version", "bad-request", "bad-request",
        "bad-request", "bad-request", "bad-request",
    ], answers  # fmt: skip
    assert all(a["error"]["message"] for a in answers[:-1])
    assert answers[-1] == {
        "version": 1, "id": 7, "ok": True, "result": {"mode": "enforcing", "previous": None}
    }, answers[-1]  # fmt: skip
