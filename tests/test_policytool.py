"""The offline policy tool (`shypectl policy lint/analyse/can/graph/convert/diff/check-labels`)
as an operator runs it: command -> output and exit status, no daemon."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_helpers import policies

from shyped.cli.shypectl import run
from shyped.policy.errors import PolicyError
from shyped.policy.model import Policy
from shyped.service.policyload import load_policy

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "conf" / "policies" / "hosting.toml"

# Every kind of problem lint must find, each marked with its code on its line.
BROKEN = """\
[policy]
name = "lint.demo"
version = "1.0"
bootstrap = "dom0"

[types]
ste = ["sys", "web", "lonely"]
cw = ["sys", "a", "b", "c", "d"]

[[conflict_set]]
name = "dom0-vs-a"
types = ["sys", "a"]

[[conflict_set]]
name = "sleepy"                 # inert-conflict-set
types = ["c", "d"]

[[label]]
name = "dom0"
ste = ["sys", "web"]
cw = ["sys"]

[[label]]
name = "web"
ste = ["web"]
cw = ["b"]
level = "high                   # syntax
[[label]]
name = "banned"                 # never-admissible
ste = ["web"]
cw = ["a"]

[[label]]
name = "silent"                 # mute
cw = ["b"]

[[label]]
name = "typo"
ste = ["wbe"]                   # unknown-type
cw = ["b"]

