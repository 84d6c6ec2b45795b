"""Builds the Xen hypervisor with XSM/FLASK that the e2e tier's FLASK scenarios boot.

Debian's xen-hypervisor-4.17-amd64 has no XSM (`# CONFIG_XSM is not set`), so the FLASK
scenarios boot upstream Xen 4.17.7 (the release Debian's 4.17.7+13 tools come from) built from
the source tarball in the shared folder (`$SHYPED_XEN_SOURCE`, see DEFAULT_XEN_SOURCE), with
the recipe verified there: `make -C xen defconfig`, CONFIG_FRAGMENT appended, `olddefconfig`,
`make -C xen -j2`.  Needs gcc, make, flex, bison, checkpolicy (scripts/install-deps.sh).

The result lives OUTSIDE the repository, beside the images, under the same lock:
    $SHYPED_E2E_CACHE/flask-xen/<key>/   xen (multiboot ELF, QEMU's -kernel), xen.config,
                                          manifest.json
<key> hashes the tarball's sha256, CONFIG_FRAGMENT, this file and the host's gcc version, so
a change of any of them rebuilds; older builds are removed.  Only this file takes part in the
key (keep it to the build: the runner and fixtures live elsewhere).  Run
`python tests/e2e/flaskxen.py` to build by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import attrs
from builder import _locked, cache_dir, publish_build
from imagetree import BuildError, _sha256_file

XEN_SOURCE_ENV = "SHYPED_XEN_SOURCE"
#: Where the shared folder keeps upstream Xen 4.17.7's source (`git archive` of
#: RELEASE-4.17.7: xen/, tools/flask/policy/, Config.mk, config/, scripts/).
DEFAULT_XEN_SOURCE = Path("/work/shared/xen-4.17.7-flask/xen-4.17.7-hv.tar.xz")
#: Appended to `make defconfig`'s .config; `olddefconfig` then adds XSM_FLASK_DEFAULT=y.
CONFIG_FRAGMENT = "CONFIG_XSM=y\nCONFIG_XSM_FLASK=y\nCONFIG_XSM_FLASK_AVC_STATS=y\n"
#: Options the built .config must carry (checked: a silently dropped option is an error).
REQUIRED_OPTIONS = ("CONFIG_XSM=y", "CONFIG_XSM_FLASK=y", "CONFIG_XSM_FLASK_AVC_STATS=y")
#: A cold build takes ~3.5 min on an idle 2-core machine; this bounds a stuck one.
MAKE_TIMEOUT_S = 3600
#: The tools the build runs (besides what the tarball's Makefiles call through them).
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "checkpolicy")


@attrs.frozen
class FlaskXen:
    """A built FLASK hypervisor."""

    directory: Path
    manifest: dict[str, object]

    @property
    def xen(self) -> Path:
        """The hypervisor as a multiboot ELF (QEMU's -kernel)."""
        return self.directory / "xen"


def xen_source() -> Path:
    return Path(os.environ.get(XEN_SOURCE_ENV) or DEFAULT_XEN_SOURCE)


def _gcc_version() -> str:
    proc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()[0] if proc.returncode == 0 and proc.stdout else "gcc missing"


def input_key(tarball_sha256: str) -> str:
    digest = hashlib.sha256()
    digest.update(tarball_sha256.encode() + b"\0")
    digest.update(CONFIG_FRAGMENT.encode() + b"\0")
    digest.update(Path(__file__).read_bytes() + b"\0")
    digest.update(_gcc_version().encode())
    return digest.hexdigest()[:16]


def _make(args: list[str], *, cwd: Path, log: Path) -> None:
    env = dict(os.environ, XEN_TARGET_ARCH="x86_64")
    # A run from the environment of another make must not leak its flags into Xen's build.
    for var in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(var, None)
    with log.open("ab") as out:
        out.write(f"\n$ make {' '.join(args)}\n".encode())
        out.flush()
        try:
            proc = subprocess.run(
                ["nice", "-n", "10", "make", *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=MAKE_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"make {' '.join(args)}: {exc} (log: {log})") from exc
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        raise BuildError(f"make {' '.join(args)} exited {proc.returncode}\n" + "\n".join(tail))


def _build(tarball: Path, out: Path, log_lines: list[str]) -> None:
    for tool in BUILD_TOOLS:
        if shutil.which(tool) is None:
            raise BuildError(f"{tool} missing: run scripts/install-deps.sh")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".src-", dir=out.parent) as tmp:
        src = Path(tmp)
        try:
            with tarfile.open(tarball) as tar:
                tar.extractall(src, filter="tar")
        except (OSError, tarfile.TarError) as exc:
            raise BuildError(f"cannot extract {tarball}: {exc}") from exc
        if not (src / "xen" / "Makefile").is_file():
            raise BuildError(f"{tarball} holds no xen/Makefile (a Xen source `git archive`?)")
        log = out / "build.log"
        _make(["-C", "xen", "defconfig"], cwd=src, log=log)
        config = src / "xen" / ".config"
        with config.open("a") as f:
            f.write(CONFIG_FRAGMENT)
        _make(["-C", "xen", "olddefconfig"], cwd=src, log=log)
        lines = set(config.read_text().splitlines())
        dropped = [opt for opt in REQUIRED_OPTIONS if opt not in lines]
        if dropped:
            raise BuildError(f"olddefconfig dropped {dropped} (see {config})")
        _make(["-C", "xen", "-j2"], cwd=src, log=log)
        built = src / "xen" / "xen"
        if not built.is_file():
            raise BuildError(f"make gave no xen/xen (log: {log})")
        shutil.copyfile(built, out / "xen")
        shutil.copyfile(config, out / "xen.config")
    seconds = round(time.monotonic() - started, 1)
    log_lines.append(f"FLASK Xen built in {seconds}s")
    manifest = {
        "xen_source": str(tarball),
        "xen_source_sha256": _sha256_file(tarball),
        "config_fragment": CONFIG_FRAGMENT,
        "gcc": _gcc_version(),
        "build_seconds": seconds,
        "size": (out / "xen").stat().st_size,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def ensure_flask_xen(
    cache: Path | None = None,
    *,
    tarball: Path | None = None,
    force: bool = False,
    log: list[str] | None = None,
) -> FlaskXen:
    """The FLASK hypervisor for the current inputs, building it if missing or stale."""
    cache = cache or cache_dir()
    tarball = tarball or xen_source()
    log = log if log is not None else []
    if not tarball.is_file():
        raise BuildError(
            f"Xen source tarball {tarball} not found: set ${XEN_SOURCE_ENV} to "
            "xen-4.17.7-hv.tar.xz (see docs/flask.md)"
        )
    key = input_key(_sha256_file(tarball))
    root = cache / "flask-xen"
    final = root / key
    with _locked(cache):
        if not force and (final / "manifest.json").is_file() and (final / "xen").is_file():
            log.append(f"cached FLASK Xen {final}")
            return FlaskXen(final, json.loads((final / "manifest.json").read_text()))
        publish_build(final, lambda staging: _build(tarball, staging, log))
        return FlaskXen(final, json.loads((final / "manifest.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--cache", type=Path, default=None, help="default: $SHYPED_E2E_CACHE")
    parser.add_argument("--xen-source", type=Path, default=None, help=f"default: {xen_source()}")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    log: list[str] = []
    try:
        built = ensure_flask_xen(args.cache, tarball=args.xen_source, force=args.force, log=log)
    except BuildError as exc:
        print("\n".join(log), file=sys.stderr)
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(log))
    print(built.xen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
