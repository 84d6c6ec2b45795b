"""Authorization by peer credentials, with real second users (`peercred_helpers`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import pytest_twisted
from control_helpers import ModelBackend, aserving, in_thread
from peercred_helpers import (
    SETENFORCE,
    STATUS,
    Account,
    Accounts,
    as_user,
    code,
    groups_config,
    needs_users,
    reachable_backend,
    system_accounts,
)

from shyped.control.server import ServerLimits

pytestmark = needs_users


@pytest.fixture(scope="module")
def accounts() -> Iterator[Accounts]:
    with system_accounts() as acc:
        yield acc


@pytest.fixture
def backend() -> Iterator[ModelBackend]:
    with reachable_backend("ctlp") as b:
        yield b


config = groups_config


@pytest_twisted.ensureDeferred
async def test_read_group_may_query_but_not_change(
    backend: ModelBackend, accounts: Accounts
) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        status, change = await in_thread(as_user, accounts.reader, server.path, STATUS, SETENFORCE)
    assert status["ok"] is True and status["result"]["policy"]["name"] == "example"
    assert code(change) == "permission-denied"
    assert f"uid {accounts.reader.uid}" in change["error"]["message"]
    assert backend.mode == "enforcing"
    refused = [a for a in backend.audits if a.op == "setenforce"]
    assert [(a.allowed, a.code, a.peer.uid, a.peer.gid) for a in refused] == [
        (False, "permission-denied", accounts.reader.uid, accounts.read_gid)
    ]


@pytest_twisted.ensureDeferred
async def test_others_are_refused_everything(backend: ModelBackend, accounts: Accounts) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        answers = await in_thread(as_user, accounts.outsider, server.path, STATUS, SETENFORCE)
        # the refusal did not disturb anyone: root is still served
        root = await in_thread(as_user, Account("root", 0, 0), server.path, STATUS)
    assert [code(a) for a in answers] == ["permission-denied", "permission-denied"]
    assert root[0]["ok"] is True
    assert backend.mode == "enforcing"


@pytest_twisted.ensureDeferred
async def test_supplementary_groups_count(backend: ModelBackend, accounts: Accounts) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        reader = await in_thread(
            as_user,
            accounts.outsider,
            server.path,
            STATUS,
            SETENFORCE,
            groups=(accounts.read_gid,),
        )
        admin = await in_thread(
            as_user, accounts.outsider, server.path, SETENFORCE, groups=(accounts.admin_gid,)
        )
    assert [code(a) for a in reader] == [None, "permission-denied"]
    assert admin[0]["ok"] is True and admin[0]["result"]["mode"] == "permissive"


@pytest_twisted.ensureDeferred
async def test_admin_group_and_root_may_change(backend: ModelBackend, accounts: Accounts) -> None:
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        admin = await in_thread(as_user, accounts.admin, server.path, SETENFORCE)
        back = '{"version": 1, "op": "setenforce", "args": {"mode": "enforcing"}}'
        root = await in_thread(as_user, Account("root", 0, 0), server.path, back)
    assert admin[0]["result"] == {"mode": "permissive", "previous": "enforcing"}
    assert root[0]["result"] == {"mode": "enforcing", "previous": "permissive"}
    assert [(a.peer.uid, a.allowed, a.code) for a in backend.audits] == [
        (accounts.admin.uid, True, None),
        (0, True, None),
    ]


@pytest_twisted.ensureDeferred
async def test_unprivileged_limits(backend: ModelBackend, accounts: Accounts) -> None:
    limits = ServerLimits(max_connections_per_uid=2)
    big = '{"version": 1, "op": "status", "id": "' + "x" * 70_000 + '"}'
    async with aserving(
        backend, backend.directory, config=config(backend, accounts), limits=limits
    ) as server:
        held = await in_thread(
            as_user, accounts.reader, server.path, STATUS, STATUS, STATUS, hold=True
        )
        too_big = await in_thread(as_user, accounts.reader, server.path, big)
        # root is not bound by the per-uid cap, and reads the same 70 kB line (whose 70 kB id
        # it then refuses as a bad request, not as too large)
        root = await in_thread(
            as_user, Account("root", 0, 0), server.path, big, big, big, hold=True
        )
    assert [code(a) for a in held] == [None, None, "busy"]
    assert code(too_big[0]) == "too-large" and too_big[0]["error"]["details"]["limit"] == 65536
    assert [code(a) for a in root] == ["bad-request"] * 3


@pytest_twisted.ensureDeferred
async def test_every_changing_op_is_refused_to_the_read_group_and_to_outsiders(
    backend: ModelBackend, accounts: Accounts
) -> None:
    """Every admin op, the ACM and pool ones included (relabel of dom0, policy_reset,
    forget_domain, reserve, a pool proposal by policy_load), asked by a real read-group user
    and a real outsider with valid arguments: refused, and nothing changed."""
    import json

    from shyped.control.protocol import OPS

    uuid = "22222222-2222-4222-8222-222222222222"
    args = {
        "setenforce": {"mode": "permissive"},
        "register_domain": {"uuid": uuid, "label": "ACM:example:web"},
        "relabel_domain": {"domain": "0", "label": "ACM:example:web"},
        "set_resource_label": {"resource": "file:/srv/x.img", "label": None},
        "policy_load": {"source": {"text": "x", "filename": "p.toml"}},
        "policy_reset": None,
        "forget_domain": {"domain": uuid},
        "reserve": {"uuid": uuid, "host": "h2"},
    }
    admin_ops = sorted(name for name, op in OPS.items() if op.access == "admin")
    assert admin_ops == sorted(args), "a new admin op: add it here"
    lines = [
        json.dumps({"version": 1, "op": op, **({} if args[op] is None else {"args": args[op]})})
        for op in admin_ops
    ]
    before = (backend.mode, backend.reload_store())
    async with aserving(backend, backend.directory, config=config(backend, accounts)) as server:
        for who in (accounts.reader, accounts.outsider):
            answers = await in_thread(as_user, who, server.path, *lines)
            assert [code(a) for a in answers] == ["permission-denied"] * len(lines), who
    assert (backend.mode, backend.reload_store()) == before
    assert not any(a.allowed for a in backend.audits)
