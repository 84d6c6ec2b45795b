"""Save, restore and live migration for the sandbox toolstack, as xl / libxl 4.17 write them.

Sources (xen-project/xen, Xen 4.17; read again with the search tools when in doubt):

* ``tools/xl/xl_migrate.c`` ``migrate_domain`` / ``migrate_receive``: the receiver creates the
  domain **paused** under the temporary name ``<name>--incoming`` (``xl_vmcontrol.c``
  ``create_domain`` with ``migrate_fd``: ``"%s--incoming"``); once the stream is in, it asks
  for permission; the sender renames its copy ``<name>--migratedaway``, says GO; the receiver
  renames its copy ``<name>`` and unpauses it, reports success, and the sender destroys its
  copy ("bang!"). If the receiver fails, it destroys its copy, and the sender renames its own
  back and resumes it.
* ``tools/libs/light/libxl_domain.c`` ``libxl__domain_rename``: one transaction reads
  ``<home>/name`` (must be the old name), writes the new one there and in ``/vm/<uuid>/name``.
* ``libxl_dom_suspend.c``: a PV guest is asked to suspend through ``<home>/control/shutdown``
  = ``suspend`` (libxl__domain_pvcontrol_write), which the guest acknowledges by clearing it.
* ``tools/xl/xl_saverestore.c``: ``xl save`` suspends the domain into the file, then destroys it
  (unless ``-c``); ``xl restore`` is ``create_domain`` from the file's stored configuration:
  ``libxl_domain_create_restore`` makes the domain with the same ``libxl__domain_make`` and
  device writes as a create (``libxl_create.c``), paused until the end, unpaused unless ``-p``.

The sandbox has no memory image: a save file is xl's header and the domain's stored
configuration as JSON (`shyped.core.xlsavefile`) without libxc's stream after it, and a
"host" to migrate to is another sandbox xenstored, named by its socket path.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from shyped.core.xlcfg import DomainConfig, domain_config_from_text
from shyped.core.xlsavefile import HEADER_LEN, MAX_CONFIG, SaveFileError, read_header, write_header
from shyped.sandbox import layout as L
from shyped.sandbox.hypervisor import DomainState
from shyped.sandbox.layout import Actor, Op, Write, step
from shyped.sandbox.toolstack import Toolstack
from shyped.sandbox.toolstack_base import ToolstackError

INCOMING: Final = "--incoming"
AWAY: Final = "--migratedaway"


class MigrationError(ToolstackError):
    """The move did not happen; the domain runs (or is paused) where it was."""


def config_text(config: dict[str, Any], name: str | None = None) -> str:
    """An xl.cfg text for libxl's stored configuration (`_config_json`'s fields)."""
    c, bi = config["c_info"], config["b_info"]
    lines = [f'name = "{name or c["name"]}"', f'uuid = "{c["uuid"]}"']
    lines += [f"memory = {bi['target_memkb'] // 1024}", f"maxmem = {bi['max_memkb'] // 1024}"]
    lines += [f"vcpus = {len(bi['avail_vcpus'])}", f"maxvcpus = {bi['max_vcpus']}"]
    lines += [f'{k} = "{bi[k]}"' for k in ("kernel", "ramdisk", "cmdline") if bi.get(k)]
    if c.get("ssid_label"):
        lines.append(f'seclabel = "{c["ssid_label"]}"')
    disks = [
        f"'format={d['format']},vdev={d['vdev']},access={'rw' if d['readwrite'] else 'ro'},"
        f"target={d['pdev_path']}'"
        for d in config.get("disks", [])
    ]
    if disks:
        lines.append(f"disk = [{', '.join(disks)}]")
    vifs = [
        "'" + ",".join(f"{k}={n[k]}" for k in ("mac", "bridge") if k in n) + "'"
        for n in config.get("nics", [])
    ]
    if vifs:
        lines.append(f"vif = [{', '.join(vifs)}]")
    return "\n".join(lines) + "\n"


def _cfg(dom: DomainState, name: str | None = None) -> DomainConfig:
    if not dom.config:
        raise MigrationError(f"no config stored for domain {dom.name}: cannot save or migrate")
    return domain_config_from_text(config_text(dom.config, name), f"{dom.name} (stored)")


def rename(ts: Toolstack, domain: str | int, old: str, new: str) -> None:
    """libxl__domain_rename: one transaction, the old name checked."""
    with ts._command() as (host, session):
        dom = host.lookup(str(domain))
        home = L.dom_path(dom.domid)
        conn = session.conn(Actor.LIBXL)
        if conn.read(f"{home}/name") != old:
            raise ToolstackError(f"domain {dom.domid} is not named {old!r} (racing?)")
        if any(d.name == new and d.domid != dom.domid for d in host.domains.values()):
            raise ToolstackError(f'Domain with name "{new}" already exists.')
        ops: list[Op] = [Write(f"{home}/name", new), Write(f"{L.vm_path(dom.uuid)}/name", new)]
        ts._run(session, step(Actor.LIBXL, ops, tx=True, what="libxl__domain_rename"))
        dom.name = new


def suspend(ts: Toolstack, domain: str | int) -> None:
    """libxl's PV suspend request and the guest's acknowledgement; the domain stops running."""
    with ts._command() as (host, session):
        dom = host.lookup(str(domain))
        shutdown = f"{L.dom_path(dom.domid)}/control/shutdown"
        ts._run(
            session, step(Actor.LIBXL, [Write(shutdown, "suspend")], tx=False, what="pvcontrol")
        )
        guest = step(
            Actor.GUEST_KERNEL, [Write(shutdown, "")], tx=False, domid=dom.domid, what="ack"
        )
        ts._run(session, guest)
        dom.paused = True


def resume(ts: Toolstack, domain: str | int) -> None:
    """libxl_domain_resume(suspend_cancel=1): the domain runs on where it was."""
    with ts._command() as (host, _session):
        host.lookup(str(domain)).paused = False


def save(ts: Toolstack, domain: str | int, path: Path, *, checkpoint: bool = False) -> None:
    """``xl save [-c] DOMAIN FILE``."""
    dom = _lookup(ts, domain)
    _cfg(dom)
    suspend(ts, dom.domid)
    path.write_bytes(write_header(dom.config))  # no memory stream in the sandbox
    if checkpoint:
        resume(ts, dom.domid)
    else:
        ts.destroy(dom.domid)


def restore(ts: Toolstack, path: Path, *, paused: bool = False) -> int:
    """``xl restore [-p] FILE``: created paused from the stored configuration, unpaused at the
    end unless ``paused``."""
    try:
        saved = read_header(path.read_bytes()[: HEADER_LEN + MAX_CONFIG + 8])
    except SaveFileError as exc:
        raise ToolstackError(f"{path}: {exc}") from None
    cfg = domain_config_from_text(config_text(saved.config), str(path))
    domid = ts.create(cfg, paused=True)
    if not paused:
        ts.unpause(domid)
    return domid


def migrate(
    src: Toolstack,
    domain: str | int,
    dst: Toolstack,
    *,
    ready: Callable[[int], None] | None = None,
) -> int:
    """``xl migrate DOMAIN HOST`` with ``xl migrate-receive`` on `dst`; the new domid.

    `ready` runs on the receiver's side after its copy was made (paused) and before it asks
    for permission to start (a test waits for the destination's daemon there). Any failure
    before GO leaves the source domain running where it was (`MigrationError`)."""
    dom = _lookup(src, domain)
    name = dom.name
    cfg = _cfg(dom, name + INCOMING)
    suspend(src, dom.domid)
    try:
        new = dst.create(cfg, paused=True)
    except ToolstackError as exc:
        resume(src, dom.domid)
        raise MigrationError(f"migration target: domain creation failed: {exc}") from exc
    try:
        if ready is not None:
            ready(new)
        if not any(d.domid == new for d in dst.list_domains()):
            raise ToolstackError(f"the incoming domain {new} is gone at the target")
        rename(src, dom.domid, name, name + AWAY)
    except ToolstackError as exc:
        _destroy_quietly(dst, new)
        resume(src, dom.domid)
        raise MigrationError(f"migration failed, resuming at sender: {exc}") from exc
    try:  # after GO
        rename(dst, new, name + INCOMING, name)
        dst.unpause(new)
    except ToolstackError as exc:
        _destroy_quietly(dst, new)
        rename(src, dom.domid, name + AWAY, name)
        resume(src, dom.domid)
        raise MigrationError(f"migration target failed to start the domain: {exc}") from exc
    src.destroy(dom.domid)
    return new


def _lookup(ts: Toolstack, domain: str | int) -> DomainState:
    for d in ts.list_domains():
        if str(domain) in (d.name, str(d.domid)):
            return d
    raise ToolstackError(f"{domain} is an invalid domain identifier")


def _destroy_quietly(ts: Toolstack, domid: int) -> None:
    if any(d.domid == domid for d in ts.list_domains()):
        ts.destroy(domid)


# -- the sandbox CLI's verbs (python -m shyped.sandbox save|restore|migrate) ----------------

COMMANDS: Final = ("save", "restore", "migrate")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("save", help="suspend a domain into a file, then destroy it (xl save)")
    p.add_argument("-c", dest="checkpoint", action="store_true", help="leave it running")
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("file", type=Path, help="save file")
    p = sub.add_parser("restore", help="create a domain from a save file (xl restore)")
    p.add_argument("-p", dest="paused", action="store_true", help="leave it paused")
    p.add_argument("file", type=Path, help="save file")
    p = sub.add_parser(
        "migrate",
        help="live-migrate a domain to another sandbox host, named by its xenstored socket "
        "(xl migrate with xl migrate-receive there)",
    )
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("host", type=Path, help="the destination's xenstored socket")


def run_command(ts: Toolstack, args: Any) -> None:
    if args.command == "save":
        save(ts, args.domain, args.file, checkpoint=args.checkpoint)
    elif args.command == "restore":
        restore(ts, args.file, paused=args.paused)
    else:
        print("migration sender: Target has acknowledged transfer.", file=sys.stderr)
        migrate(ts, args.domain, Toolstack(args.host))
        print("Migration successful.", file=sys.stderr)
