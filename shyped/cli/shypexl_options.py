"""shype-xl's command line: its own options and xl's global options, up to the sub-command.

`parse_options` reads them as xl would (xl's global options and every sub-command's arguments
pass through to xl untouched, which argparse would not do); `build_parser` describes the same
options as an argparse parser for ``--help``, the man page and the shell completion. `Refused`
and `Shown` end a run early (`shyped.cli.shypexl.run` turns them into an exit status).
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

from shyped.cli.conventions import add_version
from shyped.cli.shypectl import (
    EXIT_USAGE,
)
from shyped.control.client import default_socket

XL_ENV: Final = "SHYPE_XL"
FAIL_OPEN_ENV: Final = "SHYPE_XL_FAIL_OPEN"
#: xl's global options (tools/xl/xl.c): none takes an argument.
_XL_GLOBAL: Final = frozenset("vfNtTh")


class Refused(Exception):
    """shype-xl will not go on; `status` is the exit status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class Shown(Exception):
    """``--help`` or ``--version`` before the sub-command: print it, exit 0."""


@attrs.frozen
class Options:
    xl: tuple[str, ...]
    socket: Path
    fail_open: bool
    timeout: float
    admission_timeout: float
    xl_globals: tuple[str, ...]
    command: str | None
    rest: tuple[str, ...]


_USAGE = """usage: shype-xl [--socket PATH] [--xl CMD] [--fail-open] [--timeout S]
                [--admission-timeout S] [xl options] SUBCOMMAND [ARGS…]
create, block-attach and network-attach are checked with shyped; the rest go to xl as is.
shype-xl --help: shype-xl's help; shype-xl help [SUBCOMMAND] or shype-xl -h: xl's."""

_XL_HELP = (
    "xl's own help: `shype-xl help` (xl's sub-commands), `shype-xl help SUBCOMMAND` or "
    "`shype-xl SUBCOMMAND -h` (its options; for create, block-attach and network-attach "
    "shype-xl's note comes first), `shype-xl -h` (xl's global options)."
)


