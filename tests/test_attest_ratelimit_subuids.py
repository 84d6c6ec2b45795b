"""Red team (redlocal): a read-group member with subordinate uids (``/etc/subuid``: Debian's
useradd gives every user 65,536; ``newuidmap`` from the ``uidmap`` package maps them) connects
as many uids. In a user namespace it maps its subordinate range, ``setuid``s to each and
connects: the kernel reports each as a different uid (``SO_PEERCRED``) still in the read group
(its own gid, mapped too). What counted per peer uid -- the quote rate limit, connection slots
-- was multiplied: one user had 65,536 quote bursts (past 4,096 keys every other non-admin uid
was refused: the buckets fail closed) and held all 64 of the read group's connection slots. A
subordinate uid now counts as the user it belongs to (`shyped.control.subids`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
    run_as,
    spawn_as,
    system_accounts,
)
from test_attest_ratelimit import limited_server, quote_line

from shyped.control.subids import owner_of

#: argv: socket, first subordinate id, count, what, per. Maps uid/gid 0 to the caller's own and
#: 1..count to the subordinate range (newuidmap/newgidmap); then as each of uids 1..count:
#: ``quote``: asks one quote, prints the answer; ``hold``: opens `per` connections and holds
#: them, prints how many were answered at once (``busy``) and how many are held, then waits
#: for stdin to close.
AS_SUBUIDS = r"""
import ctypes, json, os, select, socket, subprocess, sys, time
path, sub, count, what, per = sys.argv[1], *map(int, sys.argv[2:4]), *sys.argv[4:6]
per = int(per)
libc = ctypes.CDLL(None, use_errno=True)
me, mygid = os.getuid(), os.getgid()
r, w = os.pipe()
r2, w2 = os.pipe()

def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    return s

def quote(k):
    s = connect()
    doc = {"version": 1, "op": "attest_quote", "args": {"nonce": f"s{k}"}}
    s.sendall(json.dumps(doc).encode() + b"\n")
    return json.loads(s.makefile("rb").readline() or b'{"eof": true}')

def hold():
    socks = [connect() for _ in range(per)]
    time.sleep(1.0)  # answers to refused connections come at once
    busy = sum(1 for s in socks if select.select([s], [], [], 0)[0])
    return {"busy": busy, "held": per - busy}, socks

pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        os._exit(3)
    os.write(w, b"x")
    os.read(r2, 1)
    kids, total = [], {"busy": 0, "held": 0}
    for k in range(1, count + 1):
        rr, ww = os.pipe()
        child = os.fork()
        if child == 0:
            os.setresgid(0, 0, 0)
            os.setresuid(k, k, k)
            doc, socks = (quote(k), []) if what == "quote" else hold()
            os.write(ww, json.dumps(doc).encode())
            os.close(ww)
            if what == "hold":
                sys.stdin.read()  # hold until told
            os._exit(0)
        os.close(ww)
        data = b""
        while chunk := os.read(rr, 1 << 20):
            data += chunk
        if what == "quote":
            os.waitpid(child, 0)
            print(data.decode(), flush=True)
        else:
            kids.append(child)
            total = {key: total[key] + json.loads(data)[key] for key in total}
    if what == "hold":
        print(json.dumps(total), flush=True)
        sys.stdin.read()
        for child in kids:
            os.kill(child, 15)
    os._exit(0)
os.read(r, 1)
for tool, own in (("newuidmap", me), ("newgidmap", mygid)):
    subprocess.run([tool, str(pid), "0", str(own), "1", "1", str(sub), str(count)], check=True)
os.write(w2, b"x")
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""

SUB = 310000


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    with system_accounts() as acc:
        yield acc


def give_subuids(user: Account) -> None:
    """16 subordinate uids and gids from `SUB` (userdel removes them with the user)."""
    if not (shutil.which("newuidmap") and shutil.which("newgidmap")):
        pytest.skip("needs newuidmap/newgidmap (apt-get install uidmap)")
    span = f"{SUB}-{SUB + 15}"
    subprocess.run(
        ["usermod", "--add-subuids", span, "--add-subgids", span, user.name],
        check=True, capture_output=True,
    )  # fmt: skip


@needs_users
@pytest_twisted.ensureDeferred
async def test_a_user_s_subordinate_uids_share_its_quote_bucket(
    tmp_path: Path, accounts: Accounts
) -> None:
    give_subuids(accounts.reader)
    async with limited_server(tmp_path, accounts) as server:
        answers = await in_thread(
            run_as, accounts.reader, AS_SUBUIDS, str(server.path), str(SUB), "4", "quote", "0"
        )
        assert len(answers) == 4, answers
        oks = [a.get("ok") is True for a in answers]
        assert sum(oks) <= 2, (
            f"uid {accounts.reader.uid} had {sum(oks)} quotes made as 4 subordinate uids "
            f"(burst 2): {[a.get('error') for a in answers]}"
        )
        refused = [a["error"] for a in answers if a.get("ok") is not True]
        assert refused and all(e["details"]["reason"] == "rate-limited" for e in refused)
        assert all(f"uid {accounts.reader.uid}" in e["message"] for e in refused), refused
        # its own uid shares that bucket; another read-group member has its own
        mine = await in_thread(as_user, accounts.reader, server.path, quote_line("m"))
        assert mine[0]["error"]["details"]["reason"] == "rate-limited", mine
        other = await in_thread(
            as_user, accounts.outsider, server.path, quote_line("o"),
            groups=(accounts.read_gid,),
        )  # fmt: skip
        assert other[0]["ok"] is True, other


@needs_users
@pytest_twisted.ensureDeferred
async def test_a_user_s_subordinate_uids_share_its_connection_slots(accounts: Accounts) -> None:
    """As 9 uids, one read-group user held every read-group connection slot (64: 8 per uid)
    and another member got ``busy``: its subordinate uids now share its 8."""
    give_subuids(accounts.reader)
    with reachable_backend("ctlss") as base:
        backend: ModelBackend = base
        config = groups_config(backend, accounts)
        async with aserving(backend, backend.directory, config=config) as server:
            hold = spawn_as(
                accounts.reader, AS_SUBUIDS, str(server.path), str(SUB), "9", "hold", "8"
            )
            try:
                assert hold.stdout is not None
                got = json.loads(await in_thread(hold.stdout.readline) or "{}")
                assert got.get("held") == 8, got  # its own 8, however many uids
                other = await in_thread(
                    as_user, accounts.outsider, server.path, '{"version": 1, "op": "status"}',
                    groups=(accounts.read_gid,),
                )  # fmt: skip
                assert other[0].get("ok") is True, other
            finally:
                assert hold.stdin is not None
                hold.stdin.close()
                await in_thread(hold.wait, 30)


def test_owner_of_reads_subordinate_ranges(tmp_path: Path) -> None:
    import pwd

    root = pwd.getpwuid(0).pw_name
    table = tmp_path / "subuid"
    table.write_text(f"# comment\n{root}:100000:65536\n1234:200000:10\nnobody-x:300000:5\nbad\n")
    assert owner_of(100000, table) == 0 and owner_of(165535, table) == 0
    assert owner_of(165536, table) == 165536  # past the range: its own
    assert owner_of(200009, table) == 1234  # a numeric owner
    assert owner_of(300001, table) == -300000  # an owner not known: the range, as one key
    assert owner_of(42, table) == 42
    assert owner_of(100001, tmp_path / "none") == 100001  # no table: uids are their own
