"""Xen ACM policy XML (``security_policy.xsd``): import into the model and export from it.

Import is all or nothing and reports every problem with its line:

1. *Safety* before any XML parsing: the text must be UTF-8 and at most `MAX_POLICY_BYTES`, and
   its prolog must not hold a ``<!DOCTYPE``. A DOCTYPE is the only place entities can be
   declared, so refusing it up front means no entity is ever expanded (billion laughs) or
   fetched (``SYSTEM "file:///etc/passwd"``). lxml then parses with entity resolution, DTD
   loading and network access off and its size limits on, as a second line of defence.
2. *Schema*: the document is validated with lxml against the real ``security_policy.xsd``
   shipped in this package (the one from the Xen 3.x tools); all schema errors are reported.
3. *Meaning*: what the schema cannot say (a label naming an undeclared type, a duplicate label,
   the bootstrap label missing, a ``:`` in a name, a malformed version ...) is found by building
   the model (`shyped.policy.model.Policy` validates itself); each model problem is mapped back
   to the line of the element it came from.

What is kept: header name/version/``FromPolicy``, both type lists, conflict sets, VM and
resource labels with their ``from=`` renames, in document order; the informational header
fields (``PolicyUrl``, ``Reference``, ``Date``, ``NameSpaceUrl``) and the ``priority``
attributes go into `AcmHeader` so an import/export cycle loses nothing but comments.

Behaviour followed (Xen ``RELEASE-4.1.0``, ``tools/python/xen/util/acmpolicy.py``):
- ``policy_get_types`` skips empty ``<Type/>`` elements (ACM's own DEFAULT policy writes
  ``<ChineseWallTypes><Type/></ChineseWallTypes>`` for "no CW types"); so do we.
- ``__policy_get_label_translation_map`` treats an empty ``from=""`` like no attribute.
- Domains without a label got the label ``__UNLABELED__`` (``acm.py`` ``check_can_run``), and
  resources without one ``__UNLABELED__`` too: a policy declaring a VM (resource) label of that
  name therefore imports with it as the default for unlabelled domains (resources); otherwise
  unlabelled subjects are denied (ACM gave them no types, so they could use nothing anyway).
- ACM read only the first ``SimpleTypeEnforcementTypes``/``ChineseWallTypes`` element of a
  ``VirtualMachineLabel`` although the schema allows several; silently ignoring the others
  would surprise, so more than one is refused.

Text content is stripped of surrounding XML whitespace (names cannot contain whitespace).
Only UTF-8 (or its ASCII subset) is accepted.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Final, cast

import attrs
from lxml import etree

from shyped.policy.errors import PathPart, PolicyError, Problem
from shyped.policy.model import (
    ConflictSet,
    Defaults,
    Policy,
    PolicyRef,
    PolicyVersion,
    ResourceLabel,
    VmLabel,
)

#: The namespace of every element of an ACM policy.
ACM_NS: Final = "http://www.ibm.com"
#: Label ACM gave to unlabelled domains and resources (``acmpolicy.ACM_LABEL_UNLABELED``).
UNLABELED: Final = "__UNLABELED__"
#: Largest policy document accepted (the biggest real ACM policies are a few hundred KiB).
MAX_POLICY_BYTES: Final = 4 * 1024 * 1024
#: ``xsi:schemaLocation`` written on export, as the Xen tools wrote it.
SCHEMA_LOCATION: Final = f"{ACM_NS} ../../security_policy.xsd"

_XSI_NS: Final = "http://www.w3.org/2001/XMLSchema-instance"
_PRIMARY: Final = "PrimaryPolicyComponent"
_NS_TAG_RE: Final = re.compile(r"\{" + re.escape(ACM_NS) + r"\}")
# Prolog items that may precede a DOCTYPE: whitespace, the XML declaration / PIs, comments.
_PROLOG_ITEM_RE: Final = re.compile(r"[ \t\r\n]+|<\?.*?\?>|<!--.*?-->", re.S)
_XML_DECL_RE: Final = re.compile(r"<\?xml\s[^>]*?encoding\s*=\s*[\"']([^\"']*)[\"']")
_UTF8_NAMES: Final = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_XML_WS: Final = " \t\r\n"


class AcmXmlError(PolicyError):
    """An ACM XML document could not be imported; `problems` say where and why."""


class AcmExportError(PolicyError):
    """A policy holds something Xen ACM XML cannot express; `problems` say what."""


@attrs.frozen
class AcmHeader:
    """The informational parts of an ACM document that the model does not carry.

    `ste_primary` / `cw_primary`: whether ``SimpleTypeEnforcement`` / ``ChineseWall`` carried
    ``priority="PrimaryPolicyComponent"``. ACM's XML tools ignored the attribute (the binary
    policy made Chinese Wall primary whenever it had types), so it is kept only for fidelity;
    a section without types is not written, and neither is its flag.
    """

    url: str | None = None
    reference: str | None = None
    date: str | None = None
    namespace_url: str | None = None
    ste_primary: bool = False
    cw_primary: bool = False


@attrs.frozen
class AcmDocument:
    """An imported ACM policy: the model plus the header fields it does not hold."""

    policy: Policy
    header: AcmHeader = attrs.field(factory=AcmHeader)

    def dumps(self) -> bytes:
        """This document as ACM XML."""
        return dumps(self.policy, header=self.header)


# --------------------------------------------------------------------------- schema


@functools.cache
def schema() -> etree.XMLSchema:
    """The ``security_policy.xsd`` shipped with shyped, compiled once."""
    data = resources.files("shyped.policy").joinpath("security_policy.xsd").read_bytes()
    return etree.XMLSchema(etree.fromstring(data, _parser()))


def _parser() -> etree.XMLParser:
    """A fresh parser that never resolves entities, loads DTDs or touches the network."""
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_blank_text=False,
    )


# --------------------------------------------------------------------------- import


def _q(tag: str) -> str:
    return f"{{{ACM_NS}}}{tag}"


def _line(e: etree._Element) -> int | None:
    line = e.sourceline
    return line if isinstance(line, int) else None


def _text(e: etree._Element) -> str:
    return (e.text or "").strip(_XML_WS)


def _decode(data: bytes | str, file: str) -> tuple[bytes, str]:
    """The document as UTF-8 bytes and text; refuse oversize, non-UTF-8 and DOCTYPE."""
    if isinstance(data, str):
        text = data
        raw = data.encode("utf-8", errors="surrogatepass")
    else:
        raw = bytes(data)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise AcmXmlError.single(
                f"not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); shyped reads "
                "ACM policies in UTF-8 only",
                file=file,
                line=line,
            ) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise AcmXmlError.single(
            f"document is {len(raw)} bytes, more than the {MAX_POLICY_BYTES} accepted", file=file
        )
    text = text.removeprefix("\ufeff")
    pos = 0
    while (m := _PROLOG_ITEM_RE.match(text, pos)) is not None:
        decl = _XML_DECL_RE.match(m.group(0))
        if decl is not None and decl.group(1).lower() not in _UTF8_NAMES:
            raise AcmXmlError.single(
                f"declared encoding {decl.group(1)!r} is not supported; use UTF-8",
                file=file,
                line=text.count("\n", 0, m.start()) + 1,
            )
        pos = m.end()
    if text.startswith("<!DOCTYPE", pos):
        raise AcmXmlError.single(
            "DOCTYPE declarations are not allowed in a policy (they can define entities that "
            "expand without bound or read local files); remove it",
            file=file,
            line=text.count("\n", 0, pos) + 1,
        )
    return raw, text


def _parse_tree(raw: bytes, file: str) -> etree._Element:
    parser = _parser()
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as e:
        msg = e.msg or str(e)
        # lxml appends ", line N, column M" to the message; the location is given separately.
        msg = re.sub(r", line \d+, column \d+$", "", msg)
        col = e.position[1] if e.position else None
        raise AcmXmlError.single(
            f"not well-formed XML: {msg}", file=file, line=e.lineno, column=col
        ) from None
    tree = root.getroottree()
    info = tree.docinfo
    if getattr(info, "doctype", "") or info.internalDTD is not None:  # pragma: no cover
        # Unreachable after the prolog check; kept in case the two ever disagree.
        raise AcmXmlError.single("DOCTYPE declarations are not allowed", file=file, line=1)
    for ent in root.iter(etree.Entity):  # pragma: no cover - undeclared entities are fatal
        raise AcmXmlError.single(
            f"entity reference {ent.text} is not allowed", file=file, line=_line(ent)
        )
    return root


def _validate_schema(root: etree._Element, file: str) -> None:
    if root.tag != _q("SecurityPolicyDefinition"):
        local = etree.QName(root).localname
        hint = ""
        if local == "SecurityPolicyDefinition":
            hint = f' (missing xmlns="{ACM_NS}"?)'
        raise AcmXmlError.single(
            f"root element is <{local}>, expected <SecurityPolicyDefinition> in namespace "
            f"{ACM_NS!r}{hint}",
            file=file,
            line=_line(root),
        )
    xsd = schema()
    if xsd.validate(root):
        return
    problems = [
        Problem(
            "schema: " + _NS_TAG_RE.sub("", err.message),
            file=file,
            line=err.line or None,
        )
        for err in cast(Iterable[etree._LogEntry], xsd.error_log)
    ]
    raise AcmXmlError(problems or [Problem("schema: document is not valid", file=file)])


@attrs.define
class _Parts:
    """The model's constructor arguments as read from the document."""

    name: str
    version: PolicyVersion
    from_policy: PolicyRef | None = None
    bootstrap: str = ""
    ste_types: list[str] = attrs.Factory(list)
    cw_types: list[str] = attrs.Factory(list)
    conflict_sets: list[ConflictSet] = attrs.Factory(list)
    vm_labels: list[VmLabel] = attrs.Factory(list)
    resource_labels: list[ResourceLabel] = attrs.Factory(list)
    defaults: Defaults = attrs.Factory(Defaults)

    def build(self) -> Policy:
        """The validated policy (raises `PolicyError`)."""
        return Policy(
            name=self.name,
            version=self.version,
            bootstrap=self.bootstrap,
            ste_types=self.ste_types,
            cw_types=self.cw_types,
            conflict_sets=self.conflict_sets,
            vm_labels=self.vm_labels,
            resource_labels=self.resource_labels,
            defaults=self.defaults,
            from_policy=self.from_policy,
        )


