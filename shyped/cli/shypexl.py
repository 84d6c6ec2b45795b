"""``shype-xl``: ``xl`` with shyped's admission in front of ``create`` and device attaches.

``shype-xl create <cfg> [xl create options] [KEY=VALUE…]``:

1. reads the config as xl does (overrides appended) and its ACM label (``seclabel=`` or
   ``access_control=['policy=P,label=L']``); a cfg without ``uuid`` gets one, passed to xl
   as a ``uuid="…"`` override so the daemon and xl agree on the domain's key; when Xen has
   FLASK (the daemon's status), a labelled cfg gets ``seclabel="<its FLASK context>"``;
2. asks the daemon for a dry run (domain, each disk and vif): any DENIED stops here;
3. registers the label for the UUID with the daemon;
4. runs ``xl create -p`` (the domain cannot execute an instruction while paused);
5. waits for the daemon's admission of the domain and its devices (``--admission-timeout``);
6. admitted: ``xl unpause`` (unless ``-p`` was asked for; ``-c``/``-V``/``-A`` then attach
   the console/viewer); denied or no answer: ``xl destroy`` and exit non-zero with the reason.

Every command after ``create`` names the domain by its **domid**, never by its name: the domid
the daemon admitted for the UUID, or else the one ``xl list -l`` shows for that UUID (exactly
one domain, or shype-xl does nothing to any and says so; the new domain stays paused). A name
can be taken by another domain (a rename, or a cfg read differently), a domid/UUID pair cannot.

``block-attach``, ``network-attach``, ``pci-attach`` (the device's ``pci:SSSS:BB:DD.F``
label), ``vtpm-attach`` and ``vkb-attach`` (STE with the ``backend=`` domain) and
``usbdev-attach`` (USB passthrough: no label covers it, always denied) are dry-run first and
passed to xl only if permitted. Every other sub-command is exec'd as is.

Fail closed: if the daemon cannot be reached, shype-xl refuses (exit 3). ``--fail-open`` (or
``SHYPE_XL_FAIL_OPEN=1``) lets it go on without the daemon, with a warning; the daemon will
still decide the domain when it next reconciles. The xl command is ``--xl`` or ``$SHYPE_XL``
(split like a shell would), default ``xl``.

Exit status: 0 ok; 1 denied by the policy (nothing is left running); 2 usage or bad cfg;
3 daemon unreachable or failed; 4 permission denied by the daemon; xl's own status when xl
itself fails; pass-through sub-commands exit with xl's status.
"""

from __future__ import annotations

import argparse
import errno
import getopt
import json
import os
import subprocess
import sys
import uuid as uuidlib
from collections.abc import Sequence
from typing import Final, NoReturn, TextIO

import attrs

from shyped.cli.conventions import exit_guarded, version_text
from shyped.cli.ctlcommon import check_cfg_label
from shyped.cli.shypectl import (
    EXIT_DAEMON,
    EXIT_DENIED,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_USAGE,
    exit_status,
)
from shyped.cli.shypexl_options import (
    _USAGE,
    FAIL_OPEN_ENV,
    XL_ENV,
    Options,
    Refused,
    Shown,
    build_parser,
    parse_options,
)
from shyped.control import backend as b
from shyped.control.client import ControlClient, DaemonUnreachable
from shyped.control.protocol import ControlError
from shyped.control.xlitems import (
    channel_item,
    disk_item,
    summarize,
    vif_item,
    with_overrides,
)
from shyped.core.xlcfg import XlConfigError
from shyped.core.xlcfgpci import parse_pci_spec
from shyped.fileio.boundedread import XLCFG_MAX_BYTES, read_bounded
from shyped.policy.flask import context as flask_context

#: ``xl create``'s options (tools/xl/xl_vmcontrol.c main_create).
_CREATE_SHORT: Final = "Fnqf:pcdeVAih"
_CREATE_LONG: Final = [
    "dryrun",
    "quiet",
    "defconfig=",
    "vncviewer",
    "vncviewer-autopass",
    "ignore-global-affinity-masks",
    "help",
]


