"""Where the daemon's FLASK policy build writes: not ``/tmp``. The shipped unit
(systemd/shyped.service) runs with ``ProtectSystem=strict`` and, on purpose, no private
``/tmp``: ``/tmp`` is read-only for the daemon; its ``CacheDirectory=shyped-flask`` (the
``[flask] cache``) is writable. Played in a mount namespace with exactly that view."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import HOSTING
from flask_helpers import XEN_SOURCE, cache_dir, needs_flask_tools

from shyped.service.flaskbuild import DEFAULT_CACHE

ROOT = Path(__file__).resolve().parents[1]

# In the namespace: build as the daemon does (policy_builder), then as a plain `build` with
# the system's temporary directory, which must fail there (else /tmp was not read-only).
CHILD = r"""
import sys
from pathlib import Path
from shyped.policy.flask import compile_policy
from shyped.service.flaskbuild import FlaskBuildError, build
from shyped.service.flaskxen import policy_builder
from shyped.service.policyload import load_policy

policy, source, cache = load_policy(Path(sys.argv[1])).policy, Path(sys.argv[2]), Path(sys.argv[3])
print("daemon", len(policy_builder(source, cache)(policy)))
try:
    build(compile_policy(policy).module, source, cache)
except FlaskBuildError as e:
    print("tmp", e)
"""


@needs_flask_tools
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare(1)"
)
def test_the_daemon_builds_its_flask_policy_where_the_unit_lets_it_write(tmp_path: Path) -> None:
    cache = cache_dir(tmp_path)
    cache.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(cache))
    # Read-only: every directory Python's tempfile would fall back to (/tmp, /var/tmp, the
    # working directory), as under ProtectSystem=strict; then the cache writable again.
    ro = [d for d in ("/tmp", "/var/tmp", "/usr/tmp", str(ROOT)) if os.path.isdir(d)]
    script = " && ".join(
        ["mount --make-rprivate /"]
        + [f'mount --bind "{d}" "{d}" && mount -o remount,bind,ro "{d}"' for d in ro]
        + [f'mount --bind "{cache}" "{cache}"', f'exec "{sys.executable}" -c "$0" "$@"']
    )
    r = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, CHILD, str(HOSTING), str(XEN_SOURCE),
         str(cache)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    built, refused = r.stdout.splitlines()
    assert built.startswith("daemon ") and int(built.split()[1]) > 0
    assert refused.startswith("tmp cannot make a work directory in the system's"), refused
    # the build's work directory is gone again; only an extracted tree may have come
    new = set(os.listdir(cache)) - before
    assert all(not n.startswith(".") for n in new), new
    assert cache == DEFAULT_CACHE or cache.is_relative_to(tmp_path)
