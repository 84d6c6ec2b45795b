"""The native TOML policy format: loading, precise errors (file, line, message), round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from policy_helpers import policies

from shyped.policy import toml_format
from shyped.policy.errors import PolicyError
from shyped.policy.model import MlsLabel, Policy, Quota

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "conf" / "policies").glob("*.toml"))

BASE = """\
[policy]
name = "t.toml"
version = "1.2"
bootstrap = "dom0"

[defaults]
unlabelled_domain = "deny"
unlabelled_resource = "deny"

[types]
ste = ["sys", "a", "b"]
cw = ["sys", "a", "b"]

[mls]
levels = ["low", "high"]
categories = ["pay"]

[[conflict_set]]
name = "banks"
types = ["a", "b"]

[[label]]
name = "dom0"
ste = ["sys", "a", "b"]
cw = ["sys"]

[[label]]
name = "bank-a"
ste = ["a"]
cw = ["a"]
level = "high"
categories = ["pay"]
[label.quota]
max_domains = 2

[[resource]]
name = "disk-a"
ste = "a"
level = "high"
"""


def marked_line(text: str) -> int:
    """1-based line of the `# <-` marker: where the error must point."""
    for n, line in enumerate(text.splitlines(), 1):
        if "# <-" in line:
            return n
    raise AssertionError("no marker in test text")


def load_error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        toml_format.loads(text, file="pol.toml")
    return e.value


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


def test_base_and_examples_load() -> None:
    p = toml_format.loads(BASE)
    assert p.bootstrap_label.name == "dom0"
    bank = p.vm_label("bank-a")
    assert bank is not None and bank.mls == MlsLabel("high", ["pay"])
    assert bank.quota == Quota(max_domains=2)
    assert p.defaults.unlabelled_domain is None
    assert EXAMPLES, "conf/policies has no example policy"
    for path in EXAMPLES:
        pol = toml_format.load(path)
        assert toml_format.loads(toml_format.dumps(pol)) == pol


def test_hosting_example_has_the_demo_ingredients() -> None:
    p = toml_format.load(REPO / "conf" / "policies" / "hosting.toml")
    assert p.bootstrap == "dom0"
    assert any({"bank-a", "bank-b"} <= cs.types for cs in p.conflict_sets)
    assert p.resource_label("xenbr-bank-a") is not None
    assert p.mls_levels


# Each case: (old, new) edit of BASE with a `# <-` marker on the line the error must name, and
# the exact message.
CASES = {
    "unknown STE type in a label": (
        'ste = ["a"]\ncw = ["a"]',
        'ste = ["a", "zz"]  # <-\ncw = ["a"]',
        "VM label 'bank-a' names unknown STE type 'zz'",
    ),
    "unknown CW type in a label": (
        'cw = ["sys"]',
        'cw = ["sys", "qq"]  # <-',
        "VM label 'dom0' names unknown Chinese Wall type 'qq'",
    ),
    "duplicate label": (
        '[[resource]]\nname = "disk-a"',
        '[[label]]\nname = "dom0"  # <-\n\n[[resource]]\nname = "disk-a"',
        "duplicate VM label 'dom0'",
    ),
    "duplicate resource label": (
        'ste = "a"\nlevel = "high"\n',
        'ste = "a"\nlevel = "high"\n\n[[resource]]\nname = "disk-a"  # <-\nste = "b"\n',
        "duplicate resource label 'disk-a'",
    ),
    "colon in a label name": (
        'name = "bank-a"',
        'name = "bank:a"  # <-',
        "VM label name 'bank:a' contains ':' (reserved as the label string separator)",
    ),
    "colon in the policy name": (
        'name = "t.toml"',
        'name = "t:toml"  # <-',
        "policy name 't:toml' contains ':' (reserved as the label string separator)",
    ),
    "colon in a type name": (
        'cw = ["sys", "a", "b"]',
        'cw = ["sys", "a", "b", "x:y"]  # <-',
        "Chinese Wall type 'x:y' contains ':' (reserved as the label string separator)",
    ),
    "bootstrap label missing": (
        '[policy]\nname = "t.toml"\nversion = "1.2"\nbootstrap = "dom0"',
        '[policy]  # <-\nname = "t.toml"\nversion = "1.2"',
        'bootstrap label missing: [policy] needs bootstrap = "<dom0\'s VM label>"',
    ),
    "bootstrap label unknown": (
        'bootstrap = "dom0"',
        'bootstrap = "Domain-0"  # <-',
        "bootstrap label 'Domain-0' is not a VM label of the policy",
    ),
    "conflict set naming an unknown type": (
        'types = ["a", "b"]',
        'types = ["a", "b", "c"]  # <-',
        "conflict set 'banks' names unknown Chinese Wall type 'c'",
    ),
    "label whose own CW types conflict": (
        'ste = ["a"]\ncw = ["a"]',
        'ste = ["a"]\ncw = ["a", "b"]  # <-',
        "VM label 'bank-a' has Chinese Wall types 'a', 'b' that conflict with each other "
        "in conflict set 'banks'",
    ),
    "duplicate conflict set": (
        '[[label]]\nname = "dom0"',
        '[[conflict_set]]\nname = "banks"  # <-\ntypes = ["a", "b"]\n\n[[label]]\nname = "dom0"',
        "duplicate conflict set 'banks'",
    ),
    "duplicate type": (
        'cw = ["sys", "a", "b"]',
        'cw = ["sys", "a", "b", "a"]  # <-',
        "[types]: 'cw' lists 'a' twice",
    ),
    "unknown key (typo)": (
        'cw = ["sys"]',
        'cw = ["sys"]\ncw_types = ["sys"]  # <-',
        "unknown key 'cw_types' in label 'dom0' (allowed: name, ste, cw, level, categories, from, "
        "quota, dynamic, shared)",
    ),
    "wrong value type": (
        'ste = ["a"]\ncw = ["a"]',
        'ste = "a"  # <-\ncw = ["a"]',
        "label 'bank-a': 'ste' must be a list of strings, not a string",
    ),
    "version as a float": (
        'version = "1.2"',
        "version = 1.2  # <-",
        "[policy]: 'version' must be a string like \"1.0\", not a float",
    ),
    "malformed version": (
        'version = "1.2"',
        'version = "v1"  # <-',
        "version 'v1' is not of the form <major>.<minor> (e.g. '1.0')",
    ),
    "negative quota": (
        "max_domains = 2",
        "max_domains = -1  # <-",
        "label 'bank-a' quota max_domains must be a non-negative integer, not -1",
    ),
    "unknown quota field": (
        "max_domains = 2",
        "max_domains = 2\nmax_vcpu = 3  # <-",
        "unknown key 'max_vcpu' in label 'bank-a' quota (did you mean 'max_vcpus'? allowed: "
        "max_domains, max_memory_mib, "
        "max_vcpus, max_devices, max_vchans, max_event_channels, max_grant_refs, "
        "max_label_memory_mib, max_cpu_percent)",
    ),
    "resource with several STE types": (
        'ste = "a"\nlevel = "high"',
        'ste = ["a", "b"]  # <-\nlevel = "high"',
        "resource 'disk-a': 'ste' must be one STE type (a string), not a list",
    ),
    "unknown MLS level": (
        'level = "high"\ncategories = ["pay"]',
        'level = "top"  # <-\ncategories = ["pay"]',
        "VM label 'bank-a' has unknown MLS level 'top' (levels: low, high)",
    ),
    "unknown MLS category": (
        'level = "high"\ncategories = ["pay"]',
        'level = "high"\ncategories = ["pay", "hr"]  # <-',
        "VM label 'bank-a' has unknown MLS category 'hr'",
    ),
    "default naming an unknown label": (
        'unlabelled_domain = "deny"',
        'unlabelled_domain = "guest"  # <-',
        "default for unlabelled domains names unknown VM label 'guest'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_policy_gives_precise_error(case: str) -> None:
    old, new, message = CASES[case]
    text = edit(old, new)
    err = load_error(text)
    assert err.messages == [message]
    assert (err.file, err.line) == ("pol.toml", marked_line(text))
    assert str(err) == f"pol.toml:{marked_line(text)}: {message}"


def test_element_of_a_multi_line_array_is_located() -> None:
    text = edit(
        'ste = ["sys", "a", "b"]\ncw = ["sys"]',
        'ste = [\n  "sys",\n  "a",\n  "nope",  # <-\n  "b",\n]\ncw = ["sys"]',
    )
    err = load_error(text)
    assert err.messages == ["VM label 'dom0' names unknown STE type 'nope'"]
    assert err.line == marked_line(text)


def test_all_problems_are_reported_in_line_order() -> None:
    text = edit('bootstrap = "dom0"', 'bootstrap = "nobody"')
    text = edit('ste = ["a"]', 'ste = ["zz"]', text)
    err = load_error(text)
    assert err.messages == [
        "bootstrap label 'nobody' is not a VM label of the policy",
        "VM label 'bank-a' names unknown STE type 'zz'",
    ]
    assert [p.line for p in err.problems] == sorted(p.line or 0 for p in err.problems)


def test_toml_syntax_error_keeps_tomllib_line_and_column() -> None:
    text = edit('level = "high"\ncategories', "level = high  # <-\ncategories")
    err = load_error(text)
    assert err.line == marked_line(text)
    assert err.message.startswith("TOML syntax: ")
    assert err.problems[0].column is not None


def test_duplicate_key_is_located_at_its_second_definition() -> None:
    # tomllib reports this "at end of document"; the loader finds the line itself.
    text = edit('cw = ["sys"]', 'cw = ["sys"]\nste = ["sys"]  # <-')
    err = load_error(text)
    first = text.splitlines().index('ste = ["sys", "a", "b"]', 20) + 1
    assert err.messages == [f"'label.0.ste' is defined twice (first at line {first})"]
    assert err.line == marked_line(text)


def test_table_where_an_array_of_tables_is_expected() -> None:
    text = edit('[[label]]\nname = "dom0"', '[label]\nname = "dom0"')
    err = load_error(text)  # then [[label]] follows: TOML cannot have both
    first = text.splitlines().index("[label]") + 1
    second = text.splitlines().index("[[label]]") + 1
    assert err.messages == [f"'label' is defined twice (first at line {first})"]
    assert err.line == second
    alone = BASE.split("[[label]]")[0] + '[label]  # <-\nname = "dom0"\nste = ["sys"]\n'
    err = load_error(alone)
    assert err.messages == ["'label' must be an array of tables: write [[label]]"]
    assert err.line == marked_line(alone)


def test_missing_policy_table() -> None:
    err = load_error(BASE.split("[defaults]", 1)[1].join(["[defaults]", ""]))
    assert err.messages == ["the [policy] table (name, version, bootstrap) is missing"]


def test_load_reports_the_path_and_rejects_non_utf8(tmp_path: Path) -> None:
    bad = tmp_path / "p.toml"
    bad.write_bytes(BASE.encode().replace(b'"dom0"\n\n', b'"dom0\xff"\n\n', 1))
    with pytest.raises(PolicyError) as e:
        toml_format.load(bad)
    assert e.value.file == str(bad)
    assert e.value.line == 4
    assert "not UTF-8" in e.value.message


@settings(max_examples=150, deadline=None)
@given(policies())
def test_dump_then_load_round_trips(policy: Policy) -> None:
    assert toml_format.loads(toml_format.dumps(policy)) == policy