[[resource]]
name = "orphan-disk"            # unusable-resource
ste = "lonely"
"""


def line_of(text: str, mark: str) -> int:
    (n,) = [i for i, line in enumerate(text.splitlines(), 1) if line.endswith(f"# {mark}")]
    return n


def ctl(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(args), out, err)
    return code, out.getvalue(), err.getvalue()


def test_lint_finds_every_problem_in_one_run_each_at_its_line(tmp_path: Path) -> None:
    f = tmp_path / "broken.toml"
    f.write_text(BROKEN)
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 1, out
    expect = {
        "syntax": "error: TOML syntax",
        "unknown-type": "error: VM label 'typo' names unknown STE type 'wbe'",
        "never-admissible": "warning: VM label 'banned' is never admissible",
        "mute": "warning: VM label 'silent' is mute",
        "unusable-resource": "warning: resource label 'orphan-disk' is unusable",
        "inert-conflict-set": "warning: conflict set 'sleepy' can never block anything",
    }
    for mark, text in expect.items():
        line = line_of(BROKEN, mark)
        # the name line of a label is reported; "unknown type" is at the ste line itself
        assert any(s.startswith(f"{f}:{line}:") or s.startswith(f"{f}:{line}: ") for s in
                   out.splitlines() if text in s), (mark, out)  # fmt: skip
    assert (
        f"note: syntax errors: the other checks ran without line(s) {line_of(BROKEN, 'syntax')}"
        in out
    )

    # --json: the same findings, machine-readable
    code, out, _ = ctl("--json", "policy", "lint", str(f))
    doc = json.loads(out)
    assert code == 1 and doc["failed"] and doc["errors"] == 2
    codes = {(x["code"], x["line"]) for x in doc["findings"]}
    assert ("never-admissible", line_of(BROKEN, "never-admissible")) in codes
    assert ("invalid", line_of(BROKEN, "unknown-type")) in codes


def test_lint_semantic_set_on_a_syntactically_valid_file(tmp_path: Path) -> None:
    text = BROKEN.replace('level = "high ', 'level = "high"')
    text = text.replace('cw = ["b"]\nlevel', "# level").replace('level = "high"', "")
    f = tmp_path / "p.toml"
    f.write_text(text)
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 1 and "syntax" not in out and "1 error(s), 7 warning(s)" in out, out
    # without the unknown type only warnings are left: exit 0, --strict makes them fail
    f.write_text(text.replace('"wbe"', '"web"'))
    assert ctl("policy", "lint", str(f))[0] == 0
    assert ctl("policy", "lint", "--strict", str(f))[0] == 1
    code, out, _ = ctl("policy", "lint", "--strict", str(EXAMPLE))
    assert code == 0 and "0 error(s), 0 warning(s)" in out
    assert ctl("policy", "lint", str(tmp_path / "missing.toml"))[0] == 2


def test_lint_acm_xml_reports_lines(tmp_path: Path) -> None:
    from shyped.policy import acm_xml, toml_format

    policy = toml_format.loads(BROKEN.replace('level = "high ', "").replace('"wbe"', '"web"'))
    xml = acm_xml.dumps(policy).decode()
    f = tmp_path / "p.xml"
    f.write_text(xml)
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 0 and "[never-admissible]" in out
    banned = next(i for i, s in enumerate(xml.splitlines(), 1) if ">banned<" in s)
    assert f"{f}:{banned}: warning: VM label 'banned'" in out
    # an unknown type in the XML: an error at its line, and the warnings still come
    lines = xml.splitlines()
    typo = next(i for i, s in enumerate(lines, 1) if ">typo<" in s)
    ste = next(i for i in range(typo, len(lines)) if "<Type>web</Type>" in lines[i]) + 1
    lines[ste - 1] = lines[ste - 1].replace(">web<", ">wbe<")
    f.write_text("\n".join(lines))
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 1 and f"{f}:{ste}: error: VM label 'typo' names unknown STE type 'wbe'" in out
    assert f"{f}:{banned}: warning: VM label 'banned' is never admissible" in out
    f.write_text(xml.replace("</PolicyHeader>", "</PolicyHeadr>"))
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 1 and "not well-formed" in out


def test_analyse_and_can() -> None:
    code, out, _ = ctl("policy", "analyse", str(EXAMPLE))
    assert code == 0 and "never together (Chinese Wall):" in out
    assert "bank-a-batch / bank-b-web  [banks]" in out
    code, out, _ = ctl("policy", "can", str(EXAMPLE), "bank-a-web", "bank-a-batch")
    assert code == 0 and out.startswith("yes: ") and "share STE type 'bank-a'" in out
    code, out, _ = ctl("policy", "can", str(EXAMPLE), "bank-a-web", "bank-b-web")
    assert code == 0 and out.startswith("yes, indirectly: ") and "-> dom0 ->" in out
    code, _, err = ctl("policy", "can", str(EXAMPLE), "bank-a-web", "shopp")
    assert code == 5 and "did you mean 'shop'?" in err
    code, out, _ = ctl("--json", "policy", "analyse", str(EXAMPLE))
    assert code == 0 and ["bank-a-web", "bank-b-web"] in [
        x["labels"] for x in json.loads(out)["never_together"]
    ]


def test_can_says_no_with_the_reason(tmp_path: Path) -> None:
    f = tmp_path / "p.toml"
    f.write_text(BROKEN.replace('level = "high ', "").replace('"wbe"', '"web"'))
    code, out, _ = ctl("policy", "can", str(f), "web", "banned")
    assert code == 1 and out.startswith("no: 'banned' is never admissible"), out
    code, out, _ = ctl("policy", "can", str(f), "silent", "web")
    assert code == 1 and "share no STE type" in out and "no chain of labels" in out, out


def test_graph_dot_svg_and_missing_dot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, out, _ = ctl("policy", "graph", str(EXAMPLE))
    assert code == 0 and out.startswith("graph policy {")
    if shutil.which("dot"):
        svg = tmp_path / "p.svg"
        assert ctl("policy", "graph", str(EXAMPLE), "-o", str(svg))[0] == 0
        assert b"<svg" in svg.read_bytes()
    monkeypatch.setattr(shutil, "which", lambda _: None)
    code, _, err = ctl("policy", "graph", str(EXAMPLE), "--svg")
    assert code == 2 and "apt-get install graphviz" in err


def test_convert_both_ways_and_refusals(tmp_path: Path) -> None:
    from shyped.policy import toml_format

    code, _, err = ctl("policy", "convert", str(EXAMPLE))
    assert code == 1 and "cannot be written as acm-xml" in err
    mls = [i for i, s in enumerate(EXAMPLE.read_text().splitlines(), 1) if s.startswith("levels")]
    assert f"{EXAMPLE}:{mls[0]}: ACM XML cannot express this: ACM XML has no MLS" in err
    plain = tmp_path / "plain.toml"
    plain.write_text(BROKEN.replace('level = "high ', "").replace('"wbe"', '"web"'))
    xml = tmp_path / "plain.xml"
    assert ctl("policy", "convert", str(plain), "-o", str(xml))[0] == 0
    code, out, _ = ctl("policy", "convert", str(xml))
    assert code == 0 and toml_format.loads(out) == toml_format.loads(plain.read_text())
    dated = tmp_path / "dated.xml"
    dated.write_text(xml.read_text().replace("<Version>", "<Date>2008-01-01</Date><Version>"))
    code, _, err = ctl("policy", "convert", str(dated))
    assert code == 1 and "<Date>" in err and "--drop-header" in err
    assert ctl("policy", "convert", "--drop-header", str(dated))[0] == 0


def test_diff_two_files_added_removed_renamed(tmp_path: Path) -> None:
    old, new = tmp_path / "old.toml", tmp_path / "new.toml"
    text = EXAMPLE.read_text()
    old.write_text(text)
    changed = (
        text.replace('version = "1.0"', 'version = "1.1"')
        .replace('name = "shop"\n', 'name = "webshop"\nfrom = "shop"\n')
        .replace('name = "eth0"', 'name = "nic0"')
        .replace('name = "bank-a-batch"\nste = ["bank-a"]', 'name = "bank-a-batch"\nste = []')
    )
    new.write_text(changed)
    code, out, _ = ctl("policy", "diff", str(old), str(new))
    assert code == 1
    assert "~ policy version: 1.0 -> 1.1" in out
    assert "> VM label shop -> webshop: from=" in out
    assert "? resource label eth0 -> nic0: same content" in out
    assert "~ VM label bank-a-batch: ste -bank-a" in out
    assert ctl("policy", "diff", str(old), str(old))[0] == 0


def test_check_labels_against_a_policy(tmp_path: Path) -> None:
    store = tmp_path / "labels.json"
    text = """{
  "version": 1,
  "domains": {
    "uuid": {"6e1c0b7c-0a33-4bd6-9a4b-d1a4c6f1b2a1": "bank-a-webb"},
    "names": {"x": "shop"}
  },
  "resources": {
    "file:/srv/a.img": "bank-a-disk",
    "relative.img": "shop-disk"
  }
}
"""
    store.write_text(text)
    code, out, _ = ctl("policy", "check-labels", str(EXAMPLE), str(store))
    assert code == 1, out
    assert f"{store}:4: warning: domain 6e1c0b7c" in out and "did you mean 'bank-a-web'?" in out
    assert f"{store}:5: unknown key 'domains.names' (did you mean 'name'?)" in out
    assert f"{store}:9: invalid resource 'relative.img'" in out
    store.write_text(text.replace('"names"', '"name"').replace('"relative.img"', '"/srv/r"'))
    code, out, _ = ctl("policy", "check-labels", str(EXAMPLE), str(store))
    assert code == 0 and "0 error(s), 1 warning(s)" in out
    assert ctl("policy", "check-labels", "--strict", str(EXAMPLE), str(store))[0] == 1


@settings(max_examples=40, deadline=None)
@given(policies())
def test_lint_of_a_valid_policy_reports_exactly_the_analysis(policy: Policy) -> None:
    """No errors on a valid policy, and one warning per dead item the analysis names, each
    at the line of that item's name (checked by re-reading the line)."""
    from shyped.policy.analysis import analyse
    from shyped.policy.lint import lint_toml
    from shyped.policy.toml_format import dumps

    text = dumps(policy)
    report = lint_toml(text, "p.toml")
    assert report.errors == 0 and report.policy == policy
    a = analyse(policy)
    lines = text.splitlines()
    expected_names = {
        "never-admissible": a.never_admitted,
        "mute": a.mute,
        "unusable-resource": a.unusable_resources,
        "inert-conflict-set": a.inert_conflict_sets,
    }
    for code, names in expected_names.items():
        found = [f for f in report.findings if f.code == code]
        assert len(found) == len(names), (code, found, names)
        for f in found:
            assert f.line is not None and lines[f.line - 1].startswith("name = ")
            assert any(f'name = "{n}"' == lines[f.line - 1] for n in names)
    assert sum(f.code == "unused-type" for f in report.findings) == len(a.unused_ste_types) + len(
        a.unused_cw_types
    )


