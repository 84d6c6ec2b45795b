"""Pool mode's edge: the daemon's label store kept in step with etcd, a local cache, and this
host's membership under a lease (docs/pool.md).

* **Labels**: at start (and after every lost watch) one range read of ``P/labels/`` gives the
  pool's label store at a revision; a watch from the next revision applies every change as it
  is committed (`Daemon.set_labels`: the next decision uses it). Entries are untrusted
  (`shyped.pool.keys.labels_from_kvs`): bad ones are refused and counted, a snapshot past the
  bounds is refused whole and the last good state stays.
* **Cache**: every applied state is written atomically to ``pool.cache`` (revision and entries).
  A daemon that cannot reach etcd starts from it and enforces with it; `status` then says
  ``cached`` with the error, and the store keeps trying (backoff) until etcd answers.
* **Membership**: ``P/hosts/<host>`` holds this host's running labels and Chinese Wall state,
  attached to a lease kept alive every third of its TTL; a dead daemon's entry expires with
  its lease.
* **Writes** (`publish_labels`): label changes made through this host's control socket are
  written to etcd; with etcd unreachable they are refused (`PoolUnavailable`) and nothing
  changes.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.core.labelstore import LabelStore, LabelStoreError, resolved_store
from shyped.fileio.atomicfile import write_atomic
from shyped.fileio.boundedread import read_bounded
from shyped.pool.anchor import AuditAnchor
from shyped.pool.keys import (
    MAX_ENTRIES,
    PoolKeyError,
    PoolKeys,
    check_host,
    kept_entry,
    labels_from_kvs,
)
from shyped.service.etcd import EtcdClient, EtcdError, EtcdUnavailable, Watch, WatchEvent
from shyped.service.etcdtls import EtcdSecurity
from shyped.service.poolconfig import PoolConfig

_log = Logger(namespace="shyped.pool")

#: Most characters (keys and values) of the entries kept from the pool: past it a snapshot
#: or change is refused whole and the last good state stays (as past `MAX_ENTRIES`).
MAX_POOL_CHARS: Final = 32 * 1024 * 1024
#: Largest cache file read back at start (any kept state's cache fits: JSON escapes a
#: character to at most 6 bytes).
CACHE_MAX_BYTES: Final = 6 * MAX_POOL_CHARS + 1024 * 1024
#: Longest wait between two attempts to reach etcd again.
MAX_BACKOFF: Final = 5.0


class PoolUnavailable(Exception):
    """A pool write while etcd is unreachable (no quorum): refused, nothing changed."""


class PoolStore:
    """The pool store of one daemon (`daemon`: a `shyped.service.daemon.Daemon`)."""

    def __init__(self, daemon: Any, config: PoolConfig, client: EtcdClient | None = None) -> None:
        self.daemon = daemon
        self.config = config
        self.reactor = daemon.reactor
        self.keys = PoolKeys(config.prefix, config.host)
        self.client = client or EtcdClient(
            self.reactor, config.endpoints, config.timeout, security=_security(config)
        )
        #: "starting", "connected" (watching etcd), "cached" (enforcing the last known state)
        self.state = "starting"
        self.error: str | None = None
        self.revision = 0
        #: every entry under the prefix (key -> value) as last applied
        self.entries: dict[str, str] = {}
        #: called with the entries and the keys that changed (None: all) after each change
        self.listeners: list[Callable[[dict[str, str], set[str] | None], None]] = []
        #: The label store the local label file held when this daemon last read (at start)
        #: or wrote it (`addlabel`): a hand edit since is not overwritten
        #: (`shyped.control.poolpolicy.local_file_problem`).
        self.file_labels: LabelStore = daemon.engine.labels
        self._published: str | None = None
        self.refused: tuple[str, ...] = ()
        self.changes_applied = 0
        self.lease = 0
        self._watch: Watch | None = None
        self._running = False
        self._backoff = 0.1
        self._retry: Any = None
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._anchoring = task.LoopingCall(self.anchor)
        self._anchoring.clock = self.reactor
        self._anchored: tuple[str, int, str] | None = None
        self.anchors_written = 0
        self._lagging = 0
        self.watch_restarts = 0
        #: label changes made here and not in etcd yet: key -> value (None: delete)
        self._unpublished: dict[str, str | None] = {}
        #: entries read from etcd (or the cache) and not kept (`kept_entry`)
        self.ignored = 0
        self._since = time.time()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Apply the cache (if any), then etcd's state if it answers; never fails for etcd."""
        self._running = True
        self._load_cache()
        await self._connect()
        self._heartbeat.start(max(0.5, self.config.lease_ttl / 3), now=True)
        self._anchoring.start(self.config.anchor_interval, now=False)

    def stop_beating(self) -> None:
        """Stop the heartbeat and the periodic anchor (before the daemon stops)."""
        self._running = False
        for loop in (self._heartbeat, self._anchoring):
            if loop.running:
                loop.stop()

    async def stop(self) -> None:
        """Anchor the audit chain's head a last time, leave the pool, close."""
        self.stop_beating()
        await self.anchor()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if self.lease:
            with contextlib.suppress(EtcdError):
                await self.client.call("lease/revoke", {"ID": str(self.lease)})
        await self.client.close()

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "host": self.config.host,
            "prefix": self.config.prefix,
            "revision": self.revision,
            "entries": len(self.entries),
            "refused_entries": len(self.refused),
            "unpublished": len(self._unpublished),
            "error": self.error,
            "since": round(self._since, 3),
        }

    def _set_state(self, state: str, error: str | None = None) -> None:
        if state != self.state:
            self._since = time.time()
            if state == "cached":
                _log.warn(
                    "pool: etcd unreachable ({error}); enforcing the last known state "
                    "(revision {rev})",
                    error=error,
                    rev=self.revision,
                )
            elif state == "connected":
                _log.info("pool: connected to etcd at revision {rev}", rev=self.revision)
        self.state = state
        self.error = error

    # ------------------------------------------------------------------ reading the pool

    async def _connect(self) -> None:
        try:
            revision, kvs = await self.client.range_prefix(
                self.keys.root, lambda kv: self._kept(kv.key, kv.value)
            )
        except EtcdError as exc:
            self._set_state("cached", str(exc))
            self._schedule_retry()
            return
        self._apply(revision, {kv.key: kv.value for kv in kvs})
        self._backoff = 0.1
        self._set_state("connected")
        self._start_watch(revision + 1)

    def _schedule_retry(self) -> None:
        if not self._running or (self._retry is not None and self._retry.active()):
            return
        delay, self._backoff = self._backoff, min(MAX_BACKOFF, self._backoff * 2)
        self._retry = self.reactor.callLater(delay, lambda: Deferred.fromCoroutine(self._connect()))

    def _start_watch(self, revision: int) -> None:
        watch = self.client.watch(self.keys.root, revision, self._on_events)
        self._watch = watch

        def ended(result: Any) -> None:
            if self._watch is watch:
                self._watch = None
            if not self._running or watch.cancelled:
                return
            why = getattr(result, "value", None)
            self._set_state("cached", f"watch ended: {why or 'stream closed'}")
            self._schedule_retry()

        watch.done.addBoth(ended)

    def _on_events(self, events: list[WatchEvent]) -> None:
        entries = dict(self.entries)
        revision = self.revision
        changed: set[str] = set()
        for ev in events:
            if ev.kind == "delete" or not self._kept(ev.key, ev.value):
                entries.pop(ev.key, None)
            else:
                entries[ev.key] = ev.value
            changed.add(ev.key)
            revision = max(revision, ev.revision)
        self._apply(revision, entries, changed)

    def _kept(self, key: str, value: str) -> bool:
        """`kept_entry`, counting (and logging, a few) what is not kept."""
        if kept_entry(self.config.prefix, key, value):
            return True
        self.ignored += 1
        if self.ignored <= 20:
            _log.warn("pool: entry {key} ignored: not a pool key, or its value is too long "
                      "({n} characters)", key=key[:200], n=len(value))  # fmt: skip
        return False

    def _apply(
        self, revision: int, entries: dict[str, str], changed: set[str] | None = None
    ) -> bool:
        """Decide with the label store `entries` stand for (when labels changed), tell the
        listeners; False (and the last good state kept) if they are refused whole."""
        labels_changed = changed is None or any(k.startswith(self.keys.labels) for k in changed)
        if len(entries) > 2 * MAX_ENTRIES:
            self.error = (
                f"snapshot at revision {revision} refused: more than {2 * MAX_ENTRIES} entries"
            )
            _log.error("pool: {error}", error=self.error)
            return False
        size = sum(len(k) + len(v) for k, v in entries.items())
        if size > MAX_POOL_CHARS:
            self.error = (
                f"snapshot at revision {revision} refused: its entries hold {size} characters, "
                f"more than {MAX_POOL_CHARS}"
            )
            _log.error("pool: {error}", error=self.error)
            return False
        if not labels_changed:
            self.entries, self.revision = entries, revision
            self._tell(changed)
            return True
        try:
            labels = {k: v for k, v in entries.items() if k.startswith(self.keys.labels)}
            for key, value in self._unpublished.items():  # ours, not in etcd yet
                if value is None:
                    labels.pop(key, None)
                else:
                    labels[key] = value
            label_kvs = sorted(labels.items())
            snapshot = labels_from_kvs(self.keys, label_kvs)
            store = resolved_store(snapshot.store)
        except (PoolKeyError, LabelStoreError) as exc:
            _log.error(
                "pool: label snapshot at revision {rev} refused, keeping revision {old}: {error}",
                rev=revision,
                old=self.revision,
                error=str(exc),
            )
            self.error = f"snapshot at revision {revision} refused: {exc}"
            return False
        for problem in snapshot.refused[: 20 if snapshot.refused != self.refused else 0]:
            _log.warn("pool: label entry refused: {problem}", problem=problem)
        self.refused = snapshot.refused
        self.entries = entries
        self.revision = revision
        self.changes_applied += 1
        self.daemon.set_labels(store)
        self._save_cache()
        self._tell(changed)
        return True

    def _tell(self, changed: set[str] | None) -> None:
        for listener in list(self.listeners):
            try:
                listener(self.entries, changed)
            except Exception:
                _log.failure("pool: a listener failed")

    def host_states(self) -> tuple[dict[str, str], dict[str, str]]:
        """The live hosts' published states (host -> JSON text) and the entries that are
        not valid host names (host key -> why); parsing is the caller's (`shyped.pool.records`)."""
        out, bad = {}, {}
        for key, value in self.entries.items():
            if key.startswith(self.keys.hosts):
                name = key[len(self.keys.hosts) :]
                try:
                    out[check_host(name)] = value
                except PoolKeyError as exc:
                    bad[key[:200]] = str(exc)
        return out, bad

    # ------------------------------------------------------------------ the cache

    def _save_cache(self) -> None:
        doc = {
            "version": 1,
            "prefix": self.config.prefix,
            "revision": self.revision,
            "entries": self.entries,
        }
        try:
            self.config.cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.config.cache, json.dumps(doc, sort_keys=True).encode(), mode=0o640)
        except OSError as exc:
            _log.error(
                "pool: cannot write the cache {path}: {error}",
                path=str(self.config.cache),
                error=exc.strerror or str(exc),
            )

    def _load_cache(self) -> None:
        path: Path = self.config.cache
        try:
            doc = json.loads(read_bounded(path, CACHE_MAX_BYTES, "pool cache"))
        except FileNotFoundError:
            return
        except (OSError, ValueError, RecursionError) as exc:
            _log.error("pool: cache {path} not used: {error}", path=str(path), error=str(exc))
            return
        entries = doc.get("entries") if isinstance(doc, dict) else None
        if (
            not isinstance(entries, dict)
            or doc.get("prefix") != self.config.prefix
            or not isinstance(doc.get("revision"), int)
            or len(entries) > MAX_ENTRIES
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items())
        ):
            _log.error("pool: cache {path} not used: not a cache of this pool", path=str(path))
            return
        entries = {k: v for k, v in entries.items() if self._kept(k, v)}
        if self._apply(doc["revision"], entries):
            _log.info("pool: label store from the cache at revision {rev}", rev=self.revision)

    # ------------------------------------------------------------------ writing

    def check_writable(self) -> None:
        """`PoolUnavailable` unless etcd is reachable now (pool writes are refused, clearly)."""
        if self.state != "connected":
            raise PoolUnavailable(
                f"the pool store is unreachable ({self.error or self.state}): pool writes are "
                "refused until etcd has quorum again; this host keeps enforcing its last known "
                f"state (revision {self.revision})"
            )

    def publish_labels(self, old: LabelStore, new: LabelStore) -> Deferred[None]:
        """Write the entries that differ between `old` and `new` (this host's view). Writes
        that fail (a leader election, a member gone) stay queued, newest value per key, and
        are retried every heartbeat until etcd takes them (`status` counts them)."""
        before, after = self.keys.label_keys(old), self.keys.label_keys(new)
        for key, value in after.items():
            if before.get(key) != value:
                self._unpublished[key] = value
        for key in before:
            if key not in after:
                self._unpublished[key] = None
        return self.flush()

    def flush(self) -> Deferred[None]:
        """Write the queued label changes (oldest first); stop at the first failure."""
        return Deferred.fromCoroutine(self._flush())

    async def _flush(self) -> None:
        while self._unpublished:
            key, value = next(iter(self._unpublished.items()))
            try:
                if value is None:
                    await self.client.delete(key)
                else:
                    await self.client.put(key, value)
            except EtcdError as exc:
                _log.warn(
                    "pool: {n} label change(s) not written yet, retried: {error}",
                    n=len(self._unpublished),
                    error=str(exc),
                )
                return
            if self._unpublished.get(key, value) == value:
                self._unpublished.pop(key, None)

    # ------------------------------------------------------------------ membership

    def host_state(self) -> dict[str, Any]:
        """What this host publishes: running labels, Chinese Wall blocked types, policy."""
        engine = self.daemon.engine
        running = engine.running
        return {
            "host": self.config.host,
            "policy": {
                "name": self.daemon.loaded.policy.name,
                "version": str(self.daemon.loaded.policy.version),
                "sha256": self.daemon.loaded.sha256,
            },
            "running_labels": dict(running.running_labels()),
            "blocked_types": dict(running.blocked_types()),
            "mode": self.daemon.mode.value,
        }

    def _beat(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._heartbeat_once())

    async def _heartbeat_once(self) -> None:
        renewed = False
        try:
            if self.lease:
                ttl = await self.client.lease_keepalive(self.lease)
                if ttl <= 0:
                    self.lease = 0
            if not self.lease:
                self.lease = await self.client.lease_grant(self.config.lease_ttl)
                renewed = True
            state = json.dumps(self.host_state(), sort_keys=True)
            if state != self._published or renewed:
                await self.client.put(self.keys.host_state(), state, self.lease)
                self._published = state
            if self.state == "connected":
                await self._check_watch()
            if self._unpublished:
                await self._flush()
        except EtcdUnavailable as exc:
            if self.state == "connected":
                self._set_state("cached", str(exc))
                if self._watch is not None:
                    self._watch.cancel()
                    self._watch = None
                self._schedule_retry()
        except EtcdError as exc:
            _log.warn("pool: membership not refreshed: {error}", error=str(exc))
            self.lease = 0

    async def _check_watch(self) -> None:
        """A watch that fell behind (a change committed under the prefix two heartbeats ago
        and still not delivered: a stalled stream) is replaced by a fresh read and watch."""
        newest = await self.client.newest_revision(self.keys.root)
        if newest <= self.revision:
            self._lagging = 0
            return
        self._lagging += 1
        if self._lagging < 2:
            return
        _log.warn(
            "pool: the watch stalled at revision {rev} (etcd has {newest}); resyncing",
            rev=self.revision,
            newest=newest,
        )
        self._lagging = 0
        self.watch_restarts += 1
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
        await self._connect()

    # ------------------------------------------------------------------ the audit anchor

    def anchor(self) -> Deferred[None]:
        """Write the audit chain's head to ``P/audit/<host>/<log id>`` (off-host: a rewritten local
        log and state file no longer match it) if it moved since the last anchor."""
        return Deferred.fromCoroutine(self._anchor())

    async def _anchor(self) -> None:
        audit = self.daemon.audit
        if audit is None or not audit.log.log_id:
            return
        seq, head = audit.log.head
        current = (audit.log.log_id, seq, head)
        if current == self._anchored or not head:
            return
        record = AuditAnchor(self.config.host, current[0], seq, head, round(time.time(), 3))
        try:
            await self.client.put(self.keys.audit_anchor(current[0]), record.to_json())
        except EtcdError as exc:
            _log.warn("pool: audit head not anchored: {error}", error=str(exc))
            return
        self._anchored = current
        self.anchors_written += 1


