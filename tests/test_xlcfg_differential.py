"""Issue 20 #3: one xl.cfg reading. shyped's parser against Debian's real libxlutil.so.4.17.

For every cfg (a corpus of tricky ones, then hypothesis' own): either shyped refuses it, or
libxl reads it without error and both agree on every key's value, and libxl holds no key that
shyped does not. Zero disagreements accepted. The historical one: ``name="shop-\\061"`` is
``shop-`` for libxl (its dequoting drops ``\\NNN`` with up to three digits) and was ``shop-1``
for shyped's Python-literal reading.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libxlutil_helpers import LibValue, load

from shyped.core.xlcfgfile import CfgValue, XlConfigError, parse_assignments

LIB = load()
pytestmark = pytest.mark.skipif(LIB is None, reason="Debian's libxlutil.so.4.17 is not installed")

_IDENT = re.compile(r"[a-z][._0-9a-z]*")


def _expected(value: CfgValue) -> LibValue:
    if isinstance(value, list):
        return [str(v).encode() for v in value]
    return str(value).encode()


def disagreement(text: str) -> str | None:
    """None if shyped refuses `text` or both read it alike; else what differs."""
    try:
        ours = parse_assignments(text, "t.cfg")
    except XlConfigError:
        return None
    assert LIB is not None
    data = text.encode("utf-8")
    keys = set(_IDENT.findall(text)) | set(ours)
    rc, theirs = LIB.read(data, keys)
    if rc != 0:
        return f"libxl refuses it (rc {rc}) but shyped read {ours!r}"
    mine = {k: _expected(v) for k, v in ours.items()}
    if mine != theirs:
        return f"shyped {mine!r} != libxl {theirs!r}"
    return None


CORPUS = [
    # the three
    'name="shop-\\061"\n',
    "disk=['format=raw,vdev=xvda,target=/srv/shop-\\0611.img']\n",
    "vif=['bridge=xenbr-\\160ublic']\n",
    # escapes of every kind
    'a="\\x41"\n',
    'a="\\n"\n',
    "a='\\''\n",
    'a="\\q"\n',
    'a="x\\\\"\n',
    'a="x\\"y"\n',
    # quotes, comments, separators
    "a='x\"y'\n",
    'a="x\'y"\n',
    'a=""\n',
    'a="x" # c\n',
    'a="x" # c',
    'a="x"#c\n',
    "#only a comment",
    "#only a comment\n",
    'a="x";b="y"\n',
    'a="x" ;; b="y"\n',
    'a="x"',
    '\n\n a = "x" \t\n',
    'a="x" "y"\n',
    'a="x" b="y"\n',
    'a="x\ny"\n',
    'a=\n"x"\n',
    'a="x"\\\n',
    # continuation lines and lists
    'a=[\n"x"\n,\n"y"\n]\n',
    'a=["x",]\n',
    'a=[ "x" , "y" , ]\n',
    "a=[,]\n",
    "a=[]\n",
    "a=[\n]\n",
    'a=[# c\n"x" # d\n]\n',
    'a=[["x"]]\n',
    'a=["x"]]\n',
    'a=["x"\n',
    'a=["x" "y"]\n',
    # numbers
    "a=0\n",
    "a=64\n",
    "a=007\n",
    "a=0x1f\n",
    "a=12abc\n",
    "a=1.5\n",
    "a=-1\n",
    "a=1_000\n",
    "a=1e5\n",
    "a=[1, 2]\n",
    "a=123456789012345678\n",
    # keys
    'A="x"\n',
    '_a="x"\n',
    'a.b_c9="x"\n',
    'a9="x"\n',
    'a.="x"\n',
    'a += "y"\n',
    'a="x"\na+="y"\n',
    'a="x"\na="y"\n',
    'a="x"\na=["y"]\n',
    "a=b\n",
    "[a]\n",
    # blanks, control characters, non-ASCII
    'a="x"\r\n',
    'a="x\ry"\n',
    'a="x"\x0c\n',
    'a="x\ty"\n',
    'a="é"\n',
    "a=é\n",
    'é="x"\n',
    '# é\na="x"\n',
    'a="\u200b"\n',
    'a="x"\x00\n',
    'a="x\x00y"\n',
    # Python that the old ast reader took
    'a="x" + "y"\n',
    'a=("x")\n',
    'a=r"x"\n',
    'a="""x"""\n',
    "a=True\n",
    'a="x"\nif 1: pass\n',
]


@pytest.mark.parametrize("text", CORPUS)
def test_corpus_agrees_with_libxl_or_is_refused(text: str) -> None:
    assert disagreement(text) is None


def test_the_escape_differential_is_refused_with_a_clear_error() -> None:
    with pytest.raises(XlConfigError, match="backslash"):
        parse_assignments('name="shop-\\061"\n', "shop.cfg")


_FRAGMENTS = [
    "name",
    "disk",
    "a",
    "a.b",
    "A",
    "_",
    "=",
    "+=",
    " = ",
    ";",
    ",",
    "[",
    "]",
    "\n",
    " ",
    "\t",
    "#c\n",
    "#",
    '"x"',
    "'y'",
    '"',
    "'",
    "\\",
    "\\061",
    "\\x41",
    "\\n",
    "0",
    "64",
    "007",
    "0x1f",
    "1.5",
    "-",
    "é",
    "\r",
    "\x0c",
    "\x00",
    '"a b,c=d"',
    "target=/srv/x.img",
    "\u200b",
]


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.one_of(
            st.sampled_from(_FRAGMENTS),
            st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=4),
        ),
        max_size=30,
    )
)
def test_generated_cfgs_agree_with_libxl_or_are_refused(parts: list[str]) -> None:
    assert disagreement("".join(parts)) is None


@settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[a-z][._0-9a-z]{0,6}", fullmatch=True),
            st.one_of(
                st.from_regex(r"\"[ !#-\[\]-~é]{0,8}\"", fullmatch=True),
                st.from_regex(r"'[ -&(-\[\]-~é]{0,8}'", fullmatch=True),
                st.from_regex(r"(0|[1-9][0-9]{0,5})", fullmatch=True),
                st.lists(st.from_regex(r"\"[ !#-\[\]-~é]{0,8}\"", fullmatch=True), max_size=3).map(
                    lambda xs: "[" + ", ".join(xs) + "]"
                ),
            ),
            st.sampled_from(["\n", ";", " # c\n", "\n\n"]),
        ),
        max_size=8,
    )
)
def test_generated_well_formed_cfgs_are_read_as_libxl_reads_them(
    stmts: list[tuple[str, str, str]],
) -> None:
    text = "".join(f"{k} = {v}{end}" for k, v, end in stmts)
    parse_assignments(text)  # well formed: shyped reads it (no refusal hides a difference)
    assert disagreement(text) is None
