"""The daemon's audit trail against real oxenstored: one record per decision and per daemon
event, a chain ``shypectl audit verify`` accepts, records durable before enforcing actions,
and fail-closed on a full disk (a small tmpfs this test mounts) with recovery."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg, eventually, host_fixture, image
from twisted.internet import defer, threads
from wiring_helpers import quota_policy, records, shypectl_verify, start, with_audit

from shyped.policy.decisions import Rule
from shyped.service.auditlog import verify_directory
from shyped.service.config import Mode

__all__ = ["host_fixture"]  # the `host` fixture


@pytest_twisted.ensureDeferred
async def test_a_scenario_leaves_one_record_per_decision_and_event_and_the_chain_verifies(
    host: Harness, tmp_path: Path
) -> None:
    audit_dir = tmp_path / "audit"
    daemon, _ = await start(host, with_audit(host.config(), audit_dir))
    a = await host.call(
        host.ts.create, domcfg("web-a1", vifs=["bridge=xenbr-bank-a"], disks=[image("web-a1")])
    )
    b = await host.call(host.ts.create, domcfg("web-b1"))  # Chinese Wall: destroyed
    await host.settle()
    assert "web-b1" not in host.domains()
    daemon.set_mode(Mode.PERMISSIVE)
    daemon.set_mode(Mode.ENFORCING)
    await host.settle()
    newer = quota_policy(tmp_path, {}, version="1.1")
    assert (await daemon.reload_policy(newer)).applied
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy\n")
    assert not (await daemon.reload_policy(bad)).applied
    await host.settle()
    decided = len(host.outcomes)
    await host.stop()

    recs = records(audit_dir)
    kinds = Counter(r["kind"] for r in recs)
    assert kinds["decision"] == decided
    assert kinds["daemon-start"] == 1 and kinds["daemon-stop"] == 1
    assert kinds["reconcile"] == 1 and kinds["mode-change"] == 2
    assert kinds["policy-load"] == 1 and kinds["policy-reject"] == 1
    assert [r["kind"] for r in recs][-1] == "daemon-stop"
    mine = [r for r in recs if r["kind"] == "decision" and r.get("what") == f"domain {b}"]
    assert len(mine) == 1
    denied = mine[0]
    assert denied["decision"] == "deny" and denied["rule"] == "chinese-wall"
    assert denied["subject"]["name"] == "web-b1" and denied["subject"]["domid"] == b
    assert denied["subject"]["uuid"] == domcfg("web-b1").uuid
    assert denied["subject"]["label"] == "bank-b-web" and denied["mode"] == "enforcing"
    assert denied["actions"] == [f"destroy domain {b}"]
    disk = next(r for r in recs if r.get("what") == f"device vbd {a}/51712")
    assert disk["decision"] == "permit" and disk["resource"]["label"] == "bank-a-disk"
    assert disk["object"]["domid"] == 0
    modes = [(r["old"], r["new"]) for r in recs if r["kind"] == "mode-change"]
    assert modes == [("enforcing", "permissive"), ("permissive", "enforcing")]
    stop = recs[-1]
    assert stop["head_seq"] == recs[-2]["seq"] and stop["head_hash"] == recs[-2]["hash"]

    verified = shypectl_verify(audit_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest_twisted.ensureDeferred
async def test_the_stop_record_names_the_real_chain_head_with_records_still_in_flight(
    host: Harness, tmp_path: Path
) -> None:
    """``daemon-stop`` names the chain head before it (`head_seq`, `head_hash`). Records
    appended in the same reactor tick as the stop are not yet with the writer thread (nor
    durable): a head read from the log then is one the stop record does not follow. Played
    deterministically: the mode changes (two records) and the stop starts in one tick."""
    audit_dir = tmp_path / "audit"
    daemon, _ = await start(host, with_audit(host.config(), audit_dir))
    await host.settle()
    daemon.set_mode(Mode.PERMISSIVE)
    daemon.set_mode(Mode.ENFORCING)
    stopping = daemon.stop()
    host.daemon = None
    await stopping

    recs = records(audit_dir)
    stop = recs[-1]
    assert stop["kind"] == "daemon-stop" and recs[-2]["kind"] == "mode-change"
    assert (stop["head_seq"], stop["head_hash"]) == (recs[-2]["seq"], recs[-2]["hash"])
    assert (stop["head_seq"], stop["head_hash"]) == (stop["seq"] - 1, stop["prev"])
    report, _ = verify_directory(audit_dir)  # what `shypectl audit verify` reads
    assert report.ok and not [f for f in report.warnings if "daemon-stop" in f.message]
    verified = shypectl_verify(audit_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest_twisted.ensureDeferred
async def test_enforcing_veto_waits_for_the_record_to_be_durable(
    host: Harness, tmp_path: Path
) -> None:
    audit_dir = tmp_path / "audit"
    seen: list[tuple[bool, int]] = []
    real = host.ts.destroy

    def destroy(domid: int) -> None:  # the veto: is its record on disk already?
        on_disk = [r for r in records(audit_dir) if r.get("what") == f"domain {domid}"]
        seen.append((bool(on_disk), domid))
        real(domid)

    daemon, _ = await start(host, with_audit(host.config(), audit_dir), destroy=destroy)
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await eventually(lambda: host.decided(f"domain {a}"))
    await daemon.audit_synced()  # what the control socket waits for before answering
    assert [r["decision"] for r in records(audit_dir) if r.get("what") == f"domain {a}"] == [
        "permit"
    ]
    b = await host.call(host.ts.create, domcfg("web-b1"))
    await host.settle()
    assert seen == [(True, b)]


def _mount_tmpfs(path: Path, size: str) -> None:
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)


def _fill(path: Path) -> Path:
    """Fill the filesystem of `path` to the last block."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (4096, 512, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root")
