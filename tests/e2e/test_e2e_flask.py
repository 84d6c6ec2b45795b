"""Xen itself enforces the compiled sHype policy: on Xen 4.17.7 built with FLASK
(tests/e2e/flaskxen.py), booted with `flask=enforcing` and tests/e2e/flask/policy.toml compiled
by `shypectl policy flask` as its boot policy, two guests whose labels share an STE type set up
an event channel and a shared page with hypercalls alone, and two that share none are refused
by Xen (errno in the guest, `avc: denied` in Xen's log).  No daemon runs: this is the layer
below it.

One boot runs tests/e2e/scenarios/flask.sh for the whole module; the guest program is
tests/e2e/guestprog/xenpeer.c.  Port and grant numbers reach the peer through dom0 (the
offering guest's console, a xenstore node only the peer may read), never from guest to guest.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from flaskboot import compile_flask_policy
from runner import RunResult
from test_e2e_boot import xl_list

from shyped.policy.flask import DOM0_TYPE, UNLABELLED_TYPE, type_name

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

FLASK_FILES = Path(__file__).parent / "flask"
POLICY = FLASK_FILES / "policy.toml"
EACCES, EINVAL = 13, 22
#: Xen's grant status for a refused grant operation (public/grant_table.h).
GNTST_PERMISSION_DENIED = -8


@pytest.fixture(scope="module")
def run(e2e_run: Callable[..., RunResult], tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    noshare = compile_flask_policy(
        FLASK_FILES / "policy-noshare.toml", tmp_path_factory.mktemp("flask") / "noshare"
    )
    files = {"xenpolicy-noshare": noshare.read_bytes()}
    return e2e_run("flask", files, xen="flask", flask_policy=POLICY)


def context(label: str) -> str:
    return f"system_u:system_r:{type_name(label)}"


def domid(run: RunResult, name: str) -> int:
    return int(run.text(f"{name}.domid").strip())


def peer(run: RunResult, cmd: int) -> dict[str, str]:
    """A guest program command's results: operation -> the rest of its line."""
    out: dict[str, str] = {}
    for line in run.text(f"peer-{cmd}.txt").splitlines():
        words = line.split(" ", 3)  # XENPEER <id> <operation> <rest>
        if len(words) >= 3:
            out[words[2]] = words[3] if len(words) == 4 else ""
    assert "done" in out, run.text(f"peer-{cmd}.txt")
    return out


def field(text: str, key: str) -> str:
    m = re.search(rf"(?:^| ){key}=(\S+)", text)
    assert m, f"no {key}= in {text!r}"
    return m[1]


def xl_list_z(text: str) -> dict[str, str]:
    """`xl list -Z` rows by name: the security label column."""
    rows = {}
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 7:
            rows[parts[0]] = parts[-1]
    return rows


def denials(dmesg: str) -> list[str]:
    return [line for line in dmesg.splitlines() if re.search(r"avc:\s+denied", line)]


# ---------------------------------------------------------------- Xen's view


def test_xen_enforces_the_compiled_policy_from_boot(run: RunResult) -> None:
    assert run.text("xl-getenforce.txt").strip() == "Enforcing"
    boot = run.text("xl-dmesg-boot.txt")
    assert "Flask:  Starting in enforcing mode." in boot, boot[-2000:]
    assert re.search(r"Policy len \w+, start at", boot), "Xen loaded no policy module"
    assert xl_list_z(run.text("xl-list-Z-dom0.txt"))["Domain-0"] == f"system_u:system_r:{DOM0_TYPE}"


def test_each_guest_runs_in_its_labels_type(run: RunResult) -> None:
    rows = xl_list_z(run.text("xl-list-Z.txt"))
    for label in ("alpha", "beta", "gamma"):
        assert run.text(f"xl-create-{label}.log.rc").strip() == "0"
        assert rows[label] == context(label), rows
    assert rows["Domain-0"] == f"system_u:system_r:{DOM0_TYPE}"


# ---------------------------------------------------------------- a shared type: Xen lets them


def test_guests_sharing_a_type_bind_a_port_and_map_a_page(run: RunResult) -> None:
    alpha, beta = domid(run, "alpha"), domid(run, "beta")
    offer = peer(run, 1)
    port = int(field(offer["evtchn-alloc-unbound"], "port"))
    assert field(offer["evtchn-alloc-unbound"], "peer") == str(beta)
    assert port > 0
    gref = int(field(offer["gntalloc"], "gref"))

    take = peer(run, 2)
    assert "errno" not in take["evtchn-bind-interdomain"], take
    local = int(field(take["evtchn-bind-interdomain"], "local-port"))
    assert local > 0
    assert take["evtchn-notify"] == f"ok port={local}"
    page = f"xenpeer-page-of-domain-{alpha}-for-{beta}"
    assert take["gntdev-mmap"] == f"ok text={page}", take
    # The grant copy (after the reply was written through the map) reads the reply back.
    assert take["gntdev-grant-copy"] == f"status=0 text=reply-from-domain-{beta}", take
    assert gref > 0

    # The other end saw both: the event on its port, and the reply written through the map.
    check = peer(run, 3)
    assert check["event"] == f"port={port}"
    assert check["page"] == f"text=reply-from-domain-{beta}"


# ---------------------------------------------------------------- no shared type: Xen refuses