class Wrapper:
    """One shype-xl run."""

    def __init__(self, opts: Options, err: TextIO) -> None:
        self.opts = opts
        self.err = err
        self.client = ControlClient(opts.socket, timeout=opts.timeout)

    def say(self, text: str) -> None:
        print(f"shype-xl: {text}", file=self.err, flush=True)

    def xl_argv(self, *args: str) -> list[str]:
        return [*self.opts.xl, *self.opts.xl_globals, *args]

    def xl(self, *args: str) -> int:
        """Run xl (inheriting stdio); its exit status."""
        try:
            return subprocess.run(self.xl_argv(*args), check=False).returncode
        except OSError as exc:
            raise Refused(f"cannot run {self.opts.xl[0]}: {exc.strerror}", EXIT_USAGE) from None

    def exec_xl(self, *args: str) -> NoReturn:
        argv = self.xl_argv(*args)
        sys.stdout.flush()
        self.err.flush()
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            raise Refused(f"cannot run {argv[0]}: {exc.strerror}", EXIT_USAGE) from None

    def unreachable(self, exc: DaemonUnreachable) -> None:
        """Fail closed, or warn and go on with --fail-open."""
        if not self.opts.fail_open:
            denied = exc.errno in (errno.EACCES, errno.EPERM)
            raise Refused(
                f"{exc}; refusing (fail closed; --fail-open to override)",
                EXIT_PERMISSION if denied else EXIT_DAEMON,
            )
        self.say(f"WARNING: {exc}; going on without shyped (--fail-open)")

    def print_verdicts(self, items: Sequence[b.Verdict]) -> None:
        for item in items:
            verdict = "PERMITTED" if item.permitted else "DENIED"
            print(f"  {item.item}: {verdict}: {item.reason}", file=self.err)

    # ---- sub-commands

    def run(self) -> int:
        cmd = self.opts.command
        if cmd is None:
            if "-h" in self.opts.xl_globals:
                self.exec_xl()  # `shype-xl -h`: xl's own help
            print(_USAGE, file=self.err)
            return EXIT_USAGE
        if "-N" in self.opts.xl_globals or "-h" in self.opts.xl_globals:
            self.exec_xl(cmd, *self.opts.rest)  # xl's dry run / help: nothing is created
        if cmd == "create":
            return self.create(list(self.opts.rest))
        if cmd in _CHECKED_ATTACH:
            return self.attach(cmd, list(self.opts.rest))
        if cmd == "migrate":  # pool mode: the destination's daemon reserves a place first
            from shyped.cli.shypexl_pool import migrate

            return migrate(self, list(self.opts.rest))
        if cmd == "restore":  # admitted (pool: reserved on this host) before xl restores
            from shyped.cli.shypexl_pool import restore

            return restore(self, list(self.opts.rest))
        self.exec_xl(cmd, *self.opts.rest)

    def attach(self, cmd: str, rest: list[str]) -> int:
        if len(rest) < 1 or rest[0] in ("-h", "--help"):
            _subcommand_help(cmd, self.err)
            self.exec_xl(cmd, *rest)
        domain, specs = rest[0], rest[1:]
        args = attach_items(cmd, domain, specs)
        try:
            res = self.client.dry_run(args)
        except DaemonUnreachable as exc:
            self.unreachable(exc)
            self.exec_xl(cmd, *rest)
        if not res.permitted:
            self.say(f"{cmd} to {domain} DENIED by shyped:")
            self.print_verdicts(res.items)
            return EXIT_DENIED
        self.exec_xl(cmd, *rest)

    def create(self, rest: list[str]) -> int:
        filename: str | None = None
        if rest and not rest[0].startswith("-") and "=" not in rest[0]:
            filename = rest.pop(0)
        try:
            opts, positional = getopt.gnu_getopt(rest, _CREATE_SHORT, _CREATE_LONG)
        except getopt.GetoptError as exc:
            raise Refused(f"create: {exc}", EXIT_USAGE) from None
        flags = {o for o, _ in opts}
        if flags & {"-h", "--help"}:
            _subcommand_help("create", self.err)
        if flags & {"-h", "--help", "-n", "--dryrun"}:
            self.exec_xl("create", *self.opts.rest)  # help or xl's own dry run
        if flags & {"-F", "-e"}:
            raise Refused(
                "create -F/-e (xl stays in the foreground) cannot be wrapped: the domain must "
                "be admitted while paused; run it daemonized",
                EXIT_USAGE,
            )
        passthrough: list[str] = []
        for o, v in opts:
            if o in ("-f", "--defconfig"):
                filename = v
            elif o in ("-q", "--quiet"):
                passthrough.append("-q")
            elif o in ("-i", "--ignore-global-affinity-masks"):
                passthrough.append("-i")
            elif o == "-d":
                passthrough.append("-d")
        overrides = []
        for p in positional:
            if "=" in p:
                overrides.append(p)
            elif filename is None:
                filename = p
            else:
                raise Refused(f"create: unexpected argument {p!r}", EXIT_USAGE)
        if filename is None:
            raise Refused("create: no config file", EXIT_USAGE)
        try:
            text = read_bounded(filename, XLCFG_MAX_BYTES, "domain config").decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise Refused(f"cannot read {filename}: {exc}", EXIT_USAGE) from None
        cfg = summarize(with_overrides(text, overrides), filename)
        uuid = cfg.uuid
        if uuid is None:
            uuid = str(uuidlib.uuid4())
            overrides.append(f'uuid="{uuid}"')
        else:
            try:
                uuid = str(uuidlib.UUID(uuid))
            except ValueError:
                raise Refused(f"{filename}: uuid {uuid!r} is not a UUID", EXIT_USAGE) from None
        paused = bool(flags & {"-p"})
        create_argv = ["create", "-p", *passthrough, filename, *overrides]
        label = str(cfg.label) if cfg.label else None

        try:
            check_cfg_label(self.client, cfg.label)
            domain = attrs.evolve(cfg.domain, uuid=uuid)
            res = self.client.dry_run(cfg.dry_run_args(domain))
            if not res.permitted:
                self.say(f"domain {cfg.name} DENIED by shyped (nothing created):")
                self.print_verdicts(res.items)
                return EXIT_DENIED
            self.client.register_domain(uuid, cfg.name, label)
            if cfg.label is not None and self._xen_flask():
                # xl hands seclabel= to Xen's FLASK (an ACM label would be refused there)
                create_argv.append(f'seclabel="{flask_context(cfg.label.label)}"')
        except DaemonUnreachable as exc:
            self.unreachable(exc)
            return self._create_unchecked(create_argv, uuid, paused, flags)

        status = self.xl(*create_argv)
        if status != 0:
            self._forget(uuid)
            return status
        devices = len(cfg.disks) + len(cfg.vifs) + len(cfg.pcis)
        try:
            adm = self.client.wait_admission(uuid, devices, self.opts.admission_timeout)
        except (ControlError, DaemonUnreachable) as exc:
            if isinstance(exc, DaemonUnreachable) and self.opts.fail_open:
                self.say(f"WARNING: {exc}; unpausing without shyped's admission (--fail-open)")
                return self._finish_by_uuid(uuid, paused, flags)
            domid = self._domid_of(uuid)
            if domid is None:
                self.say(
                    f"no admission for {cfg.name}: {exc}; and no single domain with uuid "
                    f"{uuid}: nothing destroyed (it stays paused)"
                )
            else:
                self.say(
                    f"no admission for {cfg.name}: {exc}; destroying domid {domid} (fail closed)"
                )
                self.xl("destroy", str(domid))
            self._forget(uuid)
            code = exc.code if isinstance(exc, ControlError) else None
            return exit_status(code) if code is not None else EXIT_DAEMON
        if not adm.permitted:
            self.say(f"domain {cfg.name} (domid {adm.domid}) DENIED by shyped: {adm.reason}")
            for dev in adm.devices:
                if not dev.permitted:
                    print(f"  {dev.kind} {dev.devid}: DENIED: {dev.reason}", file=self.err)
            if adm.state != "gone":
                self.xl("destroy", str(adm.domid))
            self._forget(uuid)
            return EXIT_DENIED
        shown = label or "unlabelled"
        if adm.instance is not None:  # a dynamic label (docs/policy.md)
            shown += f", instance {adm.instance}"
        self.say(f"domain {cfg.name} (domid {adm.domid}) admitted ({shown})")
        return self._finish(str(adm.domid), paused, flags)

    def _xen_flask(self) -> bool:
        """Xen has FLASK (the daemon's status says so): the domain is built with its label's
        FLASK context (docs/flask.md); without, xl only warns about seclabel=."""
        try:
            st = self.client.status()
        except ControlError:
            return False
        return st.flask is not None and st.flask.mode != "absent"

    def _create_unchecked(
        self, create_argv: list[str], uuid: str, paused: bool, flags: set[str]
    ) -> int:
        status = self.xl(*create_argv)
        if status != 0:
            return status
        return self._finish_by_uuid(uuid, paused, flags)

    def _domid_of(self, uuid: str) -> int | None:
        """The domid of the one domain whose UUID is `uuid` (``xl list -l``); None if there is
        none, more than one, or xl's answer cannot be read."""
        try:
            out = subprocess.run(
                self.xl_argv("list", "-l"),
                check=False,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                timeout=self.opts.timeout,
            )
            records = json.loads(out.stdout) if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, ValueError, RecursionError):
            return None
        if not isinstance(records, list):
            return None
        found: list[int] = []
        for r in records:
            try:
                domid, their = r["domid"], r["config"]["c_info"]["uuid"]
            except (KeyError, TypeError):
                continue
            if isinstance(domid, int) and isinstance(their, str) and their.lower() == uuid:
                found.append(domid)
        return found[0] if len(found) == 1 else None

    def _finish_by_uuid(self, uuid: str, paused: bool, flags: set[str]) -> int:
        domid = self._domid_of(uuid)
        if domid is None:
            self.say(
                f"cannot tell which domain xl created (no single domain with uuid {uuid}); "
                "not unpausing anything"
            )
            return EXIT_DAEMON
        return self._finish(str(domid), paused, flags)

    def _finish(self, domain: str, paused: bool, flags: set[str]) -> int:
        if not paused:
            status = self.xl("unpause", domain)
            if status != 0:
                return status
        if "-c" in flags:
            self.exec_xl("console", domain)
        if flags & {"-V", "--vncviewer", "-A", "--vncviewer-autopass"}:
            auto = ["--autopass"] if flags & {"-A", "--vncviewer-autopass"} else []
            self.exec_xl("vncviewer", *auto, domain)
        return EXIT_OK

    def _forget(self, uuid: str) -> None:
        try:
            self.client.register_domain(uuid, None, None)
        except (ControlError, DaemonUnreachable) as exc:
            self.say(f"could not forget the label of {uuid}: {exc}")


