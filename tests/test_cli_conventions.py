"""The conventions every command keeps (shyped.cli.conventions), as an operator meets them:
--help on every command and sub-command, --version, --json after the sub-command, no traceback
(a closed pipe, permission denied, unreadable directories), one table of exit statuses."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from audit_helpers import feed, small
from user_helpers import local_user, needs_users, setpriv, skip_unless_checkout_readable

import shyped
from shyped.cli import auditcli, conventions, shypectl
from shyped.service.auditlog import AuditLog

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def entry_points() -> list[tuple[str, str, str]]:
    """(script, module, function) of every console script pyproject.toml declares."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return [(name, *spec.split(":")) for name, spec in scripts.items()]


#: Every command: (name, how to run it, its parser). Every entry point must expose
#: ``build_parser()`` in its module (its --help, man page and completion come from it).
COMMANDS: list[tuple[str, list[str], Callable[[], argparse.ArgumentParser]]] = [
    (
        name,
        [PY, "-c", f"import sys; from {mod} import {func}; sys.argv[0] = {name!r}; "
         f"sys.exit({func}())"],
        importlib.import_module(mod).build_parser,
    )
    for name, mod, func in entry_points()
] + [
    (
        "shyped.cli.auditcli",
        [PY, "-m", "shyped.cli.auditcli"],
        auditcli.build_parser,
    )
]  # fmt: skip


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)  # type: ignore[call-overload,no-any-return]


def all_paths() -> list[tuple[str, tuple[str, ...]]]:
    out = []
    for name, _, build in COMMANDS:
        out += [(name, path) for path, _ in conventions.walk(build())]
    return out


