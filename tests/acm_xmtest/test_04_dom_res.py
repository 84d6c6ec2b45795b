"""Port of xm-test ``security-acm/04_security-acm_dom_res.py`` (Xen 4.1.0): two labelled
domains, each with a disk labelled like it (``phy:ram0`` green, ``phy:/dev/ram1`` red),
start; ``dry-run`` permits each disk.

Out of scope: none.

Deliberate difference: ``shypectl dry-run`` names a disk ``disk <vdev> (<target>)``
(xm: ``phy:ram0: PERMITTED``); the target is the path after xl's ``phy:`` prefix, and
``phy:ram0`` is ``/dev/ram0`` as xm's ``unify_resname`` and Xen's ``block`` script read it.
"""

from __future__ import annotations

from xmtest_helpers import AcmHost


def test_labelled_domains_with_labelled_disks_start(host: AcmHost) -> None:
    for name, label, resource in (
        ("domain-green", "green", "phy:ram0"),
        ("domain-red", "red", "phy:/dev/ram1"),
    ):
        cfg = host.domain_cfg(name, label, disk=f"{resource},hda1,w")
        r = host.ctl("addlabel", label, "res", resource)  # ACMLabelResource
        assert r.returncode == 0, r.stderr
        r = host.start_domain(cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        r = host.ctl("dry-run", str(cfg))
        assert r.returncode == 0, r.stdout + r.stderr
        target = resource.removeprefix("phy:")
        (line,) = [x for x in r.stdout.splitlines() if x.startswith(f"disk hda1 ({target})")]
        assert "PERMITTED" in line
    host.destroy("domain-red")
    host.destroy("domain-green")
