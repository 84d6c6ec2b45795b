"""Xen ACM policy XML (``security_policy.xsd``): the vocabulary the reader
(`shyped.policy.acm_xml_reader`) and the writer (`shyped.policy.acm_xml`) share: the namespace,
limits, errors, the header fields the model does not carry, and the schema and a safe parser."""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Final

import attrs
from lxml import etree

from shyped.policy.errors import PolicyError

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


def _q(tag: str) -> str:
    return f"{{{ACM_NS}}}{tag}"
