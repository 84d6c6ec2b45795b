"""The Debian package: built from this tree by scripts/build-deb.sh, installed on this machine
with apt, checked as an operator would, upgraded over itself, and purged.

Root only (into the real root: CI runs as root); one run at a time per machine (a lock). The
build takes about a minute; the .deb is cached under $SHYPED_DEB_CACHE (default
/var/cache/shyped-tests) keyed by the tree's files and the build tools' versions, so an
unchanged tree installs the same package again.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import shyped
from tests.packaging_helpers import tree_files

ROOT = Path(__file__).resolve().parent.parent
VENV = Path("/opt/shyped")
CONFIG = Path("/etc/shyped/shyped.toml")
UNIT = Path("/lib/systemd/system/shyped.service")
GROUPS = ("shyped-read", "shyped-admin")
#: The environment of an operator's root shell: nothing of the test's venv.
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C",
    "DEBIAN_FRONTEND": "noninteractive",
}
#: apt as an operator uses it, waiting for dpkg's lock if another apt runs on the machine.
APT = ("apt-get", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300")
#: One run of these tests at a time on the machine (sessions that share it, as root).
MACHINE_LOCK = Path("/run/lock/shyped-debian-package-test.lock")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1200),  # the build (about a minute), apt, and maybe a wait for the lock
    pytest.mark.skipif(os.geteuid() != 0, reason="installs a .deb with dpkg: root only"),
    pytest.mark.skipif(
        not (shutil.which("dpkg-buildpackage") and shutil.which("dh_virtualenv")),
        reason="dpkg-dev, debhelper and dh-virtualenv not installed (scripts/install-deps.sh)",
    ),
    pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout"),
]


def _run(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=CLEAN_ENV
    )


def _ok(*args: str | Path, timeout: float = 300) -> str:
    result = _run(*args, timeout=timeout)
    assert result.returncode == 0, f"{args}: {result.returncode}\n{result.stdout}{result.stderr}"
    return result.stdout


def _installed(package: str) -> bool:
    r = _run("dpkg-query", "-W", "-f=${db:Status-Status}", package)
    return r.returncode == 0 and r.stdout.strip() not in ("", "not-installed")


def _inputs_key() -> str:
    """What scripts/build-deb.sh builds from (the tree's files) and with (the tools)."""
    h = hashlib.sha256()
    for name in tree_files():
        h.update(name.encode() + b"\0" + hashlib.sha256((ROOT / name).read_bytes()).digest())
    tools = _ok("dpkg-query", "-W", "dh-virtualenv", "debhelper", "dpkg-dev", "python3")
    h.update(tools.encode())
    return h.hexdigest()[:24]


@pytest.fixture(scope="module")
def machine_lock() -> Iterator[None]:
    with MACHINE_LOCK.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="module")
def deb(machine_lock: None) -> Path:
    cache = Path(os.environ.get("SHYPED_DEB_CACHE", "/var/cache/shyped-tests"))
    cached = cache / f"shyped-{_inputs_key()}.deb"
    if not cached.is_file():
        out = cache / "build"
        shutil.rmtree(out, ignore_errors=True)
        built = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build-deb.sh"), str(out)],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert built.returncode == 0, built.stdout + built.stderr
        for old in cache.glob("shyped-*.deb"):  # one package kept, not one per commit
            old.unlink()
        Path(built.stdout.strip().splitlines()[-1]).rename(cached)
        shutil.rmtree(out, ignore_errors=True)
    return cached


@pytest.fixture
def installed(deb: Path) -> Iterator[Path]:
    """The package installed with dpkg; purged afterwards, the groups it made removed."""
    if _installed("shyped"):
        pytest.skip("a shyped package is installed on this machine: not touching it")
    if Path("/etc/shyped").exists() or VENV.exists():
        pytest.skip("/etc/shyped or /opt/shyped exists on this machine: not touching it")
    groups_before = {g for g in GROUPS if _run("getent", "group", g).returncode == 0}
    logs = Path("/var/log/shyped")  # kept by a purge (the audit trail): ours to remove here
    logs_before = logs.exists()
    try:
        _ok(*APT, "install", deb)
        yield deb
    finally:
        _run(*APT, "purge", "shyped")
        for g in set(GROUPS) - groups_before:
            _run("groupdel", g)
        if not logs_before and logs.is_dir() and not any(logs.iterdir()):
            logs.rmdir()


