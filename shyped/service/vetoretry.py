"""Domain vetoes that failed stay pending and are retried (edge code, reactor thread).

A veto that the toolstack could not carry out (``xl destroy`` failed: a busy toolstack, a
descriptor limit, a transient libxl error) must not be dropped: the denied domain would run on
beside the domains it was denied for. `VetoRetrier` keeps every failed `VetoDomain` pending and
runs it again after a capped exponential backoff with jitter ("equal jitter": half the delay
fixed, half random, so many pending vetoes do not retry in lock step), until

* it succeeds (``done``),
* the domain is gone from xenstore (``gone``: `VetoRetrier.gone`, from the event stream), or
* the daemon no longer wants it (``dropped``: re-decided as admitted after a policy reload,
  or the mode switched to permissive), asked through `wanted` right before each attempt.

Every attempt is reported to `on_attempt`; the daemon records the first few, then only attempt
numbers that are powers of two, and always the end (`worth_recording`), so a veto that fails
forever adds a logarithmic number of audit records, not one a minute.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, Literal

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shyped.core.actions import VetoDomain

_log = Logger(namespace="shyped.enforcer")

#: First retry after BASE s, doubling, at most CAP s (before jitter).
BASE = 1.0
CAP = 60.0
#: Attempts recorded one by one before only powers of two are.
RECORD_FIRST = 3

Result = Literal["failed", "done", "gone", "dropped"]


@attrs.frozen
class VetoAttempt:
    """One attempt at a pending veto, or its end."""

    action: VetoDomain
    result: Result
    #: Failed attempts so far (including this one when `result` is "failed").
    failures: int
    error: str = ""
    #: Seconds until the next attempt (only when "failed").
    retry_in: float | None = None


@attrs.define
class PendingVeto:
    """A veto the toolstack has not carried out yet."""

    action: VetoDomain
    failures: int
    last_error: str
    first_failed: float  # reactor seconds
    next_at: float  # reactor seconds
    call: Any = None  # IDelayedCall of the next attempt
    running: bool = False


def worth_recording(attempt: VetoAttempt) -> bool:
    """The first `RECORD_FIRST` failures, then powers of two, and every end."""
    n = attempt.failures
    return attempt.result != "failed" or n <= RECORD_FIRST or (n & (n - 1)) == 0


def backoff(failures: int, rng: Callable[[], float] = random.random) -> float:
    """Delay before the next attempt after `failures` failed ones (capped, jittered)."""
    delay = min(CAP, BASE * 2.0 ** min(failures - 1, 32))
    return delay / 2 + rng() * delay / 2


class VetoRetrier:
    """Pending domain vetoes by domid; see the module docstring."""

    def __init__(
        self,
        reactor: Any,
        run: Callable[[VetoDomain], Deferred[None]],
        *,
        wanted: Callable[[VetoDomain], bool] = lambda _: True,
        on_attempt: Callable[[VetoAttempt], None] | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.reactor = reactor
        self._run = run
        self.wanted = wanted
        self.on_attempt = on_attempt
        self._rng = rng
        self.pending: dict[int, PendingVeto] = {}
        #: Failed veto attempts since start (first tries included).
        self.failures = 0

    def failed(self, action: VetoDomain, error: str) -> None:
        """`action` was tried and failed: keep it pending and schedule the next attempt
        (unless the domain is no longer to be vetoed: gone meanwhile, or re-decided)."""
        self.failures += 1
        now = self.reactor.seconds()
        p = self.pending.get(action.domid)
        if not self.wanted(action):
            self._end(action.domid)
            n = p.failures + 1 if p is not None else 1
            self._report(VetoAttempt(action, "dropped", n, error))
            return
        if p is None:
            p = self.pending[action.domid] = PendingVeto(action, 0, error, now, now)
        p.action, p.failures, p.last_error, p.running = action, p.failures + 1, error, False
        delay = backoff(p.failures, self._rng)
        p.next_at = now + delay
        if p.call is not None and p.call.active():
            p.call.cancel()
        p.call = self.reactor.callLater(delay, self._retry, action.domid)
        self._report(VetoAttempt(action, "failed", p.failures, error, delay))

    def succeeded(self, action: VetoDomain) -> None:
        """`action` was carried out: a pending veto of that domain is done."""
        p = self._end(action.domid)
        if p is not None:
            self._report(VetoAttempt(action, "done", p.failures))

    def gone(self, domid: int) -> None:
        """The domain is gone from xenstore: nothing left to veto."""
        p = self._end(domid)
        if p is not None:
            self._report(VetoAttempt(p.action, "gone", p.failures, p.last_error))

    def stop(self) -> None:
        for p in self.pending.values():
            if p.call is not None and p.call.active():
                p.call.cancel()

    def _end(self, domid: int) -> PendingVeto | None:
        p = self.pending.pop(domid, None)
        if p is not None and p.call is not None and p.call.active():
            p.call.cancel()
        return p

    def _retry(self, domid: int) -> None:
        p = self.pending.get(domid)
        if p is None or p.running:
            return
        p.call = None
        if not self.wanted(p.action):
            self._end(domid)
            self._report(VetoAttempt(p.action, "dropped", p.failures, p.last_error))
            return
        p.running = True
        self._run(p.action)  # the enforcer calls back `failed` or `succeeded`

    def _report(self, attempt: VetoAttempt) -> None:
        if worth_recording(attempt):
            what, n = attempt.action.describe(), attempt.failures
            if attempt.result == "failed":
                _log.error(
                    "enforce: {what} failed ({n} failed attempt(s)): {error}; retrying in "
                    "{delay:.1f} s",
                    what=what, n=n, error=attempt.error, delay=attempt.retry_in or 0.0,
                )  # fmt: skip
            else:
                _log.warn(
                    "enforce: pending veto {what} {result} after {n} failed attempt(s)",
                    what=what, result=attempt.result, n=n,
                )  # fmt: skip
        if self.on_attempt is not None:
            self.on_attempt(attempt)
