"""Xen ACM policy XML (``security_policy.xsd``): import into the model and export from it.

Import (`parse`, `loads`, `load`, `check_document`) is all or nothing and reports every problem
with its line: safety checks before any XML parsing (UTF-8, a size bound, no DOCTYPE: no entity
is ever expanded or fetched), validation against the real ``security_policy.xsd``, then the
model's own checks mapped back to lines; the reader and what it follows of Xen ACM's tools are
in `shyped.policy.acm_xml_reader`, the shared vocabulary (namespace, limits, errors, header,
schema) in `shyped.policy.acm_xml_base`.

Export (`dumps`) writes a schema-valid document and refuses, listing everything, what ACM XML
cannot express (`export_problems`: MLS, quotas, defaults other than ``__UNLABELED__``). An
import/export cycle loses nothing but comments: the header fields the model does not hold
travel in `AcmHeader`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import attrs
from lxml import etree

from shyped.policy.acm_xml_base import (
    _PRIMARY,
    _XSI_NS,
    ACM_NS,
    MAX_POLICY_BYTES,
    SCHEMA_LOCATION,
    UNLABELED,
    AcmExportError,
    AcmHeader,
    AcmXmlError,
    _parser,
    _q,
    schema,
)
from shyped.policy.acm_xml_reader import read_document
from shyped.policy.errors import PathPart, Problem
from shyped.policy.model import Policy

__all__ = [
    "ACM_NS",
    "MAX_POLICY_BYTES",
    "SCHEMA_LOCATION",
    "UNLABELED",
    "AcmDocument",
    "AcmExportError",
    "AcmHeader",
    "AcmXmlError",
    "Checked",
    "_parser",
    "check_document",
    "dumps",
    "export_problems",
    "load",
    "loads",
    "parse",
    "schema",
]


@attrs.frozen
class AcmDocument:
    """An imported ACM policy: the model plus the header fields it does not hold."""

    policy: Policy
    header: AcmHeader = attrs.field(factory=AcmHeader)

    def dumps(self) -> bytes:
        """This document as ACM XML."""
        return dumps(self.policy, header=self.header)


# --------------------------------------------------------------------------- import


@attrs.frozen
class Checked:
    """`check_document`'s answer: the document (None on problems), every problem at its
    line, the line of a model path, and the `Policy` arguments as read (lint analyses them)."""

    document: AcmDocument | None
    problems: tuple[Problem, ...]
    line_of: Callable[[tuple[PathPart, ...]], int | None]
    parts: Mapping[str, object]


def check_document(data: bytes | str, *, file: str = "<string>") -> Checked:
    """Import with every problem collected: not well-formed (the first error: libxml2 stops)
    or schema-invalid (every error) raise `AcmXmlError`; past the schema, the reader's and
    the model's problems are returned together."""
    read = read_document(data, file)
    doc = None if read.policy is None else AcmDocument(read.policy, read.header)
    return Checked(doc, read.problems, read.line_of, read.parts)


def parse(data: bytes | str, *, file: str = "<string>") -> AcmDocument:
    """Import an ACM policy document; raise `AcmXmlError` listing every problem with its line."""
    checked = check_document(data, file=file)
    if checked.document is None:
        raise AcmXmlError(checked.problems)
    return checked.document


def loads(data: bytes | str, *, file: str = "<string>") -> Policy:
    """Import an ACM policy document and return just the policy (see `parse`)."""
    return parse(data, file=file).policy


def load(path: str | Path) -> AcmDocument:
    """Read and import an ACM policy file (reads at most `MAX_POLICY_BYTES` + 1 bytes)."""
    p = Path(path)
    with p.open("rb") as f:
        data = f.read(MAX_POLICY_BYTES + 1)
    return parse(data, file=str(p))


# --------------------------------------------------------------------------- export


def export_problems(policy: Policy) -> list[Problem]:
    """What in `policy` Xen ACM XML cannot express (empty: `dumps` will succeed)."""
    out: list[Problem] = []
    if policy.mls_levels or policy.mls_categories:
        out.append(Problem("ACM XML has no MLS levels or categories", ("mls_levels",)))
    for i, v in enumerate(policy.vm_labels):
        if v.mls is not None:
            out.append(
                Problem(f"VM label {v.name!r} has an MLS label ({v.mls})", ("vm_labels", i, "mls"))
            )
        if not v.quota.is_unlimited:
            out.append(
                Problem(
                    f"VM label {v.name!r} has a quota; ACM XML has no quotas",
                    ("vm_labels", i, "quota"),
                )
            )
        if v.dynamic:  # security_policy.xsd has no attribute or element for it
            out.append(
                Problem(
                    f"VM label {v.name!r} is dynamic (an instance per domain); ACM XML has "
                    "no dynamic labels",
                    ("vm_labels", i, "dynamic"),
                )
            )
    for i, r in enumerate(policy.resource_labels):
        if r.mls is not None:
            out.append(
                Problem(
                    f"resource label {r.name!r} has an MLS label ({r.mls})",
                    ("resource_labels", i, "mls"),
                )
            )
        if r.per_instance:
            out.append(
                Problem(
                    f"resource label {r.name!r} is per instance; ACM XML has no dynamic labels",
                    ("resource_labels", i, "per_instance"),
                )
            )
    # Defaults travel as the __UNLABELED__ label (see the module docstring).
    want_dom = UNLABELED if policy.vm_label(UNLABELED) is not None else None
    want_res = UNLABELED if policy.resource_label(UNLABELED) is not None else None
    d = policy.defaults
    for got, want, kind, field in (
        (d.unlabelled_domain, want_dom, "domains", "unlabelled_domain"),
        (d.unlabelled_resource, want_res, "resources", "unlabelled_resource"),
    ):
        if got != want:
            shown = "deny" if got is None else repr(got)
            out.append(
                Problem(
                    f"the default for unlabelled {kind} is {shown}; ACM XML can only express "
                    f"'{UNLABELED}' when a label of that name exists, and deny otherwise",
                    ("defaults", field),
                )
            )
    return out


