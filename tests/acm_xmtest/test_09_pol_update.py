"""Port of xm-test ``security-acm/09_security-acm_pol_update.py`` (Xen 4.1.0): policy updates
generated on the fly against two running domains (red, green) — each refused or accepted as
the original expects.

The original builds each policy as XML and hands it to ``XSPolicy.set_xspolicy``; the port
builds its own XML (`policy_xml`, written for this port) and loads it with ``shypectl policy
load``; ``xserr`` is the exit status.

Out of scope: the hypervisor's binary error buffer (``policystate['errors']``, two packed
ints); shyped's answer lists every reason as text instead, which the port checks.
"""

from __future__ import annotations

import subprocess
from xml.etree import ElementTree as ET

import attrs
from xmtest_helpers import AcmHost

NS = "http://www.ibm.com"


@attrs.frozen
class Label:
    name: str
    stes: tuple[str, ...]
    chws: tuple[str, ...] = ()


@attrs.frozen
class Header:
    name: str
    version: str
    oldname: str
    oldversion: str

    def updated(self) -> Header:
        """The next version, updating this one (the original's ``update_hdr``)."""
        major, minor = self.version.split(".")
        return Header(self.name, f"{major}.{int(minor) + 1}", self.name, self.version)


def policy_xml(
    hdr: Header,
    stes: list[str],
    chws: list[str],
    vms: list[Label],
    res: list[Label],
    conflicts: dict[str, list[str]],
    vm_from: dict[str, str] | None = None,
) -> str:
    """An ACM policy document (not validated here: the daemon judges it)."""
    vm_from = vm_from or {}
    root = ET.Element(f"{{{NS}}}SecurityPolicyDefinition")

    def sub(parent: ET.Element, tag: str, text: str | None = None) -> ET.Element:
        e = ET.SubElement(parent, f"{{{NS}}}{tag}")
        e.text = text
        return e

    def types(parent: ET.Element, tag: str, names: list[str] | tuple[str, ...]) -> None:
        holder = sub(parent, tag)
        for t in names:
            sub(holder, "Type", t)

    h = sub(root, "PolicyHeader")
    sub(h, "PolicyName", hdr.name)
    sub(h, "Version", hdr.version)
    frm = sub(h, "FromPolicy")
    sub(frm, "PolicyName", hdr.oldname)
    sub(frm, "Version", hdr.oldversion)
    types(sub(root, "SimpleTypeEnforcement"), "SimpleTypeEnforcementTypes", stes)
    cw = sub(root, "ChineseWall")
    types(cw, "ChineseWallTypes", chws)
    sets = sub(cw, "ConflictSets")
    for name, members in conflicts.items():
        c = sub(sets, "Conflict")
        c.set("name", name)
        for t in members:
            sub(c, "Type", t)
    tpl = sub(root, "SecurityLabelTemplate")
    subjects = sub(tpl, "SubjectLabels")
    subjects.set("bootstrap", "SystemManagement")
    for v in vms:
        e = sub(subjects, "VirtualMachineLabel")
        n = sub(e, "Name", v.name)
        if v.name in vm_from:
            n.set("from", vm_from[v.name])
        types(e, "SimpleTypeEnforcementTypes", v.stes)
        types(e, "ChineseWallTypes", v.chws)
    objects = sub(tpl, "ObjectLabels")
    for r in res:
        e = sub(objects, "ResourceLabel")
        sub(e, "Name", r.name)
        types(e, "SimpleTypeEnforcementTypes", r.stes)
    ET.register_namespace("", NS)
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


ALL = ["SystemManagement", "red", "green", "blue"]
SYSMGT = Label("SystemManagement", tuple(ALL), ("SystemManagement",))
RED, GREEN, BLUE = (Label(c, (c,), (c,)) for c in ("red", "green", "blue"))
RESOURCES = [Label(c, (c,)) for c in ("red", "green", "blue")]


def test_generated_updates_against_two_running_domains(host: AcmHost) -> None:
    def load(xml: str) -> subprocess.CompletedProcess[str]:
        path = host.directory / "update.xml"
        path.write_text(xml)
        return host.ctl("policy", "load", str(path))

    hdr = Header("xm-test", "1.1", "xm-test", "1.0")  # the active policy is xm-test 1.0
    vms = [SYSMGT, RED, GREEN, BLUE]
    good = policy_xml(hdr, ALL, ALL, vms, RESOURCES, {"CFS1": ["red", "blue"]})
    r = load(good)
    assert r.returncode == 0, r.stdout + r.stderr

    for name in ("red", "green"):
        r = host.start_domain(host.domain_cfg(f"domain-{name}", name))
        assert r.returncode == 0, r.stdout + r.stderr

    # (1) a conflict set that puts the two running domains in conflict
    hdr = hdr.updated()
    r = load(policy_xml(hdr, ALL, ALL, vms, RESOURCES, {"CFS1": ["red", "green"]}))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[chinese-wall]" in r.stderr  # the reasons (ACM: a binary error buffer)

    # (2) STE type 'red' missing (labels still use it): the policy does not load
    stes = ["SystemManagement", "green", "blue"]
    r = load(policy_xml(hdr, stes, ALL, vms, RESOURCES, {"CFS1": ["red", "blue"]}))
    assert r.returncode == 2, r.stdout + r.stderr
    assert "policy-invalid" in r.stderr

    # (3) VM label 'red' missing: it is in use
    r = load(policy_xml(hdr, ALL, ALL, [SYSMGT, GREEN, BLUE], RESOURCES, {"CFS1": ["red", "blue"]}))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[label] domain 'domain-red'" in r.stderr

    # (4) VM label 'blue' missing: not in use, accepted
    r = load(policy_xml(hdr, ALL, ALL, [SYSMGT, RED, GREEN], RESOURCES, {"CFS1": ["red", "blue"]}))
    assert r.returncode == 0, r.stdout + r.stderr

    # (5) green renamed blue: the green domain becomes blue, in conflict with red
    hdr = hdr.updated()
    blue_from_green = policy_xml(
        hdr, ALL, ALL, [SYSMGT, RED, BLUE], RESOURCES, {"CFS1": ["red", "blue"]}, {"blue": "green"}
    )
    r = load(blue_from_green)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "[chinese-wall]" in r.stderr

    # (6) a VM label named 'blue:x' (':' is not allowed in names)
    bad = Label("blue:x", ("blue",), ("blue",))
    r = load(policy_xml(hdr, ALL, ALL, [SYSMGT, RED, GREEN, bad], RESOURCES, {}))
    assert r.returncode == 2, r.stdout + r.stderr

    # (END) the first policy again, as an update of the active one
    major, minor = hdr.version.split(".")
    end = Header("xm-test", hdr.version, "xm-test", f"{major}.{int(minor) - 1}")
    r = load(policy_xml(end, ALL, ALL, vms, RESOURCES, {"CFS1": ["red", "blue"]}))
    assert r.returncode == 0, r.stdout + r.stderr

    host.destroy("domain-red")
    host.destroy("domain-green")
