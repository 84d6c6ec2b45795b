"""Xen ACM XML import/export: the real examples, round trips, precise errors, hostile input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from acm_helpers import policies
from hypothesis import given, settings
from lxml import etree

from shyped.policy import acm_xml
from shyped.policy.acm_xml import UNLABELED, AcmExportError, AcmHeader, AcmXmlError
from shyped.policy.model import (
    Defaults,
    MlsLabel,
    Policy,
    PolicyRef,
    PolicyVersion,
    Quota,
    ResourceLabel,
    VmLabel,
)

ACM_DIR = Path(__file__).parent / "acm"
CLIENT = ACM_DIR / "client_v1-security_policy.xml"
TEST = ACM_DIR / "test-security_policy.xml"

# A small valid policy; tests break one thing in it at a time. Line numbers matter below.
GOOD = """\
<?xml version="1.0" encoding="UTF-8"?>
<SecurityPolicyDefinition xmlns="http://www.ibm.com">
  <PolicyHeader>
    <PolicyName>small</PolicyName>
    <Version>2.1</Version>
    <FromPolicy>
      <PolicyName>small-old</PolicyName>
      <Version>2.0</Version>
    </FromPolicy>
  </PolicyHeader>
  <SimpleTypeEnforcement>
    <SimpleTypeEnforcementTypes>
      <Type>mgmt</Type>
      <Type>red</Type>
      <Type>blue</Type>
    </SimpleTypeEnforcementTypes>
  </SimpleTypeEnforcement>
  <ChineseWall>
    <ChineseWallTypes>
      <Type>cw_mgmt</Type>
      <Type>cw_red</Type>
      <Type>cw_blue</Type>
    </ChineseWallTypes>
    <ConflictSets>
      <Conflict name="colours">
        <Type>cw_red</Type>
        <Type>cw_blue</Type>
      </Conflict>
    </ConflictSets>
  </ChineseWall>
  <SecurityLabelTemplate>
    <SubjectLabels bootstrap="dom0">
      <VirtualMachineLabel>
        <Name>dom0</Name>
        <SimpleTypeEnforcementTypes>
          <Type>mgmt</Type>
          <Type>red</Type>
          <Type>blue</Type>
        </SimpleTypeEnforcementTypes>
        <ChineseWallTypes>
          <Type>cw_mgmt</Type>
        </ChineseWallTypes>
      </VirtualMachineLabel>
      <VirtualMachineLabel>
        <Name from="crimson">red</Name>
        <SimpleTypeEnforcementTypes>
          <Type>red</Type>
        </SimpleTypeEnforcementTypes>
        <ChineseWallTypes>
          <Type>cw_red</Type>
        </ChineseWallTypes>
      </VirtualMachineLabel>
      <VirtualMachineLabel>
        <Name>blue</Name>
        <SimpleTypeEnforcementTypes>
          <Type>blue</Type>
        </SimpleTypeEnforcementTypes>
        <ChineseWallTypes>
          <Type>cw_blue</Type>
        </ChineseWallTypes>
      </VirtualMachineLabel>
    </SubjectLabels>
    <ObjectLabels>
      <ResourceLabel>
        <Name from="old-disk">red-disk</Name>
        <SimpleTypeEnforcementTypes>
          <Type>red</Type>
        </SimpleTypeEnforcementTypes>
      </ResourceLabel>
    </ObjectLabels>
  </SecurityLabelTemplate>
