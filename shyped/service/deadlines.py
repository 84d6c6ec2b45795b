"""Waiting for a Deferred with a deadline, without cancelling it: the watch batch's barrier
(`shyped.service.watchbatch`) and the daemon's stop (`shyped.service.daemon`) both need to
know whether something finished in time while letting it run on."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred


def fired_within(reactor: Any, d: Deferred[Any], seconds: float) -> Deferred[bool]:
    """True once `d` fired, False if `seconds` passed first. `d` keeps running; its result
    is consumed here (a failure, e.g. a lost connection, is left to whoever caused it: the
    reads' own errors, the stop's own log line)."""
    done: Deferred[bool] = Deferred()

    def fire(value: bool) -> None:
        if not done.called:
            done.callback(value)

    timer = reactor.callLater(seconds, fire, False)

    def arrived(_: object) -> None:
        if timer.active():
            timer.cancel()
        fire(True)

    d.addBoth(arrived)
    return done
