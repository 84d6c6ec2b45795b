"""shypectl's Xen ACM (``xm``) aliases: setpolicy, getpolicy, dumppolicy, resetpolicy, and the
``getlabel``/``rmlabel`` forms xm had (``dom CFG``, ``mgt DOMAIN``).

Each is a thin front end over the control socket's ops (docs/control-protocol.md): an operator
moving from ``xm`` can type what they typed. Where the output differs from xm's, the docs say
so (docs/acm-xml.md, "Coming from xm").
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Final

from shyped.cli.ctlcommon import (
    EXIT_OK,
    Ctx,
    UsageError,
    _policy_source,
    _read_text,
)
from shyped.control.views import shown_label
from shyped.control.xlitems import summarize

#: Where ``xm setpolicy ACM NAME`` looked policies up (xend's ``xend-security-path``).
ACM_POLICY_DIR: Final = Path("/etc/xen/acm-security/policies")


def policy_file(name: str, directory: Path) -> Path:
    """The file ``xm setpolicy ACM NAME`` read: ``DIR/<NAME, dots as slashes>-security_policy.xml``
    (``ACMPolicy.path_from_policy_name``); NAME itself when it is an existing file."""
    if os.sep in name or name.endswith((".xml", ".toml")):
        return Path(name)
    if not name or name.startswith(".") or any(not p for p in name.split(".")):
        raise UsageError(f"invalid policy name {name[:80]!r}")
    return directory / (name.replace(".", "/") + "-security_policy.xml")


def cmd_setpolicy(ctx: Ctx) -> int:
    """``xm setpolicy ACM NAME``: load a policy (the update check as for ``policy load``)."""
    if ctx.args.type.upper() != "ACM":
        raise UsageError(f"policy type must be ACM, not {ctx.args.type[:20]!r}")
    path = policy_file(ctx.args.policy, ctx.args.policy_dir)
    res = ctx.client.policy_load(_policy_source(path))

    def human() -> None:
        was = f" (was {res.previous.name} {res.previous.version})" if res.previous else ""
        ctx.say(f"Successfully set the new policy {res.policy.name} {res.policy.version}{was}.")

    ctx.emit(res, human)
    return EXIT_OK


def cmd_getpolicy(ctx: Ctx) -> int:
    """``xm getpolicy [--dumpxml]``: the active policy's name, type and version."""
    st = ctx.client.status()
    xml = ctx.client.policy_show("acm-xml").text if ctx.args.dumpxml else None

    def human() -> None:
        p = st.policy
        ctx.say(f"Policy name           : {p.name}")
        ctx.say("Policy type           : ACM")
        ctx.say(f"Version of XML policy : {p.version}")
        ctx.say(f"Policy configuration  : loaded ({p.format}{', ' + p.source if p.source else ''})")
        ctx.say(f"Policy sha256         : {p.sha256}")
        if xml is not None:
            ctx.out.write(xml if xml.endswith("\n") else xml + "\n")

    result = {"policy": st.policy, "xml": xml}
    ctx.emit(result, human)
    return EXIT_OK


def cmd_dumppolicy(ctx: Ctx) -> int:
    """``xm dumppolicy``: the enforced policy in readable form (labels and their types;
    ACM's binary ssidref matrix has no counterpart)."""
    st = ctx.client.status()
    labels = ctx.client.labels("any")

    def human() -> None:
        ctx.say(f"POLICY REFERENCE = {st.policy.name}.")
        ctx.say(f"POLICY VERSION   = {st.policy.version}.")
        for lab in labels.labels:
            cw = f" cw={','.join(lab.cw_types)}" if lab.type == "vm" else ""
            boot = " (bootstrap)" if lab.bootstrap else ""
            ctx.say(f"{lab.type:<3} {lab.label}: ste={','.join(lab.ste_types)}{cw}{boot}")

    ctx.emit({"policy": st.policy, "labels": labels.labels}, human)
    return EXIT_OK


def cmd_resetpolicy(ctx: Ctx) -> int:
    """``xm resetpolicy``: back to ACM's DEFAULT policy when nothing labelled runs."""
    res = ctx.client.policy_reset()

    def human() -> None:
        was = f" (was {res.previous.name} {res.previous.version})" if res.previous else ""
        ctx.say(f"Successfully reset the system's policy{was}.")

    ctx.emit(res, human)
    return EXIT_OK


def cfg_label_line(path: Path) -> str | None:
    """A cfg file's label as ``xm getlabel dom`` printed it, read offline (no daemon)."""
    cfg = summarize(_read_text(path, "domain config"), str(path))
    if cfg.label is None:
        return None
    return f"policytype=ACM,policy={cfg.label.policy},label={cfg.label.label}"


def getlabel_dom(ctx: Ctx, target: str) -> int:
    """``getlabel dom CFG`` (an existing file: its label, offline) or ``getlabel dom DOMAIN``
    (a running domain, as ``getlabel mgt``)."""
    path = Path(target)
    if path.is_file():
        line = cfg_label_line(path)
        ctx.emit(
            {"config": str(path), "label": line},
            lambda: ctx.say(line or "(unlabelled)"),
        )
        return EXIT_OK
    dom = ctx.client.get_domain_label(target)
    ctx.emit(dom, lambda: ctx.say(shown_label(dom) or "(unlabelled)"))
    return EXIT_OK


def rmlabel_mgt(ctx: Ctx, target: str) -> int:
    """``rmlabel mgt DOMAIN``: forget the stored label of a domain that does not run."""
    res = ctx.client.forget_domain(target)
    was = res.by_uuid or res.by_name
    ctx.emit(res, lambda: ctx.say(f"{res.domain}: label {was} removed"))
    return EXIT_OK


def add_acm_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The xm aliases as shypectl sub-commands."""
    p = sub.add_parser(
        "setpolicy",
        help="load a policy (xm setpolicy ACM NAME)",
        description="Load NAME (a file, or NAME-security_policy.xml in --policy-dir with the "
        "dots of NAME as folders, as xm looked it up) through the update check.",
    )
    p.add_argument("type", metavar="ACM", help="the policy type (only ACM)")
    p.add_argument("policy", help="policy name or file")
    p.add_argument(
        "--policy-dir",
        type=Path,
        default=ACM_POLICY_DIR,
        help=f"where policy names are looked up (default {ACM_POLICY_DIR})",
    )
    p.set_defaults(func=cmd_setpolicy)
    p = sub.add_parser("getpolicy", help="the active policy (xm getpolicy)")
    p.add_argument("--dumpxml", action="store_true", help="print it as ACM XML too")
    p.set_defaults(func=cmd_getpolicy)
    sub.add_parser(
        "dumppolicy", help="the enforced policy's labels and types (xm dumppolicy)"
    ).set_defaults(func=cmd_dumppolicy)
    sub.add_parser(
        "resetpolicy",
        help="return to ACM's DEFAULT policy when nothing labelled runs (xm resetpolicy)",
    ).set_defaults(func=cmd_resetpolicy)
