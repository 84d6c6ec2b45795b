"""Pool policy switches and placement over the pool store (docs/pool.md).

**Switch** (`PoolPolicy.propose`, ``shypectl policy load`` in pool mode): the proposer puts
``P/policy/proposals/<proposer>/<id>`` (text, sha256, the pool policy seq it replaces); every
live host's daemon (`on_entries`) parses it in the isolated worker
(`shyped.control.policyparse`), runs the existing update check against *its own* running set
and answers under ``P/policy/answers/<host>/<proposer>/<id>`` (each host writes only its own
range: with per-host etcd users, `shyped.pool.rbac`, no host can answer, veto or withdraw for
another; a host deletes its answer when the proposal is withdrawn). The proposer waits for
every live host (``P/hosts/``), then commits with ONE etcd transaction on ``P/policy/current``
(only if its revision is still the one the proposal was based on) when all accepted; else it
is refused with each host's reasons and nothing is written. Each daemon applies a committed
record it does not run yet through its usual load path (check, switch, audit). Proposals,
answers and the committed record are untrusted input (`shyped.pool.records`).

**Placement** (`PoolPolicy.placement`): `shyped.pool.placement` over the live hosts' states.
"""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path
from typing import Any, Final

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.control import backend as b
from shyped.control.policyparse import parse_isolated
from shyped.control.protocol import ControlError, ErrorCode
from shyped.core.labelstore import overwrite_problem
from shyped.policy import update
from shyped.pool import records
from shyped.pool.placement import place
from shyped.service.etcd import EtcdError
from shyped.service.poolstore import PoolStore, PoolUnavailable

_log = Logger(namespace="shyped.pool")

#: How long a proposer waits for every live host's answer.
ANSWER_TIMEOUT: Final = 10.0
#: Proposals answered at once by one host (more wait: a flood cannot start many parsers).
MAX_OPEN_PROPOSALS: Final = 4
#: Proposal ids remembered as answered (those still filed under the prefix).
MAX_ANSWERED: Final = 10_000


#: What to do about a hand edit of the local label file in pool mode (a reload does not help).
POOL_FILE_REMEDY: Final = (
    "in pool mode the labels live in the pool store and this file is only this host's copy, "
    "which a reload does not publish: put the file back (or remove it) and make the change "
    "with addlabel/rmlabel"
)


def local_file_problem(path: Path, pool: PoolStore) -> str | None:
    """Why an ``addlabel``/``rmlabel`` in pool mode would overwrite something in the local
    label file at `path`, or None: the same check as on a single host
    (`shyped.core.labelstore.overwrite_problem`: errors, a hand edit), but against what this
    daemon last read from or wrote to the file, since the other hosts' changes reach this
    host's store without being written to the file."""
    return overwrite_problem(path, pool.file_labels, POOL_FILE_REMEDY)


