"""The pool's key layout in etcd and the label store read back from it (pure).

Under the configured prefix ``P`` (a path such as ``/shyped/pool1``)::

    P/labels/uuid/<uuid>          -> label      domains by UUID (pool-wide: a VM keeps its
    P/labels/name/<name>          -> label      label on any host)
    P/labels/res/<host>/<rid>     -> label      resources, per host (disk paths and bridges
                                                are host-local); <rid> is percent-encoded
    P/hosts/<host>                -> JSON       a live host's published state, under its lease
    P/audit/<host>/<log id>       -> JSON       the head of one of the host's audit chains
    P/policy/current              -> JSON       the committed pool policy
    P/policy/proposals/<host>/<id>  -> JSON     a switch proposed by <host>
    P/policy/answers/<host>/<proposer>/<id> -> JSON  <host>'s answer to that proposal
    P/reservations/<src>/<dest>/<id> -> JSON    a reservation <src> asks of <dest>
    P/grants/<dest>/<src>/<id>    -> JSON       <dest>'s answer to it

Every key one host writes alone starts with a range named after it (``.../<host>/`` or
``P/hosts/<host>``), so etcd's RBAC can give each host's own user write access to its ranges
only (`shyped.pool.rbac`) and a reader takes the writer from the key.

Everything read back is untrusted: another host (or anyone with write access to the prefix)
may have written it. `labels_from_kvs` validates every entry with the label store's own rules
and refuses the whole snapshot past `MAX_ENTRIES` (the caller keeps its last good state): a
label only *names* a label of this host's policy, which still decides every admission.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from typing import Final

import attrs

from shyped.core.labelstore import LabelStore, LabelStoreError
from shyped.pool.records import HOST_RE, MAX_POLICY_TEXT

#: Most label entries a pool snapshot may hold before it is refused whole (fail closed).
MAX_ENTRIES: Final = 100_000
#: Longest key and value accepted from etcd (bytes after base64 decoding).
MAX_KEY_BYTES: Final = 2048
MAX_VALUE_BYTES: Final = 64 * 1024

_PREFIX = re.compile(r"^(/[A-Za-z0-9_.-]+)+\Z")


class PoolKeyError(ValueError):
    """A prefix or host name that cannot be used."""


def check_prefix(prefix: str) -> str:
    if not _PREFIX.fullmatch(prefix) or len(prefix) > 256:
        raise PoolKeyError(f"pool prefix {prefix!r}: expected /name[/name...] of [A-Za-z0-9_.-]")
    return prefix


def check_host(host: str) -> str:
    if not HOST_RE.fullmatch(host):
        raise PoolKeyError(f"pool host name {host!r}: expected [A-Za-z0-9][A-Za-z0-9_.-]{{0,62}}")
    return host


def range_end(prefix: str) -> str:
    """etcd's range end for "every key starting with `prefix`" (last byte + 1)."""
    data = prefix.encode()
    return (data[:-1] + bytes([data[-1] + 1])).decode("latin-1")


@attrs.frozen
class PoolKeys:
    """The keys of one pool (`prefix`) as seen from one host (`host`)."""

    prefix: str = attrs.field(converter=check_prefix)
    host: str = attrs.field(converter=check_host)

    @property
    def root(self) -> str:
        return self.prefix + "/"

    @property
    def policy(self) -> str:
        return self.prefix + "/policy/"

    @property
    def policy_current(self) -> str:
        return self.policy + "current"

    @property
    def proposals(self) -> str:
        return self.policy + "proposals/"

    def proposal(self, pid: str, host: str | None = None) -> str:
        """A proposal, filed under its proposer's own range (`host`, default this one)."""
        return self.proposals + f"{host or self.host}/{pid}"

    @property
    def answers(self) -> str:
        return self.policy + "answers/"

    def answer(self, pid: str, host: str | None = None, proposer: str | None = None) -> str:
        """`host`'s answer to `proposer`'s proposal `pid` (both default: this host), under the
        answering host's own range. The proposer is part of the key: a proposal filed by
        another host under the same id gets its own answer, never this one's."""
        return self.answers + f"{host or self.host}/{proposer or self.host}/{pid}"

    @property
    def reservations(self) -> str:
        return self.prefix + "/reservations/"

    def request(self, dest: str, rid: str, source: str | None = None) -> str:
        """A reservation request, under the requesting (source) host's own range."""
        return self.reservations + f"{source or self.host}/{dest}/{rid}"

    def grant(self, rid: str, dest: str | None = None, source: str | None = None) -> str:
        """`dest`'s answer to `source`'s request `rid` (both default: this host), under the
        destination's own range. The source is part of the key: a request another host files
        under the same id gets its own answer, never this one's."""
        return self.prefix + f"/grants/{dest or self.host}/{source or self.host}/{rid}"

    def owned(self, base: str, key: str) -> tuple[str, str] | None:
        """(writer host, rest) of a `key` filed under `base` + ``<host>/`` (None: not such a
        key, or the host part is not a host name). Readers take the writer from the key, the
        part etcd's RBAC lets only that host write (docs/pool.md, "Per-host identities")."""
        if not key.startswith(base):
            return None
        host, sep, rest = key[len(base) :].partition("/")
        if not sep or not rest or not HOST_RE.fullmatch(host):
            return None
        return host, rest

    @property
    def labels(self) -> str:
        return self.prefix + "/labels/"

    @property
    def hosts(self) -> str:
        return self.prefix + "/hosts/"

    @property
    def audit(self) -> str:
        return self.prefix + "/audit/"

    def domain_uuid(self, uuid: str) -> str:
        return self.labels + "uuid/" + uuid.lower()

    def domain_name(self, name: str) -> str:
        return self.labels + "name/" + name

    def resource(self, rid: str, host: str | None = None) -> str:
        return self.labels + f"res/{host or self.host}/" + urllib.parse.quote(rid, safe="")

    def host_state(self, host: str | None = None) -> str:
        return self.hosts + (host or self.host)

    def audit_anchors(self, host: str | None = None) -> str:
        """The prefix of a host's anchors: one key per audit log (chain) id."""
        return self.audit + (host or self.host) + "/"

    def audit_anchor(self, log: str, host: str | None = None) -> str:
        return self.audit_anchors(host) + log

    def label_keys(self, store: LabelStore) -> dict[str, str]:
        """The keys and values that stand for `store` (this host's resources)."""
        out = {self.domain_uuid(u): label for u, label in store.by_uuid.items()}
        out.update({self.domain_name(n): label for n, label in store.by_name.items()})
        out.update({self.resource(r): label for r, label in store.resources.items()})
        return out


