"""Whole-string checks must not let a trailing newline through: in Python ``$`` matches before a
final ``\\n``, so ``re.match(r"^name$", "name\\n")`` succeeds. Every anchored pattern in shyped
ends with ``\\Z`` and whole-value checks use ``fullmatch``; these inputs are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shyped.core.xlcfg import (
    XlConfigError,
    domain_config_from_values,
    parse_access_control,
    parse_acm_label,
)
from shyped.pool.keys import PoolKeyError, check_host, check_prefix
from shyped.pool.records import HOST_RE, ID_RE, NAME_RE, SHA_RE

SHYPED = Path(__file__).resolve().parents[1] / "shyped"


@pytest.mark.parametrize(
    "call",
    [
        lambda: parse_acm_label("ACM:example.hosting:shop\n"),
        lambda: parse_acm_label("ACM:example.hosting\n:shop"),
        lambda: domain_config_from_values({"name": "web-a1\n", "memory": 128}, "web.json"),
    ],
)
def test_xl_config_values_with_a_trailing_newline_are_refused(call: object) -> None:
    with pytest.raises(XlConfigError):
        call()  # type: ignore[operator]


def test_the_same_values_without_the_newline_pass() -> None:
    assert parse_acm_label("ACM:example.hosting:shop").label == "shop"
    assert parse_access_control(["policy=example.hosting,label=shop"]).label == "shop"
    assert domain_config_from_values({"name": "web-a1", "memory": 128}, "w").name == "web-a1"


def test_pool_record_patterns_refuse_a_trailing_newline() -> None:
    for pattern, good in (
        (ID_RE, "0" * 32),
        (SHA_RE, "a" * 64),
        (NAME_RE, "shop"),
        (HOST_RE, "host-1"),
    ):
        assert pattern.fullmatch(good) and pattern.match(good)
        assert not pattern.match(good + "\n") and not pattern.fullmatch(good + "\n")
    assert check_host("host-1") == "host-1" and check_prefix("/shyped") == "/shyped"
    for bad in (lambda: check_host("host-1\n"), lambda: check_prefix("/shyped\n")):
        with pytest.raises(PoolKeyError):
            bad()


def test_no_pattern_in_shyped_is_anchored_with_a_dollar() -> None:
    """A source scan: a regex literal ending in ``$`` (before its closing quote) is a pattern
    that lets a trailing newline through wherever it is used with match or search."""
    found = [
        f"{path.relative_to(SHYPED.parent)}:{n}: {line.strip()}"
        for path in sorted(SHYPED.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"""\br["'][^"']*(?<!\\)\$["']""", line)
    ]
    assert found == []
