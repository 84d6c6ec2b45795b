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

import re
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

#: The value of a default meaning "deny" (a label literally named "deny" cannot be a default).
DENY: Final = "deny"

_TOP_KEYS: Final = ("policy", "defaults", "types", "mls", "conflict_set", "label", "resource")
_POLICY_KEYS: Final = ("name", "version", "bootstrap", "from")
_LABEL_KEYS: Final = ("name", "ste", "cw", "level", "categories", "from", "quota")
_RESOURCE_KEYS: Final = ("name", "ste", "level", "categories", "from")


# --------------------------------------------------------------------------- source index


@attrs.frozen
class _Value:
    """A path component meaning "the array element whose value is this string"."""

    value: str


TomlPath = tuple[PathPart | _Value, ...]


class _SourceIndex:
    """Lines of tables, keys and array elements in (syntactically valid) TOML text.

    Paths are resolved like TOML does: ``[[label]]`` number i is ``("label", i)``, a following
    ``[label.quota]`` is ``("label", i, "quota")``, an array element is ``(..., key, index)``.
    Only strings are decoded (to find elements by value); other scalars are skipped.
    """

    _BARE: Final = re.compile(r"[A-Za-z0-9_-]+")
    _ESC: Final = {"b": "\b", "t": "\t", "n": "\n", "f": "\f", "r": "\r", '"': '"', "\\": "\\"}

    def __init__(self, text: str) -> None:
        self.s = text
        self.i = 0
        self.line = 1
        self.lines: dict[tuple[PathPart, ...], int] = {}
        self.elems: dict[tuple[PathPart, ...], list[tuple[str | None, int]]] = {}
        self.duplicates: list[tuple[str, int, int]] = []  # (dotted key, first line, line)
        self._aot: dict[tuple[PathPart, ...], int] = {}
        self._run()

    # ---- public

    def line_of(self, path: TomlPath) -> int | None:
        """Line of the most specific known element of `path`."""
        for n in range(len(path), 0, -1):
            head, last = path[: n - 1], path[n - 1]
            if any(isinstance(p, _Value) for p in head):
                continue
            plain = tuple(p for p in head if not isinstance(p, _Value))
            if isinstance(last, _Value):
                for value, el_line in self.elems.get(plain, ()):
                    if value == last.value:
                        return el_line
                continue
            line = self.lines.get((*plain, last))
            if line is not None:
                return line
        return None

    # ---- scanner

    def _peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.s[j] if j < len(self.s) else ""

    def _skip_space(self, newlines: bool) -> None:
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c in " \t\r":
                self.i += 1
            elif c == "\n" and newlines:
                self.line += 1
                self.i += 1
            elif c == "#" and newlines:
                while self.i < len(s) and s[self.i] != "\n":
                    self.i += 1
            else:
                return

    def _run(self) -> None:
        table: tuple[PathPart, ...] = ()
        while True:
            self._skip_space(newlines=True)
            if self.i >= len(self.s):
                return
            line = self.line
            if self._peek() == "[":
                aot = self._peek(1) == "["
                self.i += 2 if aot else 1
                keys = self._key()
                self._skip_space(newlines=False)
                self.i += 2 if aot else 1
                table = self._resolve(keys, aot)
                self._record(table, line)
            else:
                keys = self._key()
                self._skip_space(newlines=False)
                self.i += 1  # '='
                path = table + keys
                self._record(path, line)
                self._value(path)

    def _record(self, path: tuple[PathPart, ...], line: int) -> None:
        first = self.lines.get(path)
        if first is None:
            self.lines[path] = line
        else:
            self.duplicates.append((".".join(str(p) for p in path), first, line))

    def _resolve(self, keys: tuple[str, ...], aot: bool) -> tuple[PathPart, ...]:
        path: tuple[PathPart, ...] = ()
        for k in keys[:-1]:
            path = (*path, k)
            if path in self._aot:
                path = (*path, self._aot[path] - 1)
        last = (*path, keys[-1])
        if aot:
            if last in self.lines and last not in self._aot:  # [x] or x = ... then [[x]]
                self.duplicates.append((".".join(map(str, last)), self.lines[last], self.line))
            n = self._aot.get(last, 0)
            self._aot[last] = n + 1
            self.lines.setdefault(last, self.line)
            return (*last, n)
        if last in self._aot:  # [[x]] then [x]
            self.duplicates.append((".".join(map(str, last)), self.lines[last], self.line))
        return last

    def _key(self) -> tuple[str, ...]:
        keys: list[str] = []
        while True:
            self._skip_space(newlines=False)
            c = self._peek()
            if c == '"':
                keys.append(self._basic_string())
            elif c == "'":
                keys.append(self._literal_string())
            else:
                m = self._BARE.match(self.s, self.i)
                if m is None:
                    raise ValueError(f"cannot scan key at line {self.line}")
                keys.append(m.group())
                self.i = m.end()
            self._skip_space(newlines=False)
            if self._peek() != ".":
                return tuple(keys)
            self.i += 1

    def _basic_string(self) -> str:
        self.i += 1
        out: list[str] = []
        s = self.s
        while self.i < len(s):
            c = s[self.i]
            if c == '"':
                self.i += 1
                return "".join(out)
            if c == "\\":
                e = self._peek(1)
                if e in "uU":
                    n = 4 if e == "u" else 8
                    out.append(chr(int(s[self.i + 2 : self.i + 2 + n], 16)))
                    self.i += 2 + n
                    continue
                out.append(self._ESC.get(e, e))
                self.i += 2
                continue
            if c == "\n":
                raise ValueError(f"newline in string at line {self.line}")
            out.append(c)
            self.i += 1
        raise ValueError("unterminated string")

    def _literal_string(self) -> str:
        end = self.s.index("'", self.i + 1)
        value = self.s[self.i + 1 : end]
        self.i = end + 1
        return value

    def _multiline(self, delim: str) -> None:
        self.i += 3
        s = self.s
        while self.i < len(s):
            if s.startswith(delim, self.i):
                self.i += 3
                while self._peek() == delim[0]:  # up to two quotes may close the content
                    self.i += 1
                return
            if delim == '"""' and s[self.i] == "\\":
                self.i += 1
            if self.i < len(s) and s[self.i] == "\n":
                self.line += 1
            self.i += 1

    def _value(self, path: tuple[PathPart, ...]) -> str | None:
        self._skip_space(newlines=False)
        c = self._peek()
        if self.s.startswith('"""', self.i) or self.s.startswith("'''", self.i):
            self._multiline(self.s[self.i : self.i + 3])
            return None
        if c == '"':
            return self._basic_string()
        if c == "'":
            return self._literal_string()
        if c == "[":
            self.i += 1
            elems = self.elems.setdefault(path, [])
            idx = 0
            while True:
                self._skip_space(newlines=True)
                if self._peek() in ("]", ""):
                    self.i += 1
                    return None
                line = self.line
                value = self._value((*path, idx))
                elems.append((value, line))
                self.lines.setdefault((*path, idx), line)
                idx += 1
                self._skip_space(newlines=True)
                if self._peek() == ",":
                    self.i += 1
        if c == "{":
            self.i += 1
            while True:
                self._skip_space(newlines=False)
                if self._peek() in ("}", ""):
                    self.i += 1
                    return None
                line = self.line
                sub = path + self._key()
                self._skip_space(newlines=False)
                self.i += 1  # '='
                self._record(sub, line)
                self._value(sub)
                self._skip_space(newlines=False)
                if self._peek() == ",":
                    self.i += 1
        m = re.compile(r"[^,\]}#\n]*").match(self.s, self.i)
        assert m is not None
        self.i = m.end()
        return None