</SecurityPolicyDefinition>
"""


def line_of(text: str, needle: str, nth: int = 1) -> int:
    """1-based line of the `nth` occurrence of `needle` in `text`."""
    pos = -1
    for _ in range(nth):
        pos = text.index(needle, pos + 1)
    return text.count("\n", 0, pos) + 1


def broken(old: str, new: str, text: str = GOOD, count: int = 1) -> str:
    assert old in text, old
    return text.replace(old, new, count)


def refused(text: str | bytes) -> AcmXmlError:
    with pytest.raises(AcmXmlError) as info:
        acm_xml.parse(text, file="p.xml")
    return info.value


# --------------------------------------------------------------------------- the examples


def test_client_v1_example_imports_with_all_labels_and_types() -> None:
    doc = acm_xml.load(CLIENT)
    p = doc.policy
    assert (p.name, str(p.version), p.bootstrap) == ("example.client_v1", "1.0", "SystemManagement")
    assert len(p.ste_types) == 6 and len(p.cw_types) == 4
    assert [cs.name for cs in p.conflict_sets] == ["Protection1"]
    assert p.conflict_sets[0].types == {"cw_Sensitive", "cw_Distrusted"}
    assert [v.name for v in p.vm_labels] == [
        "dom_HomeBanking",
        "dom_Fun",
        "dom_BoincClient",
        "SystemManagement",
        "dom_StorageDomain",
        "dom_NetworkDomain",
    ]
    banking = p.vm_label("dom_HomeBanking")
    assert banking is not None
    assert banking.ste_types == {"ste_PersonalFinances"} and banking.cw_types == {"cw_Sensitive"}
    assert p.bootstrap_label.ste_types == set(p.ste_types)
    disk = p.resource_label("res_HardDrive(hda)")
    assert disk is not None and disk.ste_type == "ste_PersistentStorageA"
    assert len(p.resource_labels) == 7
    assert p.from_policy is None and p.defaults == Defaults()
    assert doc.header == AcmHeader(
        url="www.ibm.com/example/client_v1", date="2006-03-31", cw_primary=True
    )


def test_ezpolicy_example_imports_with_same_names_for_vm_and_resource_labels() -> None:
    p = acm_xml.load(TEST).policy
    assert (p.name, p.bootstrap) == ("example.test", "SystemManagement")
    assert p.conflict_sets == ()
    vio = p.vm_label("VIO")
    assert vio is not None and vio.ste_types == {"CocaCola", "PepsiCo"}
    assert vio.cw_types == {"VIOServer"}
    # VM and resource labels are separate namespaces.
    res = p.resource_label("PepsiCo")
    assert res is not None and res.ste_type == "PepsiCo"
    assert p.vm_label("PepsiCo") is not None


@pytest.mark.parametrize("path", [CLIENT, TEST], ids=lambda p: p.name)
def test_examples_round_trip_through_export(path: Path) -> None:
    doc = acm_xml.load(path)
    out = doc.dumps()
    again = acm_xml.parse(out)
    assert again == doc
    assert again.dumps() == out  # export is deterministic


def test_from_policy_and_from_renames_are_kept() -> None:
    doc = acm_xml.parse(GOOD)
    p = doc.policy
    assert p.from_policy == PolicyRef("small-old", PolicyVersion(2, 0))
    red = p.vm_label("red")
    assert red is not None and red.from_name == "crimson"
    blue = p.vm_label("blue")
    assert blue is not None and blue.from_name is None
    disk = p.resource_label("red-disk")
    assert disk is not None and disk.from_name == "old-disk"
    again = acm_xml.parse(doc.dumps())
    assert again.policy == p
    assert b'<Name from="crimson">red</Name>' in doc.dumps()


@settings(max_examples=150, deadline=None)
@given(policies(acm=True))
def test_any_expressible_policy_round_trips(policy: Policy) -> None:
    header = AcmHeader(url="u", date="today", cw_primary=True, ste_primary=True)
    out = acm_xml.dumps(policy, header=header)
    doc = acm_xml.parse(out)
    assert doc.policy == policy
    # A priority attribute lives on its section, which is written only if it has types.
    assert doc.header == AcmHeader(
        url="u", date="today", cw_primary=bool(policy.cw_types), ste_primary=bool(policy.ste_types)
    )


def test_unlabeled_label_becomes_the_default_and_back() -> None:
    text = broken(
        '<SubjectLabels bootstrap="dom0">',
        f'<SubjectLabels bootstrap="dom0">\n<VirtualMachineLabel><Name>{UNLABELED}</Name>'
        "</VirtualMachineLabel>",
    )
    p = acm_xml.loads(text)
    assert p.defaults == Defaults(unlabelled_domain=UNLABELED, unlabelled_resource=None)
    assert acm_xml.loads(acm_xml.dumps(p)) == p


def test_empty_type_elements_are_ignored_as_acm_did() -> None:
    # ACM's own DEFAULT policy writes <ChineseWallTypes><Type/></ChineseWallTypes>.
    text = broken(
        "<Type>cw_red</Type>\n        </ChineseWallTypes>",
        "<Type>cw_red</Type><Type/>\n        </ChineseWallTypes>",
    )
    red = acm_xml.loads(text).vm_label("red")
    assert red is not None and red.cw_types == {"cw_red"}


def test_surrounding_whitespace_in_names_is_stripped() -> None:
    p = acm_xml.loads(broken("<Name>blue</Name>", "<Name>\n   blue  </Name>"))
    assert p.vm_label("blue") is not None


# --------------------------------------------------------------------------- malformed XML


def test_not_well_formed_reports_the_line() -> None:
    text = broken("<Type>red</Type>\n      <Type>blue</Type>", "<Type>red</Typ>")
    e = refused(text)
    assert e.line == line_of(text, "<Type>red</Typ>")
    assert e.file == "p.xml"
    assert "not well-formed XML" in e.message and "mismatch" in e.message


def test_empty_document_is_refused() -> None:
    e = refused(b"")
    assert "not well-formed" in e.message or "empty" in e.message.lower()


def test_missing_namespace_gets_a_hint() -> None:
    e = refused(broken(' xmlns="http://www.ibm.com"', ""))
    assert e.line == 2
    assert 'missing xmlns="http://www.ibm.com"' in e.message


def test_wrong_root_element_is_named() -> None:
    e = refused('<?xml version="1.0"?>\n<Policy xmlns="http://www.ibm.com"/>')
    assert e.line == 2 and "<Policy>" in e.message


@pytest.mark.parametrize(
    ("old", "new", "needle", "words"),
    [
        ("<Version>2.1</Version>", "<Version>two</Version>", "<Version>two", "pattern"),
        ("<Name>blue</Name>", "<Nam>blue</Nam>", "<Nam>", "Nam': This element is not expected"),
        ('<SubjectLabels bootstrap="dom0">', "<SubjectLabels>", "<SubjectLabels>", "bootstrap"),
        (
            "<Type>red</Type>\n        </SimpleTypeEnforcementTypes>\n      </ResourceLabel>",
            "<Type>red</Type><Type>blue</Type>\n        </SimpleTypeEnforcementTypes>\n"
            "      </ResourceLabel>",
            "<Type>red</Type><Type>blue</Type>",
            "Type': This element is not expected",
        ),
        ("<PolicyName>small</PolicyName>", "", "<Version>2.1", "PolicyName"),
        ('<Conflict name="colours">', "<Conflict>", "<Conflict>", "name"),
    ],
    ids=[
        "version-pattern",
        "unknown-element",
        "no-bootstrap",
        "two-resource-types",
        "no-policy-name",
        "unnamed-conflict",
    ],
)
def test_schema_violations_report_line_and_cause(
    old: str, new: str, needle: str, words: str
) -> None:
    text = broken(old, new)
    e = refused(text)
    assert e.message.startswith("schema: ")
    assert words in e.message
    assert e.line == line_of(text, needle)


def test_every_schema_violation_is_reported() -> None:
    text = broken("<Name>blue</Name>", "<Nam>blue</Nam>")
    text = broken("<Version>2.1</Version>", "<Version>x</Version>", text)
    e = refused(text)
    assert [p.line for p in e.problems] == sorted(
        [line_of(text, "<Version>x"), line_of(text, "<Nam>")]
    )


@pytest.mark.parametrize(
    ("old", "new", "needle", "words"),
    [
        # the schema's pattern [0-9]{1,8}.[0-9]{1,8} lets any character through as the dot
        ("<Version>2.1</Version>", "<Version>2x1</Version>", "<Version>2x1", "'2x1'"),
        (
            "<Version>2.0</Version>",
            "<Version>2-0</Version>",
            "<Version>2-0",
            "<major>.<minor>",
        ),
        (
            "<Type>red</Type>\n        </SimpleTypeEnforcementTypes>\n        <ChineseWallTypes>\n"
            "          <Type>cw_red",
            "<Type>pink</Type>\n        </SimpleTypeEnforcementTypes>\n        <ChineseWallTypes>\n"
            "          <Type>cw_red",
            "<Type>pink",
            "VM label 'red' names unknown STE type 'pink'",
        ),
        (
            "<Type>cw_blue</Type>\n        </ChineseWallTypes>\n      </VirtualMachineLabel>",
            "<Type>cw_green</Type>\n        </ChineseWallTypes>\n      </VirtualMachineLabel>",
            "<Type>cw_green",
            "unknown Chinese Wall type 'cw_green'",
        ),
        (
            "<Type>cw_red</Type>\n        <Type>cw_blue</Type>",
            "<Type>cw_red</Type>\n        <Type>cw_pink</Type>",
            "<Type>cw_pink",
            "conflict set 'colours' names unknown Chinese Wall type 'cw_pink'",
        ),
        ("<Name>blue</Name>", "<Name>red</Name>", "<Name>red</Name>", "duplicate VM label 'red'"),
        (
            "<Name>blue</Name>",
            "<Name>bl:ue</Name>",
            "<Name>bl:ue",
            "contains ':'",
        ),
        ("<Name>blue</Name>", "<Name>bl ue</Name>", "<Name>bl ue", "whitespace"),
        (
            '<SubjectLabels bootstrap="dom0">',
            '<SubjectLabels bootstrap="root">',
            "<SubjectLabels",
            "bootstrap label 'root' is not a VM label",
        ),
        (
            "<Type>mgmt</Type>\n      <Type>red</Type>",
            "<Type>mgmt</Type>\n      <Type>mgmt</Type>",
            "<Type>mgmt</Type>\n      <Type>blue",
            "duplicate STE type 'mgmt'",
        ),
        (
            "<Name>blue</Name>",
            '<Name from="crimson">blue</Name>',
            '<Name from="crimson">blue',
            "both rename 'crimson'",
        ),
        (
            "<Type>cw_red</Type>\n        <Type>cw_blue</Type>",
            "<Type>cw_red</Type>",
            '<Conflict name="colours"',
            "at least two types",
        ),
        (
            "<Type>red</Type>\n        </SimpleTypeEnforcementTypes>\n      </ResourceLabel>",
            "<Type/>\n        </SimpleTypeEnforcementTypes>\n      </ResourceLabel>",
            "<Type/>",
            "resource label 'red-disk' has an empty STE type",
        ),
        (
            "<Type>cw_mgmt</Type>\n        </ChineseWallTypes>",
            "<Type>cw_mgmt</Type>\n        </ChineseWallTypes>\n"
            "        <ChineseWallTypes><Type>cw_red</Type></ChineseWallTypes>",
            "<ChineseWallTypes><Type>cw_red",
            "more than one <ChineseWallTypes>",
        ),
    ],
    ids=[
        "version-any-dot",
        "from-version",
        "unknown-ste",
        "unknown-cw",
        "unknown-conflict-type",
        "duplicate-label",
        "colon",
        "whitespace",
        "bootstrap-missing",
        "duplicate-type",
        "duplicate-rename",
        "one-type-conflict",
        "empty-resource-type",
        "two-cw-lists",
    ],
)
def test_semantic_errors_report_the_offending_line(
    old: str, new: str, needle: str, words: str
) -> None:
    text = broken(old, new)
    e = refused(text)
    msgs = [p.message for p in e.problems]
    hit = [p for p in e.problems if words in p.message]
    assert hit, msgs
    assert hit[0].line == line_of(text, needle), (hit[0], needle)
    assert hit[0].file == "p.xml"


def test_policy_name_errors_point_at_the_name() -> None:
    text = broken("<PolicyName>small</PolicyName>", "<PolicyName>a:b</PolicyName>")
    e = refused(text)
    assert e.line == line_of(text, "<PolicyName>a:b") and "contains ':'" in e.message


def test_all_semantic_problems_are_reported_sorted_by_line() -> None:
    text = broken("<Name>blue</Name>", "<Name>red</Name>")
    text = broken(
        "<Type>cw_mgmt</Type>\n        </ChineseWallTypes>",
        "<Type>nope</Type>\n        </ChineseWallTypes>",
        text,
    )
    e = refused(text)
    assert len(e.problems) == 2
    assert [p.line for p in e.problems] == [
        line_of(text, "<Type>nope"),
        line_of(text, "<Name>red</Name>"),
    ]
    assert str(e).count("p.xml:") == 2


def test_missing_subject_labels_is_explained() -> None:
    start = GOOD.index("    <SubjectLabels")
    end = GOOD.index("</SubjectLabels>") + len("</SubjectLabels>\n")
    text = GOOD[:start] + GOOD[end:]
    e = refused(text)
    assert "no <SubjectLabels>" in e.message
    assert e.line == line_of(text, "<SecurityLabelTemplate>")


def test_non_utf8_is_refused_with_its_line() -> None:
    data = GOOD.replace("<Name>blue</Name>", "<Name>bl\xe9</Name>").encode("latin-1")
    e = refused(data)
    assert "not UTF-8" in e.message and e.line == line_of(GOOD, "<Name>blue</Name>")


def test_declared_foreign_encoding_is_refused() -> None:
    e = refused(GOOD.replace('encoding="UTF-8"', 'encoding="ISO-8859-1"'))
    assert "ISO-8859-1" in e.message and e.line == 1


def test_utf16_is_refused() -> None:
    e = refused(GOOD.replace('encoding="UTF-8"', 'encoding="UTF-16"').encode("utf-16"))
    assert "UTF-8" in e.message


def test_oversize_document_is_refused_before_parsing() -> None:
    big = GOOD.replace(
        "</SecurityPolicyDefinition>",
        "<!--" + "x" * acm_xml.MAX_POLICY_BYTES + "--></SecurityPolicyDefinition>",
    )
    e = refused(big.encode())
    assert "more than the" in e.message


def test_utf8_bom_is_accepted() -> None:
    assert acm_xml.loads(b"\xef\xbb\xbf" + GOOD.encode()).name == "small"


# --------------------------------------------------------------------------- hostile XML

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
""" + GOOD.split("\n", 1)[1].replace(
    "<PolicyName>small</PolicyName>", "<PolicyName>&lol9;</PolicyName>"
)

