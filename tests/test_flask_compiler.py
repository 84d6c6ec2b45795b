"""The FLASK compiler: the compiled binary policy allows exactly the engine's channels.

Each case compiles an sHype policy with `shyped.policy.flask`, builds the binary with Xen's
policy tree, m4 and checkpolicy (`shyped.service.flaskbuild`), reads every allow rule back with
setools and compares, for every ordered pair of domain types (a type with itself included), the
permissions between them with the engine's two-way channel decision (`PolicyEngine.channel`,
the call the daemon makes for event channels, grants and vchans).
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path
from typing import Final

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shyped.cli import shypectl
from shyped.policy import acm_xml, toml_format
from shyped.policy.decisions import Hook, PolicyEngine
from shyped.policy.flask import (
    DOM0_TYPE,
    UNLABELLED_TYPE,
    compile_policy,
    encode_name,
    relabel_types,
    type_name,
)
from shyped.policy.model import Defaults, Policy
from tests.flask_helpers import (
    COMM_PAIR,
    COMM_SELF,
    XEN_SOURCE,
    build_binary,
    cache_dir,
    expected_subjects,
    needs_flask_tools,
    observed,
    read_binary,
)
from tests.policy_helpers import policies

REPO = Path(__file__).resolve().parent.parent
FIXED = [
    REPO / "conf/policies/hosting.toml",
    REPO / "tests/acm/client_v1-security_policy.xml",
    REPO / "tests/acm/test-security_policy.xml",
]


#: dom0 <-> unlabelled event channels, whatever the policy says (libxl builds them).
BOOTSTRAP_EVENTS: Final = frozenset({("channel", "dom", "event", "bind")})
#: A label's use of channels its domain got while unlabelled (before the relabel).
KEEP_CHANNELS: Final = frozenset({("dom", "channel", "event", p) for p in ("send", "status")})


def _load(path: Path) -> Policy:
    return acm_xml.load(path).policy if path.suffix == ".xml" else toml_format.load(path)


def mismatches(policy: Policy, binary: Path) -> list[str]:
    """Every way the binary's rules between domain types differ from the engine's relation."""
    engine = PolicyEngine(policy)
    read = read_binary(binary)
    subjects = expected_subjects(policy)
    got = observed(subjects, read.rules)
    bad: list[str] = []
    types = {t for t, _ in subjects}
    known = types | {f"{t}_self" for t in types - {DOM0_TYPE}}
    if read.domain_types != known:
        bad.append(
            f"domain types: extra {sorted(read.domain_types - known)}, "
            f"missing {sorted(known - read.domain_types)}"
        )
    movable = set(relabel_types(policy))
    # dom0 relabels: from unlabelled or a movable type, to any label's type (never dom0's)
    dom0 = {b: {r[3] for r in got.get((DOM0_TYPE, b), set()) if r[2] == "domain2"}
            for b, _ in subjects}  # fmt: skip
    for b, lb in subjects:
        want_from = {"relabelfrom"} if b in movable or b == UNLABELLED_TYPE else set()
        want_to = {"relabelto"} if lb is not None and b != DOM0_TYPE else set()
        seen = dom0[b] & {"relabelfrom", "relabelto"}
        if seen != want_from | want_to:
            bad.append(f"dom0 relabel of {b}: {sorted(seen)}, want {sorted(want_from | want_to)}")
    for a, la in subjects:
        for b, lb in subjects:
            if a == b == DOM0_TYPE:
                continue  # dom0 with itself: Xen's dom0.te, not the sHype policy
            decision = engine.channel(Hook.EVTCHN, la, lb)
            perms = got.get((a, b), set())
            # Bootstrap (docs/flask.md): dom0 and unlabelled domains always get event
            # channels, never grants; a label keeps the channels it got unlabelled.
            bootstrap = {a, b} == {DOM0_TYPE, UNLABELLED_TYPE}
            if a == b:
                comm = COMM_PAIR | COMM_SELF
                seen = perms & comm
                want = comm if decision.permitted else set()
                if la is not None and (vm := policy.vm_label(la)) is not None and vm.dynamic:
                    want |= COMM_SELF  # an instance with itself, always
            elif a == DOM0_TYPE:
                seen = perms & COMM_PAIR
                want = set(COMM_PAIR) if decision.permitted else set()
                if bootstrap:
                    want |= BOOTSTRAP_EVENTS
                if ("dom", "dom", "domain", "create") not in perms:
                    bad.append(f"dom0 may not create {b}")
            else:
                seen = perms
                want = set(COMM_PAIR) if decision.permitted else set()
                if bootstrap:
                    want |= BOOTSTRAP_EVENTS
                if a == UNLABELLED_TYPE and lb is not None and b != DOM0_TYPE:
                    want.add(("dom", "dom", "domain", "transition"))
                if la is not None and b == UNLABELLED_TYPE:
                    want |= KEEP_CHANNELS
                if a in movable and b in movable:  # shypectl relabel of a running domain
                    want |= KEEP_CHANNELS | {("dom", "dom", "domain", "transition")}
            if seen != want:
                bad.append(
                    f"{a} -> {b} ({la!r} -> {lb!r}, engine: {decision}): "
                    f"extra {sorted(seen - want)}, missing {sorted(want - seen)}"
                )
    return bad


def _check(policy: Policy, tmp: Path) -> None:
    binary = build_binary(compile_policy(policy), cache_dir(tmp), tmp / "policy.bin")
    assert mismatches(policy, binary) == []


# Label names as the policy model allows them: printable, no whitespace, no ':'.
_NAMES = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), blacklist_characters=":"),
    min_size=1,
    max_size=10,
)


def _renamed(policy: Policy, names: list[str]) -> Policy:
    """`policy` with its VM labels renamed to `names` (bootstrap and defaults follow)."""
    new = dict(zip((lab.name for lab in policy.vm_labels), names, strict=False))
    d = policy.defaults
    return attrs.evolve(
        policy,
        bootstrap=new[policy.bootstrap],
        vm_labels=[attrs.evolve(lab, name=new[lab.name]) for lab in policy.vm_labels],
        defaults=Defaults(
            None if d.unlabelled_domain is None else new[d.unlabelled_domain],
            d.unlabelled_resource,
        ),
    )


@needs_flask_tools
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(policy=policies(max_labels=6), names=st.lists(_NAMES, min_size=6, max_size=6, unique=True))
def test_random_policies_compile_to_exactly_the_engine_relation(
    policy: Policy, names: list[str], tmp_path: Path
) -> None:
    _check(_renamed(policy, names), tmp_path)


@needs_flask_tools
@pytest.mark.parametrize("path", FIXED, ids=lambda p: p.name)
def test_fixed_policies_compile_to_exactly_the_engine_relation(path: Path, tmp_path: Path) -> None:
    _check(_load(path), tmp_path)


_A, _B = type_name("bank-a-web"), type_name("bank-b-web")
_WRONG = {
    "comms between labels sharing no STE type": (
        f"domain_comms({_A}, {_B})\n",
        {f"{_A} -> {_B}", f"{_B} -> {_A}"},
    ),
    "an undocumented type": (
        f"declare_domain(shype_x_t)\ndomain_comms(shype_x_t, {_A})\n",
        {"domain types"},
    ),
    "grants between dom0 and unlabelled domains (bootstrap is events only)": (
        f"allow dom0_t {UNLABELLED_TYPE}:grant map_read;\n",
        {f"{DOM0_TYPE} -> {UNLABELLED_TYPE}"},
    ),
    "dom0 relabels an unlabelled domain's type into dom0's": (
        "allow dom0_t dom0_t:domain2 relabelto;\n",
        {f"dom0 relabel of {DOM0_TYPE}"},
    ),
    "one-way grant only": (
        f"allow {_A} {_B}:grant map_read;\n",
        {f"{_A} -> {_B}"},
    ),
}


@needs_flask_tools
@pytest.mark.parametrize("wrong", sorted(_WRONG))
def test_a_wrong_compiler_fails_the_equivalence_check(wrong: str, tmp_path: Path) -> None:
    """A deliberately wrong module is caught, naming the pairs it got wrong."""
    extra, culprits = _WRONG[wrong]
    policy = _load(FIXED[0])
    fp = compile_policy(policy)
    binary = build_binary(
        attrs.evolve(fp, module=fp.module + extra), cache_dir(tmp_path), tmp_path / "wrong.bin"
    )
    bad = mismatches(policy, binary)
    assert {m.split(" (")[0].split(":")[0] for m in bad} == culprits, bad


@needs_flask_tools
def test_sesearch_sees_the_hosting_channels(tmp_path: Path) -> None:
    """Debian's sesearch reads the binary: shop and netdom share 'web', the banks nothing."""
    binary = build_binary(
        compile_policy(_load(FIXED[0])), cache_dir(tmp_path), tmp_path / "policy.bin"
    )

    def grants(src: str, dst: str) -> str:
        argv = ["sesearch", "-A", "-s", type_name(src), "-t", type_name(dst), "-c", "grant"]
        return subprocess.run([*argv, str(binary)], capture_output=True, text=True).stdout

    assert "map_write" in grants("shop", "netdom")
    assert "map_write" in grants("netdom", "shop")
    assert grants("bank-a-web", "bank-b-web").strip() == ""


