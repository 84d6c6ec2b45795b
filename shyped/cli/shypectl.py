"""``shypectl``: the administrator's command line for shyped (Xen ACM's ``xm`` security verbs).

Human output by default, ``--json`` for scripts (the daemon's result object; on failure
``{"error": {"code": ..., "message": ..., "details": ...}}``). Every command talks to the
daemon's control socket (``--socket``, ``$SHYPED_SOCKET``, default /run/shyped/control.sock)
except ``audit``, ``getlabel dom CFG`` and the policy verbs on files (``policy lint``,
``analyse``, ``can``, ``convert``, ``check-labels``, ``graph FILE``, ``diff OLD NEW``,
``flask``), which read files. The ``xm`` aliases (setpolicy, getpolicy, dumppolicy,
resetpolicy) are in `shyped.cli.shypectl_acm`.

Exit status (stable, see docs/control-protocol.md):

====  =====================================================================================
0     success (dry-run: every item PERMITTED; policy check: the update would be accepted)
1     the policy said no: dry-run DENIED, relabel denied, policy load/check rejected;
      policy diff: the policies differ
2     usage error or bad input (arguments, cfg file, label or policy text)
3     the daemon could not be asked or failed (not running, timeout, internal error)
4     permission denied by the daemon (see control.read_group / admin_group)
5     not found (domain, label, resource)
====  =====================================================================================
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final, TextIO

import attrs

from shyped.cli import flaskbuild, policytool
from shyped.cli.conventions import add_version, exit_guarded, json_after_subcommands, seconds
from shyped.cli.ctlcommon import (
    EXIT_DAEMON,
    EXIT_DENIED,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_PERMISSION,
    EXIT_USAGE,
    Ctx,
    UsageError,
    _read_text,
    _write_atomic,
    _yes,
    check_cfg_label,
    exit_status,
)
from shyped.cli.shypectl_acm import add_acm_commands, getlabel_dom, rmlabel_mgt
from shyped.cli.shypectl_attest import add_attest_commands
from shyped.cli.shypectl_policy import (
    cmd_policy_check,
    cmd_policy_diff,
    cmd_policy_graph,
    cmd_policy_load,
    cmd_policy_show,
)
from shyped.cli.shypectl_pool import add_pool_commands
from shyped.control import backend as b
from shyped.control.client import DaemonUnreachable
from shyped.control.protocol import ControlError
from shyped.control.views import match_domain, shown_label
from shyped.control.xlitems import set_cfg_label, summarize, with_overrides
from shyped.core.xlcfg import XlConfigError

# --------------------------------------------------------------------------- commands


def cmd_status(ctx: Ctx) -> int:
    st = ctx.client.status()

    def human() -> None:
        c, p = st.counts, st.policy
        ctx.say(f"mode:       {st.mode}")
        ctx.say(f"policy:     {p.name} {p.version} ({p.format})")
        ctx.say(f"sha256:     {p.sha256}")
        if p.source:
            ctx.say(f"source:     {p.source}")
        ctx.say(f"ready:      {_yes(st.ready)}")
        ctx.say(
            f"domains:    {c.domains} ({c.admitted} admitted, {c.denied} denied, "
            f"{c.paused} paused, {c.undecided} undecided)"
        )
        ctx.say(f"devices:    {c.devices}; vchans: {c.vchans}")
        ctx.say(
            f"labels:     {c.vm_labels} VM, {c.resource_labels} resource; "
            f"{c.labelled_resources} labelled resource(s)"
        )
        if st.audit is not None:
            ctx.say(f"audit:      {st.audit}")
        if st.flask is not None:
            f = st.flask
            ctx.say(
                f"xen flask:  {f.mode} ({f.reason})"
                if f.reason
                else f"xen flask:  {f.mode}; policy sha256 {f.policy_sha256 or '-'}; "
                f"{f.denials} AVC denial(s) read, {f.relabels} relabel(s)"
            )
        if st.vetoes_pending:
            ctx.say(f"vetoes:     {len(st.vetoes_pending)} PENDING (failed, retried):")
            for v in st.vetoes_pending:
                ctx.say(
                    f"  {v.veto} {v.name or '?'}({v.domid}): {v.failures} failed attempt(s) "
                    f"in {v.failing_for:.0f} s, next in {v.next_attempt_in:.0f} s: {v.error}"
                )
        ls = st.label_store
        if ls is not None and ls.error is not None:
            ctx.say(
                f"label store: {ls.path} NOT RELOADED ({ls.reload_failures} failed reload(s); "
                f"the one in use stays): {ls.error.splitlines()[0]}"
            )
        if st.daemon:
            ctx.say(f"daemon:     {st.daemon}")
        if st.quotas:
            ctx.say("quotas:")
            for line in _quota_lines(st.quotas):
                ctx.say(f"  {line}")

    ctx.emit(st, human)
    return EXIT_OK


def _quota_lines(rows: Sequence[b.QuotaRow]) -> list[str]:
    """The usage table as `shyped.core.quota.format_quota_table` prints it."""
    from shyped.core.quota import QuotaKind, QuotaUsage, format_quota_table

    usage = [QuotaUsage(r.label, QuotaKind(r.quota), r.limit, r.used, r.domid) for r in rows]
    return format_quota_table(usage).splitlines()


def cmd_getenforce(ctx: Ctx) -> int:
    mode = ctx.client.getenforce()
    ctx.emit(mode, lambda: ctx.say(mode.mode.capitalize()))
    return EXIT_OK


_MODES: Final = {
    "enforcing": "enforcing",
    "1": "enforcing",
    "permissive": "permissive",
    "0": "permissive",
}


def cmd_setenforce(ctx: Ctx) -> int:
    mode = _MODES.get(ctx.args.mode.lower())
    if mode is None:
        raise UsageError(f"mode must be enforcing|permissive|1|0, not {ctx.args.mode!r}")
    res = ctx.client.setenforce(mode)  # type: ignore[arg-type]
    ctx.emit(res, lambda: ctx.say(f"{res.mode} (was {res.previous})"))
    return EXIT_OK


def cmd_labels(ctx: Ctx) -> int:
    res = ctx.client.labels(ctx.args.type)

    def human() -> None:
        for lab in res.labels:
            extra = []
            if ctx.args.long:
                extra.append("ste=" + ",".join(lab.ste_types))
                if lab.type == "vm":
                    extra.append("cw=" + ",".join(lab.cw_types))
                if lab.mls:
                    extra.append("mls=" + lab.mls)
                if lab.bootstrap:
                    extra.append("bootstrap")
                if lab.dynamic:
                    extra.append("dynamic")
                if lab.shared_types:
                    extra.append("shared=" + ",".join(lab.shared_types))
                if lab.per_instance:
                    extra.append("per-instance")
            tail = ("  " + " ".join(extra)) if extra else ""
            kind = "" if ctx.args.type != "any" else f"{lab.type:<4}"
            ctx.say(f"{kind}{lab.name}{tail}")

    ctx.emit(res, human)
    return EXIT_OK


def cmd_getlabel(ctx: Ctx) -> int:
    if ctx.args.kind == "dom":
        return getlabel_dom(ctx, ctx.args.target)
    if ctx.args.kind == "mgt":
        dom = ctx.client.get_domain_label(ctx.args.target)
        ctx.emit(dom, lambda: ctx.say(shown_label(dom) or "(unlabelled)"))
    else:
        res = ctx.client.get_resource_label(ctx.args.target)
        ctx.emit(res, lambda: ctx.say(res.label or "(unlabelled)"))
    return EXIT_OK


def _edit_cfg(ctx: Ctx, path: Path, label: str | None) -> int:
    text = _read_text(path, "domain config")
    new = set_cfg_label(text, label, str(path))
    if new != text:
        _write_atomic(path, new)
    result = {"config": str(path), "label": label}
    ctx.emit(result, lambda: ctx.say(f"{path}: {'seclabel = ' + label if label else 'unlabelled'}"))
    return EXIT_OK


def cmd_addlabel(ctx: Ctx) -> int:
    kind, target, label = ctx.args.kind, ctx.args.target, ctx.args.label
    if ctx.args.policy is not None:  # xm addlabel LABEL dom CFG POLICY
        if ":" in label:
            raise UsageError("give the policy in the label or as the last argument, not both")
        label = f"ACM:{ctx.args.policy}:{label}"
    if kind == "dom":
        info = ctx.client.validate_label(label, "vm")
        return _edit_cfg(ctx, Path(target), info.label)
    if kind == "mgt":
        dom = ctx.client.relabel_domain(target, label)
        ctx.emit(dom, lambda: ctx.say(f"{dom.name or dom.domid} (domid {dom.domid}): {dom.label}"))
        return EXIT_OK
    change = ctx.client.set_resource_label(target, label)
    ctx.emit(
        change,
        lambda: ctx.say(
            f"{change.resource}: {change.label} (was {change.previous or 'unlabelled'})"
        ),
    )
    return EXIT_OK


def cmd_rmlabel(ctx: Ctx) -> int:
    kind, target = ctx.args.kind, ctx.args.target
    if kind == "dom":
        return _edit_cfg(ctx, Path(target), None)
    if kind == "mgt":
        return rmlabel_mgt(ctx, target)
    change = ctx.client.set_resource_label(target, None)
    ctx.emit(
        change,
        lambda: ctx.say(f"{change.resource}: unlabelled (was {change.previous or 'unlabelled'})"),
    )
    return EXIT_OK


def cmd_resources(ctx: Ctx) -> int:
    res = ctx.client.resources()

    def human() -> None:
        width = max((len(r.resource) for r in res.resources), default=8)
        for r in res.resources:
            ctx.say(f"{r.resource:<{width}}  {r.label or '(unlabelled)'}")

    ctx.emit(res, human)
    return EXIT_OK


def _print_verdicts(ctx: Ctx, items: Sequence[b.Verdict]) -> None:
    width = max((len(i.item) for i in items), default=10)
    for i in items:
        verdict = "PERMITTED" if i.permitted else "DENIED"
        ctx.say(f"{i.item:<{width}}  {verdict:<9}  {i.reason}")


def cmd_dry_run(ctx: Ctx) -> int:
    path = Path(ctx.args.config)
    text = with_overrides(_read_text(path, "domain config"), ctx.args.overrides)
    cfg = summarize(text, str(path))
    check_cfg_label(ctx.client, cfg.label)
    res = ctx.client.dry_run(attrs.evolve(cfg.dry_run_args(), acm_only=ctx.args.acm))

    def human() -> None:
        _print_verdicts(ctx, res.items)
        ctx.say("PERMITTED" if res.permitted else "DENIED")

    ctx.emit(res, human)
    return EXIT_OK if res.permitted else EXIT_DENIED


def _list_row(d: b.DomainInfo) -> str:
    """One line as ``xl list -Z`` prints it (tools/xl/xl_info.c), State being shyped's."""
    mem = "-" if d.memory_mib is None else str(d.memory_mib)
    vcpus = "-" if d.vcpus is None else str(d.vcpus)
    time_s = "-" if d.cpu_seconds is None else f"{d.cpu_seconds:.1f}"
    return (
        f"{(d.name or '?'):<40} {d.domid:>5} {mem:>5} {vcpus:>5} {d.state:>10} {time_s:>9}"
        f"  {shown_label(d) or '-'}"
    )


