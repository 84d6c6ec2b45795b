"""Port of xm-test ``security-acm/04_security-acm_dom_res.py`` (Xen 4.1.0): two labelled
domains, each with a disk labelled like it (``phy:ram0`` green, ``phy:/dev/ram1`` red),
start; ``dry-run`` permits each disk.

Out of scope: none.

Deliberate differences:
- ``shypectl dry-run`` names a disk ``disk <vdev> (<target>)`` (xm: ``phy:ram0: PERMITTED``).
- In a domain config the disk is ``phy:/dev/ram0``: xm expanded ``phy:ram0`` to
  ``/dev/ram0`` (``unify_resname``), xl 4.17 does not (libxl stats ``ram0`` relative to its
  working directory, Xen's ``block`` script relative to its own), so shyped refuses a
  relative disk target rather than guess which file a backend opens. As a resource argument
  (``addlabel … res phy:ram0``), ``phy:ram0`` is ``/dev/ram0`` as with xm.
"""

from __future__ import annotations

from xmtest_helpers import AcmHost


def test_labelled_domains_with_labelled_disks_start(host: AcmHost) -> None:
    for name, label, resource, disk in (
        ("domain-green", "green", "phy:ram0", "phy:/dev/ram0"),
        ("domain-red", "red", "phy:/dev/ram1", "phy:/dev/ram1"),
    ):
        cfg = host.domain_cfg(name, label, disk=f"{disk},hda1,w")
        r = host.ctl("addlabel", label, "res", resource)  # ACMLabelResource
        assert r.returncode == 0, r.stderr
        r = host.start_domain(cfg)
        assert r.returncode == 0, r.stdout + r.stderr
        r = host.ctl("dry-run", str(cfg))
        assert r.returncode == 0, r.stdout + r.stderr
        target = disk.removeprefix("phy:")
        (line,) = [x for x in r.stdout.splitlines() if x.startswith(f"disk hda1 ({target})")]
        assert "PERMITTED" in line
    host.destroy("domain-red")
    host.destroy("domain-green")

    # xm's short disk name in a config: refused with the reason (not guessed).
    r = host.ctl("dry-run", str(host.domain_cfg("domain-short", "green", disk="phy:ram0,hda1,w")))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "invalid resource 'ram0'" in r.stdout