_TOML_ERR_AT = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)$", re.S)
_TOML_ERR_END = re.compile(r"^(.*?)\s*\(at end of document\)$", re.S)


def _syntax_error(e: tomllib.TOMLDecodeError, text: str, file: str) -> PolicyError:
    msg = str(e)
    # tomllib reports keys/tables defined twice vaguely (often "at end of document"): when the
    # scan finds such a redefinition, name it and both of its lines instead.
    try:
        dups = _SourceIndex(text).duplicates
    except (ValueError, IndexError):
        dups = []
    if dups:
        return PolicyError(
            Problem(f"{key!r} is defined twice (first at line {first})", file=file, line=line)
            for key, first, line in dups
        )
    m = _TOML_ERR_AT.match(msg)
    if m:
        return PolicyError.single(
            f"TOML syntax: {m.group(1)}", file=file, line=int(m.group(2)), column=int(m.group(3))
        )
    m = _TOML_ERR_END.match(msg)
    body = m.group(1) if m else msg
    return PolicyError.single(
        f"TOML syntax: {body} (at end of document)", file=file, line=text.count("\n") + 1
    )


# --------------------------------------------------------------------------- model path -> TOML

_LABEL_FIELDS: Final[Mapping[str, str]] = {
    "name": "name",
    "ste_types": "ste",
    "ste_type": "ste",
    "cw_types": "cw",
    "from_name": "from",
    "quota": "quota",
}