LIST_HEADER: Final = (
    f"{'Name':<40} {'ID':>5} {'Mem':>5} {'VCPUs':>5} {'State':>10} {'Time(s)':>9}  Security Label"
)


def cmd_list(ctx: Ctx) -> int:
    res = ctx.client.list_domains()
    if ctx.args.domains:
        wanted = {match_domain(ref, res.domains).domid for ref in ctx.args.domains}
        res = b.DomainList(tuple(d for d in res.domains if d.domid in wanted))

    def human() -> None:
        xen = any(d.flask_context for d in res.domains)  # Xen has FLASK: its view too
        ctx.say(LIST_HEADER + ("  (Xen FLASK context)" if xen else ""))
        for d in sorted(res.domains, key=lambda d: d.domid):
            ctx.say(_list_row(d) + (f"  ({d.flask_context or '-'})" if xen else ""))

    ctx.emit(res, human)
    return EXIT_OK


# --------------------------------------------------------------------------- argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shypectl",
        description="Administer shyped: sHype/Xen ACM mandatory access control for Xen.",
        epilog="Exit status: 0 ok, 1 denied/rejected, 2 usage or bad input, 3 daemon "
        "unreachable or failed, 4 permission denied, 5 not found, 6 unknown label "
        "(docs/operations.md, Exit status).",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        help="control socket (default $SHYPED_SOCKET or /run/shyped/control.sock)",
    )
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    add_version(parser)
    parser.add_argument(
        "--timeout", type=seconds, default=30.0, help="seconds to wait for answers (30)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser(
        "status", help="mode, active policy (name, version, sha256), counts"
    ).set_defaults(func=cmd_status)
    sub.add_parser("getenforce", help="print Enforcing or Permissive").set_defaults(
        func=cmd_getenforce
    )
    p = sub.add_parser("setenforce", help="switch between enforcing and permissive")
    p.add_argument("mode", help="enforcing|permissive|1|0")
    p.set_defaults(func=cmd_setenforce)

    p = sub.add_parser("labels", help="the active policy's labels (xm labels)")
    p.add_argument(
        "--type",
        choices=("vm", "res", "any"),
        default="vm",
        help="VM labels (default), resource labels, or both",
    )
    p.add_argument("-l", "--long", action="store_true", help="with types and MLS")
    p.set_defaults(func=cmd_labels)

    p = sub.add_parser("getlabel", help="a domain's or resource's label (xm getlabel)")
    p.add_argument("kind", choices=("dom", "mgt", "res"))
    p.add_argument(
        "target",
        help="dom: an xl.cfg file (its label, read offline) or a domain; mgt: name, domid or "
        "uuid of a domain; res: file:/path, phy:/dev/… (phy:NAME is /dev/NAME), bridge:NAME",
    )
    p.set_defaults(func=cmd_getlabel)

    p = sub.add_parser(
        "addlabel",
        help="label a domain config (dom), a running domain (mgt) or a resource (res)",
        description="dom CFG: write seclabel= into the xl.cfg (after the daemon validated the "
        "label); mgt DOMAIN: relabel a running domain (the daemon re-checks the Chinese Wall "
        "and its live channels and resources; with Xen's FLASK, Xen relabels it first and a "
        "refusal there refuses the relabel); res RESOURCE: label a disk image, device or "
        "bridge (file:/path, phy:/dev/…, bridge:NAME).",
    )
    p.add_argument("label", help="label name or ACM:<policy>:<label>")
    p.add_argument("kind", choices=("dom", "mgt", "res"))
    p.add_argument("target")
    p.add_argument(
        "policy",
        nargs="?",
        help="the label's policy, as xm took it (must be the active policy)",
    )
    p.set_defaults(func=cmd_addlabel)

    p = sub.add_parser(
        "rmlabel",
        help="remove the label of a domain config (dom), a stored domain label (mgt: a domain "
        "that does not run, by name or uuid) or a resource (res)",
    )
    p.add_argument("kind", choices=("dom", "mgt", "res"))
    p.add_argument("target")
    p.set_defaults(func=cmd_rmlabel)

    sub.add_parser("resources", help="labelled resources (xm resources)").set_defaults(
        func=cmd_resources
    )

    p = sub.add_parser(
        "dry-run",
        help="would this domain and its disks/vifs be admitted now? (xm dry-run)",
    )
    p.add_argument("config", help="xl.cfg file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="as for xl create")
    p.add_argument(
        "--acm",
        action="store_true",
        help="Xen ACM's view: the label and the disks' resource labels only, no Chinese Wall "
        "check against running domains (shyped's default checks it)",
    )
    p.set_defaults(func=cmd_dry_run)

    p = sub.add_parser(
        "list",
        help="domains with their labels (xl list -Z)",
        description="Name, ID, Mem (MiB), VCPUs, State (shyped's: seen, admitted, denied, "
        "paused), Time(s) (CPU seconds, when the daemon polls xl; else -) and the security "
        "label of every domain, or of the DOMAINs named.",
    )
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="name, domid or uuid")
    p.set_defaults(func=cmd_list)

    add_acm_commands(sub)

    pol = sub.add_parser(
        "policy",
        help="show, check, load a policy (daemon); lint, analyse, can, graph, diff, convert, "
        "check-labels, flask a policy FILE (offline)",
    )
    psub = pol.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    p = psub.add_parser("show", help="print the active policy")
    p.add_argument("--format", choices=("toml", "acm-xml"), default="toml")
    p.set_defaults(func=cmd_policy_show)
    p = psub.add_parser("check", help="would FILE replace the active policy now?")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_policy_check)
    p = psub.add_parser("load", help="activate FILE (or re-read the configured policy)")
    p.add_argument("file", type=Path, nargs="?")
    p.set_defaults(func=cmd_policy_load)
    p = psub.add_parser(
        "diff",
        help="labels, types and rules added, removed, renamed: FILE against the active policy, "
        "or OLD NEW (offline)",
    )
    p.add_argument("file", type=Path, help="the new policy (or OLD when NEW is given)")
    p.add_argument("new", type=Path, nargs="?", help="the new policy: compare two files")
    p.add_argument("--against", type=Path, help="compare FILE with this file instead")
    p.set_defaults(func=cmd_policy_diff)
    p = psub.add_parser("graph", help="the policy's communication graph (DOT, or SVG)")
    p.add_argument("file", type=Path, nargs="?", help="policy file (default: the active one)")
    p.add_argument("--svg", action="store_true", help="render SVG with Graphviz dot")
    p.add_argument("-o", "--output", type=Path, help="write here (.svg implies --svg)")
    p.add_argument("--no-resources", action="store_true", help="leave resource labels out")
    p.add_argument("--no-conflicts", action="store_true", help="leave CW conflicts out")
    p.set_defaults(func=cmd_policy_graph)
    policytool.add_commands(psub)
    flaskbuild.add_command(psub)
    add_pool_commands(sub)
    add_attest_commands(sub)
    psub.choices["flask"].set_defaults(
        func=lambda ctx: flaskbuild.run_command(ctx.args, ctx.out, ctx.err)
    )

    try:
        from shyped.cli import auditcli
    except ImportError:  # pragma: no cover - the audit CLI ships with the daemon
        pass
    else:
        a = auditcli.add_audit_commands(sub)
        a.set_defaults(func=lambda ctx: auditcli.run(ctx.args, ctx.out, ctx.err))
    return finish_parser(parser)