#: The kinds of key under the prefix (after it) and the longest value each may hold (what its
#: reader accepts: `shyped.pool.records`, `.reservation`, `.anchor`); first match wins.
_VALUE_BOUNDS: Final = (
    ("/labels/", MAX_VALUE_BYTES),
    ("/hosts/", 4 * 1024 * 1024),
    ("/audit/", 4096),
    ("/policy/current", MAX_POLICY_TEXT + 64 * 1024),
    ("/policy/proposals/", MAX_POLICY_TEXT + 64 * 1024),
    ("/policy/answers/", 1024 * 1024),
    ("/reservations/", 4096),
    ("/grants/", 8192),
)


def kept_entry(prefix: str, key: str, value: str) -> bool:
    """Whether an entry read from etcd is one the pool uses, within its kind's size: any
    other key, or a value longer than its reader accepts, is not kept (nor cached), so junk
    under the prefix costs this host neither memory nor its view of the pool."""
    if len(key) > MAX_KEY_BYTES or not key.startswith(prefix + "/"):
        return False
    rest = key[len(prefix) :]
    for start, bound in _VALUE_BOUNDS:
        if rest == start or (start.endswith("/") and rest.startswith(start)):
            return len(value) <= bound
    return False


@attrs.frozen
class LabelSnapshot:
    """A label store read from the pool, and the entries refused on the way (with why)."""

    store: LabelStore
    refused: tuple[str, ...] = ()


def labels_from_kvs(keys: PoolKeys, kvs: Iterable[tuple[str, str]]) -> LabelSnapshot:
    """The label store of this host from the pool's label entries (key, value). Other hosts'
    resources are skipped; a malformed entry is refused (and named) while the rest is used.
    `PoolKeyError` past `MAX_ENTRIES`: the snapshot is refused whole."""
    store = LabelStore()
    by_uuid: dict[str, str] = {}
    by_name: dict[str, str] = {}
    resources: dict[str, str] = {}
    refused: list[str] = []
    own_res = f"res/{keys.host}/"
    for n, (key, value) in enumerate(kvs):
        if n >= MAX_ENTRIES:
            raise PoolKeyError(f"the pool holds more than {MAX_ENTRIES} label entries")
        if not key.startswith(keys.labels) or len(key) > MAX_KEY_BYTES:
            refused.append(f"{key[:200]!r}: not a label key")
            continue
        rest = key[len(keys.labels) :]
        try:
            if rest.startswith("uuid/"):
                one = store.with_domain(uuid=rest[5:], label=value)
                by_uuid.update(one.by_uuid)
            elif rest.startswith("name/"):
                one = store.with_domain(name=rest[5:], label=value)
                by_name.update(one.by_name)
            elif rest.startswith(own_res):
                rid = urllib.parse.unquote(rest[len(own_res) :], errors="strict")
                one = store.with_resource(rid, value)
                resources.update(one.resources)
            elif not rest.startswith("res/"):
                refused.append(f"{key[:200]!r}: unknown kind of label entry")
        except (LabelStoreError, UnicodeDecodeError) as exc:
            refused.append(f"{key[:200]!r}: {exc}")
    return LabelSnapshot(LabelStore(by_uuid, by_name, resources), tuple(refused))