def test_guests_sharing_no_type_are_refused_by_xen(run: RunResult) -> None:
    alpha, gamma = domid(run, "alpha"), domid(run, "gamma")
    offer = peer(run, 4)  # gamma offers alpha a port and a page
    assert offer["evtchn-alloc-unbound"] == f"errno={EACCES} (EACCES)", offer
    # Granting is the granter's own table: Xen checks the mapping, not the grant.
    assert int(field(offer["gntalloc"], "gref")) > 0
    assert field(offer["gntalloc"], "peer") == str(alpha)

    take = peer(run, 5)  # alpha maps gamma's page
    assert take["evtchn-bind-interdomain"] == "skipped (no port)"
    # gntdev reports a refused map (Xen's GNTST_permission_denied) as EINVAL from mmap...
    assert take["gntdev-mmap"] == f"errno={EINVAL} (EINVAL)", take
    # ...and the grant copy hands Xen's own status back.
    assert field(take["gntdev-grant-copy"], "status") == str(GNTST_PERMISSION_DENIED), take

    reverse = peer(run, 6)  # alpha offers gamma: refused the other way too
    assert reverse["evtchn-alloc-unbound"] == f"errno={EACCES} (EACCES)", reverse

    found = denials(run.text("xl-dmesg.txt"))
    gamma_t, alpha_t = type_name("gamma"), type_name("alpha")
    want = {
        "evtchn gamma->alpha": rf"\{{ bind \}}.* scontext=\S+:{gamma_t}_channel "
        rf"tcontext=\S+:{alpha_t} tclass=event",
        "evtchn alpha->gamma": rf"\{{ bind \}}.* scontext=\S+:{alpha_t}_channel "
        rf"tcontext=\S+:{gamma_t} tclass=event",
        "grant map alpha->gamma": rf"\{{ map_read map_write \}}.* scontext=\S+:{alpha_t} "
        rf"tcontext=\S+:{gamma_t} tclass=grant",
        # Xen asks whether the granter's page may be copied to the copier.
        "grant copy gamma->alpha": rf"\{{ copy \}}.* scontext=\S+:{gamma_t} "
        rf"tcontext=\S+:{alpha_t} tclass=grant",
    }
    missing = [k for k, rx in want.items() if not any(re.search(rx, d) for d in found)]
    assert not missing, "\n".join([f"no avc denial for {missing}", *found])
    # Nothing between alpha and beta was denied.
    beta_t = type_name("beta")
    assert not [d for d in found if alpha_t in d and beta_t in d], found
    assert f"current=d{gamma} " in next(
        d for d in found if re.search(want["evtchn gamma->alpha"], d)
    )


# ---------------------------------------------------------------- what libxl does under it


def test_libxl_takes_no_acm_style_seclabel(run: RunResult) -> None:
    """shype-xl's `seclabel = "ACM:<policy>:<label>"` means nothing to FLASK: libxl refuses
    the config before any domain exists (FLASK needs `system_u:system_r:<type>`)."""
    assert run.text("xl-create-acm.log.rc").strip() != "0"
    assert "Invalid init_seclabel: ACM:e2e.flask:alpha" in run.text("xl-create-acm.log")
    assert "acm" not in xl_list(run.text("xl-list-Z-plain.txt"))


def test_an_unlabelled_guest_gets_the_unlabelled_type(run: RunResult) -> None:
    """`xl create` without seclabel: Xen gives the domain its initial SID `domU`, which the
    compiled policy maps to the unlabelled type.  It gets event channels with dom0 only (the
    bootstrap rules libxl needs to build it, so that the daemon can relabel it; no grants, nothing
    with other guests); see docs/flask.md."""
    rows = xl_list_z(run.text("xl-list-Z-plain.txt"))
    unlabelled = [
        ctx for name, ctx in rows.items() if name not in ("Domain-0", "alpha", "beta", "gamma")
    ]
    assert unlabelled == [f"system_u:system_r:{UNLABELLED_TYPE}"], rows


# ---------------------------------------------------------------- a run-time policy switch


def test_a_policy_switch_refuses_new_channels_between_labels_it_separates(run: RunResult) -> None:
    """Xen booted with policy.toml is switched (`xl loadpolicy`) to policy-noshare.toml, where
    alpha and beta share nothing: a port alpha offered before the switch can no longer be bound,
    its page not mapped, a new port not allocated; dom0 still builds guests."""
    assert run.text("xl-loadpolicy.txt.rc").strip() == "0"
    assert "Successfully loaded policy." in run.text("xl-loadpolicy.txt")
    assert run.text("xl-getenforce-after.txt").strip() == "Enforcing"
    before = peer(run, 7)
    assert "port" in before["evtchn-alloc-unbound"], before  # offered under the old policy
    take = peer(run, 8)
    assert take["evtchn-bind-interdomain"] == f"errno={EACCES} (EACCES)", take
    assert take["gntdev-mmap"] == f"errno={EINVAL} (EINVAL)", take
    assert field(take["gntdev-grant-copy"], "status") == str(GNTST_PERMISSION_DENIED), take
    again = peer(run, 9)
    assert again["evtchn-alloc-unbound"] == f"errno={EACCES} (EACCES)", again
    alpha_t, beta_t = type_name("alpha"), type_name("beta")
    found = denials(run.text("xl-dmesg-switch.txt"))
    assert any(
        re.search(rf"\{{ bind \}}.* scontext=\S+:{beta_t}_channel tcontext=\S+:{alpha_t} ", d)
        for d in found
    ), found
    assert run.text("xl-create-late.log.rc").strip() == "0", run.text("xl-create-late.log")
    assert run.text("late-serving.rc").strip() == "0"


def test_a_policy_switch_does_not_close_established_channels(run: RunResult) -> None:
    """The channel alpha and beta bound under the old policy still carries events after the
    switch: FLASK checks `send` against the channel's own label, which stays valid.  Revoking
    established channels is not Xen's part (docs/flask.md)."""
    first_port = int(field(peer(run, 1)["evtchn-alloc-unbound"], "port"))
    assert peer(run, 10)["evtchn-notify"].startswith("ok port=")
    assert peer(run, 11)["event"] == f"port={first_port}"