def _toml_path(path: tuple[PathPart, ...]) -> TomlPath:
    """Where a model `Problem.path` lives in this format."""
    if not path:
        return ()
    head, rest = path[0], path[1:]
    simple = {
        "name": ("policy", "name"),
        "version": ("policy", "version"),
        "bootstrap": ("policy", "bootstrap"),
        "from_policy": ("policy", "from"),
        "ste_types": ("types", "ste"),
        "cw_types": ("types", "cw"),
        "mls_levels": ("mls", "levels"),
        "mls_categories": ("mls", "categories"),
        "defaults": ("defaults",),
    }
    if head in simple:
        return simple[str(head)] + rest
    table = {"conflict_sets": "conflict_set", "vm_labels": "label", "resource_labels": "resource"}
    if head not in table or not rest:
        return ()
    out: list[PathPart | _Value] = [table[str(head)], rest[0]]
    tail = list(rest[1:])
    if tail[:1] == ["mls"]:
        tail = tail[1:]  # level / categories sit directly in the label table
    if tail:
        field = str(tail[0])
        out.append(_LABEL_FIELDS.get(field, field))
        if len(tail) > 1:
            value = tail[1]
            out.append(_Value(value) if isinstance(value, str) and field != "quota" else value)
    return tuple(out)


# --------------------------------------------------------------------------- shape checks


class _Shape:
    """Collects shape problems of the parsed TOML (with TOML paths) and reads typed values."""

    def __init__(self) -> None:
        self.problems: list[tuple[str, TomlPath]] = []

    def bad(self, message: str, *path: PathPart | _Value) -> None:
        self.problems.append((message, tuple(path)))

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
                self.bad(f"unknown key {k!r} in {what} (allowed: {', '.join(allowed)})", *path, k)

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


def _build(doc: dict[str, Any], sh: _Shape) -> Callable[[], Policy] | None:
    """Check the document's shape; return a thunk building the Policy, or None on problems."""
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
        sh.keys(t, _LABEL_KEYS, f"label #{i + 1}", "label", i)
        lname = sh.string(t, "name", f"label #{i + 1}", "label", i, required=True) or ""
        what = f"label {lname!r}"
        labels.append(
            VmLabel(
                lname,
                sh.strings(t, "ste", what, "label", i),
                sh.strings(t, "cw", what, "label", i),
                _mls(sh, t, what, "label", i),
                _quota(sh, t["quota"], what, "label", i) if "quota" in t else Quota(),
                sh.string(t, "from", what, "label", i),
            )
        )

    resources: list[ResourceLabel] = []
    for i, t in enumerate(sh.tables(doc, "resource")):
        sh.keys(t, _RESOURCE_KEYS, f"resource #{i + 1}", "resource", i)
        rname = sh.string(t, "name", f"resource #{i + 1}", "resource", i, required=True) or ""
        what = f"resource {rname!r}"
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
            )
        )

    if sh.problems or name is None or version is None or bootstrap is None:
        return None
    return lambda: Policy(
        name=name,
        version=version,
        bootstrap=bootstrap,
        ste_types=ste_types,
        cw_types=cw_types,
        conflict_sets=csets,
        vm_labels=labels,
        resource_labels=resources,
        mls_levels=levels,
        mls_categories=categories,
        defaults=defaults,
        from_policy=from_policy,
    )


# --------------------------------------------------------------------------- load


def loads(text: str, *, file: str = "<string>") -> Policy:
    """Load a policy from TOML text; raise `PolicyError` (file, line, message) on any problem."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _syntax_error(e, text, file) from None
    index = _SourceIndex(text)
    sh = _Shape()
    build = _build(doc, sh)
    if build is None:
        raise PolicyError(
            _sorted(Problem(msg, file=file, line=index.line_of(path)) for msg, path in sh.problems)
        )
    try:
        return build()
    except PolicyError as e:
        raise PolicyError(
            _sorted(p.located(file, index.line_of(_toml_path(p.path))) for p in e.problems)
        ) from None


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
    return "\n".join(out) + "\n"


def dump(policy: Policy, path: str | Path) -> None:
    """Write the policy to `path` as TOML."""
    Path(path).write_text(dumps(policy), encoding="utf-8")