#: The attach commands dry-run before xl runs them.
_CHECKED_ATTACH: Final = frozenset(
    {
        "block-attach", "network-attach", "pci-attach", "usbdev-attach", "vtpm-attach",
        "vkb-attach",
    }
)  # fmt: skip


def attach_items(cmd: str, domain: str, specs: list[str]) -> b.DryRunArgs:
    """What an attach command would add to `domain`, as a dry run's items (`XlConfigError`
    for a spec xl would refuse or shyped will not read): ``pci-attach DOMAIN BDF`` (one spec,
    as xl takes it), ``vtpm-attach``/``vkb-attach`` with their ``backend=`` (dom0 by
    default), ``usbdev-attach`` (a vusb device: denied as the daemon denies it)."""
    if cmd == "block-attach":
        return b.DryRunArgs(running=domain, disks=(disk_item(specs),))
    if cmd == "network-attach":
        return b.DryRunArgs(running=domain, vifs=(vif_item(",".join(specs)),))
    if cmd == "pci-attach":
        if len(specs) != 1:
            raise XlConfigError("pci-attach takes one PCI spec ([SSSS:]BB:DD.F[,options])")
        return b.DryRunArgs(running=domain, pcis=(b.PciItem(parse_pci_spec(specs[0])),))
    kind = {"vtpm-attach": "vtpm", "vkb-attach": "vkbd", "usbdev-attach": "vusb"}[cmd]
    return b.DryRunArgs(running=domain, channels=(channel_item(kind, ",".join(specs)),))


