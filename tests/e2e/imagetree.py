"""The root trees of the e2e images (split from builder.py): kernel modules in dependency order,
a merged-/usr tree assembled from package trees, host files (recorded with their sha256),
busybox, static guest programs compiled from guestprog/*.c, and the gzipped newc archive.
builder.py decides what goes into dom0's and the domU's tree; this module knows how.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterable
from pathlib import Path

import attrs

#: Busybox applets not linked: with `brctl` present the hotplug scripts would use it instead
#: of `ip link ... master`, which a Debian host without bridge-utils does not.
BUSYBOX_SKIP = frozenset({"brctl"})
#: zlib level for the initramfs archives: 1 is nearly as small as 6 and the kernel unpacks it
#: just as fast, but it builds in a fraction of the time.
GZIP_LEVEL = 1

LIBDIR = "usr/lib/x86_64-linux-gnu"


class BuildError(Exception):
    """The images could not be built; the message says which step and why."""


# -- small helpers ----------------------------------------------------------------------------


def _run(
    argv: list[str], *, what: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> str:
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=900
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{what}: {' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise BuildError(
            f"{what}: `{' '.join(argv)}` exited {proc.returncode}\n{proc.stdout}{proc.stderr}"
        )
    return proc.stdout


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compile_static(source: Path, dest: Path) -> Path:
    """`gcc -static` a one-file C program (a guest program); returns `dest`."""
    _run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(dest), str(source)],
        what=f"compile {source.name} (gcc, libc6-dev, linux-libc-dev)",
    )
    return dest


# -- kernel modules ---------------------------------------------------------------------------


def _modinfo_depends(ko: Path) -> list[str]:
    """The `depends=` entry of a module's .modinfo section (what modinfo -F depends prints),
    read with a minimal ELF64 section-header walk (kmod is not needed on the host)."""
    data = ko.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise BuildError(f"{ko}: not an ELF64 module")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name_off, off, size = section(i)
        end = data.index(b"\0", stroff + name_off)
        if data[stroff + name_off : end] == b".modinfo":
            for entry in data[off : off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends=") :].decode()
                    return [d for d in value.split(",") if d]
            return []
    raise BuildError(f"{ko}: no .modinfo section")


def _module_index(moddir: Path) -> dict[str, Path]:
    """Module name (with '_' for '-', as the kernel names them) -> .ko path."""
    index: dict[str, Path] = {}
    for ko in (moddir / "kernel").rglob("*.ko"):
        index[ko.name[: -len(".ko")].replace("-", "_")] = ko
    if not index:
        raise BuildError(f"no modules under {moddir} (compressed modules are not handled)")
    return index


def module_load_order(moddir: Path, wanted: Iterable[str]) -> list[Path]:
    """The wanted modules and their dependencies, each after what it depends on."""
    index = _module_index(moddir)
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        key = name.replace("-", "_")
        if key in seen:
            return
        if key in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join((*chain, key))}")
        ko = index.get(key)
        if ko is None:
            raise BuildError(f"module {name} not in {moddir} (built in, or renamed?)")
        for dep in _modinfo_depends(ko):
            visit(dep, (*chain, key))
        seen.add(key)
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order


# -- assembling a root tree -------------------------------------------------------------------


def _merged_usr(path: str) -> str:
    """Host path -> path inside the image, whose /bin, /sbin, /lib, /lib64 link into /usr."""
    for top in ("bin", "sbin", "lib", "lib64"):
        if path == f"/{top}" or path.startswith(f"/{top}/"):
            return "/usr" + path
    return path


@attrs.define
class Tree:
    """A root filesystem being assembled in a directory, with a record of host files used."""

    root: Path
    host_files: dict[str, str] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        for d in (
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/lib64",
            LIBDIR,
            "etc",
            "proc",
            "sys",
            "dev",
            "run",
            "tmp",
            "root",
            "var",
        ):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        for top in ("bin", "sbin", "lib", "lib64"):
            link = self.root / top
            if not link.is_symlink():
                link.symlink_to(f"usr/{top}")
        for name, target in (("var/run", "../run"), ("var/lock", "../run/lock")):
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(target)
        (self.root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
        (self.root / "etc/group").write_text("root:x:0:\n")

    def path(self, inside: str) -> Path:
        return self.root / inside.lstrip("/")

    def _fresh(self, inside: str) -> Path:
        """The tree path for `inside`, with whatever was there removed: never write through a
        symlink (an absolute one would point at the host's own file)."""
        dest = self.path(inside)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.parent.resolve().is_relative_to(self.root.resolve()):
            raise BuildError(f"{inside} leads out of the image tree ({dest.parent.resolve()})")
        if dest.is_symlink() or dest.exists():
            dest.unlink()
        return dest

    def add_file(self, inside: str, source: Path, *, mode: int | None = None) -> None:
        dest = self._fresh(inside)
        shutil.copyfile(source, dest)
        os.chmod(dest, mode if mode is not None else (source.stat().st_mode & 0o7777))

    def add_host_file(self, host_path: str) -> str:
        """Copy a host file (symlinks followed) to its merged-/usr path; returns that path."""
        real = Path(host_path).resolve()
        inside = _merged_usr(host_path)
        if not self.path(inside).exists():
            self.add_file(inside, real)
        self.host_files[str(real)] = _sha256_file(real)
        return inside

    def add_text(self, inside: str, text: str, mode: int = 0o644) -> None:
        dest = self._fresh(inside)
        dest.write_text(text)
        os.chmod(dest, mode)

    def merge_tree(self, source: Path, skip: Iterable[str] = ()) -> None:
        """Copy an unpacked package tree in, keeping its symlinks."""
        skipped = tuple(s.strip("/") for s in skip)
        for dirpath, dirnames, filenames in os.walk(source):
            rel = os.path.relpath(dirpath, source)
            rel = "" if rel == "." else rel
            dirnames[:] = [d for d in dirnames if os.path.join(rel, d) not in skipped]
            for name in (*dirnames, *filenames):
                src = Path(dirpath) / name
                inside = _merged_usr("/" + os.path.join(rel, name))
                dest = self.path(inside)
                if src.is_symlink():
                    self._fresh(inside).symlink_to(os.readlink(src))
                elif src.is_dir():
                    dest.mkdir(parents=True, exist_ok=True)
                elif os.path.join(rel, name) not in skipped:
                    self.add_file(inside, src)

    def elf_files(self) -> list[Path]:
        out = []
        for path in sorted(self.root.rglob("*")):
            if path.is_symlink() or not path.is_file() or path.suffix == ".ko":
                continue
            with path.open("rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(path)
        return out

    def add_libraries(self, extra_libdirs: Iterable[Path] = ()) -> None:
        """Every shared library the tree's ELF files need, resolved with ldd: the tree's own
        libraries first (LD_LIBRARY_PATH), then the host's."""
        own = [self.path(LIBDIR), *extra_libdirs]
        env = dict(os.environ, LD_LIBRARY_PATH=":".join(str(d) for d in own))
        pending = self.elf_files()
        done: set[Path] = set()
        while pending:
            elf = pending.pop()
            if elf in done:
                continue
            done.add(elf)
            proc = subprocess.run(
                ["ldd", str(elf)], capture_output=True, text=True, env=env, check=False
            )
            text = proc.stdout + proc.stderr
            if "not a dynamic executable" in text or "statically linked" in text:
                continue
            if proc.returncode != 0:
                raise BuildError(f"ldd {elf}: {text}")
            for line in text.splitlines():
                if "not found" in line:
                    raise BuildError(
                        f"{elf.relative_to(self.root)} needs {line.strip()}: install the "
                        "library on the host (scripts/install-deps.sh)"
                    )
                m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
                if not m:
                    continue
                lib = m.group(1)
                if lib.startswith(str(self.root)):
                    continue  # already in the tree
                # ldd lists the whole closure: no need to recurse into what it names.
                self.add_host_file(lib)

    def install_busybox(self, busybox: Path) -> None:
        """busybox and a link for every applet that no real tool in the tree already provides."""
        self.add_file("/usr/bin/busybox", busybox, mode=0o755)
        self.host_files[str(busybox.resolve())] = _sha256_file(busybox)
        listing = _run([str(busybox), "--list-full"], what="busybox --list-full")
        for entry in listing.split():
            name = entry.rsplit("/", 1)[-1]
            if name in BUSYBOX_SKIP or name == "busybox":
                continue
            if any((self.root / d / name).exists() for d in ("usr/bin", "usr/sbin")):
                continue
            inside = _merged_usr("/" + entry)
            if self.path(inside).is_symlink() or self.path(inside).exists():
                continue
            # Relative, so the link never names the host's busybox while the tree is built.
            target = os.path.relpath("/usr/bin/busybox", os.path.dirname(inside))
            self._fresh(inside).symlink_to(target)

    def add_modules(self, moddir: Path, release: str, wanted: Iterable[str]) -> None:
        order = module_load_order(moddir, wanted)
        rel = [ko.relative_to(moddir) for ko in order]
        for ko, r in zip(order, rel, strict=True):
            self.add_file(f"/usr/lib/modules/{release}/{r}", ko, mode=0o644)
        self.add_text("/etc/shyped-e2e/modules", "".join(f"{r}\n" for r in rel))

    def write_cpio(self, dest: Path) -> None:
        """A gzipped newc archive of the tree (owner root, sorted, no timestamps)."""
        names = sorted(
            os.path.relpath(os.path.join(d, n), self.root)
            for d, dirs, files in os.walk(self.root)
            for n in (*dirs, *files)
        )
        listing = "\0".join(names) + "\0"
        proc = subprocess.run(
            [
                "cpio",
                "--null",
                "--create",
                "--format=newc",
                "--owner=0:0",
                "--reproducible",
                "--quiet",
            ],
            cwd=self.root,
            input=listing.encode(),
            capture_output=True,
            check=False,
        )
        if proc.returncode != 0:
            raise BuildError(f"cpio: {proc.stderr.decode(errors='replace')}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        with (
            dest.open("wb") as raw,
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=GZIP_LEVEL, mtime=0) as out,
        ):
            out.write(proc.stdout)
