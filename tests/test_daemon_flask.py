"""The daemon coupled with Xen's FLASK, on the sandbox (real oxenstored, no hypervisor).

Without FLASK (here: no Xen at all, as Debian's Xen has no XSM) the daemon says so once and
works as before. With FLASK, the Xen side is `FakeXen`: a test double of the xc/xl boundary
ONLY (`shyped.service.flaskxc.XenFlaskBoundary`: what ``xc_flask_*``, ``xc_readconsolering``
and ``xl list -Z`` would answer), which accepts or refuses as a test says. Everything above
it is the real daemon, and the policy is really compiled (m4, checkpolicy). What Xen does with
it is proved on the QEMU tier (tests/e2e), not here.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from daemon_helpers import Harness, domcfg, host_fixture
from flask_helpers import XEN_SOURCE, cache_dir, needs_flask_tools
from twisted.internet import reactor
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from wiring_helpers import quota_policy, records, shypectl_verify, start, with_audit

from shyped.control.daemon_backend import DaemonControlBackend
from shyped.core.xenflask import FlaskMode
from shyped.policy.flask import context
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.xsconn import XsConn
from shyped.service.flaskdaemon import AVC_RECORDS_PER_READ
from shyped.service.flaskxc import DisabledBoundary, FlaskError
from shyped.service.flaskxen import FlaskXen, policy_builder

__all__ = ["host_fixture"]


@attrs.define
class FakeXen:
    """Test double of the xc/xl boundary only: Xen's answers, scripted per test. A domain
    the test gave no context runs unlabelled (``xl create -p`` without ``seclabel=``)."""

    ts: Toolstack
    socket: str
    mode: FlaskMode = FlaskMode.ENFORCING
    refuse_load: bool = False
    refuse_relabel: bool = False
    by_name: dict[str, str] = attrs.field(factory=dict)  #: domain name -> context at build
    relabelled: dict[int, str] = attrs.field(factory=dict)
    loads: list[bytes] = attrs.field(factory=list)
    refused_loads: int = 0
    #: (domid, context, was the daemon's label node already written?)
    relabels: list[tuple[int, str, bool]] = attrs.field(factory=list)
    #: the daemon's label node of the domain at each relabel
    nodes: list[str | None] = attrs.field(factory=list)
    #: contexts Xen refuses to relabel to
    refuse_to: set[str] = attrs.field(factory=set)
    #: set: a relabel (Xen has the new context already) returns once it is set
    hold: threading.Event | None = None
    console: str = ""
    lock: threading.Lock = attrs.field(factory=threading.Lock)

    def detect(self) -> tuple[FlaskMode, str]:
        return self.mode, ""

    def load_policy(self, binary: bytes) -> None:
        if self.refuse_load:
            self.refused_loads += 1
            raise FlaskError("xc_flask_load: EINVAL (Invalid argument)")
        self.loads.append(binary)

    def relabel(self, domid: int, ctx: str) -> None:
        with XsConn(self.socket) as xs:
            node = xs.read(f"/local/domain/{domid}/shyped/label")
        self.relabels.append((domid, ctx, node is not None))
        self.nodes.append(node)
        if self.refuse_relabel or ctx in self.refuse_to:
            raise FlaskError(f"xc_flask_relabel_domain({domid}, {ctx}): EACCES (Permission denied)")
        self.relabelled[domid] = ctx
        if self.hold is not None:  # the call returns only when the test says so
            assert self.hold.wait(30)

    def list_contexts(self) -> str:
        rows = ["Name  ID  Mem VCPUs  State  Time(s)  Security Label"]
        for d in self.ts.list_domains():
            if d.domid == 0:
                ctx = "system_u:system_r:dom0_t"
            else:
                ctx = self.relabelled.get(d.domid) or self.by_name.get(
                    d.name, "system_u:system_r:domU_t"
                )
            rows.append(f"{d.name} {d.domid} 128 1 --p--- 0.0 {ctx}")
        return "\n".join(rows) + "\n"

    def read_console(self, index: int) -> tuple[str, int, bool]:
        with self.lock:
            return self.console[index:], len(self.console), False


def _fake(host: Harness) -> FakeXen:
    return FakeXen(host.ts, str(host.xsd.socket_path))


def _edge(fake: FakeXen, tmp: Path) -> FlaskXen:
    builder = policy_builder(XEN_SOURCE, cache_dir(tmp))
    return FlaskXen(reactor, fake, builder, poll_interval=0)


# ------------------------------------------------------------------ without FLASK


@pytest_twisted.ensureDeferred
async def test_without_flask_the_daemon_says_so_once_and_decides_as_before(
    host: Harness, tmp_path: Path
) -> None:
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_namespace") == "shyped.flask":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        audit_dir = tmp_path / "audit"
        daemon, _ = await start(host, with_audit(host.config(), audit_dir))  # the real edge
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(lines) == 1 and lines[0].startswith("Xen FLASK: absent (no /dev/xen/privcmd")
    assert "as without FLASK" in lines[0]
    assert daemon.status().flask["mode"] == "absent"
    st = DaemonControlBackend(daemon).status()
    assert st.flask is not None and st.flask.mode == "absent" and st.flask.policy_sha256 is None
    a = await host.call(host.ts.create, domcfg("web-a1"))
    b = await host.call(host.ts.create, domcfg("web-b1"))  # Chinese Wall, as ever
    await host.settle()
    assert host.last(f"domain {a}").allowed and not host.last(f"domain {b}").allowed
    listed = {d.domid: d for d in DaemonControlBackend(daemon).list_domains().domains}
    assert listed[a].state == "admitted" and listed[a].flask_context is None
    await host.stop()
    kinds = Counter(r["kind"] for r in records(audit_dir))
    assert kinds["flask-state"] == 1 and kinds["flask-load"] == 0
    state = next(r for r in records(audit_dir) if r["kind"] == "flask-state")
    assert state["mode"] == "absent" and "privcmd" in state["reason"]


# ------------------------------------------------------------------ with FLASK (test double)


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_start_loads_the_policy_and_an_unlabelled_domain_is_relabelled_before_admission(
    host: Harness, tmp_path: Path
) -> None:
    fake = _fake(host)
    fake.by_name["shop-1"] = context("shop")  # shype-xl passed seclabel=: nothing to do
    daemon, _ = await start(host, host.config(), flask=_edge(fake, tmp_path))
    assert len(fake.loads) == 1
    st = DaemonControlBackend(daemon).status()
    assert st.flask is not None and st.flask.mode == "enforcing"
    assert st.flask.policy_sha256 == daemon.flask.flask.loaded.sha256  # type: ignore[union-attr]
    a = await host.call(host.ts.create, domcfg("web-a1"))  # plain xl create -p
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    await daemon.audit_synced()
    assert host.last(f"domain {a}").allowed and host.last(f"domain {s}").allowed
    # relabelled once, before the daemon wrote the domain's label node (its admission)
    assert fake.relabels == [(a, context("bank-a-web"), False)]
    listed = {d.domid: d for d in DaemonControlBackend(daemon).list_domains().domains}
    assert listed[a].state == "admitted" and listed[a].flask_context == context("bank-a-web")
    assert listed[s].flask_context == context("shop")
    assert daemon.status().flask["relabels"] == 1


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_relabel_xen_refuses_vetoes_the_domain(host: Harness, tmp_path: Path) -> None:
    fake = _fake(host)
    fake.refuse_relabel = True
    await start(host, host.config(), flask=_edge(fake, tmp_path))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    assert [r[0] for r in fake.relabels] == [a]
    last = host.last(f"domain {a}")
    assert not last.allowed and "Xen FLASK: Xen refused the relabel" in last.decision.reason
    assert "web-a1" not in host.domains()  # destroyed (the configured domain veto)


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_domain_built_under_another_labels_context_is_refused(
    host: Harness, tmp_path: Path
) -> None:
    """A cfg whose seclabel= names another label's FLASK context than the label the daemon
    admits it with: Xen would treat it as that other label, so the daemon vetoes it."""
    fake = _fake(host)
    fake.by_name["web-a1"] = context("shop")
    await start(host, host.config(), flask=_edge(fake, tmp_path))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    last = host.last(f"domain {a}")
    assert not last.allowed and f"runs in Xen as {context('shop')}" in last.decision.reason
    assert fake.relabels == [] and "web-a1" not in host.domains()


def _newer(tmp: Path, *, conflict_system: bool = False) -> Path:
    """Version 1.1 of the hosting policy (naming 1.0 as the one it replaces)."""
    path = quota_policy(tmp, {}, version="1.1")
    if conflict_system:  # dom0 (system) and bank A may no longer run together: refused
        text = path.read_text().replace(
            'types = ["bank-a", "bank-b"]', 'types = ["bank-a", "system"]'
        )
        path = tmp / "conflict.toml"
        path.write_text(text)
    return path


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_policy_switches_go_to_xen_first_and_a_refusal_keeps_both_old(
    host: Harness, tmp_path: Path
) -> None:
    audit_dir = tmp_path / "audit"
    fake = _fake(host)
    daemon, _ = await start(host, with_audit(host.config(), audit_dir), flask=_edge(fake, tmp_path))
    await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    first = daemon.loaded.sha256

    fake.refuse_load = True  # Xen refuses: the daemon keeps its policy too
    result = await daemon.reload_policy(_newer(tmp_path))
    assert not result.applied and "Xen refused the FLASK policy" in str(result.error)
    assert daemon.loaded.sha256 == first and fake.refused_loads == 1 and len(fake.loads) == 1

    fake.refuse_load = False  # the daemon's own check refuses: Xen is not asked
    result = await daemon.reload_policy(_newer(tmp_path, conflict_system=True))
    assert not result.applied and result.problems
    assert fake.refused_loads == 1 and len(fake.loads) == 1

    result = await daemon.reload_policy(_newer(tmp_path))  # both switch
    assert result.applied and daemon.loaded.sha256 != first and len(fake.loads) == 2
    assert daemon.loaded.policy.version == daemon.engine.policy.policy.version
    await host.settle()
    await host.stop()
    loads = [r for r in records(audit_dir) if r["kind"] == "flask-load"]
    assert [r["result"] for r in loads] == ["loaded", "refused", "loaded"]
    assert loads[-1]["reason"] == "policy switch"
    verified = shypectl_verify(audit_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_start_fails_when_xen_refuses_the_policy(host: Harness, tmp_path: Path) -> None:
    from shyped.service.policyload import StartupError

    fake = _fake(host)
    fake.refuse_load = True
    with pytest.raises(StartupError, match="Xen FLASK is enforcing: xc_flask_load"):
        await start(host, host.config(), flask=_edge(fake, tmp_path))
    host.daemon = None


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_xens_avc_denials_become_audit_records_and_a_metric(
    host: Harness, tmp_path: Path
) -> None:
    """Only Xen's own lines count: a guest printing an AVC line on its console (Xen prefixes
    it with ``(dN)``) or garbage makes no record; a flood is written in part, counted whole."""
    from test_xenflask import BIND

    audit_dir = tmp_path / "audit"
    fake = _fake(host)
    fake.console = "(XEN) old line before the start: " + BIND + "\n"
    edge = _edge(fake, tmp_path)
    daemon, _ = await start(host, with_audit(host.config(), audit_dir), flask=edge)
    metrics = daemon.metrics
    with fake.lock:
        fake.console += "\n".join(
            [BIND, "(d3) " + BIND, "garbage \x00", "x" * 5000, BIND.replace("denied", "granted")]
        )
        fake.console += "\n" + BIND[:30]  # the rest of this line comes with the next read
    await edge.poll_now()
    with fake.lock:
        fake.console += BIND[30:] + "\n" + (BIND + "\n") * (AVC_RECORDS_PER_READ + 5)
    await edge.poll_now()
    assert daemon.status().flask["denials"] == 2 + AVC_RECORDS_PER_READ + 5
    await host.stop()
    recs = records(audit_dir)
    avc = [r for r in recs if r["kind"] == "flask-avc"]
    assert len(avc) == 1 + AVC_RECORDS_PER_READ  # 1 in the first read, 56 in the second
    assert avc[0]["perms"] == ["bind"] and avc[0]["source"] == 1 and avc[0]["tclass"] == "event"
    repeats = [r for r in recs if r["kind"] == "flask-avc-repeats"]
    assert [(r["count"], r["by_class"]) for r in repeats] == [(6, {"event": 6})]
    assert metrics is None or metrics.snapshot.flask is not None
    verified = shypectl_verify(audit_dir)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_rename_of_a_running_domains_label_is_refused_with_flask(
    host: Harness, tmp_path: Path
) -> None:
    """Its FLASK type would vanish from Xen's policy: refused before Xen is asked; with no
    domain of that label running, the rename goes through both."""
    from test_daemon_policy_rename import renaming_policy

    fake = _fake(host)
    daemon, _ = await start(host, host.config(), flask=_edge(fake, tmp_path))
    s = await host.call(host.ts.create, domcfg("shop-1"))
    await host.settle()
    result = await daemon.reload_policy(renaming_policy(tmp_path))
    assert not result.applied and "may not rename the label of a running domain (shop)" in str(
        result.error
    )
    assert (
        len(fake.loads) == 1 and daemon.loaded.policy.version == daemon.engine.policy.policy.version
    )
    await host.call(host.ts.destroy, s)
    await host.settle()
    assert (await daemon.reload_policy(renaming_policy(tmp_path))).applied
    assert len(fake.loads) == 2


def test_context_reads_start_after_the_request_and_are_shared_by_a_wave() -> None:
    """A domain decided while ``xl list -Z`` is out may be newer than that read: its request
    waits for the next read, which every request made meanwhile shares."""
    from twisted.internet.defer import Deferred

    calls: list[Deferred[str]] = []

    class Manual(FlaskXen):
        def _call(self, fn: object, *args: object) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            calls.append(d)
            return d

    edge = Manual(reactor, DisabledBoundary(), lambda _p: b"", poll_interval=0)
    first = edge.refresh_contexts()
    later = [edge.refresh_contexts() for _ in range(3)]
    assert len(calls) == 1
    calls[0].callback("d 1 1 1 --p--- 0 system_u:system_r:domU_t\n")
    assert first.called and not any(d.called for d in later) and len(calls) == 2
    calls[1].callback("d 1 1 1 --p--- 0 system_u:system_r:dom0_t\nn 2 1 1 --p--- 0 -\n")
    got = [d.result for d in later]
    assert got == [{1: "system_u:system_r:dom0_t", 2: None}] * 3 and len(calls) == 2


def test_the_flask_table_is_read_and_checked(tmp_path: Path) -> None:
    from shyped.service.config import ConfigError, parse_config

    base = 'policy = { path = "p.toml" }\n'
    cfg = parse_config(
        base + '[flask]\nenabled = false\nxen_source = "xen.tar.xz"\npoll_interval = 5\n',
        tmp_path / "shyped.toml",
    )
    assert not cfg.flask.enabled and cfg.flask.xen_source == tmp_path / "xen.tar.xz"
    assert cfg.flask.poll_interval == 5.0
    for bad in (
        "[flask]\nenable = true\n",
        "[flask]\npoll_interval = 0\n",
        "[flask]\nenabled = 1\n",
    ):
        with pytest.raises(ConfigError, match="flask"):
            parse_config(base + bad)


# ------------------------------------------------------------------ relabel of a running domain


async def _running(host: Harness, tmp: Path, fake: FakeXen) -> tuple[Any, int, Path]:
    audit_dir = tmp / "audit"
    daemon, _ = await start(host, with_audit(host.config(), audit_dir), flask=_edge(fake, tmp))
    a = await host.call(host.ts.create, domcfg("web-a1"))
    await host.settle()
    await daemon.audit_synced()
    assert host.last(f"domain {a}").allowed
    fake.relabels.clear()
    return daemon, a, audit_dir


def _relabel(daemon: Any, domid: int, label: str) -> Any:
    from shyped.control.backend import RelabelDomainArgs

    return DaemonControlBackend(daemon).relabel_domain(RelabelDomainArgs(str(domid), label))


def _label_node(host: Harness, domid: int) -> str | None:
    with XsConn(str(host.xsd.socket_path)) as xs:
        return xs.read(f"/local/domain/{domid}/shyped/label")


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_running_domain_is_relabelled_in_xen_before_the_daemon(
    host: Harness, tmp_path: Path
) -> None:
    fake = _fake(host)
    daemon, a, audit_dir = await _running(host, tmp_path, fake)
    info = await _relabel(daemon, a, "bank-a-batch")
    assert info.label.endswith("bank-a-batch")
    # Xen first: relabelled while the label node still said the old label
    assert fake.relabels == [(a, context("bank-a-batch"), True)]
    assert fake.nodes[-1] is not None and fake.nodes[-1].endswith("bank-a-web")
    assert (_label_node(host, a) or "").endswith("bank-a-batch")
    listed = {d.domid: d for d in DaemonControlBackend(daemon).list_domains().domains}
    assert listed[a].flask_context == context("bank-a-batch")
    await host.stop()
    recs = records(audit_dir)
    kinds = [r["kind"] for r in recs if r["kind"] in ("flask-relabel", "relabel")]
    assert kinds[-2:] == ["flask-relabel", "relabel"]
    flask_rec = [r for r in recs if r["kind"] == "flask-relabel"][-1]
    assert flask_rec["result"] == "relabelled" and flask_rec["old"] == context("bank-a-web")
    assert flask_rec["new"] == context("bank-a-batch")


def _unchanged(host: Harness, daemon: Any, a: int, label: str) -> None:
    """The daemon still runs domain `a` with `label`: its view, the label node."""
    listed = {d.domid: d for d in DaemonControlBackend(daemon).list_domains().domains}
    assert (listed[a].label or "").endswith(label) and listed[a].state == "admitted"
    assert (_label_node(host, a) or "").endswith(label)
    assert daemon.host.domain(a).label == label


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_relabel_xen_refuses_is_refused_and_changes_nothing(
    host: Harness, tmp_path: Path
) -> None:
    from shyped.control.protocol import ControlError

    fake = _fake(host)
    fake.refuse_to.add(context("bank-a-batch"))
    daemon, a, audit_dir = await _running(host, tmp_path, fake)
    store = daemon.config.labels.read_bytes()
    with pytest.raises(ControlError) as err:
        await _relabel(daemon, a, "bank-a-batch")
    assert err.value.code.value == "denied"
    assert "Xen FLASK: Xen refused the relabel" in str(err.value.details)
    assert fake.relabels == [(a, context("bank-a-batch"), True)]
    _unchanged(host, daemon, a, "bank-a-web")
    assert daemon.config.labels.read_bytes() == store  # the store was not written
    assert daemon.flask.flask.contexts[a] == context("bank-a-web")
    await host.stop()
    recs = records(audit_dir)
    assert not [r for r in recs if r["kind"] == "relabel"]
    (refused,) = [
        r for r in recs if r["kind"] == "flask-relabel" and r.get("reason") != "admission"
    ]
    assert refused["result"] == "refused" and "EACCES" in refused["error"]
    assert shypectl_verify(audit_dir).returncode == 0


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_relabel_the_daemon_cannot_store_after_xen_accepted_puts_xen_back(
    host: Harness, tmp_path: Path
) -> None:
    """Xen relabelled, then the label store cannot be written (a hand edit with errors, not
    reloaded): the daemon refuses, Xen gets its old context back, nothing changed."""
    from shyped.control.protocol import ControlError

    fake = _fake(host)
    daemon, a, audit_dir = await _running(host, tmp_path, fake)
    daemon.config.labels.write_text("{ broken")
    with pytest.raises(ControlError, match="has errors"):
        await _relabel(daemon, a, "bank-a-batch")
    assert [(d, c) for d, c, _ in fake.relabels] == [
        (a, context("bank-a-batch")),
        (a, context("bank-a-web")),
    ]
    assert fake.relabelled[a] == context("bank-a-web")
    _unchanged(host, daemon, a, "bank-a-web")
    await host.stop()
    recs = [r for r in records(audit_dir) if r["kind"] in ("flask-relabel", "relabel")]
    assert [(r["result"], r["new"]) for r in recs[1:]] == [
        ("relabelled", context("bank-a-batch")),
        ("relabelled", context("bank-a-web")),
    ]
    assert "undone" in recs[-1]["reason"]


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_relabel_of_a_domain_xen_already_disagrees_on_is_refused(
    host: Harness, tmp_path: Path
) -> None:
    """Xen runs the domain under another type than its label's (relabelled behind shyped's
    back with flask tools): fail closed, Xen is not asked to relabel."""
    fake = _fake(host)
    daemon, a, _ = await _running(host, tmp_path, fake)
    fake.relabelled[a] = context("shop")
    from shyped.control.protocol import ControlError

    with pytest.raises(ControlError) as err:
        await _relabel(daemon, a, "bank-a-batch")
    assert f"runs in Xen as {context('shop')}" in str(err.value.details)
    assert fake.relabels == []
    _unchanged(host, daemon, a, "bank-a-web")


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_domain_whose_xen_context_disagrees_is_vetoed_when_decided_again(
    host: Harness, tmp_path: Path
) -> None:
    """The reverse: Xen's context and the daemon's label disagree (what a relabel that did not
    tell Xen left behind, or flask tools behind shyped's back). Every new decision of the
    domain (here a policy switch, which re-decides all running domains; a restarted daemon
    does the same at start) reads Xen's contexts and vetoes it."""
    fake = _fake(host)
    daemon, a, _ = await _running(host, tmp_path, fake)
    fake.relabelled[a] = context("bank-a-batch")
    result = await daemon.reload_policy(_newer(tmp_path))
    assert result.applied
    await host.settle()
    last = host.last(f"domain {a}")
    assert not last.allowed
    assert f"runs in Xen as {context('bank-a-batch')}" in last.decision.reason
    assert "web-a1" not in host.domains()


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_when_xen_will_not_be_put_back_it_is_audited_and_the_next_decision_vetoes(
    host: Harness, tmp_path: Path
) -> None:
    """Xen relabelled, the daemon could not, and Xen refuses the way back: the daemon keeps
    its label, says so (critical log, ``result=undo-failed``), and the domain's next decision
    finds Xen's context wrong and vetoes it (fail closed)."""
    from shyped.control.protocol import ControlError

    fake = _fake(host)
    daemon, a, audit_dir = await _running(host, tmp_path, fake)
    fake.refuse_to.add(context("bank-a-web"))
    good = daemon.config.labels.read_bytes()
    daemon.config.labels.write_text("{ broken")
    with pytest.raises(ControlError, match="has errors"):
        await _relabel(daemon, a, "bank-a-batch")
    _unchanged(host, daemon, a, "bank-a-web")
    assert fake.relabelled[a] == context("bank-a-batch")
    daemon.config.labels.write_bytes(good)
    assert (await daemon.reload_policy(_newer(tmp_path))).applied
    await host.settle()
    last = host.last(f"domain {a}")
    assert not last.allowed and f"runs in Xen as {context('bank-a-batch')}" in last.decision.reason
    await host.stop()
    results = [r.get("result") for r in records(audit_dir) if r["kind"] == "flask-relabel"]
    assert results[-2:] == ["relabelled", "undo-failed"]


@needs_flask_tools
@pytest_twisted.ensureDeferred
async def test_a_policy_switch_while_xen_relabels_does_not_veto_the_domain(
    host: Harness, tmp_path: Path
) -> None:
    """A policy switch re-decides every domain; one decided while its relabel is between
    Xen (new context) and the daemon (old label) must not be vetoed for disagreeing."""
    from twisted.internet.task import deferLater

    fake = _fake(host)
    daemon, a, _ = await _running(host, tmp_path, fake)
    fake.hold = threading.Event()
    relabel = _relabel(daemon, a, "bank-a-batch")
    for _ in range(1000):
        if fake.relabels:
            break
        await deferLater(reactor, 0.01)
    assert fake.relabelled[a] == context("bank-a-batch")  # Xen has it, the daemon not yet
    reload = daemon.reload_policy(_newer(tmp_path))  # re-decides every domain
    lock = daemon.flask.relabel_lock
    for _ in range(6000):  # until the reload waits for the relabel, or is done
        if reload.called or lock.waiting:
            break
        await deferLater(reactor, 0.01)
    fake.hold.set()
    assert (await relabel).label.endswith("bank-a-batch")
    assert (await reload).applied
    await host.settle()
    await daemon.audit_synced()
    assert "web-a1" in host.domains()
    assert host.last(f"domain {a}").allowed
    _unchanged(host, daemon, a, "bank-a-batch")
