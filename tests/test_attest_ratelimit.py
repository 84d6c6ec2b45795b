"""Red team: a read-group user (a real second uid) asks for quote after quote. Each quote makes
the daemon read and encode the whole measurement log (up to 16 MiB by default) and the label
store on its thread pool: one uid asking in a loop kept a core busy (quotes are made one at a
time, but nothing bounded how often). A token bucket per uid (``[attestation] quote_burst``,
``quotes_per_minute``) answers ``busy`` (rate-limited) past it; root and the admin group are
not limited (docs/attestation.md, *Quote*)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from control_helpers import ModelBackend, aserving, in_thread
from peercred_helpers import (
    Account,
    Accounts,
    as_user,
    groups_config,
    needs_users,
    reachable_backend,
    system_accounts,
)
from tpm_helpers import need_swtpm, stub_daemon, swtpm

from shyped.attest.ratelimit import TokenBuckets
from shyped.control import attestserve
from shyped.service.attestation import Attestation


class AttestingBackend(ModelBackend):
    """The control server's backend with the real attest op over a stub daemon (real swtpm)."""

    daemon: Any = None

    def attest_quote(self, args: Any) -> Any:
        return attestserve.attest_quote(self.daemon, args)


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    with system_accounts() as acc:
        yield acc


def quote_line(nonce: str) -> str:
    return json.dumps({"version": 1, "op": "attest_quote", "args": {"nonce": nonce}})


@needs_users
@pytest_twisted.ensureDeferred
async def test_a_read_group_user_s_quotes_are_rate_limited_per_uid(
    tmp_path: Path, accounts: Accounts
) -> None:
    need_swtpm()
    with swtpm() as tpm, reachable_backend("ctlrl") as base:
        backend = AttestingBackend(base.directory)
        d = stub_daemon(tmp_path, tpm)
        cfg = attrs.evolve(d.attestation.config, quote_burst=2, quotes_per_minute=1)
        d.attestation = Attestation(d, cfg)
        backend.daemon = d
        await d.attestation.start()
        assert d.attestation.unavailable is None, d.attestation.unavailable
        config = groups_config(backend, accounts)
        async with aserving(backend, backend.directory, config=config) as server:
            lines = [quote_line(f"r{i}") for i in range(4)]
            mine = await in_thread(as_user, accounts.reader, server.path, *lines)
            oks = [a.get("ok") for a in mine]
            assert oks == [True, True, False, False], (
                f"uid {accounts.reader.uid} had {oks.count(True)} quotes made in a row "
                f"(burst 2, 1 a minute): {[a.get('error') for a in mine]}"
            )
            error = mine[2]["error"]
            assert error["code"] == "busy", error
            assert f"attestation rate-limited: uid {accounts.reader.uid}" in error["message"]
            assert error["details"]["reason"] == "rate-limited"
            assert 0 < error["details"]["retry_after"] <= 60
            # per uid: another read-group member still has its own quotes
            other = await in_thread(
                as_user, accounts.outsider, server.path, quote_line("o1"),
                groups=(accounts.read_gid,),
            )  # fmt: skip
            assert other[0]["ok"] is True, other
            # root and the admin group are not limited
            for who, groups in ((Account("root", 0, 0), ()), (accounts.admin, ())):
                many = await in_thread(as_user, who, server.path, *lines, groups=groups)
                assert all(a.get("ok") for a in many), (who, many)


def test_token_buckets_refill_cap_and_fail_closed() -> None:
    b = TokenBuckets(per_minute=6, burst=2, max_keys=2)
    assert b.take(1, 0.0) is None and b.take(1, 0.0) is None
    assert b.take(1, 0.0) == pytest.approx(10.0)  # one token every 10 s
    assert b.take(1, 5.0) == pytest.approx(5.0)
    assert b.take(1, 10.0) is None
    assert b.take(1, 10.0) == pytest.approx(10.0)
    assert b.take(1, 5.0) == pytest.approx(10.0)  # a clock going back refills nothing
    assert b.take(1, 1000.0) is None and b.take(1, 1000.0) is None  # capped at the burst
    assert b.take(2, 1000.0) is None
    # two keys tracked, neither full: a third is refused (fail closed), not tracked
    assert b.take(3, 1000.0) == pytest.approx(10.0)
    # once a bucket is full again it carries no state: dropped, the new key fits
    assert b.take(3, 2000.0) is None