def _security(config: PoolConfig) -> EtcdSecurity | None:
    """TLS files and credentials of ``[pool]`` (`PoolSetupError` naming what cannot be read)."""
    if config.ca_file is None and config.user is None:
        return None
    try:
        return EtcdSecurity.from_files(
            config.ca_file, config.cert_file, config.key_file, config.user, config.password_file
        )
    except OSError as exc:
        raise PoolSetupError(f"pool: cannot read {exc.filename}: {exc.strerror or exc}") from None


class PoolSetupError(Exception):
    """``[pool]`` names a file that cannot be read (the daemon does not start)."""


def attach_pool(daemon: Any) -> PoolStore | None:
    """Give `daemon` its `PoolStore` (not started) if ``[pool]`` is enabled."""
    if daemon.config.pool.enabled and daemon.pool is None:
        daemon.pool = PoolStore(daemon, daemon.config.pool)
    pool: PoolStore | None = daemon.pool
    return pool


async def start_with_pool(daemon: Any) -> None:
    """Start `daemon`, in pool mode (``[pool]`` enabled) with its `PoolStore` first: the
    pool's labels (from etcd, else from the cache) are in place before the first decision."""
    pool = attach_pool(daemon)
    if pool is not None:
        await pool.start()
    await daemon.start()


async def stop_with_pool(daemon: Any) -> None:
    """Stop the daemon, then the pool store: the audit head is anchored after the daemon's
    last record (``daemon-stop``) and the lease is revoked (this host leaves the pool)."""
    pool: PoolStore | None = daemon.pool
    if pool is not None:
        pool.stop_beating()
    await daemon.stop()
    if pool is not None:
        await pool.stop()
