"""Where a problem is in the TOML text: the source index of a parsed document (line and column of
every key and value), TOML syntax errors, and model paths spelled as TOML paths."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from typing import Final

import attrs

from shyped.policy.errors import PathPart, PolicyError, Problem

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
                elif self._peek() != "]":  # invalid text (a syntax error's): stop, never loop
                    raise ValueError(f"cannot scan array at line {self.line}")
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
                elif self._peek() != "}":
                    raise ValueError(f"cannot scan inline table at line {self.line}")
        m = re.compile(r"[^,\]}#\n]*").match(self.s, self.i)
        assert m is not None
        self.i = m.end()
        return None


#: The source index under a public name, for other TOML files (the daemon's configuration).
SourceIndex = _SourceIndex

_TOML_ERR_AT = re.compile(r"^(.*?)\s*\(at line (\d+), column (\d+)\)\Z", re.S)
_TOML_ERR_END = re.compile(r"^(.*?)\s*\(at end of document\)\Z", re.S)


def nested_too_deeply(file: str) -> PolicyError:
    """tomllib recurses once per level of nesting of arrays and inline tables: a hostile file
    raises RecursionError, reported as this instead."""
    return PolicyError.single("TOML syntax: values nested too deeply", file=file)


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
    m = _TOML_ERR_AT.fullmatch(msg)
    if m:
        return PolicyError.single(
            f"TOML syntax: {m.group(1)}", file=file, line=int(m.group(2)), column=int(m.group(3))
        )
    m = _TOML_ERR_END.fullmatch(msg)
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
    "shared_types": "shared",
    "dynamic": "dynamic",
    "per_instance": "per_instance",
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
