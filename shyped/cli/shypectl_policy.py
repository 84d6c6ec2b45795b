"""shypectl's policy verbs: show, check, load (the daemon), diff, graph (files or the active
policy); the offline verbs on files are in `shyped.cli.policytool`."""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
from pathlib import Path

from shyped.cli.ctlcommon import (
    EXIT_DENIED,
    EXIT_OK,
    Ctx,
    UsageError,
    _policy_source,
)
from shyped.control.views import parse_policy
from shyped.policy import policydiff, toml_format
from shyped.policy.analysis import analyse, to_dot
from shyped.policy.model import Policy

# ---- policy


def cmd_policy_show(ctx: Ctx) -> int:
    res = ctx.client.policy_show(ctx.args.format)

    def human() -> None:
        ctx.out.write(res.text if res.text.endswith("\n") else res.text + "\n")

    ctx.emit(res, human)
    return EXIT_OK


def cmd_policy_check(ctx: Ctx) -> int:
    res = ctx.client.policy_check(_policy_source(Path(ctx.args.file)))

    def human() -> None:
        p = res.policy
        if res.allowed:
            ctx.say(f"{p.name} {p.version}: would be accepted")
        else:
            ctx.say(f"{p.name} {p.version}: would be rejected ({len(res.problems)} reason(s))")
            for problem in res.problems:
                ctx.say(f"  {problem}")

    ctx.emit(res, human)
    return EXIT_OK if res.allowed else EXIT_DENIED


def cmd_policy_load(ctx: Ctx) -> int:
    source = _policy_source(Path(ctx.args.file)) if ctx.args.file else None
    res = ctx.client.policy_load(source)

    def human() -> None:
        was = f" (was {res.previous.name} {res.previous.version})" if res.previous else ""
        ctx.say(f"loaded {res.policy.name} {res.policy.version}{was}")

    ctx.emit(res, human)
    return EXIT_OK


def _active_policy(ctx: Ctx) -> tuple[Policy, str]:
    shown = ctx.client.policy_show("toml")
    policy, _ = parse_policy(shown.text, f"<active policy {shown.policy.name}>", "toml")
    return policy, f"active {shown.policy.name} {shown.policy.version}"


def _file_policy(path: Path) -> Policy:
    from shyped.cli.policytool import load_file

    return load_file(path).policy


def cmd_policy_diff(ctx: Ctx) -> int:
    """``diff FILE`` (against the active policy), ``diff FILE --against OLD`` or ``diff OLD
    NEW``: the item changes (`shyped.policy.policydiff`), then a unified diff of the two
    policies written out as TOML. Exit 0 same, 1 different."""
    if ctx.args.new is not None:
        if ctx.args.against:
            raise UsageError("give OLD NEW or FILE --against OLD, not both")
        old_path, new_path = Path(ctx.args.file), Path(ctx.args.new)
        old, old_name = _file_policy(old_path), str(old_path)
    else:
        new_path = Path(ctx.args.file)
        if ctx.args.against:
            old, old_name = _file_policy(Path(ctx.args.against)), str(ctx.args.against)
        else:
            old, old_name = _active_policy(ctx)
    new = _file_policy(new_path)
    a = toml_format.dumps(old).splitlines(keepends=True)
    bb = toml_format.dumps(new).splitlines(keepends=True)
    diff = list(difflib.unified_diff(a, bb, fromfile=old_name, tofile=str(new_path)))
    changes = policydiff.diff(old, new)
    summary = [str(c) for c in changes]
    result = {
        "same": not diff,
        "summary": summary,
        "changes": [c.to_json() for c in changes],
        "diff": "".join(diff),
    }

    def human() -> None:
        for line in summary:
            ctx.say(line)
        if summary and diff:
            ctx.say()
        ctx.out.write("".join(diff))

    ctx.emit(result, human)
    return EXIT_OK if not diff else EXIT_DENIED


def cmd_policy_graph(ctx: Ctx) -> int:
    policy = _file_policy(Path(ctx.args.file)) if ctx.args.file else _active_policy(ctx)[0]
    dot = to_dot(
        analyse(policy), resources=not ctx.args.no_resources, conflicts=not ctx.args.no_conflicts
    )
    output: Path | None = ctx.args.output
    svg = ctx.args.svg or (output is not None and output.suffix == ".svg")
    data = dot.encode()
    if svg:
        tool = shutil.which("dot")
        if tool is None:
            raise UsageError("SVG needs Graphviz's `dot` (apt-get install graphviz); use DOT")
        proc = subprocess.run([tool, "-Tsvg"], input=data, capture_output=True, check=False)
        if proc.returncode != 0:
            raise UsageError(f"dot failed: {proc.stderr.decode(errors='replace').strip()}")
        data = proc.stdout
    if output is not None:
        output.write_bytes(data)
        if not ctx.json:
            ctx.say(f"wrote {output}")
        else:
            ctx.say(json.dumps({"output": str(output), "format": "svg" if svg else "dot"}))
    else:
        ctx.out.write(data.decode())
    return EXIT_OK
