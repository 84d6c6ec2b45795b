"""Builds what the e2e tier boots under QEMU: Debian's Xen 4.17 hypervisor, a Debian 6.1 kernel,
a busybox dom0 initramfs with Debian's Xen tools, hotplug scripts and PV backend modules, and a
busybox domU initramfs with the PV frontends.

Why from Debian packages: the proof must run the same hypervisor, libxl, xenstored, kernel
drivers and hotplug scripts as a Debian host (and as shared/xen-4.17-reference).  Packages are
fetched with `apt-get download` and unpacked with `dpkg-deb -x`; nothing is installed into the
host's /boot.  The Xen packages are taken at the version of the host's xen-utils-4.17 (the host's
tools are what dom0 uses for Python scenarios, see e2e-lib.sh `e2e_host`); small userland tools
(busybox, bash, ip, losetup, flock, prlimit) and the shared libraries everything links against
(resolved with ldd) come from the host, which scripts/install-deps.sh sets up.

The result lives OUTSIDE the repository, in $SHYPED_E2E_CACHE (default /var/cache/shyped-e2e):
    debs/                 downloaded packages (reused across builds)
    images/<key>/         xen, vmlinuz, dom0.cpio.gz, manifest.json
<key> hashes the builder's inputs (this file, image/*, the package versions); the manifest
also records a sha256 of every host file copied in, checked on reuse, so an upgraded host
library rebuilds the images.  Run `python tests/e2e/builder.py` to build by hand.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import attrs
from imagetree import BuildError, Tree, _run, _sha256_file, compile_static

HERE = Path(__file__).resolve().parent
IMAGE_SOURCES = HERE / "image"
CACHE_ENV = "SHYPED_E2E_CACHE"
DEFAULT_CACHE = Path("/var/cache/shyped-e2e")

XEN_SERIES = "4.17"
#: Binary packages of Debian's `xen` source that dom0 needs, all taken at one version.
XEN_PACKAGES = (
    "xen-hypervisor-4.17-amd64",
    "xen-utils-4.17",
    "xen-utils-common",
    "xenstore-utils",
    "libxenmisc4.17",
    "libxencall1",
    "libxendevicemodel1",
    "libxenevtchn1",
    "libxenforeignmemory1",
    "libxengnttab1",
    "libxenhypfs1",
    "libxenstore4",
    "libxentoolcore1",
    "libxentoollog1",
)
#: The metapackage naming the current Debian kernel (its `-cloud-` sibling lacks dom0 support).
KERNEL_META = "linux-image-amd64"
#: Host tools the hotplug scripts and the init need beyond busybox (and the packages that hold
#: them, for the manifest).  busybox-static provides everything else.
HOST_TOOLS = {
    "bash": "bash",
    "ip": "iproute2",
    "losetup": "mount",
    "flock": "util-linux",
    "prlimit": "util-linux",
}
HOST_PACKAGES = ("busybox-static", "libc6", "libgcc-s1", *sorted(set(HOST_TOOLS.values())))
#: Modules loaded by dom0's /init, dependencies added by the builder: evtchn/gntdev/gntalloc/
#: privcmd/xenfs for the tools, netback/blkback/bridge/loop for the vif and vbd, 9p over
#: virtio-pci for the host share.
DOM0_MODULES = (
    "xen-evtchn",
    "xen-gntdev",
    "xen-gntalloc",
    "xen-privcmd",
    "xenfs",
    "xen-netback",
    "xen-blkback",
    "bridge",
    "loop",
    "virtio_pci",
    "9pnet_virtio",
    "9p",
)
#: The domU's: PV net and block frontends, and the evtchn/gntdev/gntalloc devices the guest
#: program (guestprog/xenpeer.c) uses to talk to another guest without xenstore.
DOMU_MODULES = ("xen-netfront", "xen-blkfront", "xen-evtchn", "xen-gntdev", "xen-gntalloc")
#: Static programs compiled into the domU's /usr/bin (from guestprog/<name>.c).
GUEST_PROGRAMS = ("xenpeer",)
GUEST_PROGRAM_SOURCES = HERE / "guestprog"
#: Parts of the Xen packages dom0 does not need (HVM firmware, docs, Python, the hypervisor).
XEN_TREE_SKIP = (
    "boot",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/bash-completion",
    "usr/share/lintian",
    "usr/lib/python3",
    "usr/lib/xen-4.17/boot",
    "usr/lib/xen-4.17/lib/python",
)


class DownloadError(BuildError):
    """apt-get download failed, even after refreshing the package lists."""


@attrs.frozen
class Images:
    """A built image set, as the runner boots it."""

    directory: Path
    manifest: dict[str, object]

    @property
    def xen(self) -> Path:
        """The hypervisor as a multiboot ELF (QEMU's -kernel)."""
        return self.directory / "xen"

    @property
    def kernel(self) -> Path:
        """dom0's kernel (the domU boots the same one, from dom0's /guest/vmlinuz)."""
        return self.directory / "vmlinuz"

    @property
    def dom0_initrd(self) -> Path:
        return self.directory / "dom0.cpio.gz"

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])


