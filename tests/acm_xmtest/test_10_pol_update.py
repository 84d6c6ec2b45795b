"""Port of xm-test ``security-acm/10_security-acm_pol_update.py`` (Xen 4.1.0): dom0 relabelled
under the Chinese Wall, resource labels through a policy update (renamed, invalidated),
``resetpolicy``.

Out of scope: none. The original's ``xm list Domain-0 --label`` is ``shypectl list`` (the last
column is the label, as with xm); its ``xm resources | grep`` loop that removes every
resource label is ``shypectl resources`` then ``rmlabel res`` per line.

Deliberate difference: resources are named by shyped's ids (``disk:/tmp/green``) in
``resources``; ``getlabel res file:/tmp/green`` answers as xm did.
"""

from __future__ import annotations

from xmtest_helpers import AcmHost

RES = {c: f"file:/tmp/{c}" for c in ("green", "red", "blue")}


def test_dom0_labels_resource_labels_through_updates_and_reset(host: AcmHost) -> None:
    r = host.ctl("resetpolicy")  # must work
    assert r.returncode == 0, r.stdout + r.stderr
    for line in host.ctl("resources").stdout.splitlines():
        host.ctl("rmlabel", "res", line.split()[0])
    assert host.ctl("resources").stdout.strip() == ""

    # XmTestDomain loads xm-test (ACMSetPolicy): from DEFAULT, no version check.
    r = host.setpolicy("xm-test")
    assert r.returncode == 0, r.stdout + r.stderr

    unlabelled = host.domain_cfg("domain-unlabeled", None)
    r = host.start_domain(unlabelled)  # xm-test has no __UNLABELED__ label
    assert r.returncode == 1, r.stdout + r.stderr

    blue = host.domain_cfg("domain-blue", "blue")
    green = host.domain_cfg("domain-green", "green")
    assert host.start_domain(blue).returncode == 0

    assert host.dom0_label() == ["ACM", "xm-test", "SystemManagement"]
    r = host.ctl("addlabel", "blue", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert host.dom0_label() == ["ACM", "xm-test", "blue"]
    r = host.ctl("addlabel", "red", "mgt", "Domain-0")  # blue runs: conflict set RER
    assert r.returncode != 0
    assert "[chinese-wall]" in r.stderr
    assert host.dom0_label() == ["ACM", "xm-test", "blue"]
    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert host.dom0_label() == ["ACM", "xm-test", "SystemManagement"]

    for color in ("green", "red", "blue"):
        r = host.ctl("addlabel", color, "res", RES[color])
        assert r.returncode == 0, r.stderr

    assert host.start_domain(green).returncode == 0

    r = host.setpolicy("xm-test-update")  # refused: blue runs and the update drops blue
    assert r.returncode != 0
    assert host.policy_name() == "xm-test"
    for color in ("green", "red", "blue"):
        assert host.reslabel(RES[color]) == f"ACM:xm-test:{color}"

    host.destroy("domain-blue")
    r = host.setpolicy("xm-test-update")
    assert r.returncode == 0, r.stdout + r.stderr
    assert host.policy_name() == "xm-test-update"
    assert host.reslabel(RES["green"]) == "ACM:xm-test-update:GREEN"
    assert host.reslabel(RES["red"]) == "ACM:xm-test-update:RED"
    assert host.reslabel(RES["blue"]) == "INV_ACM:xm-test:blue"

    red = host.domain_cfg("domain-red", "red", policy="xm-test-update")
    r = host.start_domain(red)  # GREEN runs (the green domain, renamed): conflict
    assert r.returncode == 1, r.stdout + r.stderr
    host.destroy("domain-green")
    r = host.start_domain(red)
    assert r.returncode == 0, r.stdout + r.stderr
    host.destroy("domain-red")

    r = host.ctl("addlabel", "GREEN", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert host.dom0_label() == ["ACM", "xm-test-update", "GREEN"]
    r = host.start_domain(red)  # dom0 counts in the Chinese Wall: GREEN blocks red
    assert r.returncode == 1, r.stdout + r.stderr

    r = host.ctl("addlabel", "SystemManagement", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    r = host.start_domain(unlabelled)  # xm-test-update has __UNLABELED__
    assert r.returncode == 0, r.stdout + r.stderr
    host.destroy("domain-unlabeled")

    # dom0 red: must not matter to the reset (DEFAULT's SystemManagement takes it over).
    r = host.ctl("addlabel", "red", "mgt", "Domain-0")
    assert r.returncode == 0, r.stderr
    assert host.dom0_label() == ["ACM", "xm-test-update", "red"]

    r = host.ctl("resetpolicy")
    assert r.returncode == 0, r.stdout + r.stderr
    assert host.policy_name() == "DEFAULT"
    assert host.dom0_label() == ["ACM", "DEFAULT", "SystemManagement"]
    assert host.reslabel(RES["green"]) == "INV_ACM:xm-test-update:GREEN"
    assert host.reslabel(RES["red"]) == "INV_ACM:xm-test-update:RED"
    assert host.reslabel(RES["blue"]) == "INV_ACM:xm-test:blue"