def _ordered(items: frozenset[str], order: Mapping[str, int]) -> list[str]:
    return sorted(items, key=lambda t: (order.get(t, len(order)), t))


def dumps(policy: Policy, *, header: AcmHeader | None = None) -> bytes:
    """`policy` as a schema-valid ACM XML document (UTF-8 bytes).

    Raises `AcmExportError` listing everything ACM XML cannot express (MLS, quotas, defaults
    other than ``__UNLABELED__``): nothing is dropped silently.
    """
    problems = export_problems(policy)
    if problems:
        raise AcmExportError(problems)
    hdr = header or AcmHeader()
    nsmap = {None: ACM_NS, "xsi": _XSI_NS}
    root = etree.Element(_q("SecurityPolicyDefinition"), nsmap=nsmap)  # type: ignore[arg-type]
    root.set(f"{{{_XSI_NS}}}schemaLocation", SCHEMA_LOCATION)

    def sub(parent: etree._Element, tag: str, text: str | None = None) -> etree._Element:
        e = etree.SubElement(parent, _q(tag))
        if text is not None:
            e.text = text
        return e

    def type_list(parent: etree._Element, tag: str, names: Iterable[str]) -> None:
        holder = sub(parent, tag)
        for n in names:
            sub(holder, "Type", n)

    h = sub(root, "PolicyHeader")
    sub(h, "PolicyName", policy.name)
    for tag, value in (
        ("PolicyUrl", hdr.url),
        ("Reference", hdr.reference),
        ("Date", hdr.date),
        ("NameSpaceUrl", hdr.namespace_url),
    ):
        if value is not None:
            sub(h, tag, value)
    sub(h, "Version", str(policy.version))
    if policy.from_policy is not None:
        f = sub(h, "FromPolicy")
        sub(f, "PolicyName", policy.from_policy.name)
        sub(f, "Version", str(policy.from_policy.version))

    ste_order = {t: i for i, t in enumerate(policy.ste_types)}
    cw_order = {t: i for i, t in enumerate(policy.cw_types)}
    if policy.ste_types:
        ste = sub(root, "SimpleTypeEnforcement")
        if hdr.ste_primary:
            ste.set("priority", _PRIMARY)
        type_list(ste, "SimpleTypeEnforcementTypes", policy.ste_types)
    if policy.cw_types:
        cw = sub(root, "ChineseWall")
        if hdr.cw_primary:
            cw.set("priority", _PRIMARY)
        type_list(cw, "ChineseWallTypes", policy.cw_types)
        if policy.conflict_sets:
            sets = sub(cw, "ConflictSets")
            for cs in policy.conflict_sets:
                c = sub(sets, "Conflict")
                c.set("name", cs.name)
                for t in _ordered(cs.types, cw_order):
                    sub(c, "Type", t)

    tmpl = sub(root, "SecurityLabelTemplate")
    subj = sub(tmpl, "SubjectLabels")
    subj.set("bootstrap", policy.bootstrap)
    for v in policy.vm_labels:
        vl = sub(subj, "VirtualMachineLabel")
        n = sub(vl, "Name", v.name)
        if v.from_name is not None:
            n.set("from", v.from_name)
        if v.ste_types:
            type_list(vl, "SimpleTypeEnforcementTypes", _ordered(v.ste_types, ste_order))
        if v.cw_types:
            type_list(vl, "ChineseWallTypes", _ordered(v.cw_types, cw_order))
    if policy.resource_labels:
        objs = sub(tmpl, "ObjectLabels")
        for r in policy.resource_labels:
            rl = sub(objs, "ResourceLabel")
            n = sub(rl, "Name", r.name)
            if r.from_name is not None:
                n.set("from", r.from_name)
            type_list(rl, "SimpleTypeEnforcementTypes", [r.ste_type])

    # Self-check: what we write must be what we accept.
    if not schema().validate(root):  # pragma: no cover - a bug in this function
        raise AssertionError(f"exported ACM XML is not schema-valid: {schema().error_log}")
    out: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8", pretty_print=True)
    return out
