"""Port of xm-test ``security-acm/08_security-acm_xapi.py`` (Xen 4.1.0): resource labels set,
read and removed; a halted VM's label changed and removed; a VM whose disk is unlabelled does
not start, and starts once the disk is labelled like it; a running VM is not relabelled to a
label its disk does not allow.

The original speaks Xen-API (``XSPolicy.set_resource_label``, ``VM.set_security_label``,
``VDI``/``VBD`` records); the port takes the operator's verbs: ``addlabel``/``getlabel``/
``rmlabel res`` for the resource, the domain config for a halted VM (``addlabel … dom CFG``),
``shype-xl create`` with the disk in the config, ``addlabel L mgt DOMAIN`` for the running one.

Out of scope:
- the Xen-API objects themselves (SR ``Local``, ``VDI.create``/``destroy``, ``VBD.create``,
  ``VDI.set_security_label``): shyped labels the disk by its path, which the VDI stood for;
- suspend and resume (``xm suspend``/``xm resume``) with relabels of the suspended VM and its
  disk in between: the sandbox has no save/restore;
- the guest console (``cat /proc/interrupts``).

Deliberate difference: a halted VM without a label reads ``(unlabelled)``; Xen-API showed
``ACM:xm-test:__UNLABELED__``.
"""

from __future__ import annotations

from xmtest_helpers import AcmHost

VDI = "phy:/dev/ram0"


def test_resource_and_vm_labels(host: AcmHost) -> None:
    host.ctl("rmlabel", "res", VDI)
    r = host.ctl("addlabel", "green", "res", VDI)
    assert r.returncode == 0, r.stderr
    assert host.reslabel(VDI) == "ACM:xm-test:green"

    cfg = host.domain_cfg("xapi-vm", "red", disk=f"{VDI},xvda1,w")
    r = host.ctl("getlabel", "dom", str(cfg))
    assert r.stdout.strip() == "policytype=ACM,policy=xm-test,label=red"
    assert host.ctl("addlabel", "green", "dom", str(cfg)).returncode == 0
    assert host.ctl("getlabel", "dom", str(cfg)).stdout.strip().endswith("label=green")
    assert host.ctl("rmlabel", "dom", str(cfg)).returncode == 0  # halted: may be unlabelled
    assert host.ctl("getlabel", "dom", str(cfg)).stdout.strip() == "(unlabelled)"
    assert host.ctl("addlabel", "red", "dom", str(cfg)).returncode == 0
    assert host.ctl("getlabel", "dom", str(cfg)).stdout.strip().endswith("label=red")

    assert host.ctl("rmlabel", "res", VDI).returncode == 0  # the disk unlabelled
    r = host.start_domain(cfg)
    assert r.returncode == 1, r.stdout + r.stderr  # a disk it is not allowed to access
    assert "xapi-vm" not in host.running()

    r = host.ctl("addlabel", "red", "res", VDI)
    assert r.returncode == 0, r.stderr
    assert host.reslabel(VDI) == "ACM:xm-test:red"
    r = host.start_domain(cfg)
    assert r.returncode == 0, r.stdout + r.stderr

    r = host.ctl("addlabel", "green", "mgt", "xapi-vm")  # its red disk forbids green
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[resource]" in r.stderr
    assert host.ctl("getlabel", "mgt", "xapi-vm").stdout.strip() == "ACM:xm-test:red"
    host.destroy("xapi-vm")