def test_lint_recovers_an_unclosed_array_at_the_line_that_opened_it(tmp_path: Path) -> None:
    text = EXAMPLE.read_text()
    opened = 'ste = ["net-infra", "bank-a", "bank-b", "web"]'  # netdom's types
    assert text.count(opened) == 1
    f = tmp_path / "p.toml"
    f.write_text(text.replace(opened, opened[:-1]))
    line = line_no(text, opened)
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 1
    assert f"{f}:{line}: error: TOML syntax: Unclosed array (noticed at line {line + 1})" in out
    assert "1 error(s)" in out, out  # no cascade over the rest of the file
    # a declaration left out: the uses of what it declares are not reported one by one
    decl = 'ste = ["system", "net-infra", "bank-a", "bank-b", "web"]'
    f.write_text(text.replace(f"[types]\n{decl}", f"[types]\n{decl[:-1]}"))
    code, out, _ = ctl("policy", "lint", str(f))
    assert code == 1 and "[declarations]" in out and "unknown STE type" not in out, out


def line_no(text: str, needle: str) -> int:
    return next(i for i, s in enumerate(text.splitlines(), 1) if needle in s)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from([*"[]{}\"'=,\n#. a1-", ""])),
        min_size=1,
        max_size=4,
    )
)
def test_lint_reports_and_never_raises_on_a_damaged_policy(edits: list[tuple[int, str]]) -> None:
    """Any damage to a policy gives findings (or a clean report), never an exception."""
    from shyped.policy.lint import lint

    text = EXAMPLE.read_text()
    for pos, ch in edits:
        i = pos % len(text)
        text = text[:i] + ch + text[i + 1 :]  # replace (or delete, with "")
    report = lint(text.encode(), "p.toml")
    assert all(f.line is None or f.line >= 1 for f in report.findings)
    if report.errors == 0:
        assert report.policy is not None


@pytest.mark.parametrize("verb", ["lint", "analyse", "convert", "check-labels"])
def test_a_policy_nested_too_deeply_is_a_clear_error_not_a_crash(tmp_path: Path, verb: str) -> None:
    """A hostile policy file (root runs the offline tool on it): tomllib recurses per level
    of nesting and raised RecursionError, reported as an internal error (exit 70)."""
    f = tmp_path / "deep.toml"
    store = str(tmp_path / "labels.json")
    args = {"convert": [str(f), "--to", "acm-xml"], "check-labels": [str(f), store]}
    f.write_text(EXAMPLE.read_text() + "\nx = [\n")
    syntax_error, _, _ = ctl("policy", verb, *args.get(verb, [str(f)]))
    f.write_text(EXAMPLE.read_text() + "\nx = " + "[" * 50_000 + "]" * 50_000 + "\n")
    code, out, err = ctl("policy", verb, *args.get(verb, [str(f)]))
    assert code == syntax_error != 70, (code, out, err)
    assert f"{f}:" in out + err and "nested too deeply" in out + err, (out, err)
    with pytest.raises(PolicyError, match="nested too deeply"):
        load_policy(f)
