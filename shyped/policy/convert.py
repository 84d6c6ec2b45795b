"""Convert a policy between shyped's TOML and Xen ACM XML (pure), refusing what the target
cannot express, each reason at the line of the source that holds it.

- TOML -> ACM XML: `acm_xml.export_problems` (MLS levels and categories, quotas, defaults
  other than ACM's ``__UNLABELED__`` label) refuse the conversion.
- ACM XML -> TOML: the header's informational fields (``PolicyUrl``, ``Reference``, ``Date``,
  ``NameSpaceUrl``) and the ``priority`` attributes have no place in TOML; they refuse the
  conversion unless `drop_header` says to leave them out.

Comments are carried in neither direction.
"""

from __future__ import annotations

from collections.abc import Callable

from shyped.policy import acm_xml, toml_format
from shyped.policy.errors import PathPart, PolicyError, Problem
from shyped.policy.model import Policy

Locator = Callable[[tuple[PathPart, ...]], int | None]


class ConvertRefused(PolicyError):
    """The target format cannot express part of the policy; `problems` say what and where."""


def to_acm_xml(policy: Policy, line_of: Locator, file: str) -> bytes:
    """`policy` (read from `file`) as ACM XML; `ConvertRefused` lists what XML cannot hold."""
    problems = acm_xml.export_problems(policy)
    if problems:
        raise ConvertRefused(
            Problem(f"ACM XML cannot express this: {p.message}", p.path, file, line_of(p.path))
            for p in problems
        )
    return acm_xml.dumps(policy)


def header_problems(doc: acm_xml.AcmDocument, line_of: Locator, file: str) -> list[Problem]:
    """What of an ACM document's header TOML cannot hold."""
    h = doc.header
    line = line_of(("from_policy",))
    out = [
        Problem(f"TOML has no place for the header's <{tag}> ({value!r})", file=file, line=line)
        for tag, value in (
            ("PolicyUrl", h.url),
            ("Reference", h.reference),
            ("Date", h.date),
            ("NameSpaceUrl", h.namespace_url),
        )
        if value is not None
    ]
    for section, flag in (("SimpleTypeEnforcement", h.ste_primary), ("ChineseWall", h.cw_primary)):
        if flag:
            out.append(
                Problem(
                    f'TOML has no place for <{section} priority="PrimaryPolicyComponent"> '
                    "(ACM's tools ignored it)",
                    file=file,
                    line=line_of(()),
                )
            )
    return out


def to_toml(
    doc: acm_xml.AcmDocument, line_of: Locator, file: str, *, drop_header: bool = False
) -> str:
    """An ACM document as shyped TOML; `ConvertRefused` if its header would be lost (unless
    `drop_header`)."""
    problems = header_problems(doc, line_of, file)
    if problems and not drop_header:
        raise ConvertRefused(problems)
    return toml_format.dumps(doc.policy)