def finish_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The conventions every verb gets (call last, after every sub-command is added):
    ``--json`` after the sub-command too."""
    return json_after_subcommands(parser)


def _print_error(ctx: Ctx, exc: ControlError) -> None:
    if ctx.json:
        print(json.dumps({"error": exc.to_json()}, indent=2, sort_keys=True), file=ctx.out)
        return
    print(f"shypectl: {exc.message} [{exc.code}]", file=ctx.err)
    for key in ("reasons", "problems"):
        for item in exc.details.get(key, [])[:100]:
            print(f"  {item}", file=ctx.err)


def run(
    argv: Sequence[str] | None = None, out: TextIO = sys.stdout, err: TextIO = sys.stderr
) -> int:
    """Run shypectl with `argv`; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    ctx = Ctx(args, out, err)
    try:
        status: int = args.func(ctx)
        return status
    except ControlError as exc:
        _print_error(ctx, exc)
        return exit_status(exc.code)
    except DaemonUnreachable as exc:
        denied = exc.errno in (errno.EACCES, errno.EPERM)
        if ctx.json:
            code = "permission-denied" if denied else "unreachable"
            doc = {"error": {"code": code, "message": str(exc)}}
            print(json.dumps(doc, indent=2), file=out)
        else:
            print(f"shypectl: {exc}", file=err)
        return EXIT_PERMISSION if denied else EXIT_DAEMON
    except (UsageError, XlConfigError) as exc:
        if ctx.json:
            print(json.dumps({"error": {"code": "usage", "message": str(exc)}}, indent=2), file=out)
        else:
            print(f"shypectl: {exc}", file=err)
        return EXIT_USAGE
    finally:
        ctx.close()


def main() -> None:
    exit_guarded(run, "shypectl")


__all__ = [
    "EXIT_DAEMON",
    "EXIT_DENIED",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PERMISSION",
    "EXIT_USAGE",
    "Ctx",
    "UsageError",
    "build_parser",
    "exit_status",
    "main",
    "run",
]


if __name__ == "__main__":
    main()
