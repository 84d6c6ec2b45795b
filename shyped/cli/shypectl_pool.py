"""``shypectl placement LABEL``: pool mode's question "where may this label run now?"
(docs/pool.md). Exit status 0 if at least one live host would admit it, 1 if none would."""

from __future__ import annotations

import argparse
import base64
import json
import ssl
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from shyped.cli.ctlcommon import EXIT_DENIED, EXIT_OK, Ctx


def cmd_placement(ctx: Ctx) -> int:
    res = ctx.client.placement(ctx.args.label)

    def human() -> None:
        ctx.say(f"placement of {res.label} (pool revision {res.revision}, store {res.state}):")
        for h in res.hosts:
            ctx.say(f"  {h.host:<24} {'ADMITTED' if h.admitted else 'EXCLUDED'}  {h.reason}")

    ctx.emit(res, human)
    return EXIT_OK if any(h.admitted for h in res.hosts) else EXIT_DENIED


def add_pool_commands(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "placement",
        help="pool mode: the live hosts where a VM label would be admitted now, with the "
        "reason for each excluded host",
    )
    p.add_argument("label", help="VM label (bare name or ACM:<policy>:<label>)")
    p.set_defaults(func=cmd_placement)
    r: argparse.ArgumentParser = sub.add_parser(
        "pool-roles",
        help="pool mode: print the etcdctl commands that give each host its own etcd user and "
        "a role that may write only that host's key ranges (docs/pool.md, per-host identities)",
    )
    r.add_argument("--prefix", required=True, help="the pool's key prefix ([pool] prefix)")
    r.add_argument("--user-prefix", default="shyped-", help="user and role name = this + host")
    r.add_argument("hosts", nargs="+", metavar="HOST", help="the pool's host names")
    r.set_defaults(func=cmd_pool_roles)


def cmd_pool_roles(ctx: Ctx) -> int:
    """Offline: no daemon is asked. Bad prefix or host name: a clear error, exit 2."""
    from shyped.pool.keys import PoolKeyError
    from shyped.pool.rbac import etcdctl_commands

    try:
        lines = etcdctl_commands(ctx.args.prefix, ctx.args.hosts, ctx.args.user_prefix)
    except PoolKeyError as exc:
        print(f"pool-roles: {exc}", file=ctx.err)
        return 2
    ctx.emit({"commands": lines}, lambda: ctx.say("\n".join(lines)))
    return EXIT_OK


#: Most anchors (audit chains) of one host read back.
MAX_ANCHORS = 1000


def _post(pool: Any, endpoint: str, path: str, body: dict[str, Any], token: str | None) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    req = urllib.request.Request(
        endpoint + "/v3/" + path, data=json.dumps(body).encode(), method="POST", headers=headers
    )
    context = None
    if pool.ca_file is not None:
        context = ssl.create_default_context(cafile=str(pool.ca_file))
        if pool.cert_file is not None:
            context.load_cert_chain(str(pool.cert_file), str(pool.key_file))
    with urllib.request.urlopen(req, timeout=pool.timeout, context=context) as resp:
        return json.loads(resp.read(16 << 20))


def fetch_prefix(pool: Any, prefix: str) -> list[str]:
    """The values under `prefix` from the first etcd endpoint of `pool` (a `PoolConfig`) that
    answers (at most `MAX_ANCHORS`; TLS and etcd's authentication as configured). `OSError`
    when none answers. Blocking: the CLI's own short, bounded read."""
    from shyped.pool.keys import range_end

    def enc(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    body = {"key": enc(prefix), "range_end": enc(range_end(prefix)), "limit": MAX_ANCHORS}
    password = None
    if pool.password_file is not None:
        password = pool.password_file.read_text().rstrip("\n")
    errors = []
    for endpoint in pool.endpoints:
        try:
            token = None
            if pool.user is not None:
                auth = {"name": pool.user, "password": password}
                token = _post(pool, endpoint, "auth/authenticate", auth, None).get("token")
            doc = _post(pool, endpoint, "kv/range", body, token)
        except (OSError, ValueError, AttributeError) as exc:
            errors.append(f"{endpoint}: {exc}")
            continue
        kvs = doc.get("kvs") if isinstance(doc, dict) else None
        return [
            base64.b64decode(kv.get("value", "")).decode("utf-8", "replace")
            for kv in (kvs if isinstance(kvs, list) else [])
            if isinstance(kv, dict)
        ]
    raise OSError("no etcd endpoint answered: " + "; ".join(errors))


def verify_pool(directory: Path, config_path: Path, out: TextIO, err: TextIO) -> int:
    """``shypectl audit verify --pool``: the local chain against this host's anchored head.
    0 the anchored record is there with its hash, 1 it is not (rewritten), 2 cannot check."""
    from shyped.core.audit import iter_parsed
    from shyped.pool.anchor import AnchorError, check_anchor, parse_anchor
    from shyped.pool.keys import PoolKeys
    from shyped.service.auditlog import list_log_files
    from shyped.service.auditlog.files import read_lines
    from shyped.service.config import ConfigError, load_config

    try:
        pool = load_config(config_path).pool
    except ConfigError as exc:
        print(f"audit verify --pool: {exc}", file=err)
        return 2
    if not pool.enabled:
        print(f"audit verify --pool: {config_path} has no [pool] table", file=err)
        return 2
    key = PoolKeys(pool.prefix, pool.host).audit_anchors()
    try:
        texts = fetch_prefix(pool, key)
    except OSError as exc:
        print(f"audit verify --pool: {exc}", file=err)
        return 2
    if not texts:
        print(f"audit verify --pool: no anchor for host {pool.host} under {key}", file=err)
        return 2
    problems: list[str] = []
    for text in texts:
        try:
            anchor = parse_anchor(text)
        except AnchorError as exc:
            problems.append(str(exc))
            continue
        if anchor.host != pool.host:
            problems.append(f"an anchor under {key} names host {anchor.host!r}: not this host's")
            continue
        records = (
            rec for path in list_log_files(directory) for rec in iter_parsed(read_lines(path))
        )
        problems.extend(check_anchor(records, anchor))
    for problem in problems:
        print(f"error: {problem}", file=out)
    if problems:
        print(f"POOL ANCHOR BROKEN: host {pool.host}, {len(texts)} anchored chain(s)", file=out)
        return 1
    print(
        f"POOL ANCHOR OK: host {pool.host}: {len(texts)} anchored head(s) in the local chain",
        file=out,
    )
    return 0
