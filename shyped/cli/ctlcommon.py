"""What shypectl's commands share: exit statuses, the command context (socket, output format),
reading and writing the files they are given."""

from __future__ import annotations

import argparse
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, TextIO

from shyped.cli.conventions import EXIT_DAEMON as EXIT_DAEMON
from shyped.cli.conventions import EXIT_DENIED as EXIT_DENIED
from shyped.cli.conventions import EXIT_NOT_FOUND as EXIT_NOT_FOUND
from shyped.cli.conventions import EXIT_OK as EXIT_OK
from shyped.cli.conventions import EXIT_PERMISSION as EXIT_PERMISSION
from shyped.cli.conventions import EXIT_UNKNOWN_LABEL as EXIT_UNKNOWN_LABEL
from shyped.cli.conventions import EXIT_USAGE as EXIT_USAGE
from shyped.control import backend as b
from shyped.control.client import ControlClient
from shyped.control.protocol import ControlError, ErrorCode, unstructure
from shyped.fileio.atomicfile import write_atomic
from shyped.fileio.boundedread import POLICY_MAX_BYTES, XLCFG_MAX_BYTES, read_bounded

_EXIT_BY_CODE: Final = {
    ErrorCode.DENIED: EXIT_DENIED,
    ErrorCode.POLICY_REJECTED: EXIT_DENIED,
    ErrorCode.BAD_REQUEST: EXIT_USAGE,
    ErrorCode.INVALID_ARGUMENT: EXIT_USAGE,
    ErrorCode.POLICY_INVALID: EXIT_USAGE,
    ErrorCode.TOO_LARGE: EXIT_USAGE,
    ErrorCode.PERMISSION_DENIED: EXIT_PERMISSION,
    ErrorCode.NOT_FOUND: EXIT_NOT_FOUND,
    ErrorCode.UNKNOWN_LABEL: EXIT_UNKNOWN_LABEL,
}


def exit_status(code: ErrorCode) -> int:
    """The documented exit status for a daemon error code (3 for anything else)."""
    return _EXIT_BY_CODE.get(code, EXIT_DAEMON)


class UsageError(Exception):
    """Bad local input (exit 2)."""


class Ctx:
    """What every command gets: the client, output streams and the output mode."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.json = bool(args.json)
        self._client: ControlClient | None = None

    @property
    def client(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.args.socket, timeout=self.args.timeout)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def emit(self, result: Any, human: Callable[[], None]) -> None:
        """Print `result` as JSON (--json) or through `human`."""
        if self.json:
            print(json.dumps(unstructure(result), indent=2, sort_keys=True), file=self.out)
        else:
            human()

    def say(self, text: str = "") -> None:
        print(text, file=self.out)


# --------------------------------------------------------------------------- helpers


def _read_text(path: Path, what: str) -> str:
    cap = POLICY_MAX_BYTES if what == "policy" else XLCFG_MAX_BYTES
    try:
        return read_bounded(path, cap, what).decode("utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not UTF-8 text") from None


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` atomically, keeping its mode (and owner when root).

    Only a regular file is edited: a symlink would make us stat (and copy the mode and owner
    of) whatever it points to.
    """
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{path} is not a regular file (symlinks are not edited)")
    owner = (st.st_uid, st.st_gid) if os.geteuid() == 0 else None
    write_atomic(path, text.encode("utf-8"), mode=st.st_mode & 0o7777, owner=owner)


def _policy_source(path: Path) -> b.PolicySource:
    return b.PolicySource(text=_read_text(path, "policy"), filename=str(path))


def check_cfg_label(client: ControlClient, label: object | None) -> None:
    """An ``unknown-label`` error (exit 6, "did you mean …") for a cfg label the active
    policy lacks, before a dry run would report it as a denial. A label of another policy,
    or one that does not parse, is left to the dry run to deny."""
    if label is None:
        return
    try:
        client.validate_label(str(label), "vm")
    except ControlError as exc:
        if exc.code is ErrorCode.UNKNOWN_LABEL:
            raise


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"
