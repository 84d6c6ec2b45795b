"""The daemon on a FLASK Xen: shyped detects Xen's FLASK, loads its compiled policy, labels
each domain in Xen (shype-xl hands xl the FLASK context; a plain `xl create -p` domain is
relabelled before its admission), records Xen's AVC denials in its audit trail, and switches
Xen's policy with its own (a policy Xen refuses leaves both the old).

One boot (Xen 4.17.7 with FLASK, flask=enforcing, tests/e2e/flask/policy.toml as boot policy)
runs tests/e2e/scenarios/flask_daemon.sh for the whole module; guests run the guest program
tests/e2e/guestprog/xenpeer.c as in test_e2e_flask.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flaskxen import xen_source
from runner import RunResult
from test_e2e_flask import EACCES, EINVAL, domid, field, peer, xl_list_z

from shyped.policy.flask import type_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(2400)]

HERE = Path(__file__).parent
FILES = HERE / "flask_daemon"
BOOT_POLICY = HERE / "flask" / "policy.toml"


@pytest.fixture(scope="module")
def run(e2e_run: Callable[..., RunResult]) -> RunResult:
    files = {p.name: p.read_bytes() for p in sorted(FILES.iterdir()) if p.is_file()}
    files["policy.toml"] = BOOT_POLICY.read_bytes()
    files["xen-src.tar.xz"] = xen_source().read_bytes()  # the daemon compiles with its tree
    return e2e_run("flask_daemon", files, xen="flask", flask_policy=BOOT_POLICY)


def context(label: str) -> str:
    return f"system_u:system_r:{type_name(label)}"


def status(run: RunResult, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(run.text(name))
    return doc


def audit(run: RunResult) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run.text("audit.txt").splitlines() if line.strip()]


def test_the_daemon_finds_flask_enforcing_and_loads_its_policy(run: RunResult) -> None:
    log = run.text("daemon.log")
    assert "Xen FLASK: enforcing; loading the compiled sHype policy" in log, log[-3000:]
    assert "Xen FLASK: policy loaded (sha256 " in log
    st = status(run, "status-start.json")
    assert st["flask"]["mode"] == "enforcing" and st["flask"]["reason"] is None
    assert re.fullmatch(r"[0-9a-f]{64}", st["flask"]["policy_sha256"])
    kinds = [r["kind"] for r in audit(run)]
    assert "flask-state" in kinds and "flask-load" in kinds


def test_shype_xl_guests_run_in_their_labels_type(run: RunResult) -> None:
    for g in ("alpha", "gamma"):
        assert run.text(f"create-{g}.log.rc").strip() == "0", run.text(f"create-{g}.log")
    rows = xl_list_z(run.text("xl-list-Z.txt"))
    assert rows["alpha"] == context("alpha") and rows["gamma"] == context("gamma"), rows


def test_a_plain_xl_create_guest_is_relabelled_before_it_runs(run: RunResult) -> None:
    b = domid(run, "beta")
    # Listed while still paused, after the daemon admitted it (its label node exists).
    assert xl_list_z(run.text("xl-list-Z-beta-paused.txt"))["beta"] == context("beta")
    assert f"Xen FLASK: domain {b} unlabelled in Xen: relabel to {context('beta')}" in run.text(
        "daemon.log"
    )
    (rec,) = [
        r for r in audit(run) if r["kind"] == "flask-relabel" and r.get("reason") == "admission"
    ]
    assert rec["domid"] == b and rec["new"] == context("beta")
    assert rec["old"] == "system_u:system_r:shype__unlabelled_t"
    listed = {d["name"]: d for d in json.loads(run.text("list.json"))["domains"]}
    assert listed["beta"]["flask_context"] == context("beta")
    assert listed["beta"]["state"] == "admitted"


def test_xen_refuses_guests_sharing_no_type_and_the_trail_records_it(run: RunResult) -> None:
    take = peer(run, 2)  # beta binds alpha's port and maps its page: they share a type
    assert "errno" not in take["evtchn-bind-interdomain"], take
    assert take["gntdev-mmap"].startswith("ok"), take
    offer = peer(run, 3)  # gamma offers alpha: Xen refuses
    assert offer["evtchn-alloc-unbound"] == f"errno={EACCES} (EACCES)", offer
    assert peer(run, 4)["gntdev-mmap"] == f"errno={EINVAL} (EINVAL)"
    gamma_t, alpha_t = type_name("gamma"), type_name("alpha")
    denied = [r for r in audit(run) if r["kind"] == "flask-avc"]
    assert any(
        r["tclass"] == "event"
        and r["perms"] == ["bind"]
        and r["scontext"].endswith(f":{gamma_t}_channel")
        and r["tcontext"].endswith(f":{alpha_t}")
        for r in denied
    ), denied
    assert any(r["tclass"] == "grant" and r["scontext"].endswith(f":{alpha_t}") for r in denied)
    # Guests' early console writes are denied without audit (the compiler's dontaudit).
    assert not [r for r in denied if r["perms"] == ["writeconsole"]], denied
    assert run.text("audit-verify.txt.rc").strip() == "0", run.text("audit-verify.txt")


def test_a_relabel_of_a_running_guest_reaches_xen(run: RunResult) -> None:
    """`shypectl addlabel gamma mgt alpha`: Xen relabels the running guest first (xl list -Z),
    the guest keeps its xenstore and console channels (it still runs the guest program), and a
    port it offers beta, which gamma may not reach, is refused by Xen; relabelled back, the
    same offer works."""
    a = domid(run, "alpha")
    for name in ("relabel-gamma.json", "relabel-alpha.json"):
        assert run.text(f"{name}.rc").strip() == "0", run.text(name)
    assert json.loads(run.text("relabel-gamma.json"))["label"].endswith(":gamma")
    assert xl_list_z(run.text("xl-list-Z-relabelled.txt"))["alpha"] == context("gamma")
    assert xl_list_z(run.text("xl-list-Z-back.txt"))["alpha"] == context("alpha")
    refused = peer(run, 8)
    assert refused["evtchn-alloc-unbound"] == f"errno={EACCES} (EACCES)", refused
    allowed = peer(run, 9)
    assert "errno" not in allowed["evtchn-alloc-unbound"], allowed
    gamma_t, beta_t = type_name("gamma"), type_name("beta")
    assert any(
        r["kind"] == "flask-avc"
        and r["perms"] == ["bind"]
        and r["scontext"].endswith(f":{gamma_t}_channel")
        and r["tcontext"].endswith(f":{beta_t}")
        for r in audit(run)
    )
    moves = [
        (r["kind"], r.get("old"), r.get("new"))
        for r in audit(run)
        if r["kind"] in ("flask-relabel", "relabel") and r.get("domid") == a
    ]
    assert moves == [
        ("flask-relabel", context("alpha"), context("gamma")),
        ("relabel", "alpha", "gamma"),
        ("flask-relabel", context("gamma"), context("alpha")),
        ("relabel", "gamma", "alpha"),
    ], moves


def test_a_policy_xen_refuses_leaves_both_the_old(run: RunResult) -> None:
    assert run.text("load-1.1.json.rc").strip() != "0"
    assert "Xen refused the FLASK policy" in run.text("load-1.1.json")
    assert "permission reset in class event not found in policy" in run.text("xl-dmesg-2.txt")
    before, after = status(run, "status-start.json"), status(run, "status-refused.json")
    assert after["policy"]["version"] == "1.0"
    assert after["flask"]["policy_sha256"] == before["flask"]["policy_sha256"]
    take = peer(run, 6)  # Xen still has 1.0: alpha and beta still bind
    assert "errno" not in take["evtchn-bind-interdomain"], take
    loads = [r for r in audit(run) if r["kind"] == "flask-load"]
    assert [r["result"] for r in loads] == ["loaded", "refused", "loaded"], loads


def test_a_policy_switch_reaches_xen_with_the_daemons(run: RunResult) -> None:
    assert run.text("load-1.2.json.rc").strip() == "0", run.text("load-1.2.json")
    st = status(run, "status-switched.json")
    assert st["policy"]["version"] == "1.2"
    assert (
        st["flask"]["policy_sha256"] != status(run, "status-start.json")["flask"]["policy_sha256"]
    )
    offer = peer(run, 7)  # alpha offers beta a new port: they share nothing now
    assert offer["evtchn-alloc-unbound"] == f"errno={EACCES} (EACCES)", offer
    assert field(offer["gntalloc"], "peer") == str(domid(run, "beta"))
