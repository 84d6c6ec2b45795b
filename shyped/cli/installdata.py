"""``shyped install-data``: put what a dom0 needs besides the code where the system looks for it.

The wheel carries it as ``shyped/_data`` (setup.py copies conf/, systemd/ and share/ there); a
checkout or an editable install reads the checkout's own directories. What goes where
(docs/install.md), below ``--root`` (default ``/``; a staging directory for a package build):

- ``/etc/shyped/shyped.toml`` and ``/etc/shyped/policies/hosting.toml``: the example
  configuration and policy, mode 0640 in a 0750 directory. An existing file is never
  replaced (a re-run or an upgrade keeps the operator's), only reported as kept.
- ``PREFIX/lib/systemd/system/shyped.service`` (``--unitdir``) with ``ExecStart=`` pointing at
  ``BINDIR/shyped``, and ``PREFIX/lib/tmpfiles.d/shyped.conf``.
- ``PREFIX/share/man/man8/*.8`` and ``PREFIX/share/bash-completion/completions/*``.
- ``PREFIX/share/shyped/examples/``: all of conf/ (configuration, policies, label store, guest
  cfgs, the Grafana dashboard) for reference.
- ``PREFIX/bin/{shyped,shypectl,shype-xl}``: symlinks to BINDIR's, unless BINDIR is PREFIX/bin.

PREFIX defaults to /usr/local (systemd, tmpfiles, man and bash-completion all look there);
BINDIR to the directory of the running ``shyped`` (a venv's bin/). Nothing is started,
enabled or reloaded: the command prints what to run next.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import attrs

import shyped

#: The commands an operator runs (the symlinks in PREFIX/bin).
COMMANDS = ("shyped", "shypectl", "shype-xl")
#: The unit's ExecStart= as the repository writes it (docs/install.md's manual route).
UNIT_EXEC = "ExecStart=/usr/local/bin/shyped "
CONFIG_DIR = PurePosixPath("/etc/shyped")


class DataMissing(Exception):
    """Neither the installed package nor a checkout has the data files."""


class UnsafeTarget(Exception):
    """A directory or kept file on the way that another user owns or may write."""


def data_root() -> Path:
    """Where conf/, systemd/ and share/ are: the wheel's ``shyped/_data``, else the checkout."""
    package = Path(shyped.__file__).resolve().parent
    for candidate in (package / "_data", package.parent):
        if (candidate / "conf" / "shyped.toml").is_file() and (candidate / "systemd").is_dir():
            return candidate
    raise DataMissing(
        f"no data files in {package / '_data'} nor in a checkout around {package} "
        "(install shyped from its wheel or sdist, or run from a clone)"
    )


@attrs.frozen
class Item:
    """One path to create below the root."""

    dest: PurePosixPath
    mode: int = 0o644
    source: Path | None = None  # a file to copy
    text: str | None = None  # else this text
    link: PurePosixPath | None = None  # else a symlink to this
    keep: bool = False  # configuration: an existing file stays


def _unit_text(source: Path, bindir: PurePosixPath) -> str:
    text = source.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if line.startswith(UNIT_EXEC)]
    if len(hits) != 1:
        raise DataMissing(f"{source}: no single line starting {UNIT_EXEC!r} to point at {bindir}")
    lines[hits[0]] = f"ExecStart={bindir / 'shyped'} " + lines[hits[0]][len(UNIT_EXEC) :]
    return "".join(lines)


