"""The policy operations of the daemon's control backend: show, check, load, reset.

`PolicyOps` answers ``policy_show`` (the active policy as TOML or ACM XML, keeping the ACM
file's header), ``policy_check`` and ``policy_load`` (a submitted text, or the configured file
again) and ``policy_reset`` (``xm resetpolicy``); `shyped.control.daemon_backend` builds the
whole backend on it.

- **Submitted policy texts** (``policy_check``, ``policy_load``) are parsed in a worker
  process with CPU, memory and time limits (`shyped.control.policyparse`), never on the
  reactor: a pathological text costs its sender a ``policy-invalid`` answer, not the daemon
  its decisions.
- **policy_load** with a text: the text is parsed, then written to a temporary file beside the
  configured policy file and handed to `Daemon.reload_policy`, which runs the update check on
  the running system; only if the daemon switched is the file renamed over the configured one
  (so the daemon starts with it next time). A refused policy leaves the file untouched.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from shyped.control import backend as b
from shyped.control import views
from shyped.control.admission import DaemonBackendBase, log
from shyped.control.policyparse import parse_isolated
from shyped.control.protocol import ControlError, ErrorCode
from shyped.fileio.atomicfile import fsync_dir
from shyped.fileio.boundedread import POLICY_MAX_BYTES, read_bounded
from shyped.policy import acm_xml, toml_format, update
from shyped.policy.acm_default import default_policy
from shyped.policy.errors import PolicyError
from shyped.policy.model import Policy

if TYPE_CHECKING:
    from shyped.service.daemon import ReloadResult


class PolicyOps(DaemonBackendBase):
    """The policy ops of `shyped.control.daemon_backend.DaemonControlBackend`."""

    #: sha256 of the loaded ACM XML policy -> its header (`_acm_header`), one entry
    _headers: dict[str, acm_xml.AcmHeader | None] = {}

    def policy_show(self, args: b.PolicyShowArgs) -> b.PolicyText:
        if args.format == "toml":
            text = toml_format.dumps(self._policy)
        else:
            try:
                text = acm_xml.dumps(self._policy, header=self._acm_header()).decode()
            except acm_xml.AcmExportError as exc:
                raise ControlError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"policy {self._policy.name} cannot be written as ACM XML: {exc}",
                ) from None
        return b.PolicyText(self._policy_info(), args.format, text)

    def _acm_header(self) -> acm_xml.AcmHeader | None:
        """The header fields (``Date``, ``PolicyUrl``, …) of the active policy's ACM XML
        file, so an export keeps them: read again from the file the daemon loaded, and only
        if it still has the bytes the daemon loaded (sha256); else None."""
        loaded = self.daemon.loaded
        if loaded.format != "acm-xml":
            return None
        cached = self._headers.get(loaded.sha256)
        if cached is not None or loaded.sha256 in self._headers:
            return cached
        header: acm_xml.AcmHeader | None = None
        try:
            data = read_bounded(loaded.path, POLICY_MAX_BYTES, "policy")
            if hashlib.sha256(data).hexdigest() == loaded.sha256:
                header = acm_xml.parse(data, file=str(loaded.path)).header
        except (OSError, PolicyError):
            header = None
        self._headers = {loaded.sha256: header}
        return header

    def _parse(self, src: b.PolicySource) -> Deferred[tuple[Policy, b.PolicyFormat]]:
        """Parse a submitted text in a worker process (`shyped.control.policyparse`)."""
        return parse_isolated(self.reactor, src.text, src.filename, src.format)

    def _check(
        self, src: b.PolicySource, parsed: tuple[Policy, b.PolicyFormat]
    ) -> b.PolicyCheckResult:
        new, fmt = parsed
        raw = src.text.encode("utf-8")
        info = views.policy_info(new, raw, fmt, src.filename)
        if info.sha256 == self.daemon.loaded.sha256:
            return b.PolicyCheckResult(True, info)  # the active policy: loading is a no-op
        system = self.daemon.engine.running_system(self.daemon.host)
        check = update.check_update(self._policy, new, system)
        return b.PolicyCheckResult(check.allowed, info, tuple(str(p) for p in check.problems))

    def policy_check(self, args: b.PolicySource) -> Deferred[b.PolicyCheckResult]:
        self._ready()
        return self._parse(args).addCallback(lambda parsed: self._check(args, parsed))

    def policy_load(self, args: b.PolicyLoadArgs) -> Deferred[b.PolicyLoadResult]:
        self._ready()
        if self.pool_policy is not None and args.source is not None:
            # Not under the policy lock: the committed record is applied through it.
            return self.pool_policy.propose(args.source)
        return self._policy_lock.run(self._load, args.source)

    def _load(self, source: b.PolicySource | None) -> Deferred[b.PolicyLoadResult]:
        previous = self._policy_info()
        if source is None:
            return self.daemon.reload_policy().addCallback(self._loaded, previous)
        return self._parse(source).addCallback(self._load_parsed, source, previous)

    def _load_parsed(
        self,
        parsed: tuple[Policy, b.PolicyFormat],
        source: b.PolicySource,
        previous: b.PolicyInfo,
    ) -> Deferred[b.PolicyLoadResult] | b.PolicyLoadResult:
        target = self.daemon.config.policy
        fmt = parsed[1]
        if target.suffix.lower() == ".xml" and fmt != "acm-xml":
            raise ControlError(
                ErrorCode.INVALID_ARGUMENT,
                f"the daemon reads its policy from {target} (ACM XML); send an ACM XML policy "
                "or point policy.path at a .toml file",
            )
        raw = source.text.encode("utf-8")
        if hashlib.sha256(raw).hexdigest() == self.daemon.loaded.sha256:
            return b.PolicyLoadResult(previous, previous)
        try:
            fd, tmp = tempfile.mkstemp(
                prefix=f".{target.name}.load.", suffix=target.suffix, dir=target.parent
            )
            with os.fdopen(fd, "wb") as f:
                f.write(raw)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o640)
        except OSError as exc:
            raise ControlError(
                ErrorCode.INTERNAL,
                f"cannot write the policy beside {target}: {exc.strerror or exc}; nothing changed",
            ) from None
        staged = Path(tmp)
        d = self.daemon.reload_policy(staged)
        d.addBoth(self._staged_done, staged, target)
        return d.addCallback(self._loaded, previous)

    def _staged_done(self, result: ReloadResult | Failure, staged: Path, target: Path) -> Any:
        """Keep the staged file as the configured policy if the daemon switched to it."""
        if isinstance(result, Failure) or not result.applied:
            staged.unlink(missing_ok=True)
            return result
        try:
            os.replace(staged, target)
            fsync_dir(target.parent)
        except OSError as exc:
            log.error(
                "policy applied but not saved as {target}: {error}; the next start uses the "
                "old file",
                target=str(target),
                error=exc.strerror or str(exc),
            )
            staged.unlink(missing_ok=True)
            return result
        self.daemon.loaded = attrs.evolve(self.daemon.loaded, path=target)
        return result

    def _loaded(self, result: ReloadResult, previous: b.PolicyInfo) -> b.PolicyLoadResult:
        if result.applied:
            return b.PolicyLoadResult(self._policy_info(), previous)
        if result.error is not None:
            raise ControlError(
                ErrorCode.POLICY_INVALID,
                f"the policy does not load: {result.error.splitlines()[0]}",
                {"problems": result.error.splitlines()[:200]},
            )
        if result.sha256 == previous.sha256:
            return b.PolicyLoadResult(previous, previous)  # unchanged: nothing to do
        raise ControlError(
            ErrorCode.POLICY_REJECTED,
            f"policy {result.new} rejected: the running system does not satisfy it "
            f"({len(result.problems)} reason(s)); {result.previous} stays",
            {"problems": list(result.problems)},
        )

    def policy_reset(self) -> Deferred[b.PolicyLoadResult]:
        """``xm resetpolicy``: the DEFAULT policy (`shyped.policy.acm_default`) through the
        path of `policy_load`, written in the configured file's format."""
        self._ready()
        return self._policy_lock.run(self._reset)

    def _reset(self) -> Deferred[b.PolicyLoadResult]:
        new = default_policy(self.daemon.engine.dom0_label())
        fmt: b.PolicyFormat = (
            "acm-xml" if self.daemon.config.policy.suffix.lower() == ".xml" else "toml"
        )
        text = acm_xml.dumps(new).decode() if fmt == "acm-xml" else toml_format.dumps(new)
        source = b.PolicySource(text, f"<{new.name} policy>", fmt)
        loaded = self._load_parsed((new, fmt), source, self._policy_info())
        return loaded if isinstance(loaded, Deferred) else succeed(loaded)
