"""Port of xm-test ``security-acm/01_security-acm_basic.py`` (Xen 4.1.0): the label verbs on a
domain config and a resource — ``labels``, ``addlabel``/``getlabel``/``rmlabel`` ``dom`` and
``res``, ``resources``.

Out of scope: none (everything the original asserts is ported).

Deliberate differences (docs/acm-xml.md, "Coming from xm"):
- ``shypectl labels`` lists the active policy's labels; it takes no policy name (xm read
  any policy file under /etc/xen/acm-security).
- An unlabelled config or resource is reported as ``(unlabelled)`` with exit status 0
  (xm: ``Error: 'Domain not labeled'`` / ``'Resource not labeled'``, exit status 255).
- ``rmlabel`` prints what it did (xm printed nothing).
- ``resources`` names a disk by shyped's resource id ``disk:/dev/ram0`` (xm: ``phy:/dev/ram0``).
"""

from __future__ import annotations

from xmtest_helpers import TESTPOLICY, AcmHost

TESTLABEL = "blue"
TESTRESOURCE = "phy:ram0"


def test_labels_and_the_label_verbs(host: AcmHost) -> None:
    r = host.ctl("labels")
    assert r.returncode == 0, r.stderr

    cfg = host.domain_cfg("xm-test", label=None)
    host.ctl("rmlabel", "dom", str(cfg))  # whatever label it might have
    r = host.ctl("addlabel", TESTLABEL, "dom", str(cfg), TESTPOLICY)
    assert r.returncode == 0, r.stderr
    r = host.ctl("getlabel", "dom", str(cfg))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"policytype=ACM,policy={TESTPOLICY},label={TESTLABEL}"

    r = host.ctl("rmlabel", "dom", str(cfg))
    assert r.returncode == 0, r.stderr
    r = host.ctl("getlabel", "dom", str(cfg))
    assert (r.returncode, r.stdout.strip()) == (0, "(unlabelled)")  # xm: 'Domain not labeled'

    r = host.ctl("rmlabel", "res", TESTRESOURCE)  # whatever label it might have
    assert r.returncode == 0, r.stderr
    r = host.ctl("addlabel", TESTLABEL, "res", TESTRESOURCE, TESTPOLICY)
    assert r.returncode == 0, r.stderr
    assert host.reslabel(TESTRESOURCE) == f"ACM:{TESTPOLICY}:{TESTLABEL}"

    r = host.ctl("resources")
    assert r.returncode == 0, r.stderr
    assert "/dev/ram0" in r.stdout  # unify_resname: phy:ram0 is /dev/ram0

    r = host.ctl("rmlabel", "res", TESTRESOURCE)
    assert r.returncode == 0, r.stderr
    assert host.reslabel(TESTRESOURCE) == "(unlabelled)"  # xm: 'Resource not labeled'
