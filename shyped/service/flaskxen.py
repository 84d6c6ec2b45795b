"""The daemon's edge to Xen's FLASK (one Twisted-side service over `shyped.service.flaskxc`).

What it does for the daemon (docs/flask.md, "The daemon and Xen's FLASK"):

- **detects** FLASK at start (`FlaskMode`): absent (Debian's Xen, the sandbox) → the daemon
  works as without it and says so once; present (enforcing or permissive) → it compiles the
  sHype policy (`shyped.policy.flask` + `shyped.service.flaskbuild`) and loads it into Xen
  before the first decision;
- **switches** Xen's policy with the daemon's (`prepare` compiles, `load` loads; the daemon
  loads only an update its own check accepted, and keeps its old policy when Xen refuses);
- **labels domains** in Xen: `ensure_domain` reads the domain's context (``xl list -Z``) and
  relabels an unlabelled one to its label's context (`shyped.core.xenflask.plan_domain`);
  `relabel_running` relabels a running domain the daemon relabels (``shypectl addlabel L
  mgt DOMAIN``) before the daemon does, `relabel_back` undoes it;
- **reads AVC messages** from Xen's console ring every `poll_interval` seconds (incremental,
  off the reactor) and hands the parsed denials to `on_avc`.

Every blocking call runs in the reactor's thread pool; the boundary serialises them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TypeVar

import attrs
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from shyped.core.xenflask import (
    AvcRecord,
    ConsoleRead,
    DomainPlan,
    FlaskMode,
    Step,
    parse_list_z,
    plan_domain,
    plan_running_relabel,
    read_console,
)
from shyped.policy.flask import compile_policy, context
from shyped.policy.model import Policy
from shyped.service.config import Config
from shyped.service.flaskbuild import DEFAULT_CACHE, build
from shyped.service.flaskxc import DisabledBoundary, FlaskError, XcBoundary, XenFlaskBoundary

_log = Logger(namespace="shyped.flask")
T = TypeVar("T")

#: Reads at most that skip the console ring's old text at start (512 reads of 256 KiB: a
#: 128 MiB ``conring_size=``; a ring written faster than that is read from where it is).
START_READS: Final = 512
#: Seconds between reads of Xen's console ring.
POLL_INTERVAL: Final = 2.0

#: The log line when Xen has no FLASK (one, at start).
ABSENT_LINE: Final = (
    "Xen FLASK: absent ({reason}): the hypervisor enforces nothing of the sHype policy; "
    "shyped decides what is negotiated through xenstore, as without FLASK"
)


def policy_builder(
    xen_source: Path | None, cache: Path = DEFAULT_CACHE
) -> Callable[[Policy], bytes]:
    """The binary FLASK policy of an sHype policy, built with Xen's policy tree from
    `xen_source` (blocking: m4 and checkpolicy)."""

    def build_binary(policy: Policy) -> bytes:
        if xen_source is None:
            raise FlaskError(
                "Xen has FLASK but no Xen source tarball is configured to compile the policy "
                "([flask] xen_source in shyped.toml, or $SHYPED_XEN_SOURCE)"
            )
        module = compile_policy(policy).module
        return build(module, xen_source, cache, work_in=cache).binary  # not /tmp: read-only

    return build_binary


@attrs.frozen
class Prepared:
    """A compiled binary policy, ready to load."""

    binary: bytes
    sha256: str

    @classmethod
    def of(cls, binary: bytes) -> Prepared:
        return cls(binary, hashlib.sha256(binary).hexdigest())


class FlaskXen:
    """Xen's FLASK for one daemon. Methods run on the reactor thread; results come as
    Deferreds from worker threads."""

    def __init__(
        self,
        reactor: Any,
        boundary: XenFlaskBoundary,
        builder: Callable[[Policy], bytes],
        *,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.boundary = boundary
        self.builder = builder
        self.poll_interval = poll_interval
        self.mode = FlaskMode.ABSENT
        self.reason = "not detected yet"
        #: The binary policy loaded into Xen by this daemon (None: none yet).
        self.loaded: Prepared | None = None
        #: Each domain's context as Xen last listed it (domid -> context, None: unreadable).
        self.contexts: dict[int, str | None] = {}
        #: Called on the reactor with the AVC denials of each console read.
        self.on_avc: Callable[[Sequence[AvcRecord]], None] = lambda _records: None
        self.denials = 0
        self.unparsed_lines = 0
        #: Reads that found the ring overwritten since the last one (denials may be lost).
        self.console_overruns = 0
        self.relabels = 0
        self.errors = 0
        self._index = 0
        self._rest = ""
        self._skipping = False
        self._poll = LoopingCall(self._read_console)
        self._poll.clock = reactor
        self._polling: Deferred[Any] | None = None
        self._listing = False
        self._context_waiters: list[Deferred[dict[int, str | None]]] = []

    @property
    def present(self) -> bool:
        return self.mode.present

    def _call(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), fn, *args)

    # ---------------------------------------------------------------- start and switches

    async def start(self, policy: Policy) -> None:
        """Detect FLASK; when present load `policy` compiled (`FlaskError`: the daemon must
        not start) and start reading the console ring from its current end."""
        self.mode, self.reason = await self._call(self.boundary.detect)
        if not self.present:
            _log.warn(ABSENT_LINE, reason=self.reason)
            return
        _log.info("Xen FLASK: {mode}; loading the compiled sHype policy", mode=self.mode.value)
        await self.load(await self.prepare(policy))
        # Skip what the ring holds from before this start (xl dmesg shows it): all of it,
        # however many reads that takes (a ring larger than one read, conring_size=).
        text, self._index, _ = await self._call(self.boundary.read_console, 0)
        for _ in range(START_READS):
            more, index, _ = await self._call(self.boundary.read_console, self._index)
            if not more:
                break
            text, self._index = more, index
        # the next read continues a line this one cut: that line is not read
        self._rest, self._skipping = "", not text.endswith("\n") and text != ""
        if self.poll_interval > 0:
            self._poll.start(self.poll_interval, now=False)

    def stop(self) -> None:
        if self._poll.running:
            self._poll.stop()

    def prepare(self, policy: Policy) -> Deferred[Prepared]:
        """`policy` compiled to a binary FLASK policy (off the reactor); `FlaskError` or
        `FlaskBuildError` if it cannot be."""
        return self._call(self.builder, policy).addCallback(Prepared.of)

    async def load(self, prepared: Prepared) -> None:
        """Load `prepared` into Xen; `FlaskError` if Xen refuses (its old policy stays)."""
        await self._call(self.boundary.load_policy, prepared.binary)
        self.loaded = prepared
        _log.warn("Xen FLASK: policy loaded (sha256 {sha})", sha=prepared.sha256[:16])

    # ---------------------------------------------------------------- domains

    def refresh_contexts(self) -> Deferred[dict[int, str | None]]:
        """Every domain's context as Xen lists it from a read that starts after this call.
        Calls made while a read is out share the next one (a policy switch re-decides every
        running domain: one ``xl list -Z`` per wave, not one per domain)."""
        d: Deferred[dict[int, str | None]] = Deferred()
        self._context_waiters.append(d)
        if not self._listing:
            self._list_contexts()
        return d

    def _list_contexts(self) -> None:
        waiters, self._context_waiters = self._context_waiters, []
        self._listing = True

        def done(result: str | Failure) -> None:
            self._listing = False
            if isinstance(result, Failure):
                for w in waiters:
                    w.errback(result)
            else:
                self.contexts = {d: row.context for d, row in parse_list_z(result).items()}
                for w in waiters:
                    w.callback(self.contexts)
            if self._context_waiters:
                self._list_contexts()

        self._call(self.boundary.list_contexts).addBoth(done)

    async def ensure_domain(self, domid: int, label: str | None) -> DomainPlan:
        """Make domain `domid` run in Xen with the context of `label` (None: unlabelled):
        nothing to do, relabelled (from unlabelled), or REFUSE (the caller vetoes). A
        relabel Xen refuses is a REFUSE too."""
        want = context(label)
        try:
            have = (await self.refresh_contexts()).get(domid)
        except FlaskError as e:
            self.errors += 1
            return DomainPlan(Step.REFUSE, want, None, f"cannot read Xen's contexts: {e}")
        plan = plan_domain(want, have)
        if plan.step is not Step.RELABEL:
            return plan
        return await self._relabel(domid, plan)

    async def relabel_running(self, domid: int, old: str | None, new: str) -> DomainPlan:
        """Relabel running domain `domid` in Xen from `old`'s context to `new`'s (labels;
        None: unlabelled) before the daemon does (`plan_running_relabel`): NONE, RELABEL
        (done) or REFUSE (Xen unchanged; the daemon must not relabel either)."""
        try:
            have = (await self.refresh_contexts()).get(domid)
        except FlaskError as e:
            self.errors += 1
            return DomainPlan(Step.REFUSE, context(new), None, f"cannot read Xen's contexts: {e}")
        plan = plan_running_relabel(context(old), context(new), have)
        if plan.step is Step.RELABEL:
            return await self._relabel(domid, plan)
        return plan

    async def relabel_back(self, domid: int, plan: DomainPlan) -> None:
        """Undo `plan` (a RELABEL `relabel_running` did); `FlaskError` if Xen refuses."""
        assert plan.have is not None
        await self._call(self.boundary.relabel, domid, plan.have)
        self.relabels += 1
        self.contexts[domid] = plan.have

    async def _relabel(self, domid: int, plan: DomainPlan) -> DomainPlan:
        try:
            await self._call(self.boundary.relabel, domid, plan.want)
        except FlaskError as e:
            self.errors += 1
            return attrs.evolve(plan, step=Step.REFUSE, reason=f"Xen refused the relabel: {e}")
        self.relabels += 1
        self.contexts[domid] = plan.want
        return plan

    # ---------------------------------------------------------------- AVC messages

    def _read_console(self) -> Deferred[None] | None:
        if self._polling is not None:
            return None  # the last read is still out
        d = self._call(self._read_and_parse, self._index, self._rest, self._skipping)
        d.addCallback(self._got_console)
        d.addErrback(self._console_failed)
        self._polling = d
        return None

    def _read_and_parse(
        self, index: int, rest: str, skipping: bool
    ) -> tuple[ConsoleRead, int, bool]:
        text, index, gap = self.boundary.read_console(index)
        return read_console(rest, text, skip=skipping or gap), index, gap

    def _got_console(self, result: tuple[ConsoleRead, int, bool]) -> None:
        self._polling = None
        read, self._index, gap = result
        self._rest, self._skipping = read.rest, read.skipping
        if gap:
            self.console_overruns += 1
            _log.warn(
                "Xen FLASK: the console ring was overwritten before it was read ({n} time(s) "
                "so far): AVC denials written in between are lost; its cut line is not read",
                n=self.console_overruns,
            )
        self.unparsed_lines += read.lines - len(read.records)
        denied = [r for r in read.records if r.denied]
        self.denials += len(denied)
        if denied:
            self.on_avc(denied)

    def _console_failed(self, failure: Failure) -> None:
        self._polling = None
        self.errors += 1
        _log.warn("Xen FLASK: cannot read the console ring: {e}", e=str(failure.value))

    def poll_now(self) -> Deferred[None]:
        """One console read now (tests, the QEMU tier): fires once its records are handed on."""
        d = self._call(self._read_and_parse, self._index, self._rest, self._skipping)
        return d.addCallback(self._got_console)

    def status(self) -> dict[str, Any]:
        """The hypervisor's view for ``shypectl status`` and metrics."""
        return {
            "mode": self.mode.value,
            "reason": self.reason if not self.present else None,
            "policy_sha256": None if self.loaded is None else self.loaded.sha256,
            "denials": self.denials,
            "relabels": self.relabels,
            "errors": self.errors,
            "console_overruns": self.console_overruns,
        }


def make_flask(config: Config, reactor: Any) -> FlaskXen:
    """The FLASK edge a daemon with `config` uses: libxenctrl and the configured ``xl`` (the
    sandbox actuator's toolstack has no FLASK: detection says absent there)."""
    fl = config.flask
    boundary: XenFlaskBoundary
    if not fl.enabled:
        boundary = DisabledBoundary()
    else:
        boundary = XcBoundary(config.actuator.xl if config.actuator.kind == "xl" else ("xl",))
    return FlaskXen(
        reactor, boundary, policy_builder(fl.xen_source, fl.cache), poll_interval=fl.poll_interval
    )
