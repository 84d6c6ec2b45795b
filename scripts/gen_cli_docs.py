#!/usr/bin/env python3
"""Generate the man pages and bash completions of shyped's commands from their argparse parsers.

    .venv/bin/python scripts/gen_cli_docs.py            # (re)write share/
    .venv/bin/python scripts/gen_cli_docs.py --check    # exit 1 if share/ is not current

Man pages: argparse-manpage (PyPI ``argparse-manpage``, packaged in Debian as
python3-argparse-manpage): it renders a parser and its sub-commands to roff, so the pages
cannot drift from ``--help``. Completions: shtab, which writes a static bash script from the
parser at build time, so pressing TAB does not start Python (argcomplete would import
shyped, Twisted and all, on every TAB). tests/test_cli_docs.py runs ``--check``. Both are
pinned in pyproject.toml, and argparse's layout changes between Python versions: generate
with the project's Python (Debian 12's 3.11, the .venv).

Output (the layout of /usr/share, for packaging):
    share/man/man8/{shyped,shypectl,shype-xl}.8
    share/bash-completion/completions/{shyped,shypectl,shype-xl}
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARE = ROOT / "share"
#: The date in the pages' header: bump it with the version (a fixed value keeps them
#: reproducible and the --check stable).
MAN_DATE = "December 2026"


def _parsers() -> list[tuple[str, Callable[[], argparse.ArgumentParser], str]]:
    from shyped.cli import main, shypectl, shypexl

    return [
        ("shyped", main.build_parser, "sHype mandatory access control daemon for Xen"),
        ("shypectl", shypectl.build_parser, "administer shyped (Xen ACM's xm security verbs)"),
        ("shype-xl", shypexl.build_parser, "xl with shyped's admission in front of create"),
    ]


def generate() -> dict[Path, str]:
    """Every generated file (relative to the repository) and its text."""
    os.environ["COLUMNS"] = "80"  # argparse wraps help to the terminal's width
    import shtab
    from argparse_manpage.manpage import Manpage

    import shyped

    out: dict[Path, str] = {}
    for name, build, summary in _parsers():
        parser = build()
        page = Manpage(
            parser,
            _data={
                "date": MAN_DATE,
                "project_name": "shyped",
                "version": shyped.__version__,
                "manual_title": "shyped manual",
                "manual_section": 8,
                "description": summary,
            },
        )
        text = str(page)
        out[Path("share/man/man8") / f"{name}.8"] = text if text.endswith("\n") else text + "\n"
        out[Path("share/bash-completion/completions") / name] = shtab.complete(
            build(), shell="bash"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that share/ is current")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in generate().items():
        path = ROOT / rel
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    if stale:
        print(
            "not current (run: .venv/bin/python scripts/gen_cli_docs.py): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
