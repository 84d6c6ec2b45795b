"""Control-socket test helpers: `ModelBackend`, a small stand-in for the DAEMON behind the
control socket (real policy engine, real label store file; no xenstore double anywhere), and
a fixture-friendly way to run the real `ControlServer` in the test's reactor.

The backend keeps its own list of domains. For shype-xl tests, `SandboxAdmission` makes
`wait_admission` look for the domain in the real sandbox toolstack (oxenstored) and decide it
with the policy engine, as the daemon would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
from twisted.internet import defer, threads

from shyped.control import backend as b
from shyped.control import views
from shyped.control.protocol import ControlError, ErrorCode
from shyped.control.server import Authorizer, ControlServer, ServerLimits
from shyped.core.labelstore import (
    LabelStore,
    LabelStoreError,
    load_label_store,
    resource_id,
    save_label_store,
)
from shyped.policy.chinese_wall import running_set
from shyped.policy.decisions import PolicyEngine
from shyped.policy.model import Policy
from shyped.policy.update import RunningDomain, RunningSystem, check_update
from shyped.service.config import ControlConfig

POLICY_TOML = """\
[policy]
name = "example"
version = "1.0"
bootstrap = "dom0"

[types]
ste = ["system", "bank-a", "bank-b", "web"]
cw = ["bank-a", "bank-b", "web"]

[[conflict_set]]
name = "banks"
types = ["bank-a", "bank-b"]

[[label]]
name = "dom0"
ste = ["system", "bank-a", "bank-b", "web"]

[[label]]
name = "bank-a"
ste = ["bank-a"]
cw = ["bank-a"]

[[label]]
name = "bank-b"
ste = ["bank-b"]
cw = ["bank-b"]

[[label]]
name = "web"
ste = ["web"]
cw = ["web"]

[[resource]]
name = "bank-a-disk"
ste = "bank-a"

[[resource]]
name = "bank-b-disk"
ste = "bank-b"

[[resource]]
name = "public-net"
ste = "web"
"""

#: 1.1 of the same policy: adds a label (an allowed update).
POLICY_TOML_11 = (
    POLICY_TOML.replace(
        'version = "1.0"', 'version = "1.1"\nfrom = { name = "example", version = "1.0" }'
    )
    + """
