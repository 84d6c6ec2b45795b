"""``shype-xl migrate [xl migrate options] DOMAIN HOST`` and ``shype-xl restore``: admission
before a domain moves in (docs/pool.md, "Migration and restore admission").

1. the domain's UUID from the local daemon (``get_domain_label``);
2. a reservation on HOST, granted or refused by HOST's own daemon through the pool
   (control op ``reserve``); refused: exit 1 with the reason, nothing moves;
3. granted: ``xl migrate`` with the arguments as given (``--xl-host TARGET``: the transport
   target xl is given instead of HOST, e.g. an ssh alias or a sandbox socket).
"""

from __future__ import annotations

import getopt
from pathlib import Path
from typing import Any

from shyped.control import backend as b
from shyped.control.client import DaemonUnreachable
from shyped.control.xlitems import summarize
from shyped.core.xlcfg import XlConfigError
from shyped.core.xlsavefile import HEADER_LEN, MAX_CONFIG, SaveFileError, read_header

#: ``xl migrate``'s options (tools/xl/xl_migrate.c main_migrate: "FC:s:epD", --debug, --live).
_SHORT = "FC:s:epD"
_LONG = ["debug", "live", "xl-host="]


def migrate(wrapper: Any, rest: list[str]) -> int:
    """`wrapper`: the `shyped.cli.shypexl.Wrapper` of this run (client, xl, say)."""
    try:
        opts, args = getopt.gnu_getopt(rest, _SHORT, _LONG)
    except getopt.GetoptError:
        wrapper.exec_xl("migrate", *rest)  # xl prints its own usage
    if len(args) != 2:
        wrapper.exec_xl("migrate", *rest)
    domain, host = args
    target = next((v for k, v in opts if k == "--xl-host"), host)
    passed = [x for k, v in opts if k != "--xl-host" for x in ((k, v) if v else (k,))]
    try:
        info = wrapper.client.get_domain_label(domain)
        if not info.uuid:
            wrapper.say(f"domain {domain} has no UUID: cannot reserve a place for it")
            return 1
        grant = wrapper.client.reserve(b.ReserveArgs(info.uuid, host, "migrate"))
    except DaemonUnreachable as exc:
        wrapper.unreachable(exc)
        wrapper.exec_xl("migrate", *passed, domain, target)
    wrapper.say(f"{host} granted a place for {domain} ({grant.label}): {grant.reason}")
    wrapper.exec_xl("migrate", *passed, domain, target)
    return 0  # not reached: exec_xl replaced this process


#: ``xl restore``'s options (tools/xl/xl_saverestore.c main_restore: "FcpdeVA").
_RESTORE_SHORT = "FcpdeVA"
_RESTORE_LONG = ["vncviewer", "vncviewer-autopass"]


def restore(wrapper: Any, rest: list[str]) -> int:
    """``shype-xl restore [options] [CONFIG] FILE``: the domain (UUID, name, label) from the
    save file's header (or CONFIG), admitted before xl restores it: in pool mode a
    reservation on this host (its daemon is the authority), else a dry run; refused: exit 1
    and nothing is restored."""
    try:
        _opts, args = getopt.gnu_getopt(rest, _RESTORE_SHORT, _RESTORE_LONG)
    except getopt.GetoptError:
        wrapper.exec_xl("restore", *rest)
    if len(args) not in (1, 2):
        wrapper.exec_xl("restore", *rest)
    try:
        name, uuid, label = _saved(args)
    except (OSError, SaveFileError, XlConfigError) as exc:
        wrapper.say(f"cannot read {args[-1]}: {exc}")
        return 2
    try:
        status = wrapper.client.status()
        if status.pool is not None:
            grant = wrapper.client.reserve(b.ReserveArgs(uuid, status.pool.host, "restore", label))
            wrapper.say(f"{status.pool.host} granted a place for {name} ({grant.label})")
        else:
            res = wrapper.client.dry_run(b.DryRunArgs(domain=b.NewDomain(name, uuid, label)))
            if not res.permitted:
                wrapper.say(f"restore of {name} DENIED by shyped:")
                wrapper.print_verdicts(res.items)
                return 1
    except DaemonUnreachable as exc:
        wrapper.unreachable(exc)
    wrapper.exec_xl("restore", *rest)
    return 0  # not reached: exec_xl replaced this process


def _saved(args: list[str]) -> tuple[str, str, str | None]:
    """(name, uuid, label) of the domain a restore brings back."""
    if len(args) == 2:  # an override config: xl takes the domain's config from it
        cfg = summarize(Path(args[0]).read_text(), args[0])
        if cfg.domain.uuid is None:
            raise XlConfigError(f"{args[0]}: no uuid: the restored domain keeps its own")
        return cfg.domain.name, cfg.domain.uuid, cfg.domain.label
    with open(args[0], "rb") as f:
        saved = read_header(f.read(HEADER_LEN + MAX_CONFIG + 8))
    return saved.name, saved.uuid, saved.seclabel