@pytest_twisted.ensureDeferred
async def test_disk_full_fails_closed_denies_new_domains_and_recovers(
    host: Harness, tmp_path: Path
) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    _mount_tmpfs(mnt, "64k")
    try:
        audit_dir = mnt / "audit"
        config = with_audit(host.config(), audit_dir, retry_interval=0.1)
        daemon, _ = await start(host, config)
        assert daemon.audit is not None
        a = await host.call(host.ts.create, domcfg("web-a1"))
        await host.settle()
        assert host.last(f"domain {a}").allowed
        filler = _fill(mnt)
        # The log's last page still has room (tmpfs allocates pages): records go on until one
        # needs a new page, which the full filesystem refuses. Small padding records leave less
        # room in that page than any decision record needs, so the log cannot resume by itself
        # (its retry would otherwise fit the next record into the page's last bytes).
        for i in range(2000):
            await daemon.audit_event("resource-label", resource=f"disk:/pad/{i}")
            if daemon.status().audit != "ok":
                break
        assert daemon.status().audit == "unavailable"
        # Fail-closed: the next domain is refused.
        c = await host.call(host.ts.create, domcfg("batch-a1"))
        await eventually(lambda: "batch-a1" not in host.domains())
        assert host.last(f"domain {c}").decision.rule is Rule.AUDIT
        assert daemon.status().audit == "unavailable"
        d = await host.call(host.ts.create, domcfg("reports-a1"))
        await host.settle()
        assert "reports-a1" not in host.domains()
        assert host.last(f"domain {d}").decision.rule is Rule.AUDIT
        # Space returns: the log resumes and admissions are decided by the policy again.
        filler.unlink()
        await eventually(lambda: daemon.status().audit == "ok")
        e = await host.call(host.ts.create, domcfg("batch-a1"))
        await host.settle()
        assert host.last(f"domain {e}").allowed and "batch-a1" in host.domains()
        await host.stop()
        verified = shypectl_verify(audit_dir)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        kinds = Counter(r["kind"] for r in records(audit_dir))
        assert kinds["audit-resumed"] >= 1
        after = [r for r in records(audit_dir) if r.get("what") == f"domain {e}"]
        assert after and after[-1]["decision"] == "permit"
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest_twisted.ensureDeferred
async def test_a_guest_flooding_denied_rendezvous_cannot_rotate_the_trail_away(
    host: Harness, tmp_path: Path
) -> None:
    """Red-team finding: a guest re-created denied rendezvous in its own data/ as fast as it
    could; each was a decision record, and retention deleted every earlier record (domain
    admissions included). Guest-paced decisions past a burst are now counted and summarised;
    every rendezvous is still denied and removed."""
    from shyped.sandbox.xsconn import XsConn
    from shyped.service.daemon import GUEST_REPEAT_BURST

    audit_dir = tmp_path / "audit"
    config = with_audit(host.config(), audit_dir, max_file_bytes=65536, keep_files=2)
    await start(host, config)
    a = await host.call(host.ts.create, domcfg("web-a1"))
    s = await host.call(host.ts.create, domcfg("shop-1"))  # shares no type with web-a1
    await host.settle()
    flood = 300

    def guest() -> None:  # web-a1, writing only below its own data/ (n<a> on real Xen)
        with XsConn(str(host.xsd.socket_path)) as xs:
            for i in range(flood):
                v = f"/local/domain/{a}/data/v{i % 60}"
                xs.rm(v)
                for key, value in (("ring-ref", "77"), ("event-channel", "9")):
                    xs.write(f"{v}/{key}", value)
                    xs.set_perms(f"{v}/{key}", (f"n{a}", f"r{s}"))
                if i % 30 == 29:
                    blocking_settle(host)

    await threads.deferToThread(guest)
    await host.settle()
    denied = [o for o in host.outcomes if o.kind == "vchan" and not o.allowed]
    assert len(denied) >= flood // 2  # decided (possibly coalesced), every one denied
    for i in range(60):  # and none left for the peer to read (removed, or reset to n<a>)
        for key in ("ring-ref", "event-channel"):
            assert host.perms(f"/local/domain/{a}/data/v{i}/{key}") in (None, (f"n{a}",))
    await host.stop()  # flushes the summaries
    recs = records(audit_dir)
    admitted = {r["what"] for r in recs if r["kind"] == "decision" and r["what"].startswith("dom")}
    assert {f"domain {a}", f"domain {s}"} <= admitted, "the admissions were rotated away"
    guest_paced = [o for o in host.outcomes if o.kind in ("vchan", "channel")]
    assert all(o.need.domid == a and not o.allowed for o in guest_paced)
    full = [r for r in recs if r["kind"] == "decision" and r["what"].startswith(("vchan", "xs-"))]
    pairs = {(o.need.kind, o.decision.verdict) for o in guest_paced}  # one peer: shop-1
    assert len(full) == GUEST_REPEAT_BURST + len(pairs)
    (summary,) = [r for r in recs if r["kind"] == "decision-repeats"]
    assert summary["subject_domid"] == a
    assert summary["count"] == len(guest_paced) - len(full)
    assert set(summary["kinds"]) <= {"deny vchan [ste]", "deny channel [ste]"}
    assert shypectl_verify(audit_dir).returncode == 0