[[label]]
name = "audit"
ste = ["system"]
"""
)

#: 1.1 deleting the label of a running domain (bank-a): the update check refuses it.
POLICY_TOML_BAD = POLICY_TOML_11.replace(
    'name = "bank-a"\nste = ["bank-a"]\ncw = ["bank-a"]\n', 'name = "bank-c"\nste = ["bank-a"]\n'
)


@attrs.define
class Dom:
    domid: int
    name: str
    uuid: str | None
    label: str | None  # bare name
    state: str = "admitted"
    reason: str | None = None


class ModelBackend:
    """A `ControlBackend` over a real policy engine and label store (the daemon's stand-in)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.policy_path = directory / "policy.toml"
        self.policy_path.write_text(POLICY_TOML)
        self.labels_path = directory / "labels.json"
        self.mode: b.ModeName = "enforcing"
        self.audits: list[b.ControlAudit] = []
        self.store = LabelStore()
        self.domains: dict[int, Dom] = {}
        self.admission: Callable[[b.WaitAdmissionArgs], Any] | None = None
        #: The devices of each dry-run of a new domain, by UUID (what shype-xl will create).
        self.planned: dict[str, b.DryRunArgs] = {}
        self._activate(POLICY_TOML.encode(), str(self.policy_path))
        self.add_domain(Dom(0, "Domain-0", "00000000-0000-0000-0000-000000000000", "dom0"))
        self.add_domain(Dom(1, "bank-a-1", "11111111-1111-4111-8111-111111111111", "bank-a"))

    # ---- state

    def _activate(self, raw: bytes, source: str | None) -> None:
        policy, fmt = views.parse_policy(raw.decode(), source or "<policy>")
        self.policy: Policy = policy
        self.engine = PolicyEngine(policy)
        self.info = views.policy_info(policy, raw, fmt, source)
        self.raw = raw

    def running_labels(self) -> list[str | None]:
        return [d.label for d in self.domains.values() if d.state in ("admitted", "paused")]

    def running_set(self) -> Any:
        return running_set(self.engine, self.running_labels())

    def add_domain(self, dom: Dom) -> None:
        self.domains[dom.domid] = dom

    def _full(self, label: str | None) -> str | None:
        return self.policy.label_string(label) if label else None

    def _info(self, d: Dom) -> b.DomainInfo:
        return b.DomainInfo(d.domid, d.name, d.uuid, self._full(d.label), d.state, d.reason)

    def domain_label(self, domid: int) -> str | None:
        d = self.domains.get(domid)
        return d.label if d else None

    # ---- ControlBackend

    def status(self) -> b.Status:
        doms = list(self.domains.values())
        counts = b.Counts(
            domains=len(doms),
            admitted=sum(d.state == "admitted" for d in doms),
            denied=sum(d.state == "denied" for d in doms),
            paused=sum(d.state == "paused" for d in doms),
            undecided=sum(d.state == "seen" for d in doms),
            vm_labels=len(self.policy.vm_labels),
            resource_labels=len(self.policy.resource_labels),
            labelled_resources=len(self.store.resources),
        )
        return b.Status(self.mode, self.info, counts, True, "shyped test backend")

    def getenforce(self) -> b.EnforceMode:
        return b.EnforceMode(self.mode)

    def setenforce(self, args: b.SetEnforceArgs) -> b.EnforceMode:
        previous, self.mode = self.mode, args.mode
        return b.EnforceMode(self.mode, previous)

    def labels(self, args: b.LabelsArgs) -> b.LabelList:
        return views.label_list(self.policy, args.type)

    def validate_label(self, args: b.ValidateLabelArgs) -> b.LabelInfo:
        return views.find_label(self.policy, args.label, args.type)

    def list_domains(self) -> b.DomainList:
        return b.DomainList(tuple(self._info(d) for d in self.domains.values()))

    def get_domain_label(self, args: b.DomainArgs) -> b.DomainInfo:
        return views.match_domain(args.domain, self.list_domains().domains)

    def _rid(self, spec: str) -> str:
        try:
            return resource_id(spec)
        except LabelStoreError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None

    def get_resource_label(self, args: b.ResourceArgs) -> b.ResourceInfo:
        rid = self._rid(args.resource)
        return b.ResourceInfo(rid, self._full(self.store.resource_label(rid)))

    def resources(self) -> b.ResourceList:
        return b.ResourceList(
            tuple(
                b.ResourceInfo(r, self._full(lab))
                for r, lab in sorted(self.store.resources.items())
            )
        )

    def dry_run(self, args: b.DryRunArgs) -> b.DryRunResult:
        if args.domain is not None:
            if args.domain.label:
                views.find_label(self.policy, args.domain.label, "vm")
            if args.domain.uuid:
                self.planned[args.domain.uuid] = args
            label = args.domain.label or self.store.domain_label(args.domain.uuid, args.domain.name)
            subject, running = args.domain.name, self.running_set()
        else:
            assert args.running is not None
            dom = views.match_domain(args.running, self.list_domains().domains)
            label, subject, running = self.domain_label(dom.domid), dom.name or "?", None
        return views.dry_run(
            self.engine,
            subject=subject,
            label=label,
            running=running,
            disks=args.disks,
            vifs=args.vifs,
            domain_label=self.domain_label,
            resource_label=self.store.resource_label,
            pcis=args.pcis,
            channels=args.channels,
        )

    def register_domain(self, args: b.RegisterDomainArgs) -> b.Registration:
        bare = views.find_label(self.policy, args.label, "vm").name if args.label else None
        try:
            self.store = self.store.with_domain(uuid=args.uuid, label=bare)
        except LabelStoreError as exc:
            raise ControlError(ErrorCode.INVALID_ARGUMENT, str(exc)) from None
        save_label_store(self.store, self.labels_path)
        return b.Registration(args.uuid.lower(), args.name, self._full(bare))

    def wait_admission(self, args: b.WaitAdmissionArgs) -> Any:
        if self.admission is None:
            for d in self.domains.values():
                if d.uuid == args.uuid:
                    return b.Admission(
                        d.domid, d.name, args.uuid, d.state == "admitted", d.state, d.reason or ""
                    )
            raise ControlError(ErrorCode.ADMISSION_TIMEOUT, "no such domain appeared")
        return self.admission(args)

    def relabel_domain(self, args: b.RelabelDomainArgs) -> b.DomainInfo:
        info = views.match_domain(args.domain, self.list_domains().domains)
        new = views.find_label(self.policy, args.label, "vm").name
        dom = self.domains[info.domid]
        decision = self.running_set().admit_relabel(dom.label, new)
        if not decision.permitted:
            raise ControlError(
                ErrorCode.DENIED,
                f"relabel of {dom.name} to {new} denied",
                {"reasons": [str(decision)]},
            )
        dom.label = new
        return self._info(dom)

    def set_resource_label(self, args: b.SetResourceLabelArgs) -> b.ResourceLabelChange:
        rid = self._rid(args.resource)
        bare = views.find_label(self.policy, args.label, "res").name if args.label else None
        previous = self.store.resource_label(rid)
        self.store = self.store.with_resource(args.resource, bare)
        save_label_store(self.store, self.labels_path)
        return b.ResourceLabelChange(rid, self._full(bare), self._full(previous))

    def policy_show(self, args: b.PolicyShowArgs) -> b.PolicyText:
        from shyped.policy import acm_xml, toml_format

        if args.format == "toml":
            text = toml_format.dumps(self.policy)
        else:
            text = acm_xml.dumps(self.policy).decode()
        return b.PolicyText(self.info, args.format, text)

    def _check(self, src: b.PolicySource) -> tuple[Policy, b.PolicyCheckResult]:
        new, fmt = views.parse_policy(src.text, src.filename, src.format)
        system = RunningSystem(
            domains=tuple(
                RunningDomain(d.domid, d.label, d.name)
                for d in self.domains.values()
                if d.state in ("admitted", "paused")
            )
        )
        check = check_update(self.policy, new, system)
        info = views.policy_info(new, src.text.encode(), fmt, src.filename)
        problems = tuple(str(p) for p in check.problems)
        return new, b.PolicyCheckResult(check.allowed, info, problems)

    def policy_check(self, args: b.PolicySource) -> b.PolicyCheckResult:
        return self._check(args)[1]

    def placement(self, args: b.PlacementArgs) -> b.PlacementResult:
        raise ControlError(ErrorCode.UNAVAILABLE, "placement needs pool mode ([pool])")

    def reserve(self, args: b.ReserveArgs) -> b.ReserveResult:
        raise ControlError(ErrorCode.UNAVAILABLE, "reservations need pool mode ([pool])")

    def attest_quote(self, args: Any) -> Any:
        raise ControlError(ErrorCode.UNAVAILABLE, "attestation is off")

    def attest_ak(self) -> Any:
        raise ControlError(ErrorCode.UNAVAILABLE, "attestation is off")

    def policy_load(self, args: b.PolicyLoadArgs) -> Any:
        src = args.source or b.PolicySource(self.policy_path.read_text(), str(self.policy_path))
        _, result = self._check(src)
        if not result.allowed:
            raise ControlError(
                ErrorCode.POLICY_REJECTED,
                f"{result.policy.name} {result.policy.version} rejected",
                {"problems": list(result.problems)},
            )
        previous = self.info
        self._activate(src.text.encode(), src.filename)
        # a Deferred result, as the real daemon's reload is
        return defer.succeed(b.PolicyLoadResult(self.info, previous))

    def policy_reset(self) -> Any:
        """ACM's DEFAULT policy through `policy_load` (as the daemon does)."""
        from shyped.policy import toml_format
        from shyped.policy.acm_default import default_policy

        text = toml_format.dumps(default_policy(self.policy.bootstrap))
        return self.policy_load(b.PolicyLoadArgs(b.PolicySource(text, "<DEFAULT policy>")))

    def forget_domain(self, args: b.DomainArgs) -> b.Forgotten:
        old = self.store.by_uuid.get(args.domain.lower())
        if old is None:
            raise ControlError(ErrorCode.NOT_FOUND, f"{args.domain} has no stored label")
        self.store = self.store.with_domain(uuid=args.domain, label=None)
        save_label_store(self.store, self.labels_path)
        return b.Forgotten(args.domain, self._full(old), None)

    def audit(self, event: b.ControlAudit) -> None:
        self.audits.append(event)

    # ---- test knobs

    def reload_store(self) -> LabelStore:
        return load_label_store(self.labels_path)


class SandboxAdmission:
    """`wait_admission` against the real sandbox toolstack: find the domain by UUID in the
    sandbox's hypervisor state (polling, in a thread), then decide the domain (Chinese Wall)
    and its devices (dry run of the cfg's devices) with the backend's policy engine."""

    def __init__(self, backend: ModelBackend, socket: Path) -> None:
        self.backend = backend
        self.socket = socket

    def find(self, uuid: str, timeout: float) -> Any:
        from shyped.sandbox.toolstack import Toolstack

        ts = Toolstack(str(self.socket))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for dom in ts.list_domains():
                if dom.uuid == uuid:
                    return dom
            time.sleep(0.05)
        return None

    def __call__(self, args: b.WaitAdmissionArgs) -> defer.Deferred[b.Admission]:
        d = threads.deferToThread(self.find, args.uuid, args.timeout)
        return d.addCallback(self.decide, args)

    def decide(self, dom: Any, args: b.WaitAdmissionArgs) -> b.Admission:
        if dom is None:
            raise ControlError(ErrorCode.ADMISSION_TIMEOUT, f"domain {args.uuid} did not appear")
        be = self.backend
        label = be.store.domain_label(args.uuid, None)
        decision = be.running_set().admit(label)
        planned = be.planned.get(args.uuid, b.DryRunArgs(running="?"))
        devices = views.dry_run(
            be.engine,
            subject=dom.name,
            label=label,
            running=None,
            disks=planned.disks,
            vifs=planned.vifs,
            domain_label=be.domain_label,
            resource_label=be.store.resource_label,
            pcis=planned.pcis,
            channels=planned.channels,
        )
        verdicts = tuple(
            b.DeviceVerdict(v.kind, n, 0, v.permitted, v.reason)
            for n, v in enumerate(devices.items)
        )
        ok = decision.permitted
        state = "admitted" if ok else "denied"
        be.add_domain(Dom(dom.domid, dom.name, args.uuid, label, state, decision.reason))
        return b.Admission(dom.domid, dom.name, args.uuid, ok, state, str(decision), verdicts)


# --------------------------------------------------------------------------- running it


def short_dir(prefix: str) -> Path:
    """A directory short enough for AF_UNIX socket paths (not pytest's tmp_path)."""
    return Path(tempfile.mkdtemp(dir="/tmp", prefix=prefix))


def _server(
    backend: ModelBackend,
    directory: Path,
    limits: ServerLimits | None,
    authorizer: Authorizer | None,
    config: ControlConfig | None,
) -> ControlServer:
    cfg = config or ControlConfig(socket=directory / "control.sock")
    server = ControlServer(backend, cfg, limits=limits, authorizer=authorizer)
    server.start()
    return server


@contextmanager
def serving(
    backend: ModelBackend,
    directory: Path,
    *,
    limits: ServerLimits | None = None,
    authorizer: Authorizer | None = None,
    config: ControlConfig | None = None,
) -> Iterator[ControlServer]:
    """The real ControlServer on `directory`/control.sock, in the test's reactor (fixtures)."""
    server = _server(backend, directory, limits, authorizer, config)
    try:
        yield server
    finally:
        pytest_twisted.blockon(server.stop())


@asynccontextmanager
async def aserving(
    backend: ModelBackend,
    directory: Path,
    *,
    limits: ServerLimits | None = None,
    authorizer: Authorizer | None = None,
    config: ControlConfig | None = None,
) -> AsyncIterator[ControlServer]:
    """`serving` for test bodies: pytest-twisted runs them in the reactor's greenlet, so
    blocking work there must go through `in_thread` (awaited) and so must the shutdown."""
    server = _server(backend, directory, limits, authorizer, config)
    try:
        yield server
    finally:
        await server.stop()


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run blocking `fn` in a thread while the reactor keeps serving; its result."""
    return await threads.deferToThread(fn, *args, **kwargs)


async def run_cli(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run a command in a thread (the reactor keeps serving) and capture its output."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    result: subprocess.CompletedProcess[str] = await in_thread(
        subprocess.run, argv, capture_output=True, text=True, env=full_env, timeout=timeout
    )
    return result


async def shypectl(
    *args: str, socket: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return await run_cli(
        [sys.executable, "-m", "shyped.cli.shypectl", "--socket", str(socket), *args], env
    )


def cleanup(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


@contextmanager
def web_backend(prefix: str) -> Iterator[ModelBackend]:
    """A `ModelBackend` in a fresh short directory, with domain 2 ``web-1`` (label web)."""
    directory = short_dir(prefix)
    backend = ModelBackend(directory)
    backend.add_domain(Dom(2, "web-1", "22222222-2222-4222-8222-222222222222", "web"))
    try:
        yield backend
    finally:
        cleanup(directory)
