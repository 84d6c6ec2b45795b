"""The attest_quote op inside the daemon's process (a stub daemon on the real reactor, a real
swtpm): a read-group user's quote does not encode its bundle on the reactor thread, and quotes
are made one at a time with a bounded queue (docs/attestation.md, *Quote*)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from tpm_helpers import need_swtpm, stub_daemon, swtpm
from twisted.internet import defer

from shyped.control import attestserve
from shyped.control.attestops import AttestQuoteArgs
from shyped.control.backend import Peer
from shyped.control.caller import CALLER, Caller
from shyped.control.protocol import ControlError, ErrorCode, encode_result


@pytest_twisted.ensureDeferred
async def test_the_bundle_is_not_encoded_on_the_reactor_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server encodes every answer on the reactor thread (`encode_result`): a bundle (its
    log up to 16 MiB) encoded there stalls every xenstore event meanwhile. The op hands the
    server an answer encoded on the thread pool, which it only frames."""
    need_swtpm()
    with swtpm() as tpm:
        d = stub_daemon(tmp_path, tpm)
        await d.attestation.start()
        assert d.attestation.unavailable is None
        main = threading.get_ident()
        on_reactor: list[int] = []
        real = json.JSONEncoder.encode

        def spy(self: json.JSONEncoder, o: Any) -> str:
            out = real(self, o)
            if threading.get_ident() == main and ('"log"' in out or '"bundle"' in out):
                on_reactor.append(len(out))
            return out

        monkeypatch.setattr(json.JSONEncoder, "encode", spy)
        result = await attestserve.attest_quote(d, AttestQuoteArgs("n-1"))
        line = encode_result(7, result)  # what the server does with it, on the reactor thread
        monkeypatch.undo()
        assert on_reactor == [], f"bundles of {on_reactor} bytes encoded on the reactor thread"
        doc = json.loads(line)
        assert doc["ok"] is True and doc["id"] == 7 and doc["result"]["bundle"]["nonce"] == "n-1"
        assert len(doc["result"]["bundle"]["state"]["labels"]["domains"]["name"]) == 2000


@pytest_twisted.ensureDeferred
async def test_one_quote_at_a_time_a_bounded_queue_then_busy(tmp_path: Path) -> None:
    """Quotes asked at once: one is made, two wait their turn, the rest are refused ``busy``
    at once (a read-group user cannot pile up bundles in the daemon's memory)."""
    need_swtpm()
    with swtpm() as tpm:
        d = stub_daemon(tmp_path, tpm)
        await d.attestation.start()
        token = CALLER.set(Caller(Peer(uid=0, gid=0, pid=1), "admin"))  # no rate limit
        try:
            asked = [attestserve.attest_quote(d, AttestQuoteArgs(f"n-{i}")) for i in range(5)]
        finally:
            CALLER.reset(token)
        results = await defer.DeferredList(asked, consumeErrors=True)
        made = [nonce(r) for ok, r in results if ok]
        refused = [r.value for ok, r in results if not ok]
        assert made == ["n-0", "n-1", "n-2"]
        assert len(refused) == 2 and all(isinstance(e, ControlError) for e in refused)
        assert all(e.code == ErrorCode.BUSY and "attestation busy" in e.message for e in refused)
        # once they are done, the next is made
        token = CALLER.set(Caller(Peer(uid=0, gid=0, pid=1), "admin"))
        try:
            again_d = attestserve.attest_quote(d, AttestQuoteArgs("n-5"))
        finally:
            CALLER.reset(token)
        again = await again_d
        assert nonce(again) == "n-5"


def nonce(result: Any) -> str:
    """The nonce of the bundle in the answer the server would write for `result`."""
    return str(json.loads(encode_result(1, result))["result"]["bundle"]["nonce"])