class PoolPolicy:
    """The pool policy switch and placement of one daemon's control backend."""

    def __init__(self, backend: Any, pool: PoolStore) -> None:
        """`backend`: the `shyped.control.daemon_backend.DaemonControlBackend` it serves."""
        self.backend = backend
        self.pool = pool
        self.keys = pool.keys
        self._answered: set[str] = set()
        self._applying: str | None = None
        #: proposals checked at once (each parses in a worker process): a flood waits
        self._checking = defer.DeferredSemaphore(MAX_OPEN_PROPOSALS)
        self.ignored = 0
        pool.listeners.append(self.on_entries)

    # ------------------------------------------------------------------ every host

    def on_entries(self, entries: dict[str, str], changed: set[str] | None) -> None:
        keys = changed if changed is not None else set(entries)
        filed = self.keys.proposals
        if changed is None:  # a whole snapshot: forget the ids no longer filed
            self._answered &= {k[len(filed) :] for k in entries if k.startswith(filed)}
        for key in sorted(keys):
            if key.startswith(filed) and key not in entries:  # withdrawn: forget its id
                self._answered.discard(key[len(filed) :])
                owned = self.keys.owned(filed, key)
                if owned is not None and self.keys.answer(owned[1], None, owned[0]) in entries:
                    self._withdraw_answer(self.keys.answer(owned[1], None, owned[0]))
            elif key.startswith(filed):
                pid = key[len(filed) :]
                if pid not in self._answered and len(self._answered) < MAX_ANSWERED:
                    self._answered.add(pid)
                    self._checking.run(self._answer_later, key, entries[key])
        if self.keys.policy_current in keys and self.keys.policy_current in entries:
            self._maybe_apply(entries[self.keys.policy_current])

    def _withdraw_answer(self, key: str) -> None:
        """Delete this host's answer to a withdrawn proposal (only this host may)."""
        d = Deferred.fromCoroutine(self.pool.client.delete(key))
        d.addErrback(lambda f: _log.warn("pool: {key} not withdrawn: {e}", key=key, e=f.value))

    def _answer_later(self, key: str, text: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._answer(key, text))

    async def _answer(self, key: str, text: str) -> None:
        """Check a proposal and answer it; one that is gone by its turn, whose id is not its
        key, or whose proposer is not a live member of the pool is ignored (not parsed)."""
        try:
            proposal = records.parse_proposal(text)
        except records.RecordError as exc:
            self.ignored += 1
            _log.warn("pool: proposal ignored: {error}", error=str(exc))
            return
        live = self.pool.host_states()[0]
        if (
            key not in self.pool.entries
            or key != self.keys.proposal(proposal.id, proposal.proposer)
            or proposal.proposer not in live
        ):
            self.ignored += 1
            _log.warn(
                "pool: proposal {id} ignored: withdrawn, not filed under its proposer's own "
                "range, or not from a live host",
                id=proposal.id,
            )
            return
        answer = await self._check(proposal)
        try:
            await self.pool.client.put(
                self.keys.answer(proposal.id, None, proposal.proposer),
                answer.to_json(),
                self.pool.lease,
            )
        except EtcdError as exc:
            _log.error(
                "pool: answer to proposal {id} not written: {error}", id=proposal.id, error=str(exc)
            )

    async def _check(self, proposal: records.Proposal) -> records.Answer:
        host = self.keys.host
        try:
            new, _fmt = await parse_isolated(
                self.backend.reactor, proposal.text, proposal.filename, "auto"
            )
        except ControlError as exc:
            return records.Answer(host, False, (f"the policy does not load: {exc.message}",))
        daemon = self.backend.daemon
        if proposal.sha256 == daemon.loaded.sha256:
            return records.Answer(host, True)
        system = daemon.engine.running_system(daemon.host)
        check = update.check_update(daemon.engine.policy.policy, new, system)
        return records.Answer(host, check.allowed, tuple(str(p) for p in check.problems))

    def _maybe_apply(self, text: str) -> None:
        try:
            record = records.parse_policy_record(text)
        except records.RecordError as exc:
            _log.error("pool: committed policy record ignored: {error}", error=str(exc))
            return
        if record.sha256 == self.backend.daemon.loaded.sha256 or record.sha256 == self._applying:
            return
        self._applying = record.sha256
        source = b.PolicySource(record.text, record.filename, "auto")
        d = self.backend._policy_lock.run(self.backend._load, source)

        def done(result: Any) -> None:
            self._applying = None
            err = getattr(result, "value", None)
            if err is not None:
                _log.error(
                    "pool: committed policy seq {seq} not applied here: {error}",
                    seq=record.seq,
                    error=str(err),
                )

        d.addBoth(done)

    # ------------------------------------------------------------------ the proposer

    def propose(self, source: b.PolicySource) -> Deferred[b.PolicyLoadResult]:
        return Deferred.fromCoroutine(self._propose(source))

    async def _propose(self, source: b.PolicySource) -> b.PolicyLoadResult:
        try:
            self.pool.check_writable()
        except PoolUnavailable as exc:
            raise ControlError(ErrorCode.UNAVAILABLE, str(exc)) from None
        if len(source.text) > records.MAX_POLICY_TEXT:
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"a pool policy is at most {records.MAX_POLICY_TEXT} characters",
            )
        await parse_isolated(self.backend.reactor, source.text, source.filename, source.format)
        previous = self.backend._policy_info()
        sha = records.sha256_text(source.text)
        client = self.pool.client
        try:
            current = await client.get(self.keys.policy_current)
            base_seq = 0
            if current is not None:
                base_seq = records.parse_policy_record(current.value).seq
            base_rev = 0 if current is None else current.mod_revision
            pid = uuidlib.uuid4().hex
            proposal = records.Proposal(
                pid, sha, source.text, source.filename[:200], self.keys.host, base_seq
            )
            live = frozenset(self.pool.host_states()[0])
            await client.put(self.keys.proposal(pid), proposal.to_json(), self.pool.lease)
            answers = await self._collect(pid, live)
            verdict = records.verdict(live, answers)
            committed = False
            if verdict.commit:
                record = records.PolicyRecord(
                    base_seq + 1, sha, source.text, source.filename[:200], pid
                )
                committed = await client.put_if_version(
                    self.keys.policy_current, record.to_json(), base_rev
                )
            await client.delete(self.keys.answer(pid))  # the others delete theirs on seeing
            await client.delete(self.keys.proposal(pid))  # the withdrawal (only they may)
        except (EtcdError, records.RecordError) as exc:
            raise ControlError(
                ErrorCode.UNAVAILABLE, f"pool policy switch not done: {exc}; nothing changed"
            ) from None
        if not verdict.commit:
            n = sum(len(r) for r in verdict.reasons.values())
            raise ControlError(
                ErrorCode.POLICY_REJECTED,
                f"pool policy switch refused by {len(verdict.reasons)} host(s) ({n} reason(s)): "
                + "; ".join(f"{h}: {r[0]}" for h, r in sorted(verdict.reasons.items())),
                {
                    "hosts": {h: list(r) for h, r in sorted(verdict.reasons.items())},
                    "problems": [
                        f"{h}: {p}" for h, r in sorted(verdict.reasons.items()) for p in r
                    ],
                },
            )
        if not committed:
            raise ControlError(
                ErrorCode.POLICY_REJECTED,
                "pool policy switch refused: another switch was committed meanwhile; nothing "
                "changed (propose again)",
            )
        await self._wait_applied(sha)
        return b.PolicyLoadResult(self.backend._policy_info(), previous)

    async def _collect(self, pid: str, live: frozenset[str]) -> dict[str, records.Answer]:
        deadline = self.backend.reactor.seconds() + ANSWER_TIMEOUT
        answers: dict[str, records.Answer] = {}
        while True:
            for host in live:  # each host's answer only from its own range
                value = self.pool.entries.get(self.keys.answer(pid, host))
                if value is None:
                    continue
                try:
                    ans = records.parse_answer(value)
                except records.RecordError as exc:
                    ans = records.Answer(host, False, (f"bad answer: {exc}",))
                if ans.host == host:
                    answers[host] = ans
            if set(answers) >= live or self.backend.reactor.seconds() > deadline:
                return answers
            await task.deferLater(self.backend.reactor, 0.02, lambda: None)

    async def _wait_applied(self, sha: str) -> None:
        deadline = self.backend.reactor.seconds() + ANSWER_TIMEOUT
        while self.backend.daemon.loaded.sha256 != sha:
            if self.backend.reactor.seconds() > deadline:
                return
            await task.deferLater(self.backend.reactor, 0.02, lambda: None)

    # ------------------------------------------------------------------ placement

    def placement(self, label: str) -> b.PlacementResult:
        daemon = self.backend.daemon
        states, bad = self.pool.host_states()
        parsed: list[records.HostState] = []
        excluded: list[b.PlacementHost] = []
        for host, text in sorted(states.items()):
            try:
                st = records.parse_host_state(text)
            except records.RecordError as exc:
                excluded.append(b.PlacementHost(host, False, f"unusable host state: {exc}"))
                continue
            if st.host != host:
                excluded.append(b.PlacementHost(host, False, "host state names another host"))
                continue
            parsed.append(st)
        for key, why in sorted(bad.items()):
            excluded.append(b.PlacementHost(key, False, why))
        verdicts = place(daemon.engine.policy, daemon.loaded.sha256, label, parsed)
        hosts = tuple(b.PlacementHost(v.host, v.admitted, v.reason) for v in verdicts)
        return b.PlacementResult(
            label=label,
            revision=self.pool.revision,
            state=self.pool.state,
            hosts=tuple(sorted(hosts + tuple(excluded), key=lambda h: h.host)),
        )
