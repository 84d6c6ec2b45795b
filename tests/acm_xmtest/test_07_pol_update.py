"""Port of xm-test ``security-acm/07_security-acm_pol_update.py`` (Xen 4.1.0): policy updates
there and back, dom0's label set and checked, the policy header, a running domain and dom0
relabelled under the Chinese Wall, a paused domain relabelled.

The original speaks Xen-API (``XSPolicy``, ``VM.set_security_label``); the port takes the
operator's verbs: ``shypectl setpolicy``/``policy load`` (``set_xspolicy``),
``addlabel L mgt DOMAIN`` (``VM.set_security_label``), ``getlabel mgt``
(``VM.get_security_label``), ``getpolicy --dumpxml`` (``ACMPolicy.get_header``).

Out of scope:
- the ssidref each relabel returns (``0x00010001``): the hypervisor's binary label numbers;
- ``/boot/xm-test.bin``, the boot flags (``XS_INST_BOOT``) and the grub entry: shyped keeps
  its policy in its own file (``policy.path``) and starts with it;
- ``XSPolicy.get_xstype`` / ``activate_xspolicy``: there is one policy type (ACM);
- suspend and resume of the guest and relabelling it while suspended (``VM.suspend``/
  ``VM.resume``): the sandbox has no save/restore; a domain that does not run is labelled
  through the label store (``register_domain``).
"""

from __future__ import annotations

from pathlib import Path

from xmtest_helpers import POLICIES, AcmHost, updated_from

SYS = "ACM:xm-test:SystemManagement"


def _dom0(host: AcmHost) -> str:
    r = host.ctl("getlabel", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_updates_dom0_and_running_domain_relabels(host: AcmHost) -> None:
    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")  # its own label: fine
    assert r.returncode == 0, r.stderr
    assert _dom0(host) == SYS

    # xm-test-new (updated from the current xm-test), then xm-test again from it.
    current = (POLICIES / "xm-test-security_policy.xml").read_bytes()
    new = updated_from((POLICIES / "xm-test-new-security_policy.xml").read_bytes(), current)
    path = host.directory / "new.xml"
    path.write_bytes(new)
    r = host.ctl("policy", "load", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    back = updated_from(current, new)
    path.write_bytes(back)
    r = host.ctl("policy", "load", str(path))
    assert r.returncode == 0, r.stdout + r.stderr

    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    r = host.ctl("addlabel", "black", "mgt", "Domain-0")  # not in the policy
    assert r.returncode == 6, r.stdout + r.stderr  # unknown label (docs/operations.md)
    r = host.ctl("addlabel", "red", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert _dom0(host) == "ACM:xm-test:red"
    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert _dom0(host) == SYS

    r = host.ctl("getpolicy", "--dumpxml")
    assert r.returncode == 0, r.stderr
    assert "Policy name           : xm-test" in r.stdout
    assert "<PolicyName>xm-test</PolicyName>" in r.stdout
    assert "<Date>Fri Sep 29 14:44:38 2006</Date>" in r.stdout
    assert "<PolicyUrl>" not in r.stdout

    cfg: Path = host.domain_cfg("domain-blue", "blue")
    r = host.ctl("getlabel", "dom", str(cfg))
    assert r.stdout.strip() == "policytype=ACM,policy=xm-test,label=blue"
    r = host.start_domain(cfg)
    assert r.returncode == 0, r.stdout + r.stderr

    r = host.ctl("addlabel", "red", "mgt", "domain-blue")  # relabel the running domain
    assert r.returncode == 0, r.stderr
    r = host.ctl("addlabel", "red", "mgt", "Domain-0")  # dom0 red beside a red guest: fine
    assert r.returncode == 0, r.stderr
    r = host.ctl("addlabel", "blue", "mgt", "domain-blue")  # dom0 red blocks blue (RER)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[chinese-wall]" in r.stderr
    assert host.ctl("getlabel", "mgt", "domain-blue").stdout.strip() == "ACM:xm-test:red"
    assert _dom0(host) == "ACM:xm-test:red"
    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr

    # Paused, the guest is relabelled blue; unpaused, it keeps it.
    assert host.xl("pause", "domain-blue").returncode == 0
    assert host.ctl("getlabel", "mgt", "domain-blue").stdout.strip() == "ACM:xm-test:red"
    r = host.ctl("addlabel", "blue", "mgt", "domain-blue")
    assert r.returncode == 0, r.stderr
    assert host.ctl("getlabel", "mgt", "domain-blue").stdout.strip() == "ACM:xm-test:blue"
    assert host.xl("unpause", "domain-blue").returncode == 0
    assert host.ctl("getlabel", "mgt", "domain-blue").stdout.strip() == "ACM:xm-test:blue"
    host.destroy("domain-blue")
