"""Port of xm-test ``security-acm/05_security-acm_dom_res_conf.py`` (Xen 4.1.0): a blue
domain whose disk is labelled red does not start, and ``dry-run`` denies the disk.

Out of scope: none. Deliberate differences (see test_04): the dry-run item is named
``disk hda1 (/dev/ram0)`` (xm: ``phy:ram0: DENIED``); the config names ``phy:/dev/ram0``.
"""

from __future__ import annotations

from xmtest_helpers import AcmHost


def test_a_domain_with_a_disk_it_may_not_use_does_not_start(host: AcmHost) -> None:
    cfg = host.domain_cfg("domain-blue", "blue", disk="phy:/dev/ram0,hda1,w")
    r = host.ctl("addlabel", "red", "res", "phy:ram0")
    assert r.returncode == 0, r.stderr
    r = host.start_domain(cfg)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "domain-blue" not in host.running()

    for extra in ((), ("--acm",)):
        r = host.ctl("dry-run", *extra, str(cfg))
        assert r.returncode == 1, r.stdout + r.stderr
        (line,) = [x for x in r.stdout.splitlines() if x.startswith("disk hda1 (/dev/ram0)")]
        assert "DENIED" in line and "[ste]" in line
