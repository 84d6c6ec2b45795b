"""Man pages and bash completions are generated from the parsers (scripts/gen_cli_docs.py) and
checked in under share/: they must be current, and they must work."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("shyped", "shypectl", "shype-xl")


def test_man_pages_and_completions_are_current() -> None:
    r = subprocess.run(
        [sys.executable, "scripts/gen_cli_docs.py", "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr


def complete(command: str, *words: str) -> list[str]:
    """What bash offers after `words` (the last one being completed)."""
    script = (
        f"source share/bash-completion/completions/{command}\n"
        f"COMP_WORDS=({command} {' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words)}\n"
        f"_shtab_{command.replace('-', '_')}\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    r = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_bash_completes_commands_options_and_choices() -> None:
    assert complete("shypectl", "au") == ["audit"]
    assert complete("shypectl", "audit", "search", "--dec") == ["--decision"]
    assert complete("shypectl", "audit", "search", "--decision", "") == ["permit", "deny"]
    assert "--admission-timeout" in complete("shype-xl", "--adm")
    assert complete("shyped", "--log-format", "") == ["text", "json"]


@pytest.mark.skipif(shutil.which("man") is None, reason="needs man")
@pytest.mark.parametrize("command", COMMANDS)
def test_man_pages_render(command: str) -> None:
    r = subprocess.run(
        ["man", "-l", f"share/man/man8/{command}.8"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert f"{command.upper()}(8)" in r.stdout and "--version" in r.stdout
