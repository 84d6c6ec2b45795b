"""The one validation ``shyped check`` and start share, so they cannot drift: the file
(`config.load_config`: every problem at once, at its line), the host (groups), the policy,
the label store (refused on errors; labels the policy lacks are warnings) and the metrics
credentials files. Start runs exactly this before it touches xenstore; check runs it and
reports."""

from __future__ import annotations

from pathlib import Path

import attrs

from shyped.core.labelstore import LabelStore, label_store_problems
from shyped.fileio.boundedread import LABELS_MAX_BYTES, read_bounded
from shyped.policy.model import Policy
from shyped.service.config import Config, ConfigError, load_config
from shyped.service.policyload import LoadedPolicy, StartupError, load_startup


@attrs.frozen
class Startup:
    """What start begins with, and what is worth a warning."""

    config: Config
    loaded: LoadedPolicy
    labels: LabelStore
    warnings: tuple[str, ...] = ()


def store_warnings(config: Config, loaded: LoadedPolicy) -> tuple[str, ...]:
    """The label store's assignments of labels the policy lacks, each at its line (the daemon
    denies those domains and resources with rule ``label``; a store left behind by a policy
    update may hold some, so they do not stop start)."""
    try:
        text = read_bounded(config.labels, LABELS_MAX_BYTES, "label store").decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ()  # a missing store is empty; an unreadable one was refused already
    problems = label_store_problems(text, str(config.labels), loaded.policy)
    return tuple(
        f"{p.file}:{p.line}: {p.message}" if p.line else f"{p.file}: {p.message}"
        for p in problems
        if p.severity == "warning"
    )


def dom0_problem(where: Path, labels: LabelStore, policy: Policy) -> str | None:
    """Why dom0's stored label cannot be used with `policy`, or None. Fail closed: dom0 is
    not run with another label than the one an operator gave it (the bootstrap label would
    give it every type the operator took away), so start, and a store reload, refuse."""
    if labels.dom0 is None or policy.vm_label(labels.dom0) is not None:
        return None
    return (
        f"{where}: dom0's label {labels.dom0!r} is not a VM label of policy {policy.name!r} "
        f"{policy.version}; shyped does not run dom0 with another label: label dom0 again "
        f"(shypectl addlabel <label> mgt Domain-0 with the old store) or remove the store's "
        f'"dom0" entry to run it with the bootstrap label {policy.bootstrap!r}'
    )


def validate_startup(path: Path) -> Startup:
    """Everything start checks before it runs; `StartupError` lists every problem found."""
    try:
        config = load_config(path)
    except ConfigError as e:
        raise StartupError(str(e)) from None
    loaded, labels = load_startup(config)
    problem = dom0_problem(config.labels, labels, loaded.policy)
    if problem is not None:
        raise StartupError(problem)
    if config.metrics.enabled:
        from shyped.service.metricsweb import load_access

        try:
            load_access(config.metrics)  # the token and TLS key files: root's only
        except ConfigError as e:
            raise StartupError(f"{path}: {e}") from None
    return Startup(config, loaded, labels, store_warnings(config, loaded))