@pytest.mark.parametrize(("name", "path"), all_paths(), ids=lambda v: " ".join(v) or "-")
def test_help_on_every_command_and_subcommand(
    name: str, path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    build = next(b for n, _, b in COMMANDS if n == name)
    with pytest.raises(SystemExit) as exc:
        build().parse_args([*path, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and " ".join(path) in out.splitlines()[0]
    # every sub-command has a line of help in its parent's listing
    if path:
        parent = next(p for q, p in conventions.walk(build()) if q == path[:-1])
        (sub,) = conventions.subparsers_of(parent)
        helps = {a.dest: a.help for a in sub._choices_actions}
        assert helps.get(path[-1]), f"{name} {' '.join(path)} has no help line"


@pytest.mark.parametrize(("name", "argv"), [pytest.param(n, a, id=n) for n, a, _ in COMMANDS])
def test_version_and_help_of_every_entry_point(name: str, argv: list[str]) -> None:
    r = run(*argv, "--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{name} (shyped) {shyped.__version__}\n", "")
    r = run(*argv, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: ") and r.stderr == ""


def test_shype_xl_help_is_its_own_and_says_how_to_reach_xls() -> None:
    # --xl names nothing that exists: the help must not need xl
    r = run(PY, "-m", "shyped.cli.shypexl", "--xl", "/nonexistent/xl", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: shype-xl ") and "--admission-timeout" in r.stdout
    assert "xl's own help: `shype-xl help`" in " ".join(r.stdout.split())
    # a sub-command's -h is xl's, after shype-xl's note on what it adds
    r = run(PY, "-m", "shyped.cli.shypexl", "--xl", "echo XL", "create", "-h")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("shype-xl create: Read CFG as xl does")
    assert r.stdout == "XL create -h\n"
    # -h is xl's global help
    r = run(PY, "-m", "shyped.cli.shypexl", "--xl", "echo XL", "-h")
    assert (r.returncode, r.stdout) == (0, "XL -h\n"), r.stderr
    # with no sub-command: the usage, exit 2 (as xl)
    r = run(PY, "-m", "shyped.cli.shypexl", "--xl", "/nonexistent/xl")
    assert r.returncode == 2 and "shype-xl --help: shype-xl's help" in r.stderr


def test_json_is_accepted_after_every_shypectl_subcommand() -> None:
    parser = shypectl.build_parser()
    for path, sub in conventions.walk(parser):
        if path:
            assert "--json" in sub._option_string_actions, " ".join(path)
    args = parser.parse_args(["getlabel", "dom", "web", "--json"])
    assert args.json is True
    assert parser.parse_args(["--json", "status"]).json is True
    assert parser.parse_args(["status"]).json is False


def test_a_verb_added_by_another_module_gets_the_conventions() -> None:
    """shypectl's finish_parser runs over whatever sub-commands exist (acm's, policytool's)."""
    parser = argparse.ArgumentParser(prog="shypectl")
    parser.add_argument("--json", action="store_true")
    sub = parser.add_subparsers(dest="command")
    verb = sub.add_parser("setpolicy", help="xm setpolicy")
    verb.add_argument("file")
    shypectl.finish_parser(parser)
    assert parser.parse_args(["setpolicy", "p.xml", "--json"]).json is True


def big_log(directory: Path, records: int = 3000) -> Path:
    with AuditLog(small(directory / "audit", keep_files=0)) as log:
        feed(log, records, flush_every=500)
    return directory / "audit"


@pytest.mark.parametrize("args", [["tail", "-n", "3000"], ["search", "--json"]])
def test_a_closed_pipe_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    """``shypectl audit … | head -1`` (output far beyond the pipe's buffer): no BrokenPipeError
    traceback, no "Broken pipe" error (tail said so, exit 2): quiet, status 141."""
    audit = big_log(tmp_path)
    proc = subprocess.Popen(
        [PY, "-m", "shyped.cli.shypectl", "audit", "--dir", str(audit), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == conventions.EXIT_BROKEN_PIPE
    assert err == ""


@needs_users
def test_permission_denied_is_one_line_and_its_exit_status(tmp_path: Path) -> None:
    """As a user who may not: the control socket (4), an audit directory (2: the log could not
    be read), a configuration file (2). One line each, never a traceback."""
    private = Path("/tmp") / f"clip-{os.getpid()}"
    private.mkdir(mode=0o700)
    try:
        audit = big_log(private, 12)
        config = private / "shyped.toml"
        config.write_text('[policy]\npath = "p.toml"\n')
        socket_path = private / "control.sock"
        with local_user("shyc") as user:
            skip_unless_checkout_readable(user, PY, "shyped.cli.shypectl")
            as_user = [*setpriv(user), PY, "-m"]
            cases = [
                (["shyped.cli.shypectl", "--socket", str(socket_path), "status"], 4),
                (
                    [
                        "shyped.cli.shypexl",
                        "--socket",
                        str(socket_path),
                        "create",
                        "conf/shop-1.cfg",
                    ],
                    4,
                ),
                (["shyped.cli.shypectl", "audit", "--dir", str(audit), "verify"], 2),
                (["shyped.cli.shypectl", "audit", "--dir", str(audit), "tail"], 2),
                (["shyped.cli.shypectl", "audit", "--dir", str(audit), "search"], 2),
                (["shyped.cli.shypectl", "audit", "--config", str(config), "verify"], 2),
                (["shyped.cli.main", "--config", str(config), "check"], 2),
            ]
            for argv, status in cases:
                r = run(*as_user, *argv)
                assert r.returncode == status, (argv, r.stdout, r.stderr)
                assert "Permission denied" in r.stderr and "Traceback" not in r.stderr, argv
                assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    finally:
        for p in sorted(private.rglob("*"), reverse=True):
            p.unlink() if not p.is_dir() else p.rmdir()
        private.rmdir()


def test_unexpected_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    def boom() -> int:
        raise RuntimeError("bad state")

    assert conventions.guarded(boom, "shypectl") == conventions.EXIT_INTERNAL
    assert capsys.readouterr().err == "shypectl: internal error: RuntimeError: bad state\n"

    def denied() -> int:
        raise PermissionError(13, "Permission denied", "/etc/shyped/shyped.toml")

    assert conventions.guarded(denied, "shyped") == conventions.EXIT_USAGE  # a local file
    assert capsys.readouterr().err == "shyped: /etc/shyped/shyped.toml: Permission denied\n"


def test_the_exit_status_table_in_the_docs_is_the_codes() -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Exit status") :]
    rows = re.findall(r"^\| (\d+) \|", section, re.M)
    assert [int(r) for r in rows] == [code for code, _ in conventions.EXIT_TABLE]