def plan(
    data: Path,
    *,
    prefix: PurePosixPath,
    bindir: PurePosixPath,
    unitdir: PurePosixPath | None = None,
) -> list[Item]:
    """Every path to create, in order (pure but for reading the unit and listing `data`)."""
    conf, share = data / "conf", data / "share"
    items = [
        Item(CONFIG_DIR / "shyped.toml", 0o640, conf / "shyped.toml", keep=True),
        Item(
            CONFIG_DIR / "policies" / "hosting.toml",
            0o640,
            conf / "policies" / "hosting.toml",
            keep=True,
        ),
        Item(
            (unitdir or prefix / "lib" / "systemd" / "system") / "shyped.service",
            text=_unit_text(data / "systemd" / "shyped.service", bindir),
        ),
        Item(
            prefix / "lib" / "tmpfiles.d" / "shyped.conf",
            source=data / "systemd" / "shyped.tmpfiles",
        ),
    ]
    for sub in ("man/man8", "bash-completion/completions"):
        for f in sorted((share / sub).iterdir()):
            items.append(Item(prefix / "share" / sub / f.name, source=f))
    examples = prefix / "share" / "shyped" / "examples"
    for f in sorted(p for p in conf.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        items.append(Item(examples / f.relative_to(conf).as_posix(), source=f))
    if prefix / "bin" != bindir:
        items.extend(Item(prefix / "bin" / c, link=bindir / c) for c in COMMANDS)
    return items


def _below(root: Path, path: PurePosixPath) -> Path:
    return root / path.relative_to("/")


def _make_dirs(root: Path, dest: PurePosixPath) -> None:
    """The parents of `dest`; those under /etc/shyped are 0750 (the unit's mode for it)."""
    for parent in reversed(dest.parents):
        target = _below(root, parent)
        if target.is_dir():
            continue
        private = parent == CONFIG_DIR or CONFIG_DIR in parent.parents
        target.mkdir(mode=0o750 if private else 0o755)
        os.chmod(target, 0o750 if private else 0o755)  # not the umask's


def _check_owner(path: Path, what: str, *, private: bool) -> None:
    """`path` (if it exists) must be owned by root or by us, and if `private` (the
    configuration a root daemon reads) writable by no one else, a sticky directory excepted:
    whoever else may change it would change what root installs there or the daemon reads (a
    pre-created /etc/shyped, a kept shyped.toml another user owns or may write, a symlink they
    placed). Shared directories such as a staff-writable /usr/local are the system's choice."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafeTarget(f"{path}: {what} owned by uid {st.st_uid}, not root: not used")
    if stat.S_ISLNK(st.st_mode) or not private:
        return
    if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
        raise UnsafeTarget(
            f"{path}: {what} writable by others (mode {stat.S_IMODE(st.st_mode):04o}): not used"
        )


def _check_path(root: Path, dest: PurePosixPath, keep: bool) -> None:
    """Every existing directory from `root` down to `dest`, followed as the install follows
    them, and `dest` itself when it is kept configuration."""
    private = CONFIG_DIR in dest.parents
    for parent in reversed(dest.parents):
        _check_owner(_below(root, parent).resolve(), "a directory", private=private)
    if keep:
        target = _below(root, dest)
        _check_owner(target, "the configuration file", private=True)
        if target.is_symlink():
            _check_owner(target.resolve(), "the configuration file (a link's target)", private=True)


def install(items: Sequence[Item], root: Path, *, dry_run: bool = False) -> list[str]:
    """Create `items` below `root`; one report line per item. `UnsafeTarget` before anything
    is written if a directory or kept file on the way is another user's (`_check_owner`)."""
    for item in items:
        _check_path(root, item.dest, item.keep)
    report = []
    for item in items:
        target = _below(root, item.dest)
        exists = target.exists() or target.is_symlink()
        if item.keep and exists:
            report.append(f"kept       {item.dest} (exists; the shipped one is in the examples)")
            continue
        if item.link is not None and exists and not target.is_symlink():
            report.append(f"skipped    {item.dest} (a file, not a link: not replaced)")
            continue
        report.append(f"{'would add ' if dry_run else 'installed '} {item.dest}")
        if dry_run:
            continue
        _make_dirs(root, item.dest)
        temporary = target.with_name(f".{target.name}.shyped-new")
        if temporary.exists() or temporary.is_symlink():
            temporary.unlink()
        if item.link is not None:
            temporary.symlink_to(item.link)
        else:
            body = item.source.read_bytes() if item.source is not None else None
            data = body if body is not None else (item.text or "").encode("utf-8")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, item.mode)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.chmod(temporary, item.mode)
        os.replace(temporary, target)
    return report


NEXT_STEPS = """\
Next (nothing was started or enabled):
  systemd-tmpfiles --create shyped.conf && systemctl daemon-reload
  edit /etc/shyped/shyped.toml and its policy; label your domains (docs/install.md)
  shyped check            # what start would refuse, at file:line
  systemctl enable --now shyped"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "install-data",
        help="install the example configuration (never over an existing one), the systemd "
        "unit and tmpfiles entry, man pages, bash completion and examples (docs/install.md)",
    )
    p.add_argument(
        "--root", type=Path, default=Path("/"), help="install below this directory (default /)"
    )
    p.add_argument(
        "--prefix",
        type=PurePosixPath,
        default=PurePosixPath("/usr/local"),
        help="for the unit, tmpfiles, man pages, completion, examples and links "
        "(default /usr/local)",
    )
    p.add_argument(
        "--bindir",
        type=PurePosixPath,
        default=None,
        help="where the shyped commands are at run time: the unit's ExecStart= and the "
        "links point there (default: the directory of this shyped)",
    )
    p.add_argument(
        "--unitdir",
        type=PurePosixPath,
        default=None,
        help="directory of the systemd unit (default PREFIX/lib/systemd/system)",
    )
    p.add_argument("--dry-run", action="store_true", help="print what would be done, write nothing")


def run(args: argparse.Namespace) -> int:
    for name in ("prefix", "bindir", "unitdir"):
        value = getattr(args, name)
        if value is not None and not value.is_absolute():
            print(f"shyped install-data: --{name} {value}: not an absolute path", file=sys.stderr)
            return 2
    bindir = args.bindir or PurePosixPath(sysconfig.get_path("scripts"))
    try:
        items = plan(data_root(), prefix=args.prefix, bindir=bindir, unitdir=args.unitdir)
    except DataMissing as e:
        print(f"shyped install-data: {e}", file=sys.stderr)
        return 2
    try:
        report = install(items, args.root, dry_run=args.dry_run)
    except UnsafeTarget as e:
        print(f"shyped install-data: {e}", file=sys.stderr)
        return 2
    for line in report:
        print(line)
    if not args.dry_run and args.root == Path("/"):
        print(NEXT_STEPS)
    return 0