def test_type_names_are_injective_identifiers() -> None:
    names = ["web", "web_1", "web-1", "web_x2d1", "_unlabelled", "Ü", "a__b", "a_b_"]
    types = [type_name(n) for n in names]
    assert len(set(types)) == len(types)
    assert UNLABELLED_TYPE not in types
    assert all(t.replace("_", "").isalnum() and t.isascii() for t in types)
    assert encode_name("web-1") == "web_x2d1"
    assert encode_name("a_b") == "a__b"


@given(st.lists(_NAMES, min_size=2, max_size=2, unique=True))
def test_distinct_labels_get_distinct_types(names: list[str]) -> None:
    a, b = names
    assert type_name(a) != type_name(b)
    for t in (type_name(a), type_name(b)):
        assert t != UNLABELLED_TYPE and t.replace("_", "").isalnum() and t.isascii()


def test_compiler_is_deterministic_and_emits_no_comms_for_denied_pairs() -> None:
    policy = _load(FIXED[0])
    assert compile_policy(policy) == compile_policy(policy)
    module = compile_policy(policy).module
    a, b = type_name("bank-a-web"), type_name("bank-b-web")
    assert f"domain_comms({a}, {b})" not in module
    assert f"domain_comms({b}, {a})" not in module


# --------------------------------------------------------------------------- shypectl policy flask


