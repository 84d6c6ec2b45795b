"""The transaction bodies of a device cut (`shyped.service.enforcer`): the backend's state,
libxl's path clean-up, and the walk that revokes or re-checks a guest-owned frontend directory,
bounded by `MAX_FRONTEND_NODES`. They run in a worker thread inside one xenstore transaction."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from shyped.xenstore import NoEntry, Perm, Transaction

#: Most nodes a device veto re-permissions below a (guest-owned) frontend directory.
MAX_FRONTEND_NODES = 512


def parse_state(raw: bytes | None) -> int | None:
    """A backend's XenbusState; None if the node is absent, 0 (Unknown) if it is garbage."""
    if raw is None:
        return None
    try:
        return int(raw.strip(b"\x00"))
    except ValueError:
        return 0


def path_cleanup(tx: Transaction, path: str) -> bool:
    """``libxl__xs_path_cleanup``: remove `path`, then every parent that has become empty and
    has an empty value. False if `path` was not there."""
    try:
        tx.rm(path)
    except NoEntry:
        return False
    parent = path
    while True:
        parent = parent.rsplit("/", 1)[0]
        if not parent:
            return True
        try:
            if tx.read(parent) != b"" or tx.directory(parent):
                return True
            tx.rm(parent)
        except NoEntry:
            return True


def _walk_frontend(tx: Transaction, frontend_dir: str, visit: Callable[[str], bool]) -> bool:
    """`visit` the directory and every node below it, breadth first, up to
    `MAX_FRONTEND_NODES` (nodes gone meanwhile are skipped); stops early when `visit` says
    False. True if every node was visited: the guest owns its frontend directory and may fill
    it with junk nodes to make a walk stop at the cap."""
    level = [frontend_dir]
    done = 0
    while level:
        next_level: list[str] = []
        for path in level:
            if done >= MAX_FRONTEND_NODES:
                return False
            try:
                if not visit(path):
                    return True
                kids = tx.directory(path)
            except NoEntry:
                continue
            done += 1
            next_level.extend(f"{path}/{k}" for k in kids)
        level = next_level
    return True


def revoke_frontend(tx: Transaction, frontend_dir: str, frontend: int) -> tuple[int, bool]:
    """Owner = the frontend, no access for anyone else, on the directory and below it.
    Returns the nodes set and whether that was all of them (else the caller fails closed)."""
    perms = (Perm("n", frontend),)
    done: list[str] = []

    def revoke(path: str) -> bool:
        tx.set_perms(path, perms)
        done.append(path)
        return True

    complete = _walk_frontend(tx, frontend_dir, revoke)
    return len(done), complete


def frontend_regranted(tx: Transaction, frontend_dir: str, frontend: int) -> str | None:
    """Why the frontend directory of a pending cut must go at once, or None: a node below it
    grants another domain again (the guest owns its nodes and may SET_PERMS them during the
    wait), or it holds more than `MAX_FRONTEND_NODES` nodes to look at."""
    only_owner = (Perm("n", frontend),)
    found: list[str] = []

    def check(path: str) -> bool:
        perms = tuple(tx.get_perms(path))
        if perms != only_owner:
            found.append(f"{path} granted again ({','.join(str(p) for p in perms)})")
        return not found

    if not _walk_frontend(tx, frontend_dir, check):
        return f"more than {MAX_FRONTEND_NODES} nodes"
    return found[0] if found else None


#: XenbusState Initialising / InitWait (`hotplug_pending`).
_INITIALISING = 1
_INIT_WAIT = 2


def hotplug_nodes(be_dir: str, fe_dir: str) -> tuple[str, str, str, str]:
    """The nodes `hotplug_pending` reads: backend ``script``, ``hotplug-status`` and
    ``state``, frontend ``state``."""
    return (f"{be_dir}/script", f"{be_dir}/hotplug-status", f"{be_dir}/state", f"{fe_dir}/state")


def hotplug_pending(values: Mapping[str, bytes | None], be_dir: str, fe_dir: str) -> bool:
    """Is the device still being added, its hotplug script not done? A cut then would make
    the add fail (libxl_device.c: libxl waits for the backend's InitWait, then runs the
    ``script`` and fails the add if it exits non-zero; netback drops ``vif<d>.<n>`` under
    ``vif-bridge`` when told Closing), and ``xl create`` destroy the whole domain.

    True while the backend names a script, has no ``hotplug-status`` value yet (libxl
    writes "" for a vif; the script writes "connected" or "error"), is at Initialising or
    InitWait, and the frontend is still Initialising: a guest that moved its frontend on
    is cut at once (its backend cannot connect before the script is done either way)."""
    script, status, be_state, fe_state = (values.get(p) for p in hotplug_nodes(be_dir, fe_dir))
    if script is None or status not in (None, b""):
        return False
    return parse_state(be_state) in (_INITIALISING, _INIT_WAIT) and (
        parse_state(fe_state) == _INITIALISING
    )