def test_package_metadata_and_contents(deb: Path) -> None:
    fields = _ok("dpkg-deb", "-f", deb, "Package", "Version", "Depends", "Recommends")
    assert f"Version: {shyped.__version__}\n" in fields
    depends = fields.split("Depends: ")[1].splitlines()[0]
    assert "python3.11" in depends and "adduser" in depends
    assert "xen" not in depends  # Recommends: only a dom0 has xl and xenstored
    assert "xen-utils" in fields.split("Recommends: ")[1]
    listing = _ok("dpkg-deb", "-c", deb)
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for wanted in (
        "/opt/shyped/bin/shyped",
        "/usr/bin/shypectl",
        "/etc/shyped/shyped.toml",
        "/etc/shyped/policies/hosting.toml",
        str(UNIT),
        "/usr/lib/tmpfiles.d/shyped.conf",
        "/usr/share/man/man8/shypectl.8.gz",
        "/usr/share/bash-completion/completions/shypectl",
        "/usr/share/shyped/examples/grafana-dashboard.json",
        "/usr/share/doc/shyped/copyright",
    ):
        assert wanted in paths, wanted
    assert not [p for p in paths if p.endswith("/shype-sandbox")]
    conffiles = _ok("dpkg-deb", "-I", deb, "conffiles").split()
    assert sorted(conffiles) == ["/etc/shyped/policies/hosting.toml", str(CONFIG)]


def test_installs_checks_upgrades_and_purges(installed: Path) -> None:
    deb = installed
    # The commands on PATH are the package's, running the package's interpreter.
    assert os.path.realpath("/usr/bin/shyped") == str(VENV / "bin" / "shyped")
    assert (VENV / "bin" / "shyped").read_text().startswith(f"#!{VENV}/bin/python\n")
    for command in ("shypectl", "shype-xl", "shyped"):
        assert _ok(command, "--version") == f"{command} (shyped) {shyped.__version__}\n"
    assert not Path("/usr/bin/shype-sandbox").exists()

    # The unit as installed: verifies, starts the packaged binary, and is neither enabled
    # nor started by the package.
    unit = UNIT.read_text()
    assert "\nExecStart=/opt/shyped/bin/shyped --config /etc/shyped/shyped.toml\n" in unit
    verify = _run("systemd-analyze", "verify", UNIT, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert [line for line in verify.stderr.splitlines() if "shyped" in line] == []
    assert not list(Path("/etc/systemd/system").glob("*.wants/shyped.service"))

    # `shyped check` on the packaged configuration (the default path), from /.
    check = _ok("shyped", "check")
    assert check.startswith(f"{CONFIG}: ok\n"), check
    assert "/etc/shyped/policies/hosting.toml" in check

    # postinst: the groups, and the directories of the tmpfiles entry.
    for g in GROUPS:
        assert _run("getent", "group", g).returncode == 0, g
    for d in ("/var/lib/shyped", "/var/log/shyped"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o750, d
    assert stat.S_IMODE(os.stat("/etc/shyped").st_mode) == 0o750
    assert stat.S_IMODE(CONFIG.stat().st_mode) == 0o640
    with gzip.open("/usr/share/man/man8/shypectl.8.gz", "rt") as page:
        assert page.read().startswith(".TH SHYPECTL")

    # An upgrade (the same version again) keeps the operator's configuration.
    edited = CONFIG.read_text() + "# edited by the operator\n"
    CONFIG.write_text(edited)
    _ok(*APT, "install", "--reinstall", deb)
    assert CONFIG.read_text() == edited
    assert _ok("shyped", "check").startswith(f"{CONFIG}: ok\n")

    # Purge: the program, the configuration and the state go; nothing of ours is left on PATH.
    _ok(*APT, "purge", "shyped")
    for gone in (VENV, Path("/usr/bin/shyped"), UNIT, Path("/etc/shyped"), Path("/var/lib/shyped")):
        assert not gone.exists(), gone
    assert not _installed("shyped")
