"""Lint a policy file: every problem at its line in one pass, plus the analysis' warnings.

Pure (text in, report out); ``shypectl policy lint`` prints it. What one run finds:

- **TOML**: a syntax error stops `tomllib`, so the line it names is left out (blanked) and
  the text parsed again, up to `MAX_RECOVERIES` times: every syntax error is reported, and the
  shape and model checks and the analysis still run on what is left. A finding that may be a
  consequence of a left-out line (a label whose ``name`` was on it ...) is a real finding
  about the text that was checked; the report lists the lines left out
  (`LintReport.skipped_lines`). Shape problems (unknown keys, wrong value types) and model
  problems (unknown types, duplicates ...) are reported together; only when a declaration
  itself cannot be read (``[types]``, ``[mls]``, the label arrays) is the model not checked,
  since every use of what it declares would be reported too.
- **ACM XML**: a document that is not well-formed stops at the first error (libxml2 does, and
  recovering XML guesses at structure); schema errors are all reported and stop there; past
  the schema every reader and model problem is reported together.
- **Warnings** (`analysis.analyse`, on a valid policy): VM labels never admissible, mute
  labels, unusable resource labels, inert conflict sets, unused STE and Chinese Wall types;
  isolated labels are ``info``. ``--strict`` fails on warnings, never on info.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs

from shyped.policy import acm_xml, toml_format
from shyped.policy.analysis import PolicyAnalysis, analyse
from shyped.policy.errors import PathPart, PolicyError, Problem
from shyped.policy.model import Defaults, Policy, Quota
from shyped.policy.toml_source import _syntax_error, nested_too_deeply

Severity = Literal["error", "warning", "info"]
Locator = Callable[[tuple[PathPart, ...]], int | None]

#: Syntax errors recovered from (each leaves a line out) before the checks give up.
MAX_RECOVERIES: Final = 20

_LINE_RE: Final = re.compile(r"\n")


@attrs.frozen
class Finding:
    """One thing lint reports, at its place in the file."""

    severity: Severity
    code: str
    message: str
    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.severity}: {self.message} [{self.code}]"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class LintReport:
    """Everything lint found in one file."""

    file: str
    format: str  # "toml" or "acm-xml"
    findings: tuple[Finding, ...]
    policy: Policy | None = None
    #: Lines left out after syntax errors (TOML); the other checks ran without them.
    skipped_lines: tuple[int, ...] = ()
    #: False when the analysis could not run (nothing usable was left to analyse).
    checked: bool = True
    #: The analysis ran on the policy with the items the errors name left out.
    repaired: bool = False

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity == "warning" for f in self.findings)

    def failed(self, strict: bool = False) -> bool:
        """Errors, or (strict) warnings."""
        return self.errors > 0 or (strict and self.warnings > 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "format": self.format,
            "errors": self.errors,
            "warnings": self.warnings,
            "checked": self.checked,
            "repaired": self.repaired,
            "skipped_lines": list(self.skipped_lines),
            "policy": None
            if self.policy is None
            else {"name": self.policy.name, "version": str(self.policy.version)},
            "findings": [f.to_json() for f in self.findings],
        }


def _error(p: Problem, code: str, file: str) -> Finding:
    return Finding("error", code, p.message, p.file or file, p.line, p.column)


def _sorted(findings: list[Finding]) -> tuple[Finding, ...]:
    unique = list(dict.fromkeys(findings))  # a syntax error seen again after a recovery
    return tuple(sorted(unique, key=lambda f: (f.line is None, f.line or 0)))


# --------------------------------------------------------------------------- formats


def is_xml(file: str, data: bytes) -> bool:
    """ACM XML by extension, else by content (as the daemon decides)."""
    if file.lower().endswith(".xml"):
        return True
    return data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"<"


def lint(data: bytes, file: str, *, analysis: bool = True) -> LintReport:
    """Lint a policy file's bytes (TOML or ACM XML, see `is_xml`)."""
    if is_xml(file, data):
        return _lint_xml(data, file, analysis)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        msg = f"not UTF-8: byte 0x{data[e.start]:02x} cannot be decoded"
        return LintReport(
            file, "toml", (Finding("error", "encoding", msg, file, line),), checked=False
        )
    return lint_toml(text, file, analysis=analysis)


def _blank(text: str, line: int) -> str:
    lines = text.split("\n")
    if 1 <= line <= len(lines):
        lines[line - 1] = ""
    return "\n".join(lines)


_STATEMENT_RE: Final = re.compile(r"\s*(\[|[A-Za-z0-9_\"'.-][^=]*=)")


_TABLE_RE: Final = re.compile(r"\s*\[\[?\s*([A-Za-z0-9_-]+)")


