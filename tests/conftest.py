"""Shared fixtures: a fresh real oxenstored per test (see shyped.sandbox.xenstored)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import Any

import pytest

from shyped.sandbox.xenstored import SandboxXenstored, short_instance_dir


@pytest.fixture
def xenstored() -> Iterator[SandboxXenstored]:
    """A fresh, running sandbox oxenstored, stopped (and its directory removed) afterwards."""
    # Not tmp_path: pytest's directories can exceed the AF_UNIX socket path limit.
    directory = short_instance_dir()
    instance = SandboxXenstored(directory)
    instance.start()
    try:
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def xs(xenstored: SandboxXenstored) -> Iterator[Any]:
    """A connected ``pyxs.Client`` on the ``xenstored`` fixture's instance."""
    with xenstored.client() as client:
        yield client


@pytest.fixture
def harness(xenstored: SandboxXenstored) -> Iterator[Any]:
    """A booted sandbox host (`daemon_helpers.Harness`); its daemon, if started, is stopped."""
    import pytest_twisted
    from daemon_helpers import Harness
    from twisted.internet import defer

    h = Harness.boot(xenstored)
    try:
        yield h
    finally:
        pytest_twisted.blockon(defer.ensureDeferred(h.stop()))