XXE = """<?xml version="1.0"?>
<!-- a friendly comment first -->
<!DOCTYPE SecurityPolicyDefinition [ <!ENTITY xxe SYSTEM "file:///etc/passwd"> ]>
""" + GOOD.split("\n", 1)[1].replace(
    "<PolicyName>small</PolicyName>", "<PolicyName>&xxe;</PolicyName>"
)


def test_billion_laughs_is_refused_at_the_doctype() -> None:
    e = refused(BILLION_LAUGHS)
    assert "DOCTYPE declarations are not allowed" in e.message
    assert e.line == 2
    assert "lollol" not in str(e)


def test_external_entity_is_refused_without_reading_the_file() -> None:
    e = refused(XXE.encode())
    assert "DOCTYPE declarations are not allowed" in e.message
    assert e.line == 3
    assert "root:" not in str(e)


def test_external_dtd_reference_is_refused() -> None:
    text = (
        '<?xml version="1.0"?>\n<!DOCTYPE x SYSTEM "http://example.invalid/x.dtd">\n'
        + (GOOD.split("\n", 1)[1])
    )
    assert "DOCTYPE" in refused(text).message


def test_entity_reference_without_doctype_is_not_well_formed() -> None:
    text = broken("<PolicyName>small</PolicyName>", "<PolicyName>&xxe;</PolicyName>")
    e = refused(text)
    assert "not well-formed" in e.message and "xxe" in e.message
    assert e.line == line_of(text, "&xxe;")


