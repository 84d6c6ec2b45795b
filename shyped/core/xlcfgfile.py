"""Reading an xl.cfg file exactly as libxl does, or refusing it.

Why: `shype-xl` and `shypectl dry-run` check a domain's name, label, disks and vifs before
``xl create`` reads the same file. If the two readings differed, the daemon would check other
items than xl creates (issue 20 #3: libxl's ``xlu__cfgl_dequote`` *drops* an escape ``\\NNN``
and its digits, so ``name="shop-\\061"`` is ``shop-`` for xl, while a Python-literal reading
makes it ``shop-1``). So this module implements libxlutil's grammar (Xen 4.17
``tools/libs/util/libxlu_cfg_l.l`` / ``libxlu_cfg_y.y``) for a strict subset and **refuses
everything outside it** with an error naming the line:

- statements ``key = value`` ended by a newline, ``;`` or the end of the file; empty
  statements; ``#`` comments up to a newline (libxl rejects a comment at the very end of a file
  without one, so do we);
- keys ``[a-z][._0-9a-z]*`` (libxl's IDENT);
- values: a quoted string (``"…"`` or ``'…'``, no newline) **without any backslash** (refused:
  libxl's escapes are lossy and differ from every other language's), a decimal number written
  canonically (``0`` or ``[1-9][0-9]*``, at most 18 digits; libxl keeps numbers as text, so
  ``0x10``, ``010`` or ``12abc`` are refused rather than guessed), or a list ``[ … ]`` of those
  (newlines and comments inside, an optional trailing comma; nested lists are refused);
- blanks are spaces and tabs only; no NUL byte (libxl aborts on one inside a string), no
  carriage return or other control character, no non-ASCII outside strings and comments;
- ``+=`` (libxl's append) is refused; a later ``key = …`` replaces an earlier one, as in libxl.

`tests/test_xlcfg_differential.py` checks this against Debian's ``libxlutil.so.4.17`` through
ctypes: for every cfg of a corpus and of hypothesis' making, either both readings agree on
every key, or this module refuses the file. The work is linear in the text (one regular
expression scan, no recursion), and callers cap the size (`shyped.fileio.boundedread`).
"""

from __future__ import annotations

import re
from typing import Final

import attrs

CfgAtom = str | int
CfgValue = str | int | list[str | int]

#: The largest number of digits of a number (libxl hands numbers to strtol as text; 18 digits
#: fit a C long, so neither side overflows).
_MAX_DIGITS: Final = 18


class XlConfigError(ValueError):
    """An xl.cfg file or device spec that xl would refuse, or that shyped will not read because
    xl could read it differently; the message says which part."""


@attrs.frozen
class Statement:
    """One ``key = value`` statement and the lines (1-based) it spans."""

    key: str
    value: CfgValue
    first_line: int
    last_line: int


_TOKEN: Final = re.compile(
    r"""
    (?P<blank>[ \t]+)
  | (?P<newline>(?:\#[^\n]*)?\n)
  | (?P<comment_eof>\#[^\n]*\Z)
  | (?P<ident>[a-z][._0-9a-z]*)
  | (?P<number>[0-9][0-9a-zA-Z_.]*)
  | (?P<string>"[^"\n]*"|'[^'\n]*')
  | (?P<open_string>["'])
  | (?P<append>\+=)
  | (?P<punct>[=;,\[\]])
    """,
    re.VERBOSE,
)
_DECIMAL: Final = re.compile(r"0|[1-9][0-9]*")
_BAD_IN_STRING: Final = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\\]")


@attrs.define
class _Tok:
    kind: str
    text: str
    line: int


