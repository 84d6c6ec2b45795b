"""Red team (redlocal): a local user plants Xen's FLASK policy tree in the daemon's build cache.
`shyped.service.flaskbuild.policy_tree` trusted any ``<cache>/<sha256 of the tarball>/`` that
held ``tools/flask/policy/modules/xen.if``: the policy the daemon compiles and loads into Xen
is built from those files. The unit's ``CacheDirectory=`` (root's, under ``/var/cache``) is
out of a user's reach, but ``[flask] cache`` and ``shypectl policy flask --cache`` name any
directory: one a user could create first (under a world-writable directory such as ``/tmp``)
or replace with a symlink to theirs. The cache is now refused unless this process's uid owns
it and no one else may write to it or to a directory above it (sticky ones aside)."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from user_helpers import local_user, needs_users, setpriv

from shyped.service.flaskbuild import FlaskBuildError, policy_tree

XEN_IF = "tools/flask/policy/modules/xen.if"


def small_source(path: Path) -> str:
    """A Xen source tarball holding just the member the cache check looks for; its sha256."""
    with tarfile.open(path, "w:xz") as tar:
        data = b"# Xen's interfaces\n"
        info = tarfile.TarInfo(f"xen/{XEN_IF}")  # as a git archive names it
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(XEN_IF)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _as(user: object, *argv: str) -> None:
    subprocess.run([*setpriv(user), *argv], check=True, capture_output=True)  # type: ignore[arg-type]


@contextmanager
def _removed(path: Path) -> Iterator[None]:
    try:
        yield
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_users
@pytest.mark.parametrize("how", ["pre-created", "symlink"])
def test_a_cache_a_local_user_controls_is_refused(tmp_path: Path, how: str) -> None:
    source = tmp_path / "xen.tar.xz"
    sha = small_source(source)
    shared = Path(tempfile.mkdtemp(prefix="shyfc", dir="/tmp"))  # as /tmp: anyone's, sticky
    os.chmod(shared, 0o1777)
    cache = shared / "shyped-flask"
    with local_user("shyfc") as mallory, _removed(shared):
        planted = shared / "mine" if how == "symlink" else cache
        tree = planted / sha / XEN_IF
        _as(mallory, "mkdir", "-p", str(tree.parent))
        _as(mallory, "sh", "-c", f'echo "planted by {mallory.name}" > "{tree}"')
        if how == "symlink":
            _as(mallory, "ln", "-s", str(planted), str(cache))
        with pytest.raises(FlaskBuildError) as e:
            got = policy_tree(source, cache)
            pytest.fail(f"the build used {got}: {(got / XEN_IF).read_text().strip()!r}")
        assert str(cache) in str(e.value)


def test_a_cache_of_its_own_is_used(tmp_path: Path) -> None:
    source = tmp_path / "xen.tar.xz"
    sha = small_source(source)
    cache = tmp_path / "cache"
    tree = policy_tree(source, cache)
    assert tree == cache / sha and (tree / XEN_IF).is_file()
    assert policy_tree(source, cache) == tree  # extracted once, then found
    os.chmod(cache, 0o777)
    with pytest.raises(FlaskBuildError, match="writable by others"):
        policy_tree(source, cache)
