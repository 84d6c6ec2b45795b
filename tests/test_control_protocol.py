"""The control protocol (pure) and fuzzed requests against the real server."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from control_helpers import ModelBackend, cleanup, in_thread, serving, short_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shyped.control import backend as b
from shyped.control.client import ControlClient
from shyped.control.protocol import (
    OPS,
    VERSION,
    ControlError,
    ErrorCode,
    encode_error,
    encode_request,
    encode_result,
    parse_request,
    parse_response,
    structure,
    unstructure,
)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def request_docs() -> st.SearchStrategy[dict[str, Any]]:
    """Request-shaped objects: real ops and versions most of the time, junk args."""
    return st.fixed_dictionaries(
        {
            "version": st.sampled_from([VERSION, VERSION, 0, 2, "1", None]),
            "op": st.sampled_from([*OPS, "nope", ""]) | st.text(max_size=10),
        },
        optional={"id": json_values, "args": json_values, "extra": json_values},
    )


# --------------------------------------------------------------------------- pure


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_parse_request_only_raises_control_errors(data: bytes) -> None:
    try:
        parse_request(data)
    except ControlError as exc:
        assert isinstance(exc.code, ErrorCode) and exc.message


@given(request_docs())
@settings(max_examples=400)
def test_request_docs_are_accepted_or_refused_with_a_code(doc: dict[str, Any]) -> None:
    try:
        req = parse_request(json.dumps(doc).encode())
    except ControlError as exc:
        assert exc.code in {
            ErrorCode.BAD_REQUEST,
            ErrorCode.UNSUPPORTED_VERSION,
            ErrorCode.UNKNOWN_OP,
            ErrorCode.BAD_JSON,
        }
    else:
        assert doc["version"] == VERSION and req.op.name == doc["op"]
        assert isinstance(req.args, req.op.args)


def test_round_trip_of_results_and_errors() -> None:
    result = b.DryRunResult(False, (b.Verdict("disk xvda", "disk", False, "deny", "ste"),))
    assert parse_response(encode_result(7, result), b.DryRunResult) == (7, result)
    err = ControlError(ErrorCode.DENIED, "no", {"reasons": ["r1"]})
    with pytest.raises(ControlError) as info:
        parse_response(encode_error("x", err), b.DryRunResult)
    assert (info.value.code, info.value.message, info.value.details) == (
        ErrorCode.DENIED,
        "no",
        {"reasons": ["r1"]},
    )


def test_request_encoding_is_what_the_server_parses() -> None:
    args = b.DryRunArgs(
        domain=b.NewDomain("web", "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001", "ACM:example:web"),
        disks=(b.DiskItem("/img/web.img", "xvda", writable=False),),
        vifs=(b.VifItem(bridge="br1", mac="00:16:3e:00:00:01"),),
    )
    req = parse_request(encode_request("dry_run", args, 3))
    assert (req.op.name, req.id, req.args) == ("dry_run", 3, args)


def test_strictness_of_argument_types() -> None:
    for bad in ({"label": "x", "type": "dom"}, {"label": 1}, {"label": "x", "type": None}):
        with pytest.raises(ControlError) as info:
            structure(bad, b.ValidateLabelArgs)
        assert info.value.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ControlError, match="exactly one of"):
        structure({"domain": {"name": "a"}, "running": "b"}, b.DryRunArgs)
    with pytest.raises(ControlError, match="expected array"):
        structure({"running": "a", "disks": "xvda"}, b.DryRunArgs)
    with pytest.raises(ControlError, match="expected integer, got boolean"):
        structure({"uuid": "u", "devices": True}, b.WaitAdmissionArgs)
    assert structure({"uuid": "u", "timeout": 5}, b.WaitAdmissionArgs).timeout == 5.0


def test_every_op_has_a_backend_method_or_is_the_servers() -> None:
    methods = {m for m in dir(b.ControlBackend) if not m.startswith("_")}
    for op in OPS.values():
        assert op.name == "ping" or op.method in methods, op
        assert attrs.has(op.args) and attrs.has(op.result)
    # result classes survive a JSON round trip with their defaults
    for op in OPS.values():
        fields = attrs.fields(op.result)
        assert all(f.type is not None for f in fields)
    assert unstructure(b.Pong(1, "x")) == {"protocol": 1, "daemon": "x"}


# --------------------------------------------------------------------------- fuzz the server


@pytest.fixture
def sock() -> Iterator[Path]:
    directory = short_dir("ctlf")
    backend = ModelBackend(directory)
    try:
        with serving(backend, directory) as server:
            yield server.path
    finally:
        cleanup(directory)


def _send_and_ping(path: Path, payload: bytes) -> list[dict[str, Any]]:
    """Send the fuzz payload and a ping; every answer up to the ping's (or EOF)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(payload + b"\n" + b'{"version": 1, "id": "final", "op": "ping"}\n')
        answers: list[dict[str, Any]] = []
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return answers
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                answers.append(json.loads(line))
                if answers[-1].get("id") == "final":
                    return answers


def _fuzz(path: Path) -> None:
    @given(st.binary(max_size=400) | request_docs().map(lambda d: json.dumps(d).encode()))
    @settings(
        max_examples=250,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    def one(payload: bytes) -> None:
        answers = _send_and_ping(path, payload)
        # every line got a well-formed answer; the ping after the junk was answered
        for a in answers:
            assert a["version"] == VERSION and isinstance(a["ok"], bool)
            if not a["ok"]:
                assert ErrorCode(a["error"]["code"])
        assert answers and answers[-1]["id"] == "final" and answers[-1]["ok"] is True

    one()


@pytest_twisted.ensureDeferred
async def test_fuzzed_requests_never_disturb_the_server(sock: Path) -> None:
    await in_thread(_fuzz, sock)

    def status() -> str:
        with ControlClient(sock) as c:
            return c.status().policy.name

    assert await in_thread(status) == "example"