def _tokens(text: str, filename: str) -> list[_Tok]:
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise XlConfigError(f"{filename}:{line}: NUL byte in the file")
    out: list[_Tok] = []
    pos, line = 0, 1
    end = len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            ch = text[pos]
            raise XlConfigError(
                f"{filename}:{line}: unexpected character {ch!r} (xl.cfg allows key = value "
                "lines with quoted strings, decimal numbers and [lists])"
            )
        kind = m.lastgroup or ""
        tok = m.group()
        if kind == "comment_eof":
            raise XlConfigError(
                f"{filename}:{line}: a comment at the end of the file needs a newline (xl "
                "refuses it)"
            )
        if kind == "open_string":
            raise XlConfigError(f"{filename}:{line}: string not closed on its line")
        if kind == "append":
            raise XlConfigError(f"{filename}:{line}: '+=' is not supported; use key = value")
        if kind == "string":
            bad = _BAD_IN_STRING.search(tok, 1, len(tok) - 1)
            if bad is not None:
                what = (
                    "a backslash (libxl drops escapes such as \\NNN with their digits; write "
                    "the character itself)"
                    if bad.group() == "\\"
                    else f"the control character {bad.group()!r}"
                )
                raise XlConfigError(f"{filename}:{line}: string {tok[:40]!r} contains {what}")
        if kind != "blank":
            out.append(_Tok(kind, tok, line))
        if kind == "newline":
            line += 1
        pos = m.end()
    return out


def _atom(tok: _Tok, filename: str) -> CfgAtom:
    if tok.kind == "string":
        return tok.text[1:-1]
    if tok.kind == "number":
        if not _DECIMAL.fullmatch(tok.text) or len(tok.text) > _MAX_DIGITS:
            raise XlConfigError(
                f"{filename}:{tok.line}: number {tok.text[:40]!r}: only plain decimal numbers "
                f"(no leading 0, at most {_MAX_DIGITS} digits) are read; quote anything else"
            )
        return int(tok.text)
    raise XlConfigError(
        f"{filename}:{tok.line}: expected a quoted string, a number or a list, not "
        f"{tok.text[:40]!r}"
    )


class _Parser:
    def __init__(self, tokens: list[_Tok], filename: str) -> None:
        self.toks = tokens
        self.i = 0
        self.filename = filename

    def peek(self) -> _Tok | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            last = self.toks[-1].line if self.toks else 1
            raise XlConfigError(f"{self.filename}:{last}: unexpected end of file")
        self.i += 1
        return tok

    def skip_newlines(self) -> None:
        while (tok := self.peek()) is not None and tok.kind == "newline":
            self.i += 1

    def error(self, tok: _Tok, what: str) -> XlConfigError:
        shown = "end of line" if tok.kind == "newline" else repr(tok.text[:40])
        return XlConfigError(f"{self.filename}:{tok.line}: expected {what}, not {shown}")

    def value(self) -> CfgValue:
        tok = self.take()
        if tok.text != "[" or tok.kind != "punct":
            return _atom(tok, self.filename)
        items: list[CfgAtom] = []
        self.skip_newlines()
        while True:
            tok = self.take()
            if tok.kind == "punct" and tok.text == "]":
                return items
            if tok.kind == "punct" and tok.text == "[":
                raise XlConfigError(f"{self.filename}:{tok.line}: nested lists are not read")
            items.append(_atom(tok, self.filename))
            self.skip_newlines()
            tok = self.take()
            if tok.kind == "punct" and tok.text == "]":
                return items
            if not (tok.kind == "punct" and tok.text == ","):
                raise self.error(tok, "',' or ']' in a list")
            self.skip_newlines()

    def statements(self) -> list[Statement]:
        out: list[Statement] = []
        while (tok := self.peek()) is not None:
            if tok.kind == "newline" or (tok.kind == "punct" and tok.text == ";"):
                self.i += 1
                continue
            if tok.kind != "ident":
                raise self.error(tok, "a key (lower-case letters, digits, '.', '_')")
            self.i += 1
            eq = self.take()
            if not (eq.kind == "punct" and eq.text == "="):
                raise self.error(eq, f"'=' after {tok.text}")
            value = self.value()
            last = self.toks[self.i - 1].line
            end = self.peek()
            if end is not None and not (
                end.kind == "newline" or (end.kind == "punct" and end.text == ";")
            ):
                raise self.error(end, f"the end of the statement {tok.text} = …")
            out.append(Statement(tok.text, value, tok.line, last))
        return out


def parse_statements(text: str, filename: str = "<xl.cfg>") -> list[Statement]:
    """Every statement of an xl.cfg text, in order (see the module doc for what is read)."""
    return _Parser(_tokens(text, filename), filename).statements()


def parse_assignments(text: str, filename: str = "<xl.cfg>") -> dict[str, CfgValue]:
    """An xl.cfg text as libxl reads it: key -> value, a later assignment winning."""
    return {s.key: s.value for s in parse_statements(text, filename)}