@pytest_twisted.ensureDeferred
async def test_a_permitted_channel_cannot_hide_behind_a_burst_of_junk(
    host: Harness, tmp_path: Path
) -> None:
    """Red team: a guest spent its burst on junk grants, then opened the channel that
    mattered; only a count named it. The first decision of each pair is always in full."""
    from shyped.sandbox.xsconn import XsConn
    from shyped.service.daemon import GUEST_REPEAT_BURST

    audit_dir = tmp_path / "audit"
    await start(host, with_audit(host.config(), audit_dir))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("batch-a1"))  # shares a type with web-a1
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    secret = f"/local/domain/{a}/data/secret"
    with XsConn(str(host.xsd.socket_path)) as xs:
        for i in range(2 * GUEST_REPEAT_BURST):
            junk = f"/local/domain/{a}/data/junk{i}"
            xs.write(junk, "x")
            xs.set_perms(junk, (f"n{a}", f"r{s}"))
        xs.write(secret, "the channel that matters")
        xs.set_perms(secret, (f"n{a}", f"r{b}"))
    await host.settle()
    assert host.last(f"xs-channel {secret}").allowed
    await host.stop()
    recs = records(audit_dir)
    (named,) = [r for r in recs if r["kind"] == "decision" and r["what"] == f"xs-channel {secret}"]
    assert named["decision"] == "permit" and named["object"]["domid"] == b


def blocking_settle(host: Harness) -> None:
    """`host.settle()` from a thread (the guest's writer)."""
    from twisted.internet import reactor
    from twisted.internet.threads import blockingCallFromThread

    blockingCallFromThread(reactor, lambda: defer.ensureDeferred(host.settle()))