def _table_of(lines: list[str], line: int) -> str | None:
    """The table a line of TOML text is in (by the nearest header above it)."""
    for k in range(line, 0, -1):
        m = _TABLE_RE.match(lines[k - 1]) if k <= len(lines) else None
        if m is not None:
            return m.group(1)
    return None


def _progress(text: str) -> float:
    """How far tomllib gets in `text`: the line of its error, or infinity."""
    try:
        tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"at line (\d+)", str(e))
        return int(m.group(1)) if m else text.count("\n") + 1
    except RecursionError:
        return 0
    return math.inf


def _recover(text: str, line: int) -> tuple[str, list[int]]:
    """`text` with the syntax error at `line` left out: that line, or — when that gets
    further — the statement before it from its first line (an array or inline table left
    open reports its error on the next statement). The lines left out."""
    lines = text.split("\n")
    candidates = [[line]]
    start = next((k for k in range(line - 1, 0, -1) if _STATEMENT_RE.match(lines[k - 1])), None)
    if start is not None:
        candidates.append(list(range(start, line)))
    best: tuple[float, str, list[int]] | None = None
    for cand in candidates:
        blanked = text
        for n in cand:
            blanked = _blank(blanked, n)
        got = _progress(blanked)
        if best is None or got > best[0]:
            best = (got, blanked, cand)
    assert best is not None
    return best[1], best[2]


def lint_toml(text: str, file: str = "<string>", *, analysis: bool = True) -> LintReport:
    """Lint TOML policy text (see the module docstring for syntax error recovery)."""
    findings: list[Finding] = []
    skipped: list[int] = []
    current = text
    doc: dict[str, Any] | None = None
    for _ in range(MAX_RECOVERIES + 1):
        try:
            doc = tomllib.loads(current)
            break
        except tomllib.TOMLDecodeError as e:
            err = _syntax_error(e, current, file)
        except RecursionError:
            findings += [_error(p, "syntax", file) for p in nested_too_deeply(file).problems]
            break
        lines = sorted({p.line for p in err.problems if p.line is not None} - set(skipped))
        if not lines:
            findings += [_error(p, "syntax", file) for p in err.problems]
            break
        if len(err.problems) == 1 and len(lines) == 1:
            current, left_out = _recover(current, lines[0])
            p = err.problems[0]
            if left_out[0] != lines[0]:  # the statement before was not closed
                noticed = f" (noticed at line {p.line})"
                p = Problem(p.message + noticed, p.path, p.file, left_out[0])
            findings.append(_error(p, "syntax", file))
            skipped += left_out
            continue
        findings += [_error(p, "syntax", file) for p in err.problems]
        for line in lines:
            current = _blank(current, line)
        skipped += lines
    if doc is None:
        return LintReport(file, "toml", _sorted(findings), None, tuple(sorted(skipped)), False)
    source = text.split("\n")
    lost = any(_table_of(source, n) in ("types", "mls") for n in skipped)
    checked = toml_format.check_text(doc, current, file=file, declarations_lost=lost)
    findings += [_error(p, "invalid", file) for p in checked.problems]
    if lost:
        findings.append(
            Finding(
                "info",
                "declarations",
                "a line of [types] or [mls] was left out: unknown types and levels are not "
                "reported until the syntax error is fixed",
                file,
                min(n for n in skipped if _table_of(source, n) in ("types", "mls")),
            )
        )
    return _analysed(
        file,
        "toml",
        findings,
        checked.policy,
        checked.parts,
        checked.line_of,
        analysis,
        tuple(sorted(skipped)),
    )


def _lint_xml(data: bytes, file: str, analysis: bool) -> LintReport:
    try:
        checked = acm_xml.check_document(data, file=file)
    except PolicyError as e:
        syntax = any(p.message.startswith("not well-formed") for p in e.problems)
        findings = [_error(p, "syntax" if syntax else "invalid", file) for p in e.problems]
        return LintReport(file, "acm-xml", _sorted(findings), checked=False)
    findings = [_error(p, "invalid", file) for p in checked.problems]
    return _analysed(
        file,
        "acm-xml",
        findings,
        None if checked.document is None else checked.document.policy,
        checked.parts,
        checked.line_of,
        analysis,
    )


def _analysed(
    file: str,
    fmt: str,
    findings: list[Finding],
    policy: Policy | None,
    parts: Mapping[str, Any] | None,
    line_of: Locator,
    analysis: bool,
    skipped: tuple[int, ...] = (),
) -> LintReport:
    """The report, with the analysis' warnings on `policy`, or on the policy `parts` make
    with the items the errors name left out (and nothing said about those)."""
    touched: set[str] = set()
    repaired = False
    if policy is None and parts is not None:
        policy = repaired_policy(parts, touched)
        repaired = policy is not None
    if policy is not None and analysis:
        if repaired and parts is not None:
            line_of = _original_lines(parts, policy, line_of)
        findings = findings + warnings(analyse(policy), line_of, file, skip=touched)
    return LintReport(
        file,
        fmt,
        _sorted(findings),
        None if (skipped or repaired) else policy,
        skipped,
        checked=policy is not None,
        repaired=repaired,
    )