def _show(what: str, out: TextIO) -> int:
    if what == "--version":
        print(version_text("shype-xl"), file=out)
    else:
        out.write(build_parser().format_help())
    return EXIT_OK


def _subcommand_help(cmd: str, err: TextIO) -> None:
    """shype-xl's note on `cmd` before xl's own help for it."""
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction) and cmd in action.choices:
            print(f"shype-xl {cmd}: {action.choices[cmd].description or ''}", file=err)
            print("xl's options follow (shype-xl passes them on):\n", file=err, flush=True)


def run(
    argv: Sequence[str] | None = None, err: TextIO = sys.stderr, out: TextIO = sys.stdout
) -> int:
    try:
        opts = parse_options(sys.argv[1:] if argv is None else argv)
        wrapper = Wrapper(opts, err)
        try:
            return wrapper.run()
        finally:
            wrapper.client.close()
    except Shown as shown:
        return _show(str(shown), out)
    except Refused as exc:
        print(f"shype-xl: {exc}", file=err)
        return exc.status
    except XlConfigError as exc:
        print(f"shype-xl: {exc}", file=err)
        return EXIT_USAGE
    except ControlError as exc:
        print(f"shype-xl: shyped refused: {exc.message} [{exc.code}]", file=err)
        for key in ("reasons", "problems"):
            for item in exc.details.get(key, [])[:50]:
                print(f"  {item}", file=err)
        return exit_status(exc.code)


def main() -> None:
    exit_guarded(run, "shype-xl")


__all__ = [
    "FAIL_OPEN_ENV",
    "XL_ENV",
    "Options",
    "Refused",
    "Shown",
    "Wrapper",
    "attach_items",
    "build_parser",
    "main",
    "parse_options",
    "run",
]


if __name__ == "__main__":
    main()
