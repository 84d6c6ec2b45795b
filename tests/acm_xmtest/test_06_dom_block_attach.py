"""Port of xm-test ``security-acm/06_security-acm_dom_block_attach.py`` (Xen 4.1.0): a blue
domain; a disk labelled blue (``phy:ram1``) attaches and connects, one labelled red
(``phy:/dev/ram0``) does not, and the first stays.

Out of scope: the guest console (``cat /proc/partitions`` in the guest): the sandbox has no
guest kernel; the frontend's xenbus state (4, Connected) in xenstore stands for it, as the
original's ``block_utils.get_state`` loop does.

Deliberate differences: ``shype-xl block-attach`` refuses the red disk before xl runs (exit 1);
``xm block-attach`` ran and the hypervisor's check failed the device. The attached disk is
named ``phy:/dev/ram1`` (xl does not expand ``phy:ram1``, see test_04); it is labelled as
``phy:ram1``, as the original did.
"""

from __future__ import annotations

from process_helpers import wait_until
from xmtest_helpers import AcmHost

XVDA1, XVDA2 = 51713, 51714  # xl's devids for xvda1, xvda2 (202 << 8 | minor)


def test_only_the_disk_of_the_domains_label_attaches(host: AcmHost) -> None:
    r = host.start_domain(host.domain_cfg("domain-blue", "blue"))
    assert r.returncode == 0, r.stdout + r.stderr
    domid = host.domid("domain-blue")

    def state(devid: int) -> str | None:
        return host.read(f"/local/domain/{domid}/device/vbd/{devid}/state")

    assert host.ctl("addlabel", "blue", "res", "phy:ram1").returncode == 0
    r = host.shype_xl("block-attach", "domain-blue", "phy:/dev/ram1", "xvda1")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_until(lambda: state(XVDA1) == "4", what="xvda1 connected")

    assert host.ctl("addlabel", "red", "res", "phy:/dev/ram0").returncode == 0
    r = host.shype_xl("block-attach", "domain-blue", "phy:/dev/ram0", "xvda2", "w")
    assert r.returncode == 1, r.stdout + r.stderr
    assert state(XVDA2) is None  # never connected: the device does not exist
    assert state(XVDA1) == "4"  # the labelled one has not disappeared

    # Past the wrapper (plain xl): the daemon cuts the device when it appears.
    r = host.xl("block-attach", "domain-blue", "phy:/dev/ram0", "xvda2", "w")
    wait_until(lambda: "deny device vbd" in host.log(), what="denied")
    assert "res=disk:/dev/ram0 [ste]" in host.log()
    # The cut closes the device (it may have connected for a moment: README, honest limits).
    wait_until(lambda: state(XVDA2) != "4", what="xvda2 cut")
    assert state(XVDA1) == "4"
    host.destroy("domain-blue")
