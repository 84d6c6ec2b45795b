"""`python -m shyped.sandbox`: an `xl`-compatible subset driving the sandbox toolstack.

Why: tests and the daemon's XlActuator run it as the `xl` binary of a host without Xen.  The
xenstored socket comes from `--socket` or XENSTORED_PATH (as for Debian's xenstore tools); the
simulated hypervisor's state lives beside it.  A leading `xl` word is accepted and ignored, so
`python -m shyped.sandbox xl create -p guest.cfg` works too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from pyxs.exceptions import PyXSError

import shyped
from shyped.core.xlcfg import (
    XlConfigError,
    domain_config_from_text,
    domain_config_from_values,
    parse_assignments,
    parse_disk_specs,
    parse_vif_spec,
)
from shyped.core.xlcfgpci import parse_pci_spec
from shyped.sandbox import migration
from shyped.sandbox.hypervisor import DomainState, HypervisorError
from shyped.sandbox.toolstack import Toolstack, ToolstackError
from shyped.sandbox.xsconn import XsError

#: The reference domain of shared/xen-4.17-reference (xsgold.cfg), used by `demo`.
DEMO_CFG = """\
name = "xsgold"
uuid = "6f1b1c9e-2a4d-4c55-9e0e-5ca1ab1e0001"
type = "pv"
kernel = "/guest/vmlinuz"
ramdisk = "/guest/initrd.gz"
extra = "console=hvc0 rdinit=/init loglevel=4"
memory = 128
vcpus = 1
vif = [ 'mac=00:16:3e:5a:11:01,bridge=xenbr0' ]
disk = [ 'format=raw,vdev=xvda,access=rw,target=/var/lib/xen/images/xsgold-xvda.img' ]
on_poweroff = "destroy"
on_reboot = "destroy"
on_crash = "preserve"
"""


class UsageError(Exception):
    """Bad command line (exit status 2, like argparse)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shyped.sandbox",
        description="xl-compatible sandbox toolstack: writes into a (sandbox) xenstored what "
        "libxl, dom0's backends, hotplug scripts, xenconsoled and a Linux PV guest write on a "
        "real Xen 4.17 host.",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help="xenstored socket (default: $XENSTORED_PATH)",
    )
    parser.add_argument(
        "--version", action="version", version=f"shype-sandbox (shyped) {shyped.__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("create", help="create a domain from an xl.cfg file (xl create)")
    p.add_argument("-p", dest="paused", action="store_true", help="leave the domain paused")
    p.add_argument("-q", dest="quiet", action="store_true", help="quiet")
    p.add_argument("config", type=Path, help="xl.cfg file")
    p.add_argument("overrides", nargs="*", help="extra key=value lines appended to the config")

    for verb, text in (
        ("unpause", "unpause a domain (its kernel boots on the first unpause)"),
        ("pause", "pause a domain"),
        ("destroy", "destroy a domain and remove its xenstore trees"),
    ):
        p = sub.add_parser(verb, help=text)
        p.add_argument("domain", help="domain name or domid")

    migration.add_commands(sub)

    p = sub.add_parser("list", help="list domains (xl list)")
    p.add_argument("-l", "--long", action="store_true", help="JSON configuration (xl list -l)")
    p.add_argument("domains", nargs="*", help="only these domains (names or domids)")

    p = sub.add_parser("block-attach", help="hot-plug a disk (xl block-attach)")
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("disk_spec", nargs="+", help="xl-disk-configuration(5) spec")

    p = sub.add_parser("network-attach", help="hot-plug a vif (xl network-attach)")
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("vif_spec", nargs="*", help="key=value settings (mac=, bridge=, ...)")

    p = sub.add_parser("pci-attach", help="pass a PCI device through (xl pci-attach)")
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("pci_spec", help="[SSSS:]BB:DD.F[,options]")

    p = sub.add_parser("block-detach", help="unplug a disk (xl block-detach)")
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("device", help="virtual device name (xvda) or devid (51712)")

    p = sub.add_parser("network-detach", help="unplug a vif (xl network-detach)")
    p.add_argument("domain", help="domain name or domid")
    p.add_argument("device", help="devid or mac address")

    sub.add_parser("boot-host", help="sandbox only: write what a freshly booted dom0 writes")

    p = sub.add_parser("vchan-listen", help="sandbox only: publish a libxenvchan rendezvous")
    p.add_argument("--server", type=int, default=0, help="server domid (default 0)")
    p.add_argument("--client", type=int, required=True, help="client domid")
    p.add_argument("--path", help="xenstore path (default data/vchan/<client>/<port>)")
    p.add_argument("--port", type=int, default=0, help="vchan port number for the default path")

    p = sub.add_parser("vchan-close", help="sandbox only: remove a vchan rendezvous")
    p.add_argument("--server", type=int, default=0, help="server domid (default 0)")
    p.add_argument("path", help="the rendezvous path (absolute, or relative to the server)")

    p = sub.add_parser(
        "demo",
        help="sandbox only: start a sandbox xenstored, boot the host, create the reference "
        "domain, print xenstore-ls -fp",
    )
    p.add_argument("--config", type=Path, help="xl.cfg to create (default: the reference one)")
    p.add_argument("--unpause", action="store_true", help="also unpause (frontends connect)")
    p.add_argument(
        "--keep",
        action="store_true",
        help="keep the sandbox xenstored running until Ctrl-C (prints XENSTORED_PATH)",
    )
    return parser


def _socket(args: argparse.Namespace) -> Path:
    socket = args.socket or os.environ.get("XENSTORED_PATH")
    if not socket:
        raise UsageError("no xenstored socket: pass --socket or set XENSTORED_PATH")
    return Path(socket)


def _print_list(domains: Sequence[DomainState]) -> None:
    """tools/xl/xl_info.c list_domains' format."""
    print("Name                                        ID   Mem VCPUs\tState\tTime(s)")
    for dom in domains:
        if dom.domid == 0:
            flags = "r-----"
        elif dom.paused:
            flags = "--p---"
        else:
            flags = "-b----"
        mem = dom.memory_kb // 1024
        print(f"{dom.name:<40} {dom.domid:5d} {mem:5d} {dom.vcpus:5d}     {flags}  {0.0:8.1f}")


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    ts = Toolstack(_socket(args))
    cmd = args.command
    if cmd == "create":
        text = args.config.read_text()
        if args.overrides:
            text += "\n" + "\n".join(args.overrides) + "\n"
        print(f"Parsing config from {args.config}", file=sys.stderr)
        values = parse_assignments(text, str(args.config))
        cfg = domain_config_from_values(values, str(args.config))
        domid = ts.create(cfg, paused=args.paused)
        if "seclabel" in values or "init_seclabel" in values:
            # xl puts the label in c_info.ssid_label; without XSM libxl only warns
            # (libxl_create.c libxl__domain_config_setdefault) and writes no xenstore node.
            # (`access_control = [...]` is xm syntax, which xl 4.17 ignores silently.)
            print(
                "libxl: warning: libxl_create.c:1085:libxl__domain_config_setdefault: "
                f"Domain {domid}:XSM Disabled: init_seclabel not supported",
                file=sys.stderr,
            )
    elif cmd == "unpause":
        ts.unpause(args.domain)
    elif cmd == "pause":
        ts.pause(args.domain)
    elif cmd == "destroy":
        ts.destroy(args.domain)
    elif cmd == "list":
        wanted = set(args.domains)
        if args.long:
            records = [
                r
                for r in ts.list_long()
                if not wanted or {str(r["domid"]), r["config"]["c_info"]["name"]} & wanted
            ]
            print(json.dumps(records, indent=4))
        else:
            doms = [d for d in ts.list_domains() if not wanted or {str(d.domid), d.name} & wanted]
            if wanted and not doms:
                raise ToolstackError(f"{' '.join(sorted(wanted))} is an invalid domain identifier")
            _print_list(doms)
    elif cmd == "block-attach":
        ts.attach_disk(args.domain, parse_disk_specs(args.disk_spec))
    elif cmd == "network-attach":
        ts.attach_nic(args.domain, parse_vif_spec(",".join(args.vif_spec)))
    elif cmd == "pci-attach":
        ts.attach_pci(args.domain, parse_pci_spec(args.pci_spec))
    elif cmd == "block-detach":
        ts.detach_disk(args.domain, args.device)
    elif cmd == "network-detach":
        ts.detach_nic(args.domain, args.device)
    elif cmd in migration.COMMANDS:
        migration.run_command(ts, args)
    elif cmd == "boot-host":
        ts.boot_host()
    elif cmd == "vchan-listen":
        ep = ts.vchan_listen(args.server, args.client, path=args.path, port=args.port)
        print(f"{ep.path} ring-ref={ep.ring_ref} event-channel={ep.evtchn}")
    elif cmd == "vchan-close":
        ts.vchan_close(args.server, args.path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from shyped.sandbox.xenstored import SandboxXenstored

    text = args.config.read_text() if args.config else DEMO_CFG
    cfg = domain_config_from_text(text, str(args.config or "xsgold.cfg"))
    directory = Path(tempfile.mkdtemp(dir="/tmp", prefix="xsdemo"))
    xsd = SandboxXenstored(directory)
    xsd.start()
    try:
        ts = Toolstack(xsd.socket_path)
        ts.boot_host()
        domid = ts.create(cfg, paused=True)
        if args.unpause:
            ts.unpause(domid)
        xenstore_ls = shutil.which("xenstore-ls")
        if xenstore_ls is None:
            raise ToolstackError("xenstore-ls not found (Debian package xenstore-utils)")
        sys.stdout.flush()
        subprocess.run([xenstore_ls, "-fp"], env=xsd.env(), check=False)
        if args.keep:
            print(f"export XENSTORED_PATH={xsd.socket_path}", file=sys.stderr, flush=True)
            print("sandbox xenstored running; Ctrl-C to stop", file=sys.stderr, flush=True)
            stop: list[int] = []
            signal.signal(signal.SIGTERM, lambda signum, _frame: stop.append(signum))
            try:
                while not stop:
                    xsd.check()
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
    finally:
        xsd.stop()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


#: The parser, under the name every entry point exposes (tests/test_cli_conventions.py).
build_parser = _parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["xl"]:
        args_list = args_list[1:]
    parser = _parser()
    args = parser.parse_args(args_list)
    try:
        return _run(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ToolstackError, XlConfigError, XsError, HypervisorError, PyXSError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
