"""The control socket server (real Twisted server, real Unix socket) in front of ModelBackend,
a stand-in for the daemon: every request kind, error codes, limits, slow and hostile clients."""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from control_helpers import (
    POLICY_TOML,
    POLICY_TOML_11,
    POLICY_TOML_BAD,
    ModelBackend,
    aserving,
    in_thread,
    serving,
    web_backend,
)
from twisted.internet import defer

from shyped.control import backend as b
from shyped.control.client import ControlClient, DaemonUnreachable
from shyped.control.protocol import OPS, ControlError, ErrorCode
from shyped.control.server import ControlServer, ControlSetupError, ServerLimits
from shyped.service.config import ControlConfig


@pytest.fixture
def backend() -> Iterator[ModelBackend]:
    with web_backend("ctlb") as be:
        yield be


@pytest.fixture
def sock(backend: ModelBackend) -> Iterator[Path]:
    with serving(backend, backend.directory) as server:
        yield server.path


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    return s


def read_line(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            return buf
        buf += chunk
    return buf


def read_lines(s: socket.socket, n: int) -> list[dict[str, Any]]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


def exchange(path: Path, data: bytes) -> dict[str, Any]:
    """Send raw bytes on a fresh connection; the first response as a dict."""
    with connect(path) as s:
        s.sendall(data)
        return dict(json.loads(read_line(s)))


def call(path: Path, fn: str, *args: Any) -> Any:
    with ControlClient(path) as c:
        return getattr(c, fn)(*args)


async def error_of(path: Path, fn: str, *args: Any) -> ControlError:
    with pytest.raises(ControlError) as info:
        await in_thread(call, path, fn, *args)
    return info.value


# --------------------------------------------------------------------------- each request kind


@pytest_twisted.ensureDeferred
async def test_every_request_kind(backend: ModelBackend, sock: Path) -> None:
    seen: set[str] = set()

    async def ask(op: str, fn: str, *args: Any) -> Any:
        seen.add(op)
        return await in_thread(call, sock, fn, *args)

    assert (await ask("ping", "ping")).protocol == 1

    st = await ask("status", "status")
    assert (st.mode, st.policy.name, st.policy.version) == ("enforcing", "example", "1.0")
    assert st.policy.sha256 == hashlib.sha256(POLICY_TOML.encode()).hexdigest()
    assert (st.counts.domains, st.counts.admitted, st.counts.vm_labels) == (3, 3, 4)

    assert (await ask("getenforce", "getenforce")).mode == "enforcing"
    assert await ask("setenforce", "setenforce", "permissive") == b.EnforceMode(
        "permissive", "enforcing"
    )
    assert backend.mode == "permissive"

    vm = await ask("labels", "labels", "vm")
    assert [lab.name for lab in vm.labels] == ["dom0", "bank-a", "bank-b", "web"]
    assert vm.labels[0].bootstrap and vm.labels[1].label == "ACM:example:bank-a"
    res = await in_thread(call, sock, "labels", "res")
    assert {lab.name for lab in res.labels} == {"bank-a-disk", "bank-b-disk", "public-net"}

    assert (await ask("validate_label", "validate_label", "ACM:example:web", "vm")).name == "web"

    doms = (await ask("list", "list_domains")).domains
    assert {(d.domid, d.name, d.label) for d in doms} == {
        (0, "Domain-0", "ACM:example:dom0"),
        (1, "bank-a-1", "ACM:example:bank-a"),
        (2, "web-1", "ACM:example:web"),
    }
    for ref in ("bank-a-1", "1", "11111111-1111-4111-8111-111111111111"):
        assert (
            await ask("get_domain_label", "get_domain_label", ref)
        ).label == "ACM:example:bank-a"

    change = await ask("set_resource_label", "set_resource_label", "file:/img/a.img", "bank-a-disk")
    assert change == b.ResourceLabelChange("disk:/img/a.img", "ACM:example:bank-a-disk", None)
    assert backend.reload_store().resource_label("disk:/img/a.img") == "bank-a-disk"
    got = await ask("get_resource_label", "get_resource_label", "/img/a.img")
    assert got.label == "ACM:example:bank-a-disk"
    assert [r.resource for r in (await ask("resources", "resources")).resources] == [
        "disk:/img/a.img"
    ]

    # bank-b cannot start while bank-a-1 runs (Chinese Wall); its disk label is bank-a's.
    dry = await ask(
        "dry_run",
        "dry_run",
        b.DryRunArgs(
            domain=b.NewDomain("b2", None, "bank-b"),
            disks=(b.DiskItem("/img/a.img", "xvda"),),
            vifs=(b.VifItem(),),
        ),
    )
    assert not dry.permitted
    assert [(i.kind, i.permitted) for i in dry.items] == [
        ("domain", False),
        ("disk", False),
        ("vif", False),
    ]
    assert "chinese-wall" in dry.items[0].reason and "bank-a" in dry.items[0].reason
    ok = await in_thread(
        call,
        sock,
        "dry_run",
        b.DryRunArgs(
            domain=b.NewDomain("a2", None, "bank-a"), disks=(b.DiskItem("/img/a.img", "xvda"),)
        ),
    )
    assert ok.permitted and [i.permitted for i in ok.items] == [True, True]

    reg = await ask(
        "register_domain", "register_domain", "33333333-3333-4333-8333-333333333333", "new", "web"
    )
    assert reg.label == "ACM:example:web"
    assert (
        backend.reload_store().domain_label("33333333-3333-4333-8333-333333333333", None) == "web"
    )

    adm = await ask(
        "wait_admission", "wait_admission", "22222222-2222-4222-8222-222222222222", 0, 5.0
    )
    assert (adm.domid, adm.admitted) == (2, True)

    relabelled = await ask("relabel_domain", "relabel_domain", "bank-a-1", "ACM:example:bank-b")
    assert relabelled.label == "ACM:example:bank-b"

    shown = await ask("policy_show", "policy_show", "toml")
    assert shown.policy.name == "example" and "[[conflict_set]]" in shown.text
    xml = await in_thread(call, sock, "policy_show", "acm-xml")
    assert xml.text.lstrip().startswith("<?xml")

    check = await ask("policy_check", "policy_check", b.PolicySource(POLICY_TOML_11, "p11.toml"))
    assert check.allowed and check.policy.version == "1.1"

    loaded = await ask("policy_load", "policy_load", b.PolicySource(POLICY_TOML_11, "p11.toml"))
    assert (loaded.previous.version, loaded.policy.version) == ("1.0", "1.1")
    assert (await in_thread(call, sock, "status")).policy.version == "1.1"

    gone = await ask("forget_domain", "forget_domain", "33333333-3333-4333-8333-333333333333")
    assert gone.by_uuid == "ACM:example:web"
    with pytest.raises(ControlError) as refused:  # labelled domains run: DEFAULT lacks them
        await ask("policy_reset", "policy_reset")
    assert refused.value.code is ErrorCode.POLICY_REJECTED
    try:
        await ask("placement", "placement", "ACM:example:web")
    except ControlError as exc:  # a single host: placement needs pool mode
        assert exc.code is ErrorCode.UNAVAILABLE and "pool mode" in exc.message
    else:
        raise AssertionError("placement answered on a single host")
    try:
        await ask("reserve", "reserve", b.ReserveArgs("22222222-2222-4222-8222-222222222222", "h2"))
    except ControlError as exc:  # a single host: reservations need pool mode
        assert exc.code is ErrorCode.UNAVAILABLE and "pool mode" in exc.message
    else:
        raise AssertionError("a reservation answered on a single host")
    for op, args in (("attest_quote", ("n",)), ("attest_ak", ())):
        with pytest.raises(ControlError) as off:  # [attestation] is off here
            await ask(op, op, *args)
        assert off.value.code is ErrorCode.UNAVAILABLE and "attestation is off" in off.value.message

    assert seen == set(OPS), f"not exercised: {set(OPS) - seen}"
    audited = [(a.op, a.allowed, a.code, a.peer.uid) for a in backend.audits]
    assert ("setenforce", True, None, 0) in audited
    assert ("policy_load", True, None, 0) in audited
    assert {a.op for a in backend.audits} == {o.name for o in OPS.values() if o.access == "admin"}


@pytest_twisted.ensureDeferred
async def test_backend_refusals_keep_their_codes(backend: ModelBackend, sock: Path) -> None:
    assert (await error_of(sock, "validate_label", "nope", "vm")).code is ErrorCode.UNKNOWN_LABEL
    assert (
        await error_of(sock, "validate_label", "ACM:other:web", "vm")
    ).code is ErrorCode.INVALID_ARGUMENT
    assert (await error_of(sock, "get_domain_label", "ghost")).code is ErrorCode.NOT_FOUND
    assert (
        await error_of(sock, "get_resource_label", "relative.img")
    ).code is ErrorCode.INVALID_ARGUMENT
    denied = await error_of(sock, "relabel_domain", "web-1", "bank-b")
    assert denied.code is ErrorCode.DENIED and "chinese-wall" in denied.details["reasons"][0]
    bad = await error_of(sock, "policy_load", b.PolicySource(POLICY_TOML_BAD, "bad.toml"))
    assert bad.code is ErrorCode.POLICY_REJECTED
    assert any("bank-a" in p for p in bad.details["problems"])
    invalid = await error_of(sock, "policy_check", b.PolicySource("[policy]\nname = 1\n", "x.toml"))
    assert invalid.code is ErrorCode.POLICY_INVALID and invalid.details["problems"]
    assert (await in_thread(call, sock, "status")).policy.version == "1.0"  # nothing changed
    # the refused change was audited with its code
    assert ("policy_load", "policy-rejected") in [(a.op, a.code) for a in backend.audits]


# --------------------------------------------------------------------------- protocol errors


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json", "bad-json"),
        (b"\xff\xfe{}", "bad-json"),
        (b'{"version": 1, "op": "status", "args": {}, "x": NaN}', "bad-json"),
        (b"[" * 40 + b"]" * 40, "bad-json"),
        (b"[1, 2]", "bad-request"),
        (b'{"op": "status"}', "bad-request"),
        (b'{"version": "1", "op": "status"}', "bad-request"),
        (b'{"version": 2, "op": "status"}', "unsupported-version"),
        (b'{"version": 0, "op": "status"}', "unsupported-version"),
        (b'{"version": 1, "op": "format_disk"}', "unknown-op"),
        (b'{"version": 1}', "bad-request"),
        (b'{"version": 1, "op": "status", "args": {"verbose": true}}', "bad-request"),
        (b'{"version": 1, "op": "labels", "args": {"type": "dom"}}', "bad-request"),
        (b'{"version": 1, "op": "get_domain_label", "args": {"domain": 7}}', "bad-request"),
        (
            b'{"version": 1, "op": "wait_admission", "args": {"uuid": "u", "timeout": 1e9}}',
            "bad-request",
        ),
        (b'{"version": 1, "op": "status", "id": {"a": 1}}', "bad-request"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_requests_get_stable_codes_and_the_connection_goes_on(
    sock: Path, line: bytes, code: str
) -> None:
    def go() -> list[dict[str, Any]]:
        with connect(sock) as s:
            s.sendall(line + b"\n" + b'{"version": 1, "id": "next", "op": "ping"}\n')
            return read_lines(s, 2)

    first, second = await in_thread(go)
    assert first["ok"] is False and first["error"]["code"] == code, first
    assert first["version"] == 1 and first["error"]["message"]
    assert second == {
        "version": 1,
        "id": "next",
        "ok": True,
        "result": {"protocol": 1, "daemon": second["result"]["daemon"]},
    }


@pytest_twisted.ensureDeferred
async def test_error_answer_echoes_the_request_id(sock: Path) -> None:
    resp = await in_thread(exchange, sock, b'{"version": 1, "id": 41, "op": "nope"}\n')
    assert (resp["id"], resp["error"]["code"]) == (41, "unknown-op")
    resp = await in_thread(exchange, sock, b'{"version": 9, "id": "x", "op": "status"}\n')
    assert (resp["id"], resp["error"]["code"]) == ("x", "unsupported-version")
    assert resp["error"]["details"] == {"supported": [1]}


@pytest_twisted.ensureDeferred
async def test_argument_errors_name_the_field(sock: Path) -> None:
    line = json.dumps(
        {
            "version": 1,
            "op": "dry_run",
            "args": {"domain": {"name": "x"}, "disks": [{"target": 5, "vdev": "xvda"}, {}]},
        }
    ).encode()
    resp = await in_thread(exchange, sock, line + b"\n")
    problems = resp["error"]["details"]["problems"]
    assert "args.disks[0].target: expected string, got integer" in problems
    assert "args.disks[1].target: required key missing" in problems


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(sock: Path) -> None:
    lines = b"".join(
        json.dumps({"version": 1, "id": i, "op": op}).encode() + b"\n"
        for i, op in enumerate(["status", "nope", "list", "getenforce", "resources"] * 4)
    )

    def go() -> list[dict[str, Any]]:
        with connect(sock) as s:
            s.sendall(lines)
            return read_lines(s, 20)

    answers = await in_thread(go)
    assert [a["id"] for a in answers] == list(range(20))
    assert [a["ok"] for a in answers[:5]] == [True, False, True, True, True]


# --------------------------------------------------------------------------- limits


@pytest_twisted.ensureDeferred
async def test_oversized_line_is_refused_and_others_are_served(backend: ModelBackend) -> None:
    limits = ServerLimits(max_admin_line=4096, max_read_line=1024)
    async with aserving(backend, backend.directory, limits=limits) as server:

        def go(data: bytes) -> tuple[dict[str, Any], bytes]:
            with connect(server.path) as s:
                s.sendall(data)
                first = read_line(s)
                rest = s.recv(100)  # EOF: the server closed the connection
                return json.loads(first), rest

        for data in (b"x" * 5000, b'{"version":1,"op":"ping","pad":"' + b"y" * 5000 + b'"}\n'):
            resp, rest = await in_thread(go, data)
            assert (
                resp["error"]["code"] == "too-large" and resp["error"]["details"]["limit"] == 4096
            )
            assert rest == b""
        # a request at the limit is fine, and other clients never noticed
        pad = "z" * (4096 - 60)
        line = json.dumps({"version": 1, "op": "ping", "id": pad}).encode()
        assert len(line) <= 4096
        assert (await in_thread(exchange, server.path, line + b"\n"))["error"][
            "code"
        ] == "bad-request"
        assert (await in_thread(call, server.path, "ping")).protocol == 1


@pytest_twisted.ensureDeferred
async def test_half_written_request_times_out_without_blocking_others(
    backend: ModelBackend,
) -> None:
    limits = ServerLimits(request_timeout=1.5)
    async with aserving(backend, backend.directory, limits=limits) as server:

        def slow_and_fast() -> tuple[list[str], dict[str, Any], bytes]:
            served: list[str] = []
            with connect(server.path) as slow:
                slow.sendall(b'{"version": 1, "op": "sta')  # and nothing more
                # while the slow request hangs, other clients are answered
                for _ in range(20):
                    with ControlClient(server.path) as c:
                        served.append(c.status().policy.name)
                answer = json.loads(read_line(slow))
                eof = slow.recv(100)
            return served, answer, eof

        served, answer, eof = await in_thread(slow_and_fast)
        assert served == ["example"] * 20
        assert answer["ok"] is False and answer["error"]["code"] == "request-timeout"
        assert eof == b""


@pytest_twisted.ensureDeferred
async def test_trickling_bytes_do_not_keep_a_request_alive(backend: ModelBackend) -> None:
    import time

    limits = ServerLimits(request_timeout=1.0)
    async with aserving(backend, backend.directory, limits=limits) as server:

        def trickle() -> dict[str, Any]:
            with connect(server.path) as s:
                payload = b'{"version": 1, "op": "status", "args": {}, "pad": "' + b"a" * 200
                for byte in payload:
                    try:
                        s.sendall(bytes([byte]))
                    except (BrokenPipeError, ConnectionResetError):
                        break
                    time.sleep(0.02)
                return dict(json.loads(read_line(s)))

        assert (await in_thread(trickle))["error"]["code"] == "request-timeout"


@pytest_twisted.ensureDeferred
async def test_connection_cap_answers_busy(backend: ModelBackend) -> None:
    limits = ServerLimits(root_slots=2)
    async with aserving(backend, backend.directory, limits=limits) as server:

        def go() -> tuple[dict[str, Any], str]:
            a, bb = connect(server.path), connect(server.path)
            try:
                a.sendall(b'{"version":1,"op":"ping"}\n')
                read_line(a)  # both are in
                third = json.loads(read_line(connect(server.path)))
            finally:
                a.close()
                bb.close()
            return third, ""

        third, _ = await in_thread(go)
        assert third["error"]["code"] == "busy"
        # once they are gone, connections are accepted again
        assert (await in_thread(call, server.path, "ping")).protocol == 1


@pytest_twisted.ensureDeferred
async def test_backend_crash_is_internal_and_the_server_goes_on(
    backend: ModelBackend, sock: Path
) -> None:
    def boom() -> b.Status:
        raise RuntimeError("secret detail")

    backend.status = boom  # type: ignore[method-assign]
    err = await error_of(sock, "status")
    assert err.code is ErrorCode.INTERNAL and "secret" not in err.message
    backend.getenforce = lambda: "not an EnforceMode"  # type: ignore[method-assign,assignment,return-value]
    assert (await error_of(sock, "getenforce")).code is ErrorCode.INTERNAL
    assert (await in_thread(call, sock, "ping")).protocol == 1


@pytest_twisted.ensureDeferred
async def test_disconnect_cancels_a_pending_wait(backend: ModelBackend, sock: Path) -> None:
    cancelled: list[bool] = []
    started: list[bool] = []

    def wait(args: b.WaitAdmissionArgs) -> defer.Deferred[b.Admission]:
        started.append(True)
        return defer.Deferred(lambda d: cancelled.append(True))

    backend.admission = wait

    def go() -> None:
        import time

        with connect(sock) as s:
            s.sendall(b'{"version":1,"op":"wait_admission","args":{"uuid":"u","timeout":60}}\n')
            while not started:
                time.sleep(0.01)

    await in_thread(go)
    import time

    def settle() -> None:
        for _ in range(200):
            if cancelled:
                return
            time.sleep(0.01)

    await in_thread(settle)
    assert cancelled == [True]
    assert (await in_thread(call, sock, "ping")).protocol == 1


@pytest_twisted.ensureDeferred
async def test_unreachable_daemon_is_a_clear_client_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="cannot connect"):
        ControlClient(tmp_path / "nothing.sock").status()


@pytest_twisted.ensureDeferred
async def test_socket_file_handling(backend: ModelBackend) -> None:
    directory = backend.directory / "run"
    path = directory / "control.sock"
    async with aserving(backend, directory, config=ControlConfig(socket=path)) as server:
        assert (path.stat().st_mode & 0o777) == 0o666
        second = ControlServer(backend, ControlConfig(socket=path))
        with pytest.raises(ControlSetupError, match="another daemon"):
            second.start()
        assert (await in_thread(call, server.path, "ping")).protocol == 1
    assert not path.exists()  # removed at stop
    # a stale socket (nobody listening) is replaced; a regular file is never removed
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    async with aserving(backend, directory, config=ControlConfig(socket=path)) as server:
        assert (await in_thread(call, server.path, "ping")).protocol == 1
    path.write_text("not a socket")
    with pytest.raises(ControlSetupError, match="not a socket"):
        ControlServer(backend, ControlConfig(socket=path)).start()
    assert path.read_text() == "not a socket"


@pytest_twisted.ensureDeferred
async def test_a_pipelined_flood_is_answered_and_others_get_turns(sock: Path) -> None:
    n = 3000
    flood = b"".join(b'{"version":1,"op":"ping","id":%d}\n' % i for i in range(n))

    def go() -> tuple[list[int], str]:
        import threading

        other: list[str] = []

        def meanwhile() -> None:
            with ControlClient(sock) as c:
                other.append(c.status().policy.name)

        with connect(sock) as s:
            s.sendall(flood)
            t = threading.Thread(target=meanwhile)
            t.start()
            answers = read_lines(s, n)
            t.join(30)
        return [a["id"] for a in answers if a["ok"]], other[0]

    ids, other = await in_thread(go)
    assert ids == list(range(n)) and other == "example"
