"""What every shyped command does the same way (docs/operations.md, "Exit status").

- ``--version`` on every command (`add_version`);
- ``--json`` accepted after the sub-command as well as before it (`json_after_subcommands`,
  run once on the finished parser, so verbs added later get it by construction);
- no traceback, ever (`guarded`): a closed output pipe (``| head``) ends the command quietly,
  permission and other OS errors are one line on stderr, each with its documented status;
- one table of exit statuses, shared by shypectl, shype-xl, shyped and the audit commands.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final, TextIO

from shyped import __version__

EXIT_OK: Final = 0
#: The policy said no (dry-run DENIED, relabel denied, policy rejected); audit verify: broken.
EXIT_DENIED: Final = 1
#: Usage error or bad input (arguments, cfg file, policy text, an unreadable file or log).
EXIT_USAGE: Final = 2
#: The daemon could not be asked or failed (not running, timeout, internal error).
EXIT_DAEMON: Final = 3
#: Permission denied by the daemon, or on its control socket (a local file: EXIT_USAGE).
EXIT_PERMISSION: Final = 4
#: No such domain or resource.
EXIT_NOT_FOUND: Final = 5
#: A label the active policy does not have (a typo: the message says "did you mean").
EXIT_UNKNOWN_LABEL: Final = 6
#: A bug in the command itself (one line; ``SHYPED_DEBUG=1`` shows the traceback).
EXIT_INTERNAL: Final = 70
#: The output was closed early (``| head``): quiet, as a C tool killed by SIGPIPE.
EXIT_BROKEN_PIPE: Final = 141
#: Ctrl-C.
EXIT_INTERRUPTED: Final = 130

#: The table docs/operations.md shows (checked by tests/test_cli_conventions.py).
EXIT_TABLE: Final = (
    (EXIT_OK, "success"),
    (EXIT_DENIED, "the policy said no; audit verify: the chain is broken"),
    (EXIT_USAGE, "usage error or bad input; a file or log that cannot be read"),
    (EXIT_DAEMON, "the daemon could not be asked or failed"),
    (EXIT_PERMISSION, "permission denied by the daemon or on its socket"),
    (EXIT_NOT_FOUND, "no such domain or resource"),
    (EXIT_UNKNOWN_LABEL, "unknown label (a typo: did you mean …)"),
    (EXIT_INTERNAL, "internal error of the command (one line; SHYPED_DEBUG=1 for details)"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
    (EXIT_BROKEN_PIPE, "output closed early (| head): quiet"),
)

DEBUG_ENV: Final = "SHYPED_DEBUG"
#: The daemon's configuration, which the audit commands read their directory from.
DEFAULT_CONFIG: Final = Path("/etc/shyped/shyped.toml")
CONFIG_ENV: Final = "SHYPED_CONFIG"


def version_text(prog: str) -> str:
    return f"{prog} (shyped) {__version__}"


def add_version(parser: argparse.ArgumentParser, name: str | None = None) -> None:
    """``--version``: ``<prog> (shyped) <version>`` on stdout, exit 0."""
    text = version_text(name or parser.prog.split()[0])
    parser.add_argument("--version", action="version", version=text)


def subparsers_of(parser: argparse.ArgumentParser) -> Iterator[argparse._SubParsersAction]:  # type: ignore[type-arg]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield action


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser under `parser` (itself first) with the words that reach it."""
    yield path, parser
    for action in subparsers_of(parser):
        seen: set[int] = set()
        for name, sub in action.choices.items():
            if id(sub) in seen:  # an alias
                continue
            seen.add(id(sub))
            yield from walk(sub, (*path, name))


def _has_option(parser: argparse.ArgumentParser, option: str) -> bool:
    return option in parser._option_string_actions


def json_after_subcommands(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Let every sub-command take the global ``--json`` after its name too.

    The sub-command's ``--json`` has ``default=SUPPRESS``: absent, it leaves the global one be.
    Sub-commands that define their own ``--json`` keep it. Returns `parser`.
    """
    for path, sub in walk(parser):
        if path and not _has_option(sub, "--json"):
            sub.add_argument(
                "--json",
                action="store_true",
                default=argparse.SUPPRESS,
                help="machine-readable JSON output (as the global --json)",
            )
    return parser


def seconds(text: str) -> float:
    """An argparse type: a duration in (0, 3600] seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 3600] seconds")
    return value


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _say(err: TextIO, text: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(text, file=err, flush=True)


def os_error_text(exc: OSError) -> str:
    """``/path: Permission denied`` (the file first, as coreutils write it)."""
    what = exc.strerror or str(exc)
    name = exc.filename
    return f"{name}: {what}" if name else what


def guarded(run: Callable[[], int], prog: str, err: TextIO | None = None) -> int:
    """`run()`'s exit status, with every escaping exception turned into one line and a status.

    ``BrokenPipeError`` (the reader went away): no message, `EXIT_BROKEN_PIPE`. Another
    ``OSError``, permission denied included: `EXIT_USAGE` (a file or directory named on the
    command line cannot be used; `EXIT_PERMISSION` is the daemon's refusal, or its socket's).
    Anything else is a bug:
    `EXIT_INTERNAL`, with the traceback only when ``$SHYPED_DEBUG`` is set.
    """
    stream = err if err is not None else sys.stderr
    try:
        return run()
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _say(stream, f"{prog}: interrupted")
        return EXIT_INTERRUPTED
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            _silence_stdout()
            return EXIT_BROKEN_PIPE
        _say(stream, f"{prog}: {os_error_text(exc)}")
        return EXIT_USAGE
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            traceback.print_exc(file=stream)
        _say(stream, f"{prog}: internal error: {type(exc).__name__}: {exc}")
        return EXIT_INTERNAL


def exit_guarded(run: Callable[[], int], prog: str) -> None:
    """`guarded` for a console script's ``main``: exits with the status."""
    code = guarded(run, prog)
    try:
        sys.stdout.flush()
    except (BrokenPipeError, OSError, ValueError):
        _silence_stdout()
        if code == EXIT_OK:
            code = EXIT_BROKEN_PIPE
    sys.exit(code)