def _shypectl(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = shypectl.run(["policy", "flask", *argv], out, err)
    return status, out.getvalue(), err.getvalue()


def test_cli_module_needs_no_daemon_and_no_tools(tmp_path: Path) -> None:
    out = tmp_path / "shype.te"
    status, said, _ = _shypectl(str(FIXED[0]), "--module", "-o", str(out))
    assert status == 0 and "wrote" in said
    assert out.read_text() == compile_policy(_load(FIXED[0])).module


def test_cli_refuses_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nname = 'x'\n")
    out = tmp_path / "out.bin"
    status, _, err = _shypectl(str(bad), "--module", "-o", str(out))
    assert status == 2 and "does not load" in err and not out.exists()
    status, _, err = _shypectl(str(FIXED[0]), "--xen-source", str(XEN_SOURCE))
    assert status == 2 and "needs -o" in err
    missing = tmp_path / "no-such.tar.xz"
    status, _, err = _shypectl(str(FIXED[0]), "--xen-source", str(missing), "-o", str(out))
    assert status == 3 and "not found" in err and not out.exists()
    junk = tmp_path / "junk.tar.xz"
    junk.write_bytes(b"not a tarball")
    cache = ["--cache", str(tmp_path / "cache")]
    status, _, err = _shypectl(str(FIXED[0]), "--xen-source", str(junk), *cache, "-o", str(out))
    assert status == 3 and "cannot extract" in err and not out.exists()
    other = tmp_path / "other.tar.xz"
    with tarfile.open(other, "w:xz") as tar:
        tar.add(bad, arcname="README")
    status, _, err = _shypectl(str(FIXED[0]), "--xen-source", str(other), *cache, "-o", str(out))
    assert status == 3 and "holds no tools/flask/policy/" in err and not out.exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # nothing half-extracted


@needs_flask_tools
def test_cli_binary_and_source_are_what_checkpolicy_built(tmp_path: Path) -> None:
    cache = cache_dir(tmp_path)
    common = ["--xen-source", str(XEN_SOURCE), "--cache", str(cache)]
    out = tmp_path / "xenpolicy"
    status, _, err = _shypectl(str(FIXED[1]), *common, "-o", str(out))
    assert status == 0, err
    assert mismatches(_load(FIXED[1]), out) == []
    status, conf, err = _shypectl(str(FIXED[1]), *common, "--source")
    assert status == 0, err
    assert "\ndomain_comms(" not in conf  # m4 expanded Xen's macros
    assert f"type {type_name(_load(FIXED[1]).bootstrap)}," in conf


@needs_flask_tools
def test_running_relabels_are_compiled_between_static_labels_only(tmp_path: Path) -> None:
    """``shypectl relabel`` never moves a domain into or out of a dynamic label: Xen may not
    either (the equivalence check expects transitions between static labels' types only)."""
    from tests.test_dynamic_labels import POLICY

    assert list(relabel_types(POLICY)) == [type_name(n) for n in ("dom0", "dns", "backup")]
    _check(POLICY, tmp_path)
