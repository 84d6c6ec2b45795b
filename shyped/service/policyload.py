"""Loading what the daemon starts with: the policy (TOML or ACM XML), the label store, the
toolstack actuator."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import attrs

from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    load_label_store,
)
from shyped.fileio.boundedread import POLICY_MAX_BYTES, read_bounded
from shyped.policy import acm_xml, toml_format
from shyped.policy.errors import PolicyError
from shyped.policy.model import Policy
from shyped.service.actuator import ToolstackActuator, XlActuator
from shyped.service.config import Config, ConfigError, check_host


class StartupError(Exception):
    """The daemon cannot start (bad configuration, policy or label store; no xenstored)."""


@attrs.frozen
class LoadedPolicy:
    """A policy with where it came from."""

    policy: Policy
    path: Path
    sha256: str
    format: str  # "toml" or "acm-xml"


def _is_xml(path: Path, data: bytes) -> bool:
    if path.suffix.lower() == ".xml":
        return True
    head = data.lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    return head == b"<"


def load_policy(path: Path) -> LoadedPolicy:
    """Load a TOML or Xen ACM XML policy (by extension, else by content).

    Reads at most `POLICY_MAX_BYTES` of a regular file. Raises `PolicyError` (every problem,
    with file and line) or `OSError` (`InputFileError`: not a regular file, or too large).
    """
    data = read_bounded(path, POLICY_MAX_BYTES, "policy")
    digest = hashlib.sha256(data).hexdigest()
    if _is_xml(path, data):
        return LoadedPolicy(acm_xml.parse(data, file=str(path)).policy, path, digest, "acm-xml")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PolicyError.single(
            f"not UTF-8: byte 0x{data[e.start]:02x} cannot be decoded", file=str(path), line=line
        ) from None
    return LoadedPolicy(toml_format.loads(text, file=str(path)), path, digest, "toml")


def load_startup(config: Config) -> tuple[LoadedPolicy, LabelStore]:
    """The policy and label store a daemon starts with; `StartupError` says what is wrong.

    `shyped check` and start both come through here, so check validates what start does:
    the file (`load_config`), the host (`check_host`: groups), the policy and the store.
    """
    try:
        check_host(config)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    try:
        loaded = load_policy(config.policy)
    except PolicyError as e:
        raise StartupError(f"policy {config.policy} is not valid:\n{e}") from None
    except OSError as e:
        raise StartupError(f"cannot read policy {config.policy}: {e.strerror or e}") from None
    try:
        labels = load_label_store(config.labels)
    except LabelStoreError as e:
        raise StartupError(str(e)) from None
    return loaded, labels


def make_actuator(config: Config, reactor: Any) -> ToolstackActuator:
    """``xl``: the configured xl command. ``sandbox``: the sandbox toolstack's xl-compatible
    CLI as a child process (``python -m shyped.sandbox --socket <xenstored socket>``), so the
    daemon's own process holds no sandbox state."""
    act = config.actuator
    if act.kind == "sandbox":
        command: tuple[str, ...] = (
            sys.executable,
            "-m",
            "shyped.sandbox",
            "--socket",
            str(config.xenstore.socket),
        )
    else:
        command = act.xl
    return XlActuator(reactor, command, timeout=act.timeout)