@attrs.frozen
class Package:
    name: str
    version: str


# -- small helpers ----------------------------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One builder per cache at a time (two pytest runs may start together)."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- package versions -------------------------------------------------------------------------


def _apt_candidates(names: Iterable[str]) -> dict[str, str]:
    """Candidate versions from `apt-cache policy` (local lists, no network)."""
    out = _run(["apt-cache", "policy", *names], what="apt-cache policy")
    result: dict[str, str] = {}
    current = None
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1]
        elif current and line.strip().startswith("Candidate:"):
            version = line.split(":", 1)[1].strip()
            if version != "(none)":
                result[current] = version
    return result


def _installed_version(name: str) -> str | None:
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}\t${Version}", name],
        capture_output=True,
        text=True,
        check=False,
    )
    status, _, version = proc.stdout.partition("\t")
    return version if proc.returncode == 0 and status.endswith(" installed") else None


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", KERNEL_META], what="apt-cache depends")
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise BuildError(f"{KERNEL_META} names no linux-image package:\n{out}")


def resolve_packages(*, follow_host: bool = True) -> list[Package]:
    """The Debian packages to download: the Xen set at the host's xen-utils-4.17 version
    (`follow_host`, and the host has it) or at apt's candidate, and the kernel the metapackage
    points at."""
    kernel = _kernel_package()
    candidates = _apt_candidates([*XEN_PACKAGES, kernel])
    if kernel not in candidates:
        raise BuildError(f"apt has no candidate for {kernel}; run apt-get update")
    host = _installed_version(f"xen-utils-{XEN_SERIES}") if follow_host else None
    xen_version = host or candidates.get(f"xen-utils-{XEN_SERIES}")
    if xen_version is None:
        raise BuildError(f"apt has no candidate for xen-utils-{XEN_SERIES}; run apt-get update")
    return [*(Package(n, xen_version) for n in XEN_PACKAGES), Package(kernel, candidates[kernel])]


def download(packages: list[Package], debs: Path) -> dict[str, Path]:
    """`apt-get download` what is not in debs/ yet; returns name -> .deb path."""
    debs.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    missing: list[Package] = []
    for pkg in packages:
        path = debs / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_amd64.deb"
        alt = debs / f"{pkg.name}_{pkg.version.replace(':', '%3a')}_all.deb"
        if path.exists():
            found[pkg.name] = path
        elif alt.exists():
            found[pkg.name] = alt
        else:
            missing.append(pkg)
    if missing:
        specs = [f"{p.name}={p.version}" for p in missing]
        try:
            _run(["apt-get", "download", "-q", *specs], what="apt-get download", cwd=debs)
        except BuildError:
            # Stale lists name a version the mirror no longer has: refresh once and retry.
            _run(["apt-get", "update", "-q"], what="apt-get update")
            try:
                _run(["apt-get", "download", "-q", *specs], what="apt-get download", cwd=debs)
            except BuildError as exc:
                raise DownloadError(str(exc)) from exc
        for pkg in missing:
            matches = sorted(debs.glob(f"{pkg.name}_{pkg.version.replace(':', '%3a')}_*.deb"))
            if not matches:
                raise BuildError(f"apt-get download gave no .deb for {pkg.name}={pkg.version}")
            found[pkg.name] = matches[0]
    # Keep only what the current set uses.
    keep = set(found.values())
    for old in debs.glob("*.deb"):
        if old not in keep:
            old.unlink()
    return found


# -- the build --------------------------------------------------------------------------------