@attrs.frozen
class Located:
    """A valid policy read from a file, with the line of each model path in it."""

    policy: Policy
    line_of: Locator
    format: str  # "toml" or "acm-xml"
    acm: acm_xml.AcmDocument | None = None


def load_located(data: bytes, file: str) -> Located:
    """Load a policy file's bytes (TOML or ACM XML); `PolicyError` lists every problem."""
    if is_xml(file, data):
        xml = acm_xml.check_document(data, file=file)
        if xml.document is None:
            raise acm_xml.AcmXmlError(xml.problems)
        return Located(xml.document.policy, xml.line_of, "acm-xml", xml.document)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError.single(
            f"not UTF-8: byte 0x{data[e.start]:02x} cannot be decoded", file=file, line=line
        ) from None
    checked = toml_format.loads_checked(text, file=file)
    assert checked.policy is not None
    return Located(checked.policy, checked.line_of, "toml")


# --------------------------------------------------------------------------- repair


_DROP: Final = "drop"


def repaired_policy(parts: Mapping[str, Any], touched: set[str] | None = None) -> Policy | None:
    """The policy `parts` would build with every item a model problem names left out (a type
    reference removed, a duplicate or malformed label dropped ...), so the analysis can still
    say what the rest allows; None if a problem cannot be repaired (the bootstrap label)."""
    kw = dict(parts)
    for key in ("ste_types", "cw_types", "mls_levels", "mls_categories"):
        kw[key] = list(kw.get(key, ()))
    for key in ("conflict_sets", "vm_labels", "resource_labels"):
        kw[key] = list(kw.get(key, ()))
    for _ in range(3):
        try:
            return Policy(**kw)
        except PolicyError as e:
            if not all(_repair(kw, p.path, touched) for p in e.problems):
                return None
            for key in ("ste_types", "cw_types", "mls_levels", "mls_categories"):
                kw[key] = [x for x in kw[key] if x is not _DROP]
            for key in ("conflict_sets", "vm_labels", "resource_labels"):
                kw[key] = [x for x in kw[key] if x is not None]
    return None


def _original_lines(parts: Mapping[str, Any], policy: Policy, line_of: Locator) -> Locator:
    """`line_of` for paths into `policy` (a repaired policy, with items left out) by way of
    the original index of the item of the same name."""

    def name(x: Any) -> Any:
        return getattr(x, "name", x)

    def translate(path: tuple[PathPart, ...]) -> int | None:
        if len(path) >= 2 and isinstance(path[1], int):
            key, i = str(path[0]), path[1]
            now = getattr(policy, key)
            if i < len(now):
                target = name(now[i])
                for j, orig in enumerate(parts[key]):
                    if name(orig) == target:
                        return line_of((key, j, *path[2:]))
        return line_of(path)

    return translate


def _repair(kw: dict[str, Any], path: tuple[PathPart, ...], touched: set[str] | None) -> bool:
    """Leave out what `path` names (in place; the names of the items changed go into
    `touched`); False if that cannot be done."""
    head = path[0] if path else None
    if head in ("ste_types", "cw_types", "mls_levels", "mls_categories") and len(path) > 1:
        i = path[1]
        if isinstance(i, int) and i < len(kw[head]):
            kw[head][i] = _DROP
        return True
    if head == "from_policy":
        kw["from_policy"] = None
        return True
    if head == "name":
        kw["name"] = "unnamed"
        return True
    if head == "defaults":
        kw["defaults"] = Defaults()
        return True
    if head not in ("conflict_sets", "vm_labels", "resource_labels") or len(path) < 2:
        return False
    i, rest = path[1], path[2:]
    items = kw[head]
    if not isinstance(i, int) or i >= len(items) or items[i] is None:
        return True
    item = items[i]
    if touched is not None:
        touched.add(item.name)
    field = rest[0] if rest else "name"
    value = rest[1] if len(rest) > 1 else None
    if head == "conflict_sets" and field == "types" and isinstance(value, str):
        items[i] = attrs.evolve(item, types=item.types - {value})
    elif field in ("ste_types", "cw_types") and isinstance(value, str):
        items[i] = attrs.evolve(item, **{field: getattr(item, field) - {value}})
    elif field == "mls":
        items[i] = attrs.evolve(item, mls=None)
    elif field == "quota":
        items[i] = attrs.evolve(item, quota=Quota())
    elif field == "from_name":
        items[i] = attrs.evolve(item, from_name=None)
    else:  # its name, its only STE type, a set with fewer than two types: leave it out
        items[i] = None
    return True


