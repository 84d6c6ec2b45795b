"""Shared fixtures: a fresh real oxenstored per test (see shyped.sandbox.xenstored)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shyped.sandbox.xenstored import SandboxXenstored


def short_tmp_dir(prefix: str = "xs") -> Path:
    """A fresh directory under /tmp: pytest's tmp_path can exceed the AF_UNIX path limit."""
    return Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))


@pytest.fixture
def xenstored() -> Iterator[SandboxXenstored]:
    """A fresh, running sandbox oxenstored, stopped (and its directory removed) afterwards."""
    directory = short_tmp_dir()
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