def _host_tool(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        if os.access(f"{d}/{name}", os.X_OK):
            return f"{d}/{name}"
    raise BuildError(f"host tool {name} missing: run scripts/install-deps.sh")


def _busybox() -> Path:
    for candidate in ("/usr/bin/busybox", "/bin/busybox"):
        path = Path(candidate)
        if path.exists():
            proc = subprocess.run(["ldd", candidate], capture_output=True, text=True, check=False)
            if "not a dynamic executable" in proc.stdout + proc.stderr or "statically linked" in (
                proc.stdout + proc.stderr
            ):
                return path
    raise BuildError("a static busybox is needed: apt-get install busybox-static")


def input_key(packages: list[Package]) -> str:
    """Hash of everything the images are built from, bar host files (checked separately)."""
    digest = hashlib.sha256()
    digest.update(Path(__file__).read_bytes())
    digest.update((HERE / "imagetree.py").read_bytes())
    for src in [*sorted(IMAGE_SOURCES.iterdir()), *sorted(GUEST_PROGRAM_SOURCES.iterdir())]:
        digest.update(src.name.encode() + b"\0" + src.read_bytes())
    for pkg in packages:
        digest.update(f"{pkg.name}={pkg.version}\n".encode())
    return digest.hexdigest()[:16]


def _host_files_unchanged(manifest: dict[str, object]) -> bool:
    files = manifest.get("host_files")
    if not isinstance(files, dict):
        return False
    for path, digest in files.items():
        p = Path(path)
        if not p.exists() or _sha256_file(p) != digest:
            return False
    return True


def _build(packages: list[Package], debs: dict[str, Path], out: Path, log: list[str]) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shyped-e2e-build-", dir=out.parent) as tmp:
        work = Path(tmp)
        xen_tree = work / "xen-debs"
        for pkg in packages:
            if pkg.name.startswith("linux-image-"):
                continue
            _run(["dpkg-deb", "-x", str(debs[pkg.name]), str(xen_tree)], what="dpkg-deb -x")
        kernel_pkg = next(p for p in packages if p.name.startswith("linux-image-"))
        kernel_tree = work / "kernel"
        _run(["dpkg-deb", "-x", str(debs[kernel_pkg.name]), str(kernel_tree)], what="dpkg-deb -x")
        vmlinuz = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
        if len(vmlinuz) != 1:
            raise BuildError(f"{kernel_pkg.name}: expected one /boot/vmlinuz-*, got {vmlinuz}")
        release = vmlinuz[0].name[len("vmlinuz-") :]
        moddir = kernel_tree / "lib/modules" / release
        log.append(f"unpacked in {time.monotonic() - started:.1f}s")

        xen_gz = xen_tree / "boot" / f"xen-{XEN_SERIES}-amd64.gz"
        if not xen_gz.exists():
            raise BuildError(f"{xen_gz.name} not in xen-hypervisor package")
        with gzip.open(xen_gz, "rb") as src, (out / "xen").open("wb") as dst:
            shutil.copyfileobj(src, dst)
        shutil.copyfile(vmlinuz[0], out / "vmlinuz")

        busybox = _busybox()

        # domU: busybox, the PV frontends, an /init that lets them connect.
        domu = Tree(work / "domU")
        domu.install_busybox(busybox)
        domu.add_file("/init", IMAGE_SOURCES / "domU-init.sh", mode=0o755)
        domu.add_file("/usr/sbin/poweroff", IMAGE_SOURCES / "poweroff.sh", mode=0o755)
        domu.add_modules(moddir, release, DOMU_MODULES)
        for prog in GUEST_PROGRAMS:
            domu.add_file(
                f"/usr/bin/{prog}",
                compile_static(GUEST_PROGRAM_SOURCES / f"{prog}.c", work / prog),
                mode=0o755,
            )

        # dom0: Debian's Xen tools and scripts, host tools, busybox, backends, guest files.
        dom0 = Tree(work / "dom0")
        dom0.merge_tree(xen_tree, skip=XEN_TREE_SKIP)
        for name in HOST_TOOLS:
            dom0.add_host_file(_host_tool(name))
        dom0.add_libraries()
        # glibc dlopens libgcc_s for thread cancellation (oxenstored's threads, xl's forks).
        gcc_s = Path("/usr/lib/x86_64-linux-gnu/libgcc_s.so.1")
        if not gcc_s.exists():
            raise BuildError(f"{gcc_s} missing: apt-get install libgcc-s1")
        dom0.add_host_file(str(gcc_s))
        dom0.install_busybox(busybox)
        dom0.add_modules(moddir, release, DOM0_MODULES)
        dom0.add_file("/init", IMAGE_SOURCES / "dom0-init.sh", mode=0o755)
        dom0.add_file("/usr/lib/shyped-e2e/lib.sh", IMAGE_SOURCES / "e2e-lib.sh", mode=0o644)
        dom0.add_file("/etc/shyped-e2e/oxenstored.conf", IMAGE_SOURCES / "oxenstored.conf")
        dom0.add_file("/guest/vmlinuz", vmlinuz[0], mode=0o644)
        domu.write_cpio(dom0.path("/guest/initrd.gz"))
        versions = "".join(f"{p.name}={p.version}\n" for p in packages)
        dom0.add_text("/etc/shyped-e2e/versions", versions)
        log.append(f"trees assembled in {time.monotonic() - started:.1f}s")

        dom0.write_cpio(out / "dom0.cpio.gz")
        log.append(f"archives written in {time.monotonic() - started:.1f}s")

        host_versions = {name: _installed_version(name) for name in HOST_PACKAGES}
        manifest = {
            "packages": {p.name: p.version for p in packages},
            "host_packages": host_versions,
            "kernel_release": release,
            "xen_version": next(p.version for p in packages if p.name.startswith("xen-utils")),
            "host_xen_utils": _installed_version(f"xen-utils-{XEN_SERIES}"),
            "host_files": {**dom0.host_files, **domu.host_files},
            "sizes": {f.name: f.stat().st_size for f in out.iterdir()},
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def ensure_images(
    cache: Path | None = None, *, force: bool = False, log: list[str] | None = None
) -> Images:
    """The current image set, downloading and building it if it is missing or stale."""
    cache = cache or cache_dir()
    log = log if log is not None else []
    packages = resolve_packages()
    try:
        return _ensure(cache, packages, force=force, log=log)
    except DownloadError:
        # The mirror dropped the host's (older) xen-utils-4.17 version: take apt's candidate.
        # dom0 stays self-consistent; only e2e_host's xl (the host's) is then another 4.17.x.
        fallback = resolve_packages(follow_host=False)
        if fallback == packages:
            raise
        log.append(
            f"host xen-utils-{XEN_SERIES} {packages[0].version} is not downloadable; using "
            f"{fallback[0].version} (upgrade the host's Xen packages to match)"
        )
        return _ensure(cache, fallback, force=force, log=log)


def publish_build(final: Path, build: Callable[[Path], None]) -> None:
    """Run `build` into a fresh staging directory beside `final`, then make it `final` (so a
    failed or interrupted build never leaves a half-built `final`) and remove the older builds
    beside it.  Call under `_locked`."""
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        build(staging)
        staging.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    for old in root.iterdir():
        if old != final and old.is_dir() and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


def _ensure(cache: Path, packages: list[Package], *, force: bool, log: list[str]) -> Images:
    key = input_key(packages)
    images_root = cache / "images"
    final = images_root / key
    with _locked(cache):
        manifest_path = final / "manifest.json"
        if not force and manifest_path.exists():
            manifest = json.loads(manifest_path.read_text())
            if _host_files_unchanged(manifest):
                log.append(f"cached images {final}")
                return Images(final, manifest)
            log.append("host files changed: rebuilding")
        started = time.monotonic()
        debs = download(packages, cache / "debs")
        log.append(f"packages ready in {time.monotonic() - started:.1f}s")
        publish_build(final, lambda staging: _build(packages, debs, staging, log))
        manifest = json.loads((final / "manifest.json").read_text())
        log.append(f"built {final} in {time.monotonic() - started:.1f}s")
        return Images(final, manifest)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--cache", type=Path, default=None, help=f"default: ${CACHE_ENV} or {DEFAULT_CACHE}"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    log: list[str] = []
    try:
        images = ensure_images(args.cache, force=args.force, log=log)
    except BuildError as exc:
        print("\n".join(log), file=sys.stderr)
        print(f"build failed: {exc}", file=sys.stderr)
        return 1
    print("\n".join(log))
    print(images.directory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
