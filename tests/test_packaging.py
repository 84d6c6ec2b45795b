"""The sdist and the wheel carry what a dom0 installs, and `shyped install-data` puts it in place.

The wheel is built from the sdist (``python -m build``, offline: ``--no-isolation`` with the
venv's setuptools), so a wheel that has everything also proves the sdist complete.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import shyped
from tests.packaging_helpers import tree_files

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DATA_DIRS = ("conf", "systemd", "share")
COMMANDS = {"shyped", "shypectl", "shype-xl"}


def _tree_files(*dirs: str) -> list[str]:
    """Files of the tree under `dirs`, relative (what the repository has, not a fixed list)."""
    return sorted(
        p.relative_to(ROOT).as_posix()
        for d in dirs
        for p in (ROOT / d).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


def clean_copy(target: Path) -> Path:
    """The tree's files as a clean clone would have them (with working-tree edits), in `target`.

    Not ROOT itself: setuptools re-reads a stale shyped.egg-info/SOURCES.txt (the editable
    install writes one) into the sdist, which would hide a MANIFEST.in that misses files.
    """
    for name in tree_files():
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target / name)
    return target


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the clean copy is made from git ls-files")
    tree = clean_copy(tmp_path_factory.mktemp("tree"))
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    v = shyped.__version__
    sdist, wheel = out / f"shyped-{v}.tar.gz", out / f"shyped-{v}-py3-none-any.whl"
    assert sdist.is_file() and wheel.is_file(), sorted(os.listdir(out))
    yield sdist, wheel


def test_wheel_carries_the_data_the_license_and_only_the_production_commands(
    dists: tuple[Path, Path],
) -> None:
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"shyped-{shyped.__version__}.dist-info"
        entry_points = z.read(f"{info}/entry_points.txt").decode()
        metadata = z.read(f"{info}/METADATA").decode()
        license_text = z.read(f"{info}/licenses/LICENSE")
        unit = z.read("shyped/_data/systemd/shyped.service")
    missing = [f for f in _tree_files(*DATA_DIRS) if f"shyped/_data/{f}" not in names]
    assert missing == []
    assert unit == (ROOT / "systemd" / "shyped.service").read_bytes()
    assert "shyped/sandbox/preload.c" in names  # `shyped demo` still works from the wheel
    scripts = entry_points.split("[console_scripts]")[1].split("[")[0]
    declared = {line.split("=")[0].strip() for line in scripts.splitlines() if "=" in line}
    assert declared == COMMANDS  # no shype-sandbox: `python -m shyped.sandbox` (docs/sandbox.md)
    assert "License-Expression: GPL-2.0-only" in metadata.splitlines()
    assert license_text == (ROOT / "LICENSE").read_bytes()
    assert license_text.lstrip().startswith(b"GNU GENERAL PUBLIC LICENSE\n")
    assert b"Version 2, June 1991" in license_text[:200]


def test_sdist_carries_the_debian_packaging_and_its_build_script(dists: tuple[Path, Path]) -> None:
    sdist, _ = dists
    top = f"shyped-{shyped.__version__}"
    with tarfile.open(sdist) as t:
        names = {n.removeprefix(f"{top}/") for n in t.getnames()}
    wanted = [
        *_tree_files(*DATA_DIRS, "debian"),
        "LICENSE",
        "setup.py",
        "MANIFEST.in",
        "scripts/build-deb.sh",
        "docs/install.md",
    ]
    assert [f for f in wanted if f not in names] == []


def _run_from(wheel_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m shyped.cli.main ARGS` with shyped imported from the unpacked wheel."""
    env = {**os.environ, "PYTHONPATH": str(wheel_dir)}
    env.pop("SHYPED_CONFIG", None)
    result = subprocess.run(
        [sys.executable, "-m", "shyped.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=wheel_dir,
    )
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def unpacked_wheel(dists: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(dists[1]) as z:
        z.extractall(target)
    found = subprocess.run(
        [sys.executable, "-c", "import shyped.cli.installdata as i; print(i.data_root())"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(target)},
        cwd=target,
        check=True,
    )
    assert found.stdout.strip() == str(target / "shyped" / "_data")  # the wheel's, not the tree's
    return target


def test_install_data_puts_everything_in_place_and_never_replaces_the_configuration(
    unpacked_wheel: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    first = _run_from(
        unpacked_wheel, "install-data", "--root", str(root), "--bindir", str(VENV_BIN)
    )
    config = root / "etc/shyped/shyped.toml"
    assert "installed  /etc/shyped/shyped.toml" in first.stdout
    assert config.read_bytes() == (ROOT / "conf/shyped.toml").read_bytes()
    assert stat.S_IMODE(config.stat().st_mode) == 0o640
    assert stat.S_IMODE((root / "etc/shyped").stat().st_mode) == 0o750
    unit_path = root / "usr/local/lib/systemd/system/shyped.service"
    unit = unit_path.read_text()
    assert f"\nExecStart={VENV_BIN}/shyped --config /etc/shyped/shyped.toml\n" in unit
    if shutil.which("systemd-analyze"):
        verify = subprocess.run(
            ["systemd-analyze", "verify", str(unit_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert verify.returncode == 0, verify.stderr
        assert [line for line in verify.stderr.splitlines() if "shyped" in line] == []
    assert (root / "usr/local/lib/tmpfiles.d/shyped.conf").read_bytes() == (
        ROOT / "systemd/shyped.tmpfiles"
    ).read_bytes()
    for f in _tree_files("share"):
        assert (root / "usr/local" / f).read_bytes() == (ROOT / f).read_bytes(), f
    for f in _tree_files("conf"):
        example = root / "usr/local/share/shyped/examples" / f.removeprefix("conf/")
        assert example.read_bytes() == (ROOT / f).read_bytes(), f
    for c in COMMANDS:
        assert os.readlink(root / "usr/local/bin" / c) == str(VENV_BIN / c)

    # The operator's edits survive a second run (an upgrade, a re-install).
    edited = config.read_text() + "# edited by the operator\n"
    config.write_text(edited)
    again = _run_from(
        unpacked_wheel, "install-data", "--root", str(root), "--bindir", str(VENV_BIN)
    )
    assert "kept       /etc/shyped/shyped.toml" in again.stdout
    assert config.read_text() == edited

    # What start would refuse, on the installed configuration: nothing.
    check = _run_from(unpacked_wheel, "--config", str(config), "check")
    assert check.stdout.startswith(f"{config}: ok\n")
    assert str(root / "etc/shyped/policies/hosting.toml") in check.stdout


def test_install_data_refuses_a_relative_prefix(unpacked_wheel: Path, tmp_path: Path) -> None:
    result = _run_from(
        unpacked_wheel, "install-data", "--root", str(tmp_path), "--prefix", "usr", check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "shyped install-data: --prefix usr: not an absolute path"
    assert list(tmp_path.iterdir()) == []


def test_install_data_from_a_checkout_reads_the_tree_and_dry_run_writes_nothing(
    tmp_path: Path,
) -> None:
    from shyped.cli.installdata import data_root

    assert data_root() == ROOT  # an editable install has no shyped/_data
    result = subprocess.run(
        [VENV_BIN / "shyped", "install-data", "--root", tmp_path, "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("would add  /") for line in lines), lines
    assert "would add  /etc/shyped/shyped.toml" in lines
    assert len(lines) == 2 + 2 + len(_tree_files("share", "conf")) + len(COMMANDS)
    assert list(tmp_path.iterdir()) == []
