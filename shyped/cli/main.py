"""The ``shyped`` command: run the daemon, check a configuration, or run the sandbox demo.

Exit status: 0 after a clean stop (SIGTERM/SIGINT), 1 if the daemon could not run (xenstored
unreachable) or the demo saw an unexpected decision, 2 for a configuration, policy or label
store that cannot be used (the message says which file and what; no traceback).
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.cli import installdata
from shyped.cli.conventions import DEFAULT_CONFIG, add_version, exit_guarded
from shyped.cli.logs import FORMATS, LEVELS, start_logging
from shyped.service.config import ConfigError

_log = Logger(namespace="shyped")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shyped",
        description="sHype-style mandatory access control for Xen, enforced from dom0 at the "
        "xenstore/toolstack layer (STE, Chinese Wall, MLS). Without a command, runs the daemon "
        "(SIGHUP reloads the policy and the label store; SIGTERM stops).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG,
        help=f"configuration file (default {DEFAULT_CONFIG}; see conf/shyped.toml)",
    )
    parser.add_argument(
        "--log-level",
        choices=sorted(LEVELS),
        default="info",
        help="least severe log level written to stderr (default info: one line per decision)",
    )
    parser.add_argument(
        "--log-format",
        choices=FORMATS,
        help="text (default) or json: one JSON object per line (overrides [log] format)",
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", help="run the daemon (the default)")
    sub.add_parser(
        "check",
        help="run start's own validation (configuration, groups, policy, label store, metrics "
        "credentials), report every problem at file:line, and exit: 0 ok, 2 refused",
    )
    demo = sub.add_parser(
        "demo",
        help="start a sandbox xenstored, run the daemon on conf/'s example policy and a "
        "scripted scenario, print each decision and a summary, and exit",
    )
    demo.add_argument(
        "--verbose", action="store_true", help="also show the daemon's own log on stderr"
    )
    installdata.add_parser(sub)
    return parser


def _error(message: str) -> int:
    print(f"shyped: error: {message}", file=sys.stderr)
    return 2


def _check(config_path: Path) -> int:
    """What start would refuse, refused the same way (`validate_startup` is start's own check),
    every problem at once; warnings (labels the policy lacks) are printed, exit 0."""
    from shyped.service.daemon import StartupError
    from shyped.service.startcheck import validate_startup

    try:
        st = validate_startup(config_path)
    except StartupError as e:
        return _error(str(e))
    config, loaded, labels = st.config, st.loaded, st.labels
    p = loaded.policy
    for warning in st.warnings:
        print(f"shyped: warning: {warning}", file=sys.stderr)
    print(
        f"{config_path}: ok\n"
        f"policy {p.name} {p.version} ({loaded.format}, {loaded.path}, sha256 {loaded.sha256})\n"
        f"  {len(p.vm_labels)} VM labels, {len(p.resource_labels)} resource labels, "
        f"{len(p.conflict_sets)} conflict sets\n"
        f"labels {config.labels}: {len(labels.by_uuid)} by uuid, {len(labels.by_name)} by name, "
        f"{len(labels.resources)} resources"
        + (f" ({len(st.warnings)} warning(s))" if st.warnings else "")
        + "\n"
        f"mode {config.mode.value}, domain veto {config.domain_veto.value}, "
        f"actuator {config.actuator.kind}, xenstore {config.xenstore.socket}"
    )
    return 0


def _run(config_path: Path, level: str, log_format: str | None = None) -> int:
    """The daemon, its control socket and systemd notifications, until SIGTERM/SIGINT.

    Order: the control socket listens first (it answers ``unavailable`` until the daemon is
    ready), then the daemon connects and reconciles; READY=1 goes to systemd only once that
    first reconcile has decided every domain that exists. SIGHUP: RELOADING=1, reload, READY=1.
    On the way out: STOPPING=1, the control socket closes, then the xenstore connection.
    """
    from shyped.control.daemon_backend import DaemonControlBackend
    from shyped.control.server import ControlServer, ControlSetupError
    from shyped.service.attestation import attach_attestation
    from shyped.service.daemon import Daemon, ReloadResult, StartupError, freeze_after_start
    from shyped.service.poolstore import (
        PoolSetupError,
        attach_pool,
        start_with_pool,
        stop_with_pool,
    )
    from shyped.service.sdnotify import Notifier, Watchdog
    from shyped.service.startcheck import validate_startup

    try:
        st = validate_startup(config_path)  # the same check as `shyped check`
    except StartupError as e:
        return _error(str(e))
    config, loaded, labels = st.config, st.loaded, st.labels
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    from shyped.service.metricsweb import raise_nofile_limit
    from shyped.service.observability import build_audit, build_metrics, build_user_avc

    raise_nofile_limit()
    audit = build_audit(config, reactor)
    try:
        metrics = build_metrics(config, reactor, audit)
    except ConfigError as e:
        return _error(f"{config_path}: {e}")
    daemon = Daemon(
        config,
        loaded,
        labels,
        reactor=reactor,
        audit=audit,
        metrics=None if metrics is None else metrics.state,
    )
    try:
        pool = attach_pool(daemon)  # pool mode ([pool]): before the control backend uses it
    except PoolSetupError as e:
        return _error(f"{config_path}: {e}")
    daemon.attestation = attach_attestation(daemon)  # [attestation]: TPM quotes
    if pool is not None and metrics is not None:
        from shyped.service.poolmetrics import PoolCollector

        metrics.registry.register(PoolCollector(pool))
    try:
        server = ControlServer(DaemonControlBackend(daemon), config.control, reactor=reactor)
    except ControlSetupError as e:
        return _error(f"{config_path}: control: {e}")
    start_logging(level, fmt=log_format or config.log.format)
    user_avc = build_user_avc(config)
    if user_avc is not None:
        daemon.add_listener(user_avc)
        reactor.addSystemEventTrigger("after", "shutdown", user_avc.close)
    for warning in st.warnings:
        _log.warn("label store: {warning}", warning=warning)
    notifier = Notifier()
    watchdog = Watchdog.from_environment(notifier)
    status = {"code": 0}

    def summary() -> str:
        st = daemon.status()
        p = daemon.loaded.policy
        return (
            f"{st.mode}; policy {p.name} {p.version}; {sum(st.domains.values())} domains "
            f"({st.domains.get('admitted', 0)} admitted, {st.domains.get('denied', 0)} denied)"
        )

    stopping = {"now": False}

    def stop(code: int) -> None:
        status["code"] = code
        if not stopping["now"]:
            reactor.stop()

    def failed(failure: Any) -> None:
        if stopping["now"]:  # SIGTERM while starting: the shutdown closed the connection
            _log.info("start interrupted by the shutdown")
            return
        if isinstance(failure.value, StartupError):
            _log.critical("{error}", error=str(failure.value))
        else:
            _log.failure("shyped failed to start", failure)
        stop(1)

    def ready(_: object) -> None:
        freeze_after_start()
        _log.info("ready: {summary}", summary=summary())
        notifier.ready(summary())

    def start() -> None:
        if metrics is not None:
            try:
                metrics.start()
            except Exception as e:  # a bad address, the port taken
                _log.critical("metrics endpoint: {error}", error=str(e))
                stop(1)
                return
        try:
            server.start()
        except (ControlSetupError, OSError) as e:
            _log.critical("control socket {path}: {error}", path=str(server.path), error=str(e))
            stop(1)
            return
        if watchdog is not None:
            watchdog.start()
        Deferred.fromCoroutine(start_all()).addCallbacks(ready, failed)

    async def start_all() -> None:
        await start_with_pool(daemon)
        if daemon.attestation is not None:  # never fails: without a TPM it says why
            await daemon.attestation.start()

    def reloaded(result: ReloadResult) -> None:
        if result.applied:
            what = f"policy {result.new} applied"
        elif result.error is not None:
            what = "reload failed (see the log)"
        elif result.sha256 == daemon.loaded.sha256:
            what = "policy unchanged"
        else:
            what = f"policy {result.new} refused ({len(result.problems)} reasons)"
        if result.label_store_error is not None:
            what += "; label store not reloaded (errors, see the log)"
        if daemon.ready:
            notifier.ready(f"{summary()}; reload: {what}")

    def hangup(_signum: int, _frame: object) -> None:
        def reload() -> None:
            _log.info("SIGHUP: reloading the label store and the policy")
            if daemon.ready:  # before READY=1, systemd is not told about reloads
                notifier.reloading("reloading the policy and the label store")
            daemon.reload_policy().addCallback(reloaded)

        reactor.callFromThread(reload)

    def shutdown() -> Deferred[Any]:
        stopping["now"] = True
        notifier.stopping("stopping")
        if watchdog is not None:
            watchdog.stop()
        stopped = server.stop()
        stopped.addBoth(lambda _: Deferred.fromCoroutine(stop_with_pool(daemon)))
        if metrics is not None:
            stopped.addBoth(lambda _: metrics.stop())
        stopped.addErrback(lambda f: _log.failure("while stopping", f))
        return stopped

    reactor.callWhenRunning(start)
    reactor.callWhenRunning(signal.signal, signal.SIGHUP, hangup)
    reactor.addSystemEventTrigger("before", "shutdown", shutdown)
    reactor.run()
    notifier.close()
    return status["code"]


def build_parser() -> argparse.ArgumentParser:
    """shyped's parser with every sub-command (for man pages and completion too)."""
    return _parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from shyped.cli.demo import run_demo

        return run_demo(verbose=args.verbose)
    if args.command == "check":
        return _check(args.config)
    if args.command == "install-data":
        return installdata.run(args)
    return _run(args.config, args.log_level, args.log_format)


def console_main() -> None:
    """The ``shyped`` console script: `main` without tracebacks (shyped.cli.conventions)."""
    exit_guarded(main, "shyped")


if __name__ == "__main__":
    console_main()
