"""`AsyncAuditLog`: group commit on a writer thread, for the daemon's reactor."""

from __future__ import annotations

import threading
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shyped.core.audit import (
    Draft,
    Record,
)
from shyped.service.auditlog.settings import (
    AuditState,
)
from shyped.service.auditlog.writer import (
    AuditLog,
)
from shyped.service.auditlog.writerstate import (
    HeadDraft,
    Listener,
    _Recorder,
    _StateView,
)

_log = Logger(namespace="shyped.audit")

#: A record handed to the writer thread and its Deferred; (None, None): try to resume.
_Queued = tuple[Draft | HeadDraft | None, Deferred[Record] | None]


class AsyncAuditLog(_StateView, _Recorder["Deferred[Record]"]):
    """Group commit on a writer thread, for the daemon's reactor.

    `append` (reactor thread only) collects the record and returns a Deferred that fires with
    the sealed record once the fsync covering it returned, or fails with `AuditUnavailable`
    (fail-closed). The records of one reactor tick are handed to the writer thread together at
    the end of the tick, and more accumulate while it fsyncs: one tick's records, and those of
    every tick during an fsync, share one write and one fsync. Listeners and the `state` seen
    here run on the reactor thread.
    """

    def __init__(self, log: AuditLog, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.log: Final = log
        self._reactor = reactor
        self._cond = threading.Condition()
        self._queue: list[_Queued] = []
        self._tick: list[_Queued] = []
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stopped: Deferred[None] | None = None
        self._state = log.state
        self._listeners: list[Listener] = []
        self._resume = LoopingCall(self._poke_resume)
        self._resume.clock = reactor
        log.add_listener(lambda s, why: reactor.callFromThread(self._state_changed, s, why))

    def add_listener(self, listener: Listener) -> None:
        """`listener(state, reason)` on every state change, on the reactor thread."""
        self._listeners.append(listener)

    def now(self) -> str:
        return self.log.now()

    def start(self) -> None:
        """Open the log (in the caller's thread) and start the writer thread."""
        self.log.open()
        self._state = self.log.state
        self._thread = threading.Thread(target=self._run, name="shyped-audit", daemon=True)
        self._thread.start()
        interval = self.log.settings.retry_interval
        self._resume.start(interval if interval > 0 else 1.0, now=False)

    def append(self, draft: Draft | HeadDraft) -> Deferred[Record]:
        if self._stopped is not None:
            raise RuntimeError("the audit log is stopping")
        d: Deferred[Record] = Deferred()
        if not self._tick:
            self._reactor.callLater(0, self._hand_over)
        self._tick.append((draft, d))
        return d

    def _hand_over(self) -> None:
        """End of the tick: give this tick's records to the writer thread, as one batch."""
        with self._cond:
            self._queue.extend(self._tick)
            self._cond.notify()
        self._tick = []

    def stop(self) -> Deferred[None]:
        """Write what is queued, close the log; fires when the writer thread has finished."""
        if self._stopped is None:
            self._stopped = Deferred()
            if self._resume.running:
                self._resume.stop()
            if self._tick:
                self._hand_over()
            with self._cond:
                self._stopping = True
                self._cond.notify()
            if self._thread is None:
                self._stopped.callback(None)
        return self._stopped

    def _poke_resume(self) -> None:
        if self._state is not AuditState.OK:
            with self._cond:
                self._queue.append((None, None))
                self._cond.notify()

    def _state_changed(self, state: AuditState, why: str) -> None:
        self._state = state
        self._tell_listeners(state, why)

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._stopping:
                        self._cond.wait()
                    batch, self._queue = self._queue, []
                    if not batch and self._stopping:
                        break
                self._commit(batch)
        finally:
            try:
                self.log.close()
            finally:
                self._reactor.callFromThread(self._finished)

    def _commit(self, batch: list[_Queued]) -> None:
        done: list[tuple[Deferred[Record], Record | BaseException]] = []
        appended: list[tuple[Deferred[Record], Record]] = []
        for draft, d in batch:
            if draft is None:
                self.log.try_resume()
                continue
            assert d is not None
            try:
                appended.append((d, self.log.append(draft)))
            except Exception as e:
                done.append((d, e))
        if appended:
            try:
                self.log.flush()
                done.extend(appended)
            except Exception as e:
                done.extend((d, e) for d, _ in appended)
        if done:
            self._reactor.callFromThread(self._fire, done)

    @staticmethod
    def _fire(done: list[tuple[Deferred[Record], Record | BaseException]]) -> None:
        for d, result in done:
            if isinstance(result, BaseException):
                d.errback(result)
            else:
                d.callback(result)

    def _finished(self) -> None:
        if self._stopped is None:
            self._stopped = Deferred()
        if not self._stopped.called:
            self._stopped.callback(None)