def test_xinclude_is_not_processed() -> None:
    text = broken(
        "<PolicyName>small</PolicyName>",
        '<PolicyName>small</PolicyName><xi:include xmlns:xi="http://www.w3.org/2001/XInclude" '
        'href="/etc/passwd" parse="text"/>',
    )
    e = refused(text)
    assert e.message.startswith("schema: ") and "include" in e.message
    assert "root:" not in str(e)


def test_the_parser_itself_would_not_expand_entities() -> None:
    # Defence in depth: even past the DOCTYPE check, lxml is configured not to expand.
    parser = acm_xml._parser()
    try:
        root = etree.fromstring(XXE.encode(), parser)
    except etree.XMLSyntaxError:
        return
    assert "root:" not in etree.tostring(root, encoding="unicode")
    try:
        root = etree.fromstring(BILLION_LAUGHS.encode(), parser)
    except etree.XMLSyntaxError:
        return
    assert len(etree.tostring(root)) < 100_000


# --------------------------------------------------------------------------- export


def test_export_refuses_what_acm_cannot_express_and_says_all() -> None:
    p = Policy(
        name="m",
        version=PolicyVersion(1, 0),
        bootstrap="dom0",
        ste_types=["s"],
        vm_labels=[
            VmLabel("dom0", ["s"]),
            VmLabel("g", ["s"], mls=MlsLabel("low"), quota=Quota(max_domains=1)),
        ],
        resource_labels=[ResourceLabel("r", "s", mls=MlsLabel("low"))],
        mls_levels=["low"],
        defaults=Defaults(unlabelled_domain="g"),
    )
    with pytest.raises(AcmExportError) as info:
        acm_xml.dumps(p)
    text = str(info.value)
    for words in (
        "MLS levels",
        "'g' has an MLS label",
        "'g' has a quota",
        "resource label 'r'",
        "unlabelled domains is 'g'",
    ):
        assert words in text
    assert len(info.value.problems) == 5
    assert acm_xml.export_problems(p) == list(info.value.problems)


def test_export_escapes_markup_in_names() -> None:
    p = Policy(
        name="a&b",
        version=PolicyVersion(1, 0),
        bootstrap='<x">',
        ste_types=["t&<>"],
        vm_labels=[VmLabel('<x">', ["t&<>"])],
    )
    out = acm_xml.dumps(p)
    assert b"<PolicyName>a&amp;b</PolicyName>" in out
    assert acm_xml.loads(out) == p


def test_export_is_valid_against_the_shipped_schema() -> None:
    out = acm_xml.dumps(acm_xml.load(CLIENT).policy)
    root = etree.fromstring(out, acm_xml._parser())
    assert acm_xml.schema().validate(root)
    assert re.search(rb"^<\?xml version='1.0' encoding='UTF-8'\?>", out)
