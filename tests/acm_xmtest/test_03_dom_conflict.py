"""Port of xm-test ``security-acm/03_security-acm_dom_conflict.py`` (Xen 4.1.0): with a blue
domain running, a red one (conflict set RER) does not start.

Out of scope: none.

Deliberate difference: ``xm dry-run`` of the red config said PERMITTED (it checked only the
label and the disks' STE). ``shypectl dry-run`` also checks the Chinese Wall against the
running domains, so it says DENIED, as the start itself is; ``shypectl dry-run --acm`` gives
ACM's view (PERMITTED), which is what the original asserts.
"""

from __future__ import annotations

from xmtest_helpers import AcmHost


def test_a_conflicting_domain_does_not_start(host: AcmHost) -> None:
    blue = host.domain_cfg("domain-blue", "blue")
    r = host.start_domain(blue)
    assert r.returncode == 0, r.stdout + r.stderr

    r = host.ctl("dry-run", str(blue))
    assert r.returncode == 0 and "PERMITTED" in r.stdout, r.stdout + r.stderr

    red = host.domain_cfg("domain-red", "red")
    r = host.start_domain(red)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "domain-red" not in host.running()

    r = host.ctl("dry-run", "--acm", str(red))  # ACM's view, as the original asserts
    assert r.returncode == 0 and "PERMITTED" in r.stdout, r.stdout + r.stderr
    r = host.ctl("dry-run", str(red))  # shyped's: the Chinese Wall too
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DENIED" in r.stdout and "conflict set 'RER'" in r.stdout

    host.destroy("domain-blue")
