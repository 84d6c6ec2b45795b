"""``shype-xl migrate [xl migrate options] DOMAIN HOST``: pool mode's admission before a
migration (docs/pool.md, "Migration and restore admission").

1. the domain's UUID from the local daemon (``get_domain_label``);
2. a reservation on HOST, granted or refused by HOST's own daemon through the pool
   (control op ``reserve``); refused: exit 1 with the reason, nothing moves;
3. granted: ``xl migrate`` with the arguments as given (``--xl-host TARGET``: the transport
   target xl is given instead of HOST, e.g. an ssh alias or a sandbox socket).
"""

from __future__ import annotations

import getopt
from typing import Any

from shyped.control import backend as b
from shyped.control.client import DaemonUnreachable

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
