"""shyped's native policy format: TOML written by people (see docs/policy.md).

Loading is all or nothing: the text is parsed with `tomllib`, its shape is checked (unknown
keys, wrong value types, missing keys, duplicates inside a list), then the model is built, which
validates the policy as a whole. Every problem is reported with the file and line: tomllib's
own syntax errors carry a line already; for everything else a light scan of the source text
(`_SourceIndex`) finds the line of the offending table, key or array element.

Labels are arrays of tables (``[[label]]``, ``[[resource]]``, ``[[conflict_set]]``) with a
``name`` key, so the order is kept and a name defined twice is reported at its second
definition rather than rejected by TOML as a duplicate table.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

import attrs

from shyped.fileio.boundedread import POLICY_MAX_BYTES, read_bounded
from shyped.policy.errors import PathPart, PolicyError, Problem
from shyped.policy.model import (
    QUOTA_FIELDS,
    ConflictSet,
    Defaults,
    MlsLabel,
    Policy,
    PolicyRef,
    PolicyVersion,
    Quota,
    ResourceLabel,
    VmLabel,
)
from shyped.policy.toml_source import (
    TomlPath,
    _SourceIndex,
    _syntax_error,
    _toml_path,
    _Value,
    nested_too_deeply,
)

#: The value of a default meaning "deny" (a label literally named "deny" cannot be a default).
DENY: Final = "deny"

_TOP_KEYS: Final = ("policy", "defaults", "types", "mls", "conflict_set", "label", "resource")
_POLICY_KEYS: Final = ("name", "version", "bootstrap", "from")
_LABEL_KEYS: Final = (
    "name",
    "ste",
    "cw",
    "level",
    "categories",
    "from",
    "quota",
    "dynamic",
    "shared",
)
_RESOURCE_KEYS: Final = ("name", "ste", "level", "categories", "from", "per_instance")


# --------------------------------------------------------------------------- shape checks


class _Shape:
    """Collects shape problems of the parsed TOML (with TOML paths) and reads typed values."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, TomlPath]] = []
        #: A declaration (types, MLS levels, the label or resource arrays) could not be read:
        #: the model would report every use of what is missing, so it is not checked.
        self.declarations_bad = False

    def bad(self, message: str, *path: PathPart | _Value) -> None:
        self.problems.append((message, tuple(path)))
        if path[:1] in (("types",), ("mls",)) or path in (("label",), ("resource",)):
            self.declarations_bad = True

    def table(self, value: object, what: str, *path: PathPart) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.bad(f"{what} must be a table", *path)
            return None
        return value

    def keys(
        self, t: Mapping[str, Any], allowed: tuple[str, ...], what: str, *path: PathPart
    ) -> None:
        for k in t:
            if k not in allowed:
                close = difflib.get_close_matches(k, allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                self.bad(
                    f"unknown key {k!r} in {what} ({hint}allowed: {', '.join(allowed)})", *path, k
                )

    def string(
        self, t: Mapping[str, Any], key: str, what: str, *path: PathPart, required: bool = False
    ) -> str | None:
        if key not in t:
            if required:
                self.bad(f"{what} has no {key!r}", *path)
            return None
        v = t[key]
        if not isinstance(v, str):
            self.bad(f"{what}: {key!r} must be a string, not {_tname(v)}", *path, key)
            return None
        return v

    def strings(self, t: Mapping[str, Any], key: str, what: str, *path: PathPart) -> list[str]:
        if key not in t:
            return []
        v = t[key]
        if not isinstance(v, list):
            self.bad(f"{what}: {key!r} must be a list of strings, not {_tname(v)}", *path, key)
            return []
        out: list[str] = []
        for i, item in enumerate(v):
            if not isinstance(item, str):
                self.bad(
                    f"{what}: {key!r} items must be strings, not {_tname(item)}", *path, key, i
                )
            elif item in out:
                self.bad(f"{what}: {key!r} lists {item!r} twice", *path, key, i)
            else:
                out.append(item)
        return out

    def tables(self, doc: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
        if key not in doc:
            return []
        v = doc[key]
        if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
            self.bad(f"{key!r} must be an array of tables: write [[{key}]]", key)
            return []
        return v


def _tname(v: object) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(v), type(v).__name__)


def _mls(sh: _Shape, t: Mapping[str, Any], what: str, *path: PathPart) -> MlsLabel | None:
    level = sh.string(t, "level", what, *path)
    cats = sh.strings(t, "categories", what, *path)
    if level is None:
        if cats:
            sh.bad(f"{what} has MLS categories but no 'level'", *path, "categories")
        return None
    return MlsLabel(level, cats)


def _quota(sh: _Shape, v: object, what: str, *path: PathPart) -> Quota:
    t = sh.table(v, f"{what} quota", *path, "quota")
    if t is None:
        return Quota()
    sh.keys(t, QUOTA_FIELDS, f"{what} quota", *path, "quota")
    vals: dict[str, int] = {}
    for f in QUOTA_FIELDS:
        if f not in t:
            continue
        x = t[f]
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            sh.bad(f"{what} quota {f} must be a non-negative integer, not {x!r}", *path, "quota", f)
        else:
            vals[f] = x
    return Quota(**vals)


def _flag(sh: _Shape, t: Mapping[str, Any], key: str, what: str, *path: PathPart) -> bool:
    v = t.get(key, False)
    if not isinstance(v, bool):
        sh.bad(f"{what}: {key!r} must be true or false, not {_tname(v)}", *path, key)
        return False
    return v


def _build(doc: dict[str, Any], sh: _Shape) -> tuple[dict[str, Any], frozenset[str]]:
    """Check the document's shape; return the `Policy` constructor's arguments and the fields
    filled with placeholders (missing or malformed header values), so that the model's own
    problems can still be collected when the shape has problems."""
    sh.keys(doc, _TOP_KEYS, "the policy file")

    name = vtext = bootstrap = None
    pol: dict[str, Any] = {}
    if "policy" not in doc:
        sh.bad("the [policy] table (name, version, bootstrap) is missing")
    else:
        pol = sh.table(doc["policy"], "[policy]", "policy") or {}
        sh.keys(pol, _POLICY_KEYS, "[policy]", "policy")
        name = sh.string(pol, "name", "[policy]", "policy", required=True)
        if "version" in pol and not isinstance(pol["version"], str):
            v = pol["version"]
            sh.bad(
                f"[policy]: 'version' must be a string like \"1.0\", not {_tname(v)}",
                "policy",
                "version",
            )
        else:
            vtext = sh.string(pol, "version", "[policy]", "policy", required=True)
        if "bootstrap" in pol:
            bootstrap = sh.string(pol, "bootstrap", "[policy]", "policy")
        else:
            sh.bad(
                'bootstrap label missing: [policy] needs bootstrap = "<dom0\'s VM label>"',
                "policy",
            )
    version: PolicyVersion | None = None
    if vtext is not None:
        try:
            version = PolicyVersion.parse(vtext)
        except ValueError as e:
            sh.bad(str(e), "policy", "version")
    from_policy: PolicyRef | None = None
    if "from" in pol:
        ft = sh.table(pol["from"], "[policy] from", "policy", "from")
        if ft is not None:
            sh.keys(ft, ("name", "version"), "[policy] from", "policy", "from")
            fname = sh.string(ft, "name", "[policy] from", "policy", "from", required=True)
            fver = sh.string(ft, "version", "[policy] from", "policy", "from", required=True)
            if fname is not None and fver is not None:
                try:
                    from_policy = PolicyRef(fname, PolicyVersion.parse(fver))
                except ValueError as e:
                    sh.bad(str(e), "policy", "from", "version")

    defaults_t = sh.table(doc.get("defaults", {}), "[defaults]", "defaults") or {}
    sh.keys(defaults_t, ("unlabelled_domain", "unlabelled_resource"), "[defaults]", "defaults")
    ud = sh.string(defaults_t, "unlabelled_domain", "[defaults]", "defaults")
    ur = sh.string(defaults_t, "unlabelled_resource", "[defaults]", "defaults")
    defaults = Defaults(None if ud in (None, DENY) else ud, None if ur in (None, DENY) else ur)

    types_t = sh.table(doc.get("types", {}), "[types]", "types") or {}
    sh.keys(types_t, ("ste", "cw"), "[types]", "types")
    ste_types = sh.strings(types_t, "ste", "[types]", "types")
    cw_types = sh.strings(types_t, "cw", "[types]", "types")

    mls_t = sh.table(doc.get("mls", {}), "[mls]", "mls") or {}
    sh.keys(mls_t, ("levels", "categories"), "[mls]", "mls")
    levels = sh.strings(mls_t, "levels", "[mls]", "mls")
    categories = sh.strings(mls_t, "categories", "[mls]", "mls")

    csets: list[ConflictSet] = []
    for i, t in enumerate(sh.tables(doc, "conflict_set")):
        what = f"conflict set #{i + 1}"
        sh.keys(t, ("name", "types"), what, "conflict_set", i)
        cname = sh.string(t, "name", what, "conflict_set", i, required=True) or ""
        csets.append(
            ConflictSet(cname, sh.strings(t, "types", f"conflict set {cname!r}", "conflict_set", i))
        )

    labels: list[VmLabel] = []
    for i, t in enumerate(sh.tables(doc, "label")):
        lname = sh.string(t, "name", f"label #{i + 1}", "label", i, required=True) or ""
        what = f"label {lname!r}" if lname else f"label #{i + 1}"
        sh.keys(t, _LABEL_KEYS, what, "label", i)
        labels.append(
            VmLabel(
                lname,
                sh.strings(t, "ste", what, "label", i),
                sh.strings(t, "cw", what, "label", i),
                _mls(sh, t, what, "label", i),
                _quota(sh, t["quota"], what, "label", i) if "quota" in t else Quota(),
                sh.string(t, "from", what, "label", i),
                _flag(sh, t, "dynamic", what, "label", i),
                sh.strings(t, "shared", what, "label", i),
            )
        )

    resources: list[ResourceLabel] = []
    for i, t in enumerate(sh.tables(doc, "resource")):
        rname = sh.string(t, "name", f"resource #{i + 1}", "resource", i, required=True) or ""
        what = f"resource {rname!r}" if rname else f"resource #{i + 1}"
        sh.keys(t, _RESOURCE_KEYS, what, "resource", i)
        ste: str | None = None
        if isinstance(t.get("ste"), list):
            sh.bad(
                f"{what}: 'ste' must be one STE type (a string), not a list", "resource", i, "ste"
            )
        else:
            ste = sh.string(t, "ste", what, "resource", i, required=True)
        resources.append(
            ResourceLabel(
                rname,
                ste or "",
                _mls(sh, t, what, "resource", i),
                sh.string(t, "from", what, "resource", i),
                _flag(sh, t, "per_instance", what, "resource", i),
            )
        )

    placeholders = frozenset(
        f for f, v in (("name", name), ("version", version), ("bootstrap", bootstrap)) if v is None
    )
    parts: dict[str, Any] = {
        "name": name or "unnamed",
        "version": version or PolicyVersion(0, 0),
        "bootstrap": bootstrap or "",
        "ste_types": ste_types,
        "cw_types": cw_types,
        "conflict_sets": csets,
        "vm_labels": labels,
        "resource_labels": resources,
        "mls_levels": levels,
        "mls_categories": categories,
        "defaults": defaults,
        "from_policy": from_policy,
    }
    return parts, placeholders


# --------------------------------------------------------------------------- load


Locator = Callable[[tuple[PathPart, ...]], int | None]


@attrs.frozen
class Checked:
    """A TOML policy text checked as a whole: the policy (None if anything is wrong), every
    problem found (shape and model, each with its line), and `line_of`, the line of a model
    path (`errors.Problem.path`) in the text."""

    policy: Policy | None
    problems: tuple[Problem, ...]
    line_of: Locator
    #: The `Policy` constructor's arguments as read (None when a declaration is unreadable).
    parts: Mapping[str, Any] | None = None


def check_text(
    doc: dict[str, Any], text: str, *, file: str = "<string>", declarations_lost: bool = False
) -> Checked:
    """Check a parsed TOML document (`text` is its source, for lines): shape problems and the
    model's own problems are collected together. A value the shape could not read is left out
    of the model (or replaced by a placeholder), and a model problem at a line the shape
    already reported, or about a placeholder, is dropped rather than reported twice."""
    index = _SourceIndex(text)

    def line_of(path: tuple[PathPart, ...]) -> int | None:
        return index.line_of(_toml_path(path))

    sh = _Shape()
    sh.declarations_bad = declarations_lost  # (lint left a line of [types]/[mls] out)
    parts, placeholders = _build(doc, sh)
    shape = [Problem(msg, file=file, line=index.line_of(path)) for msg, path in sh.problems]
    if sh.declarations_bad:
        return Checked(None, tuple(_sorted(shape)), line_of)  # no parts: nothing to analyse
    try:
        policy = Policy(**parts)
    except PolicyError as e:
        seen = {p.line for p in shape if p.line is not None}
        model = [
            p.located(file, line_of(p.path))
            for p in e.problems
            if not (p.path and p.path[0] in placeholders)
        ]
        model = [p for p in model if p.line is None or p.line not in seen]
        return Checked(None, tuple(_sorted(shape + model)), line_of, parts)
    if shape:
        return Checked(None, tuple(_sorted(shape)), line_of, parts)
    return Checked(policy, (), line_of, parts)


def loads_checked(text: str, *, file: str = "<string>") -> Checked:
    """`check_text` of TOML text that holds a policy; else `PolicyError` (file, line,
    message) listing every problem: a syntax error alone (tomllib stops there), else every
    shape and model problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, text, file) from None
    except RecursionError:
        raise nested_too_deeply(file) from None
    checked = check_text(doc, text, file=file)
    if checked.policy is None:
        raise PolicyError(checked.problems)
    return checked


def loads(text: str, *, file: str = "<string>") -> Policy:
    """Load a policy from TOML text (`loads_checked`'s errors)."""
    policy = loads_checked(text, file=file).policy
    assert policy is not None
    return policy


def load(path: str | Path) -> Policy:
    """Load a policy file (UTF-8 TOML)."""
    p = Path(path)
    data = read_bounded(p, POLICY_MAX_BYTES, "policy")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError.single(
            f"not UTF-8: byte 0x{data[e.start]:02x} cannot be decoded", file=str(p), line=line
        ) from None
    return loads(text, file=str(p))


def _sorted(problems: Any) -> list[Problem]:
    probs = list(problems)
    return sorted(probs, key=lambda q: (q.line is None, q.line or 0))


# --------------------------------------------------------------------------- dump


def _q(s: str) -> str:
    """A TOML basic string (names hold no control characters, see model.name_problem)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _qlist(items: list[str]) -> str:
    return "[" + ", ".join(_q(x) for x in items) + "]"


def dumps(policy: Policy) -> str:
    """The policy as TOML in this format; `loads(dumps(p)) == p`."""
    ste_order = {t: i for i, t in enumerate(policy.ste_types)}
    cw_order = {t: i for i, t in enumerate(policy.cw_types)}
    cat_order = {c: i for i, c in enumerate(policy.mls_categories)}

    def ordered(items: frozenset[str], order: Mapping[str, int]) -> list[str]:
        return sorted(items, key=lambda x: (order.get(x, len(order)), x))

    out = [
        "# shyped policy (native TOML format, see docs/policy.md)",
        "[policy]",
        f"name = {_q(policy.name)}",
        f"version = {_q(str(policy.version))}",
        f"bootstrap = {_q(policy.bootstrap)}",
    ]
    if policy.from_policy is not None:
        fp = policy.from_policy
        out.append(f"from = {{ name = {_q(fp.name)}, version = {_q(str(fp.version))} }}")
    d = policy.defaults
    out += [
        "",
        "[defaults]",
        f"unlabelled_domain = {_q(d.unlabelled_domain or DENY)}",
        f"unlabelled_resource = {_q(d.unlabelled_resource or DENY)}",
        "",
        "[types]",
        f"ste = {_qlist(list(policy.ste_types))}",
        f"cw = {_qlist(list(policy.cw_types))}",
    ]
    if policy.mls_levels or policy.mls_categories:
        out += [
            "",
            "[mls]",
            f"levels = {_qlist(list(policy.mls_levels))}",
            f"categories = {_qlist(list(policy.mls_categories))}",
        ]
    for cs in policy.conflict_sets:
        out += ["", "[[conflict_set]]", f"name = {_q(cs.name)}"]
        out.append(f"types = {_qlist(ordered(cs.types, cw_order))}")

    def mls_lines(m: MlsLabel | None) -> list[str]:
        if m is None:
            return []
        lines = [f"level = {_q(m.level)}"]
        if m.categories:
            lines.append(f"categories = {_qlist(ordered(m.categories, cat_order))}")
        return lines

    for lab in policy.vm_labels:
        out += ["", "[[label]]", f"name = {_q(lab.name)}"]
        if lab.from_name is not None:
            out.append(f"from = {_q(lab.from_name)}")
        out.append(f"ste = {_qlist(ordered(lab.ste_types, ste_order))}")
        out.append(f"cw = {_qlist(ordered(lab.cw_types, cw_order))}")
        out += mls_lines(lab.mls)
        if lab.dynamic:
            out.append("dynamic = true")
            if lab.shared_types:
                out.append(f"shared = {_qlist(ordered(lab.shared_types, ste_order))}")
        if not lab.quota.is_unlimited:
            out.append("[label.quota]")
            for f in QUOTA_FIELDS:
                v = getattr(lab.quota, f)
                if v is not None:
                    out.append(f"{f} = {v}")
    for r in policy.resource_labels:
        out += ["", "[[resource]]", f"name = {_q(r.name)}"]
        if r.from_name is not None:
            out.append(f"from = {_q(r.from_name)}")
        out.append(f"ste = {_q(r.ste_type)}")
        out += mls_lines(r.mls)
        if r.per_instance:
            out.append("per_instance = true")
    return "\n".join(out) + "\n"


def dump(policy: Policy, path: str | Path) -> None:
    """Write the policy to `path` as TOML."""
    Path(path).write_text(dumps(policy), encoding="utf-8")
