"""Port of xm-test ``security-acm/02_security-acm_dom_start.py`` (Xen 4.1.0): two labelled
domains that do not conflict (green, red) both start; ``labels`` and ``dumppolicy`` answer.

Out of scope: the ``ssidref N:  00 01 …`` lines of ``xm dumppolicy`` (the hypervisor's
binary ssidref matrix; ``shypectl dumppolicy`` prints the labels with their types instead).
"""

from __future__ import annotations

from xmtest_helpers import AcmHost


def test_two_labelled_domains_start(host: AcmHost) -> None:
    r = host.ctl("labels")
    for label in ("SystemManagement", "blue", "red", "green"):
        assert label in r.stdout

    r = host.ctl("dumppolicy")
    assert r.returncode == 0, r.stderr
    assert "POLICY REFERENCE = xm-test." in r.stdout.splitlines()

    for label in ("green", "red"):
        r = host.start_domain(host.domain_cfg(f"domain-{label}", label))
        assert r.returncode == 0, r.stdout + r.stderr
    assert {"domain-green", "domain-red"} <= host.running()
    host.destroy("domain-red")
    host.destroy("domain-green")