# --------------------------------------------------------------------------- warnings


def _names(items: Any) -> str:
    return ", ".join(repr(x) for x in sorted(items))


def warnings(
    a: PolicyAnalysis, line_of: Locator, file: str, *, skip: set[str] | frozenset[str] = frozenset()
) -> list[Finding]:
    """The analysis' findings about `a.policy`, each at the line of what it is about (none
    about the labels and conflict sets named in `skip`: lint changed them to analyse)."""
    p = a.policy
    out: list[Finding] = []

    def warn(code: str, message: str, *path: PathPart, severity: Severity = "warning") -> None:
        item = path[1] if len(path) > 1 and path[0] not in ("ste_types", "cw_types") else None
        if isinstance(item, int) and getattr(p, str(path[0]))[item].name in skip:
            return
        out.append(Finding(severity, code, message, file, line_of(tuple(path))))

    boot = p.bootstrap
    for i, v in enumerate(p.vm_labels):
        at = ("vm_labels", i, "name")
        if v.name in a.never_admitted:
            if v.quota.max_domains == 0:
                why = "its quota allows no domain (max_domains = 0)"
            else:
                pair = (v.name, boot) if v.name <= boot else (boot, v.name)
                sets = a.cw_conflicts.get(pair, frozenset())
                why = (
                    f"it conflicts with dom0's label {boot!r} (conflict set {_names(sets)}), "
                    "and dom0 always runs"
                )
            warn("never-admissible", f"VM label {v.name!r} is never admissible: {why}", *at)
        elif v.name in a.mute:
            why = (
                "it has no STE type, so its domains cannot even get a console from dom0"
                if not v.ste_types
                else "it shares no STE type (with equal MLS labels) with any label it can run "
                "beside, itself included"
            )
            warn("mute", f"VM label {v.name!r} is mute: {why}", *at)
        elif v.name in a.isolated:
            warn(
                "isolated",
                f"VM label {v.name!r} is isolated: its domains may talk only among themselves, "
                f"not even to dom0's label {boot!r}",
                *at,
                severity="info",
            )
    for i, r in enumerate(p.resource_labels):
        if r.name in a.unusable_resources:
            carriers = [v.name for v in p.vm_labels if r.ste_type in v.ste_types]
            if r.per_instance:
                carriers = [n for n in carriers if (vm := p.vm_label(n)) and vm.dynamic]
            if not carriers and r.per_instance:
                why = (
                    f"it is per instance, and no dynamic VM label carries its STE type "
                    f"{r.ste_type!r}"
                )
            elif not carriers:
                why = f"no VM label carries its STE type {r.ste_type!r}"
            else:
                why = (
                    f"of the VM labels with its STE type {r.ste_type!r} ({_names(carriers)}) "
                    "none is admissible and MLS-compatible"
                )
            warn(
                "unusable-resource",
                f"resource label {r.name!r} is unusable: {why}",
                "resource_labels",
                i,
                "name",
            )
    admitted_cw = {t for v in p.vm_labels if v.name in a.admissible for t in v.cw_types}
    for i, cs in enumerate(p.conflict_sets):
        if cs.name in a.inert_conflict_sets:
            live = sorted(cs.types & admitted_cw)
            carried = f"only {_names(live)} is" if live else "none of them is"
            warn(
                "inert-conflict-set",
                f"conflict set {cs.name!r} can never block anything: of its types "
                f"{_names(cs.types)}, {carried} carried by an admissible label",
                "conflict_sets",
                i,
                "name",
            )
    for j, t in enumerate(p.ste_types):
        if t in a.unused_ste_types:
            warn("unused-type", f"STE type {t!r} is carried by no label", "ste_types", j)
    for j, t in enumerate(p.cw_types):
        if t in a.unused_cw_types:
            warn("unused-type", f"Chinese Wall type {t!r} is carried by no VM label", "cw_types", j)
    return out


def format_text(report: LintReport) -> list[str]:
    """The report as lines for a terminal: one per finding, then a summary."""
    lines = [str(f) for f in report.findings]
    if report.skipped_lines:
        shown = ", ".join(map(str, report.skipped_lines))
        what = "the other checks ran without" if report.checked else "left out"
        lines.append(f"{report.file}: note: syntax errors: {what} line(s) {shown}")
    if not report.checked:
        lines.append(f"{report.file}: note: the analysis could not run (no usable policy)")
    elif report.repaired:
        lines.append(
            f"{report.file}: note: the warnings come from the policy with the items the "
            "errors name left out"
        )
    name = ""
    if report.policy is not None:
        name = f"{report.policy.name} {report.policy.version}: "
    lines.append(f"{report.file}: {name}{report.errors} error(s), {report.warnings} warning(s)")
    return lines