def build_parser() -> argparse.ArgumentParser:
    """shype-xl's options as an argparse parser: its ``--help``, man page and completion.

    The command line itself is read by `parse_options` (xl's global options and every
    sub-command's arguments pass through to xl untouched, which argparse would not do).
    """
    parser = argparse.ArgumentParser(
        prog="shype-xl",
        add_help=False,  # -h is xl's (its global help option)
        description="xl with shyped's admission in front of create and device attaches: "
        "create runs `xl create -p`, waits for the daemon to admit the domain and its "
        "devices, then unpauses it (or destroys it); block-attach and network-attach are "
        "dry-run with the daemon first. Every other sub-command is xl's, run as is. Fail "
        "closed: without the daemon, create and the attaches are refused (exit 3).",
        epilog=f"{_XL_HELP} Exit status: 0 ok, 1 denied by the policy, 2 usage or bad cfg, "
        "3 daemon unreachable or no admission in time, 4 permission denied, 6 unknown label; "
        "otherwise xl's own status. docs/control-protocol.md, section shype-xl.",
    )
    parser.add_argument(
        "--help", action="help", help="show this help and exit (xl's own: shype-xl -h)"
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket (default $SHYPED_SOCKET or /run/shyped/control.sock)",
    )
    parser.add_argument(
        "--xl", metavar="CMD", help=f"the xl command, split like a shell (default ${XL_ENV} or xl)"
    )
    parser.add_argument(
        "--fail-open",
        action="store_true",
        help=f"go on without the daemon, with a warning (also ${FAIL_OPEN_ENV}=1)",
    )
    parser.add_argument("--timeout", metavar="S", help="seconds to wait for the daemon (10)")
    parser.add_argument(
        "--admission-timeout", metavar="S", help="seconds to wait for the admission (60)"
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    p = sub.add_parser(
        "create",
        help="create a domain paused, unpause it once shyped admitted it",
        description="Read CFG as xl does, dry-run the domain, its disks and vifs with shyped, "
        "register its label, `xl create -p`, wait for the admission, then `xl unpause` (or "
        "`xl destroy` and exit 1). -F/-e are refused (the domain must be admitted while "
        "paused).",
    )
    p.add_argument("config", metavar="CFG", help="xl.cfg file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for xl create")
    p.add_argument("-p", action="store_true", help="leave the domain paused once admitted")
    p.add_argument("-q", "--quiet", action="store_true", help="passed to xl create")
    p.add_argument("-d", action="store_true", help="passed to xl create (debug)")
    p.add_argument("-i", action="store_true", help="passed to xl create")
    p.add_argument("-c", action="store_true", help="attach the console once admitted")
    p.add_argument("-V", "--vncviewer", action="store_true", help="xl vncviewer once admitted")
    p.add_argument("-A", "--vncviewer-autopass", action="store_true", help="same, --autopass")
    p.add_argument("-n", "--dryrun", action="store_true", help="xl's own dry run (no daemon)")
    p = sub.add_parser("block-attach", help="hot-plug a disk if shyped permits it")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("spec", nargs="+", metavar="DISKSPEC")
    p = sub.add_parser("network-attach", help="hot-plug a vif if shyped permits it")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("spec", nargs="*", metavar="KEY=VALUE")
    return parser


def parse_options(argv: Sequence[str]) -> Options:
    """shype-xl's own options and xl's global options, up to the sub-command."""
    xl = os.environ.get(XL_ENV, "xl")
    socket = default_socket()
    fail_open = os.environ.get(FAIL_OPEN_ENV, "") in ("1", "yes", "true")
    timeout, admission_timeout = 10.0, 60.0
    globals_: list[str] = []
    args = list(argv)
    i = 0

    def value(name: str) -> str:
        nonlocal i
        if "=" in args[i]:
            return args[i].split("=", 1)[1]
        if i + 1 >= len(args):
            raise Refused(f"{name} needs a value\n{_USAGE}", EXIT_USAGE)
        i += 1
        return args[i]

    def number(name: str) -> float:
        text = value(name)
        try:
            n = float(text)
        except ValueError:
            raise Refused(f"{name}: {text!r} is not a number", EXIT_USAGE) from None
        if not 0 < n <= 600:
            raise Refused(f"{name} must be in (0, 600]", EXIT_USAGE)
        return n

    while i < len(args):
        a = args[i]
        name = a.split("=", 1)[0]
        if name == "--xl":
            xl = value("--xl")
        elif name == "--socket":
            socket = Path(value("--socket"))
        elif a == "--fail-open":
            fail_open = True
        elif a in ("--help", "--version"):
            raise Shown(a)
        elif name == "--timeout":
            timeout = number("--timeout")
        elif name == "--admission-timeout":
            admission_timeout = number("--admission-timeout")
        elif a == "--":
            i += 1
            break
        elif a.startswith("-") and len(a) > 1 and not a.startswith("--"):
            if not set(a[1:]) <= _XL_GLOBAL:
                raise Refused(f"unknown option {a!r}\n{_USAGE}", EXIT_USAGE)
            globals_.append(a)
        elif a.startswith("--"):
            raise Refused(f"unknown option {a!r}\n{_USAGE}", EXIT_USAGE)
        else:
            break
        i += 1
    xl_cmd = tuple(shlex.split(xl))
    if not xl_cmd:
        raise Refused("the xl command is empty", EXIT_USAGE)
    command = args[i] if i < len(args) else None
    return Options(
        xl=xl_cmd,
        socket=socket,
        fail_open=fail_open,
        timeout=timeout,
        admission_timeout=admission_timeout,
        xl_globals=tuple(globals_),
        command=command,
        rest=tuple(args[i + 1 :]),
    )
