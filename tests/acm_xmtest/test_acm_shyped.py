"""What the xm-test port needs of shyped beyond the suite's own assertions (issue 21): dom0's
label kept across a daemon restart and counted in the Chinese Wall, an invalidated resource
label refused at use, the new operations refused to local users who may not change things,
and hostile arguments answered with clear errors."""

from __future__ import annotations

import json
import os
import subprocess

from user_helpers import local_user, needs_users, python_as
from xmtest_helpers import AcmHost

#: Sends each argv[2:] line (a JSON request) to the socket argv[1]; prints each answer line.
ASK = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for line in sys.argv[2:]:
    f.write(line.encode() + b"\\n"); f.flush()
    print(f.readline().decode().strip())
"""


def test_dom0_label_survives_a_restart_and_counts_in_the_chinese_wall(host: AcmHost) -> None:
    r = host.ctl("addlabel", "red", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert "relabel: Domain-0(0) SystemManagement -> red" in host.log()
    assert json.loads(host.labels.read_text())["dom0"] == "red"

    assert host.stop() == 0
    host.start()
    assert host.dom0_label() == ["ACM", "xm-test", "red"]
    assert host.ctl("getlabel", "mgt", "0").stdout.strip() == "ACM:xm-test:red"
    r = host.start_domain(host.domain_cfg("domain-blue", "blue"))  # red dom0 blocks blue
    assert r.returncode == 1, r.stdout + r.stderr
    assert "conflict set 'RER'" in r.stdout + r.stderr

    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")  # back: forgotten
    assert r.returncode == 0, r.stderr
    assert "dom0" not in json.loads(host.labels.read_text())
    assert host.start_domain(host.domain_cfg("domain-blue", "blue")).returncode == 0
    host.destroy("domain-blue")


def test_an_invalidated_resource_label_denies_every_use(host: AcmHost) -> None:
    assert host.ctl("addlabel", "blue", "res", "file:/tmp/acm-blue.img").returncode == 0
    assert host.setpolicy("xm-test-update").returncode == 0  # drops blue
    assert host.reslabel("file:/tmp/acm-blue.img") == "INV_ACM:xm-test:blue"
    assert "INV_ACM:xm-test:blue" in host.ctl("resources").stdout
    cfg = host.domain_cfg(
        "domain-sys",
        "SystemManagement",
        policy="xm-test-update",
        disk="file:/tmp/acm-blue.img,xvda,w",
    )
    r = host.ctl("dry-run", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "'INV_ACM:xm-test:blue' has policy type 'INV_ACM'" in r.stdout
    r = host.start_domain(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "domain-sys" not in host.running()
    # relabelled under the new policy, it may be used again
    assert host.ctl("addlabel", "SystemManagement", "res", "file:/tmp/acm-blue.img").returncode == 0
    assert host.ctl("dry-run", str(cfg)).returncode == 0


def test_resetpolicy_is_refused_while_a_labelled_domain_runs(host: AcmHost) -> None:
    assert host.start_domain(host.domain_cfg("domain-green", "green")).returncode == 0
    r = host.ctl("resetpolicy")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[label] domain 'domain-green'" in r.stderr
    assert host.policy_name() == "xm-test"
    host.destroy("domain-green")
    assert host.ctl("resetpolicy").returncode == 0
    assert host.policy_name() == "DEFAULT"


def test_rmlabel_mgt_forgets_a_stored_label_but_not_a_running_domains(host: AcmHost) -> None:
    cfg = host.domain_cfg("domain-red", "red")
    assert host.start_domain(cfg).returncode == 0
    uuid = json.loads(host.ctl("--json", "getlabel", "mgt", "domain-red").stdout)["uuid"]
    r = host.ctl("rmlabel", "mgt", "domain-red")
    assert r.returncode == 1 and "runs" in r.stderr, r.stdout + r.stderr
    host.destroy("domain-red")
    r = host.ctl("rmlabel", "mgt", uuid)
    assert r.returncode == 0, r.stderr
    assert uuid not in host.labels.read_text()
    r = host.ctl("rmlabel", "mgt", uuid)
    assert r.returncode == 5, r.stdout + r.stderr


def test_hostile_arguments_get_clear_errors(host: AcmHost) -> None:
    for domain, code in (
        ("../../etc/passwd", 5),
        ("x" * 100_000, 5),
        ("Domain-0\nred", 5),
        ("-1", 5),
    ):
        r = host.ctl("addlabel", "red", "mgt", domain)
        assert r.returncode == code, (domain[:40], r.stdout, r.stderr)
        assert "no domain" in r.stderr and len(r.stderr) < 2000
    for label in ("r" * 100_000, "red\n", "ACM:other:red", "INV_ACM:xm-test:red", ""):
        r = host.ctl("addlabel", label, "mgt", "Domain-0")
        assert r.returncode == 2, (label[:40], r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr) < 2000
    for name in ("../x", "a b", "x" * 300):
        r = host.ctl("rmlabel", "mgt", name)
        assert r.returncode in (2, 5), (name[:40], r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr) < 2000
    assert host.ctl("setpolicy", "FLASK", "xm-test").returncode == 2
    assert host.ctl("setpolicy", "ACM", "../../etc/shadow").returncode != 0
    assert host.dom0_label() == ["ACM", "xm-test", "SystemManagement"]
    assert "Traceback" not in host.log()


@needs_users
def test_local_users_may_not_relabel_dom0_or_reset_the_policy(host: AcmHost) -> None:
    with local_user("shyacm") as user:
        os.chmod(host.directory, 0o755)  # the socket itself is 0666; the folder was 0700
        for extra in ("", f'read_group = "{user.name}"\n'):  # an outsider, then a reader
            host.extra = extra
            assert host.stop() == 0
            host.start()
            requests = [
                {"version": 1, "op": "relabel_domain", "args": {"domain": "0", "label": "red"}},
                {"version": 1, "op": "policy_reset"},
                {"version": 1, "op": "forget_domain", "args": {"domain": "Domain-0"}},
                {
                    "version": 1,
                    "op": "set_resource_label",
                    "args": {"resource": "phy:ram0", "label": "red"},
                },
            ]
            read = {"version": 1, "op": "get_domain_label", "args": {"domain": "0"}}
            lines = [*map(json.dumps, requests), json.dumps(read)]
            argv = python_as(user, ASK, [str(host.socket), *lines])
            out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
            *answers, looked = [json.loads(line) for line in out.stdout.splitlines()]
            assert len(answers) == len(requests), out.stdout + out.stderr
            for a in answers:
                assert a["ok"] is False and a["error"]["code"] == "permission-denied", a
            assert looked["ok"] is bool(extra), looked  # the reader may look
        assert host.dom0_label() == ["ACM", "xm-test", "SystemManagement"]
        assert host.policy_name() == "xm-test"
        assert host.reslabel("phy:ram0") == "(unlabelled)"
