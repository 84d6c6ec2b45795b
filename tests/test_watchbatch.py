"""`shyped.service.watchbatch.BatchReader` against a scripted gateway: which reads go out
when, and what the assembler is fed (the daemon tests run it against a real oxenstored)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from shyped.core.fairbatch import FairBatches
from shyped.service.watchbatch import BURST_WAIT, BatchReader

NAME = "/local/domain/5/name"
DATA = "/local/domain/5/data/x"


class ScriptedGateway:
    """Answers nothing by itself: the test fires each read round and barrier."""

    direct = True

    def __init__(self) -> None:
        self.reads: list[tuple[list[str], Deferred[Any]]] = []
        self.barriers: list[Deferred[None]] = []

    def read_nodes(self, paths: list[str], perm_paths: list[str]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.reads.append((list(paths), d))
        return d

    def sync(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.barriers.append(d)
        return d


class Recorder:
    def __init__(self) -> None:
        self.fed: list[list[Any]] = []

    def feed_batch(self, nodes: list[Any]) -> list[Any]:
        self.fed.append(list(nodes))
        return []


def _reader() -> tuple[BatchReader, ScriptedGateway, Recorder, Clock]:
    gateway, assembler, clock = ScriptedGateway(), Recorder(), Clock()
    return BatchReader(gateway, assembler, clock), gateway, assembler, clock  # type: ignore[arg-type]


def _start(reader: BatchReader, pending: FairBatches, *paths: str) -> Deferred[Any]:
    for path in paths:
        pending.add(path, 0.0)
    pending.begin()
    taken, _ = pending.take()
    return Deferred.fromCoroutine(reader.read(pending, taken, 0.0))


def test_the_next_round_goes_out_once_the_barrier_is_in_not_after_the_reads() -> None:
    """The rest of a burst (pending once the barrier is in) is read at once, while the first
    round's reads are still unanswered; the newer round's values win."""
    reader, gateway, assembler, _clock = _reader()
    pending = FairBatches()
    batch = _start(reader, pending, NAME)
    assert [paths for paths, _ in gateway.reads] == [[NAME]]
    pending.add(NAME, 0.0)  # the rest of the burst: the same node again, and another
    pending.add(DATA, 0.0)
    gateway.barriers[0].callback(None)
    assert [paths for paths, _ in gateway.reads] == [[NAME], [NAME, DATA]]  # not waited for
    gateway.barriers[1].callback(None)
    gateway.reads[0][1].callback(({NAME: b"old"}, {}))
    assert not batch.called
    gateway.reads[1][1].callback(({NAME: b"new", DATA: b"x"}, {DATA: None}))
    assert batch.called and reader.rounds[2] == 1
    assert assembler.fed == [[(NAME, b"new", None), (DATA, b"x", None)]]


def test_without_the_barrier_the_batch_waits_burst_wait_after_its_reads() -> None:
    reader, gateway, assembler, clock = _reader()
    pending = FairBatches()
    batch = _start(reader, pending, NAME)
    gateway.reads[0][1].callback(({NAME: b"v"}, {}))
    clock.advance(BURST_WAIT / 2)
    assert not batch.called  # the barrier may still bring the rest of the burst
    clock.advance(BURST_WAIT)
    assert batch.called and reader.barrier_timeouts == 1
    assert assembler.fed == [[(NAME, b"v", None)]]
    gateway.barriers[0].callback(None)  # late: nothing more happens
    assert len(gateway.reads) == 1


def test_a_failed_round_fails_the_batch_with_the_first_error() -> None:
    reader, gateway, _assembler, _clock = _reader()
    pending = FairBatches()
    batch = _start(reader, pending, NAME)
    pending.add(DATA, 0.0)
    gateway.barriers[0].callback(None)
    gateway.barriers[1].callback(None)
    gateway.reads[0][1].errback(RuntimeError("lost"))
    gateway.reads[1][1].errback(RuntimeError("lost too"))
    failures: list[Any] = []
    batch.addErrback(failures.append)
    assert len(failures) == 1 and "lost" in str(failures[0].value)
