"""Per-host identities for a pool (pure): the etcd RBAC role of each host's own etcd user.

Each host authenticates as its own etcd user (``[pool] user``, a password file only that host
holds) with one role: read the whole prefix, write only the ranges named after it (its
membership, resource labels, audit anchors, proposals, answers, reservation requests and
grants: `shyped.pool.keys`) and the pool-wide ranges every host writes (domain labels, the
committed policy). etcd then refuses host A's write of host B's answer, grant or anchor
(``permission denied``), and readers take the writer from the key (docs/pool.md, "Per-host
identities"). `etcdctl_commands` is the recipe ``shypectl pool-roles`` prints.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

import attrs

from shyped.pool.keys import PoolKeys


@attrs.frozen
class Permission:
    """One etcd role permission: ``read`` or ``readwrite`` on a key, or on every key below it."""

    kind: str
    key: str
    prefix: bool


def host_permissions(keys: PoolKeys) -> tuple[Permission, ...]:
    """What the role of host `keys.host` may do under `keys.prefix`."""
    h = keys.host
    own = (
        keys.audit_anchors(h),
        keys.labels + f"res/{h}/",
        keys.proposals + f"{h}/",
        keys.answers + f"{h}/",
        keys.reservations + f"{h}/",
        keys.prefix + f"/grants/{h}/",
    )
    shared = (keys.labels + "uuid/", keys.labels + "name/")
    return (
        Permission("read", keys.root, True),
        Permission("readwrite", keys.host_state(h), False),
        *(Permission("readwrite", k, True) for k in own),
        *(Permission("readwrite", k, True) for k in shared),
        Permission("readwrite", keys.policy_current, False),
    )


def role_name(user_prefix: str, host: str) -> str:
    return user_prefix + host


def etcdctl_argv(
    prefix: str, hosts: Iterable[str], user_prefix: str = "shyped-"
) -> list[list[str]]:
    """The etcdctl calls (arguments after ``etcdctl``) that create one user and one role per
    host; `user add` asks for the password (give each host its own, stored in that host's
    ``password_file``)."""
    out: list[list[str]] = []
    for host in hosts:
        name = role_name(user_prefix, host)
        out += [["user", "add", name], ["role", "add", name]]
        for p in host_permissions(PoolKeys(prefix, host)):
            flag = ["--prefix=true"] if p.prefix else []
            out.append(["role", "grant-permission", name, p.kind, *flag, p.key])
        out.append(["user", "grant-role", name, name])
    return out


def etcdctl_commands(prefix: str, hosts: Iterable[str], user_prefix: str = "shyped-") -> list[str]:
    """`etcdctl_argv` as shell lines."""
    return [shlex.join(["etcdctl", *argv]) for argv in etcdctl_argv(prefix, hosts, user_prefix)]
