"""Red team: a read-group user (a real second uid) asks for large answers (attestation quotes)
on many connections and reads none of them. Every answer was made and held in the daemon's
memory until the stall cut-off, one per connection, for as many connections as the read group
may open (64; 8 per uid); a quote carries the whole measurement log (up to 16 MiB by default):
hundreds of MiB against the unit's MemoryMax=1G. And while an answer made asynchronously (as
the TPM's are) sat unread, the read group's one heavy slot stayed taken: no other member's
quote or policy check was answered until the stall cut-off (30 s), again and again."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
    spawn_as,
    system_accounts,
)

from shyped.control.attestops import EncodedAttestQuote
from shyped.control.server import ServerLimits

pytestmark = needs_users

#: A bundle far larger than the write buffer and the kernel's socket buffers.
ANSWER_BYTES = 4 << 20


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with system_accounts() as acc:
        yield acc


class QuotingBackend(ModelBackend):
    """Answers every quote with a large bundle and counts them."""

    quotes = 0

    def attest_quote(self, args: Any) -> Any:
        """A moment later, as the TPM answers: meanwhile further quotes wait their turn."""
        from twisted.internet import reactor, task

        self.quotes += 1
        pad = b"x" * ANSWER_BYTES
        answer = EncodedAttestQuote({}, b'{"bundle":{"pad":"' + pad + b'"}}')
        return task.deferLater(reactor, 0.05, lambda: answer)  # type: ignore[arg-type]


@pytest.fixture
def backend() -> Iterator[QuotingBackend]:
    with reachable_backend("ctlq") as b:
        yield QuotingBackend(b.directory)


#: Opens argv[2] connections, asks a quote on each, reads nothing; prints once all are sent,
#: then holds the connections until stdin closes.
HOARDER = r"""
import json, socket, sys
path, n = sys.argv[1], int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b'{"version": 1, "op": "attest_quote", "args": {"nonce": "n%d"}}\n' % i)
    socks.append(s)
print(json.dumps({"sent": n}), flush=True)
sys.stdin.read()
"""

PING = '{"version": 1, "op": "ping"}'
QUOTE = '{"version": 1, "op": "attest_quote", "args": {"nonce": "mine"}}'


@pytest_twisted.ensureDeferred
async def test_unread_quotes_of_the_read_group_are_not_all_held_in_memory(
    backend: QuotingBackend, accounts: Accounts
) -> None:
    limits = ServerLimits(stall_timeout=600.0)
    async with aserving(
        backend, backend.directory, config=groups_config(backend, accounts), limits=limits
    ) as server:
        hoarder = spawn_as(accounts.reader, HOARDER, str(server.path), "6")
        try:
            assert hoarder.stdout is not None
            line = await in_thread(hoarder.stdout.readline)
            assert '"sent": 6' in line, line + (hoarder.stderr.read() if hoarder.stderr else "")
            # a round trip on its 7th connection: the server has read the 6 requests
            ping = await in_thread(as_user, accounts.reader, server.path, PING)
            assert ping[0]["ok"] is True, ping
            # its next quote is refused at once, not made behind the unread ones
            mine = await in_thread(as_user, accounts.reader, server.path, QUOTE)
            assert backend.quotes == 1, (
                f"{backend.quotes} answers of {ANSWER_BYTES} bytes made and held for one "
                "read-group user who reads none"
            )
            assert mine[0]["error"]["code"] == "busy", mine
            assert "has a large answer unread on another connection" in str(mine)
            # another read-group member is not held up behind the unread answer
            other = await in_thread(
                as_user, accounts.outsider, server.path, QUOTE, groups=(accounts.read_gid,)
            )
            assert other[0]["ok"] is True, other
            # root and the admins have slots of their own
            mine = await in_thread(as_user, Account("root", 0, 0), server.path, QUOTE)
            assert mine[0]["ok"] is True and backend.quotes == 3
        finally:
            hoarder.kill()
            hoarder.wait()
        # the hoarder gone, its answers with it: its next quote is made
        mine = await in_thread(as_user, accounts.reader, server.path, QUOTE)
        assert mine[0]["ok"] is True and backend.quotes == 4