class _Reader:
    """Walks a schema-valid document into model parts, recording lines by model path."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[tuple[PathPart, ...], int] = {}
        self.problems: list[Problem] = []

    def at(self, e: etree._Element, *path: PathPart) -> None:
        line = _line(e)
        if line is not None:
            self.lines.setdefault(tuple(path), line)

    def bad(self, e: etree._Element, message: str) -> None:
        self.problems.append(Problem(message, file=self.file, line=_line(e)))

    def version(self, e: etree._Element, *path: PathPart) -> PolicyVersion:
        self.at(e, *path)
        try:
            return PolicyVersion.parse(_text(e))
        except ValueError as err:
            self.bad(e, str(err))
            return PolicyVersion(0, 0)

    def types(self, holder: etree._Element | None, *path: PathPart) -> list[str]:
        """The non-empty ``Type`` texts under `holder`, lines recorded by value and index."""
        out: list[str] = []
        if holder is None:
            return out
        for t in holder.iterchildren(_q("Type")):
            name = _text(t)
            if not name:
                continue  # ACM skipped empty <Type/> (policy_get_types)
            self.at(t, *path, name)
            self.at(t, *path, len(out))
            out.append(name)
        return out

    def one(self, parent: etree._Element, tag: str, owner: str) -> etree._Element | None:
        found = list(parent.iterchildren(_q(tag)))
        for extra in found[1:]:
            self.bad(
                extra,
                f"{owner} has more than one <{tag}> element; Xen ACM read only the first, "
                "so merge them into one",
            )
        return found[0] if found else None

    def name(self, label: etree._Element, *path: PathPart) -> tuple[str, str | None]:
        n = label.find(_q("Name"))
        assert n is not None  # schema
        self.at(n, *path, "name")
        frm = (n.get("from") or "").strip(_XML_WS) or None
        if frm is not None:
            self.at(n, *path, "from_name")
        return _text(n), frm

    def read(self, root: etree._Element) -> tuple[_Parts, AcmHeader]:
        self.at(root)
        hdr = root.find(_q("PolicyHeader"))
        assert hdr is not None  # schema
        self.at(hdr, "from_policy")

        def opt(tag: str) -> str | None:
            e = hdr.find(_q(tag))
            return None if e is None else (e.text or "")

        name_e = hdr.find(_q("PolicyName"))
        ver_e = hdr.find(_q("Version"))
        assert name_e is not None and ver_e is not None  # schema
        self.at(name_e, "name")
        parts = _Parts(_text(name_e), self.version(ver_e, "version"))
        frm = hdr.find(_q("FromPolicy"))
        if frm is not None:
            fn, fv = frm.find(_q("PolicyName")), frm.find(_q("Version"))
            assert fn is not None and fv is not None  # schema
            self.at(fn, "from_policy", "name")
            parts.from_policy = PolicyRef(_text(fn), self.version(fv, "from_policy", "version"))

        ste = root.find(_q("SimpleTypeEnforcement"))
        cw = root.find(_q("ChineseWall"))
        parts.ste_types = self.types(
            None if ste is None else ste.find(_q("SimpleTypeEnforcementTypes")), "ste_types"
        )
        parts.cw_types = self.types(
            None if cw is None else cw.find(_q("ChineseWallTypes")), "cw_types"
        )
        sets: list[ConflictSet] = []
        csets = None if cw is None else cw.find(_q("ConflictSets"))
        if csets is not None:
            for c in csets.iterchildren(_q("Conflict")):
                i = len(sets)
                self.at(c, "conflict_sets", i)
                self.at(c, "conflict_sets", i, "name")
                types = self.types(c, "conflict_sets", i, "types")
                sets.append(ConflictSet((c.get("name") or "").strip(_XML_WS), types))
        parts.conflict_sets = sets

        tmpl = root.find(_q("SecurityLabelTemplate"))
        assert tmpl is not None  # schema
        subj = tmpl.find(_q("SubjectLabels"))
        vms: list[VmLabel] = []
        if subj is None:
            self.bad(
                tmpl,
                "no <SubjectLabels>: a policy must declare VM labels, among them the "
                "bootstrap label dom0 runs with",
            )
            parts.bootstrap = ""
        else:
            self.at(subj, "bootstrap")
            parts.bootstrap = (subj.get("bootstrap") or "").strip(_XML_WS)
            for v in subj.iterchildren(_q("VirtualMachineLabel")):
                i = len(vms)
                self.at(v, "vm_labels", i)
                name, frm_name = self.name(v, "vm_labels", i)
                owner = f"VM label {name!r}"
                stes = self.one(v, "SimpleTypeEnforcementTypes", owner)
                cws = self.one(v, "ChineseWallTypes", owner)
                vms.append(
                    VmLabel(
                        name,
                        self.types(stes, "vm_labels", i, "ste_types"),
                        self.types(cws, "vm_labels", i, "cw_types"),
                        from_name=frm_name,
                    )
                )
        parts.vm_labels = vms

        objs = tmpl.find(_q("ObjectLabels"))
        res: list[ResourceLabel] = []
        if objs is not None:
            for r in objs.iterchildren(_q("ResourceLabel")):
                i = len(res)
                self.at(r, "resource_labels", i)
                name, frm_name = self.name(r, "resource_labels", i)
                st = r.find(_q("SimpleTypeEnforcementTypes"))
                assert st is not None  # schema
                t = st.find(_q("Type"))
                assert t is not None  # schema
                self.at(t, "resource_labels", i, "ste_type")
                if not _text(t):
                    self.bad(t, f"resource label {name!r} has an empty STE type")
                res.append(ResourceLabel(name, _text(t), from_name=frm_name))
        parts.resource_labels = res
        parts.defaults = Defaults(
            unlabelled_domain=UNLABELED if any(v.name == UNLABELED for v in vms) else None,
            unlabelled_resource=UNLABELED if any(r.name == UNLABELED for r in res) else None,
        )
        header = AcmHeader(
            url=opt("PolicyUrl"),
            reference=opt("Reference"),
            date=opt("Date"),
            namespace_url=opt("NameSpaceUrl"),
            ste_primary=ste is not None and ste.get("priority") == _PRIMARY,
            cw_primary=cw is not None and cw.get("priority") == _PRIMARY,
        )
        return parts, header

    def locate(self, p: Problem) -> Problem:
        """`p` with the line of the longest recorded prefix of its model path."""
        path = p.path
        while path:
            line = self.lines.get(path)
            if line is not None:
                return p.located(self.file, line)
            path = path[:-1]
        return p.located(self.file, self.lines.get(()))


def _sorted(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.line is None, p.line or 0))


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
    raw, _text_unused = _decode(data, file)
    root = _parse_tree(raw, file)
    _validate_schema(root, file)
    reader = _Reader(file)
    parts, header = reader.read(root)
    problems = _sorted(reader.problems)
    try:
        policy = parts.build()
    except PolicyError as e:
        seen = {p.line for p in problems}
        problems += _sorted(q for q in map(reader.locate, e.problems) if q.line not in seen)
    doc = None if problems else AcmDocument(policy, header)
    return Checked(
        doc,
        tuple(problems),
        lambda path: reader.locate(Problem("", path)).line,
        attrs.asdict(parts, recurse=False),
    )


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
