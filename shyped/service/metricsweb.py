"""The metrics HTTP endpoint (edge code): who may scrape, and what a scraper may hold.

Access follows Prometheus' exporter web config (exporter-toolkit): HTTP basic auth against
bcrypt hashes (`basic_auth_users`) and/or a bearer token read from a root-only file, TLS
optional (a certificate and key, served by Twisted's TLS transport). `load_access` reads and
checks those files (the key and the token must be owned by root, or by the user the daemon runs
as, and readable by nobody else); `shyped check` and the start refuse anything else with a
clear message. Twisted's `HTTPAuthSessionWrapper` answers a request without valid credentials
with 401 before any resource below it is looked up, so the collector never runs for it.
bcrypt runs on the reactor's thread pool, one check at a time, and a successful
(user, password) pair is remembered, so neither a scrape nor a guesser stalls the reactor.

Budgets: `BudgetedFactory` (a `twisted.protocols.policies.WrappingFactory`) refuses a
connection past `max_connections` in total or `max_connections_per_peer` per peer (the uid
owning the client's socket, `shyped.service.peeruid`; its address where that is unknown) by
returning None from `buildProtocol` (Twisted then closes the accepted socket at once), gives
each connection `connection_timeout` seconds to live (`TimeoutMixin`, never reset: a slow
client cannot hold a slot) besides the site's idle timeout, and stops accepting (`stopReading`
on the listening port) while fewer than `fd_reserve` descriptors of the process's
``RLIMIT_NOFILE`` are left, so the enforcer's child processes and the control socket always
find descriptors. `raise_nofile_limit` lifts the soft limit to the hard one at start.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import resource
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
import bcrypt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from twisted.cred import credentials as cred_credentials
from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, ssl, threads
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.protocols import policies
from twisted.web.guard import BasicCredentialFactory, HTTPAuthSessionWrapper
from twisted.web.iweb import ICredentialFactory
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site
from twisted.web.wsgi import WSGIResource
from zope.interface import implementer  # type: ignore[import-untyped]

from shyped.service.config import ConfigError, MetricsConfig, loopback_problem
from shyped.service.metricstext import metrics_app
from shyped.service.peeruid import PeerUids

_log = Logger(namespace="shyped.metrics")

#: Largest token or PEM file read.
MAX_SECRET_BYTES = 64 * 1024
REALM = b"shyped"


# ---- the credentials files ------------------------------------------------------------------


def read_secret_file(path: Path, what: str) -> bytes:
    """The bytes of `path`, which must be a regular file owned by root (or by this process's
    user) that neither its group nor others may read or write."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{what} {path}: not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(
                f"{what} {path}: owned by uid {st.st_uid}; it must be owned by root "
                "(chown root: it; chmod 600 it)"
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{what} {path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read or "
                "change it; it must be readable by root only (chmod 600 it)"
            )
        if st.st_size > MAX_SECRET_BYTES:
            raise ConfigError(f"{what} {path}: larger than {MAX_SECRET_BYTES} bytes")
        return os.read(fd, MAX_SECRET_BYTES + 1)[:MAX_SECRET_BYTES]
    finally:
        os.close(fd)


@attrs.frozen
class MetricsAccess:
    """Who may scrape: `users` (name -> bcrypt hash), `token`, and the TLS context (or None)."""

    users: dict[bytes, bytes] = attrs.field(factory=dict)
    token: bytes | None = None
    tls: Any = None  # twisted.internet.ssl.CertificateOptions
    unauthenticated: bool = False


def _tls_options(cert_path: Path, cert: bytes, key_path: Path, key: bytes) -> Any:
    """Twisted's `CertificateOptions` for the PEM certificate chain (leaf first) and its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        chain = x509.load_pem_x509_certificates(cert)
        private = load_pem_private_key(key, password=None)
        options = ssl.CertificateOptions(
            privateKey=private,  # type: ignore[arg-type]  # pyOpenSSL takes cryptography's
            certificate=chain[0],  # type: ignore[arg-type]
            extraCertChain=chain[1:] or None,  # type: ignore[arg-type]
        )
        options.getContext()  # the key must match the certificate
    except Exception as exc:  # cryptography's and OpenSSL's errors have no common base
        raise ConfigError(
            f"metrics.tls_server_config: {cert_path} and {key_path} are not a PEM certificate "
            f"(chain) and its unencrypted key: {exc}"
        ) from None
    return options


def load_access(config: MetricsConfig) -> MetricsAccess:
    """Read the bearer token and TLS files `config` names (a `ConfigError` says what is wrong)."""
    if not config.authenticated and not config.allow_unauthenticated:
        raise ConfigError(
            "[metrics] has no access control: set basic_auth_users and/or bearer_token_file, "
            "or allow_unauthenticated = true"
        )
    token = None
    if config.bearer_token_file is not None:
        token = read_secret_file(config.bearer_token_file, "metrics.bearer_token_file").strip()
        if len(token) < 16:
            raise ConfigError(
                f"metrics.bearer_token_file {config.bearer_token_file}: the token must have at "
                "least 16 characters (e.g. openssl rand -hex 32)"
            )
        if not token.isascii() or any(c in token for c in b" \t\r\n"):
            raise ConfigError(
                f"metrics.bearer_token_file {config.bearer_token_file}: the token must be one "
                "line of printable ASCII without spaces"
            )
    tls = None
    if config.tls_cert_file is not None and config.tls_key_file is not None:
        key = read_secret_file(config.tls_key_file, "metrics.tls_server_config.key_file")
        try:
            cert = config.tls_cert_file.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"metrics.tls_server_config.cert_file {config.tls_cert_file}: cannot read: "
                f"{exc.strerror}"
            ) from None
        tls = _tls_options(config.tls_cert_file, cert, config.tls_key_file, key)
    users = {u.encode(): h.encode() for u, h in config.basic_auth_users}
    return MetricsAccess(users, token, tls, not config.authenticated)


# ---- authentication -------------------------------------------------------------------------


class IBearerToken(cred_credentials.ICredentials):
    """An ``Authorization: Bearer <token>`` header's token."""


@implementer(IBearerToken)
@attrs.frozen
class BearerToken:
    token: bytes


@implementer(ICredentialFactory)
class BearerCredentialFactory:
    """`twisted.web.guard`'s factory interface for ``Authorization: Bearer``."""

    scheme = b"bearer"

    def getChallenge(self, request: Any) -> dict[bytes, bytes]:
        return {b"realm": REALM}

    def decode(self, response: bytes, request: Any) -> BearerToken:
        token = response.strip()
        if not token:
            raise cred_error.LoginFailed("empty bearer token")
        return BearerToken(token)


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


@implementer(ICredentialsChecker)
class MetricsChecker:
    """Checks basic-auth passwords against bcrypt hashes off the reactor thread (one at a time;
    an unknown user costs a bcrypt check too) and bearer tokens in constant time."""

    credentialInterfaces = (cred_credentials.IUsernamePassword, IBearerToken)

    def __init__(self, access: MetricsAccess, reactor: Any) -> None:
        self.access = access
        self.reactor = reactor
        self._token = None if access.token is None else _digest(access.token)
        self._one = defer.DeferredSemaphore(1)
        self._good: set[bytes] = set()  # digests of (user, password) pairs that passed
        cost = next(iter(access.users.values()), b"$2b$04$").split(b"$")[2]
        self._dummy = bcrypt.hashpw(b"-", bcrypt.gensalt(int(cost))) if access.users else b""

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes]:
        if IBearerToken.providedBy(credentials):
            given = _digest(credentials.token)
            if self._token is not None and hmac.compare_digest(given, self._token):
                return defer.succeed(b"bearer")
            return defer.fail(cred_error.UnauthorizedLogin())
        user: bytes = credentials.username
        password: bytes = credentials.password
        key = _digest(len(user).to_bytes(4, "big") + user + password)
        if key in self._good:
            return defer.succeed(user)
        hashed = self.access.users.get(user)
        if not self.access.users:
            return defer.fail(cred_error.UnauthorizedLogin())

        def check() -> bool:
            try:
                return bcrypt.checkpw(password, hashed or self._dummy) and hashed is not None
            except ValueError:  # a password over bcrypt's 72 bytes, a malformed hash
                return False

        def decided(ok: bool) -> bytes:
            if not ok:
                raise cred_error.UnauthorizedLogin()
            if len(self._good) < 64:
                self._good.add(key)
            return user

        pool = self.reactor.getThreadPool()
        run: Any = threads.deferToThreadPool
        d: defer.Deferred[bool] = self._one.run(run, self.reactor, pool, check)
        return d.addCallback(decided)


@implementer(IRealm)
@attrs.frozen
class _Realm:
    resource: Any

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Any:
        if IResource not in interfaces:
            raise NotImplementedError()
        return IResource, self.resource, lambda: None


def protect(resource: Any, access: MetricsAccess, reactor: Any) -> Any:
    """`resource` behind basic and/or bearer authentication (unchanged when unauthenticated)."""
    if access.unauthenticated:
        return resource
    factories: list[Any] = []
    if access.users:
        basic: Any = BasicCredentialFactory  # untyped
        factories.append(basic(REALM.decode()))
    if access.token is not None:
        factories.append(BearerCredentialFactory())
    realm: Any = _Realm(resource)
    checker: Any = MetricsChecker(access, reactor)
    wrapper: Any = HTTPAuthSessionWrapper  # untyped
    return wrapper(Portal(realm, [checker]), factories)


# ---- the site -------------------------------------------------------------------------------


class _Index(Resource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")  # type: ignore[no-untyped-call]
        return b"shyped metrics: /metrics\n"


class _QuietSite(Site):
    """A site that does not write an access log line per scrape."""

    def log(self, request: Any) -> None:
        pass


def check_loopback(address: str) -> None:
    """Refuse anything but a loopback IP address: the series name domains, labels, uuids
    (`shyped.service.config.loopback_problem`, which the configuration is checked with)."""
    why = loopback_problem(address)
    if why is not None:
        raise ValueError(why)


def metrics_site(
    reactor: Any,
    registry: CollectorRegistry,
    access: MetricsAccess | None = None,
    *,
    idle_timeout: float = 10.0,
) -> Site:
    """``/metrics`` served by `shyped.service.metricstext.metrics_app` (cached per-domain text,
    prometheus_client's negotiation and encoders) on the reactor's thread pool, behind
    `access` (None: open to every client)."""
    root = Resource()  # type: ignore[no-untyped-call]
    app = metrics_app(registry)
    wsgi: Any = WSGIResource(reactor, reactor.getThreadPool(), app)  # type: ignore[no-untyped-call]
    index: Any = _Index()  # type: ignore[no-untyped-call]
    root.putChild(b"metrics", wsgi)
    root.putChild(b"", index)
    top = root if access is None else protect(root, access, reactor)
    site = _QuietSite(top, timeout=idle_timeout)  # type: ignore[no-untyped-call]
    site.noisy = False
    return site


# ---- descriptor and connection budgets ------------------------------------------------------


def open_fds() -> int:
    """Descriptors this process holds now (0 where ``/proc/self/fd`` is not there)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir held
    except OSError:
        return 0


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_nofile_limit() -> tuple[int, int]:
    """Lift the soft ``RLIMIT_NOFILE`` to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as exc:
        _log.warn("cannot raise the descriptor limit to {hard}: {error}", hard=hard, error=exc)
        return soft, hard
    return hard, hard


class FdBudget:
    """Whether the process is within `reserve` descriptors of its soft limit. Counting
    ``/proc/self/fd`` costs a directory read, so between counts (at most `interval` s apart)
    every accepted connection is assumed to add one: the estimate only errs high."""

    def __init__(
        self,
        reserve: int,
        *,
        limit: Callable[[], int] = nofile_limit,
        count: Callable[[], int] = open_fds,
        clock: Callable[[], float] = time.monotonic,
        interval: float = 1.0,
    ) -> None:
        self.reserve = reserve
        self._limit = limit
        self._count = count
        self._clock = clock
        self.interval = interval
        self._measured = 0
        self._since = 0
        self._at = -float("inf")

    @property
    def threshold(self) -> int:
        return self._limit() - self.reserve

    def measure(self) -> int:
        self._measured, self._since, self._at = self._count(), 0, self._clock()
        return self._measured

    def exhausted(self, accepting: int = 0) -> bool:
        """True when the descriptors in use (and `accepting` more) reach the threshold."""
        estimate = self._measured + self._since + accepting
        if estimate >= self.threshold or self._clock() - self._at >= self.interval:
            estimate = self.measure() + accepting
        self._since += accepting
        return estimate >= self.threshold


class _Guarded(policies.ProtocolWrapper, policies.TimeoutMixin):
    """One connection: its peer is counted, and it is aborted `lifetime` seconds after it
    was accepted, whatever it sends (the timer is never reset)."""

    factory: BudgetedFactory
    peer: str = ""

    def makeConnection(self, transport: Any) -> None:
        wrapper: Any = super()
        wrapper.makeConnection(transport)
        timeout: Any = self.setTimeout
        timeout(self.factory.lifetime)

    def timeoutConnection(self) -> None:
        self.factory.refused["lifetime"] += 1
        transport: Any = self.transport
        transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        timeout: Any = self.setTimeout
        timeout(None)
        wrapper: Any = super()
        wrapper.connectionLost(reason)


class BudgetedFactory(policies.WrappingFactory):
    """Wraps the site: total and per-peer connection caps, a lifetime per connection, and the
    descriptor reserve (the listening port stops reading until descriptors are free again)."""

    protocol = _Guarded
    noisy = False

    def __init__(
        self, site: Any, config: MetricsConfig, reactor: Any, budget: FdBudget | None = None
    ) -> None:
        """`site`: the HTTP site, or a TLS factory wrapping it."""
        init: Any = super().__init__
        init(site)
        self.reactor = reactor
        self.max_total = config.max_connections
        self.max_per_peer = config.max_connections_per_peer
        self.lifetime = config.connection_timeout
        self.budget = budget if budget is not None else FdBudget(config.fd_reserve)
        self.uids = PeerUids()
        self.per_peer: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self.port: Any = None  # IListeningPort, set by `start_metrics_server`
        self.paused = False
        self._resume: Any = None
        self._logged: dict[str, float] = {}

    def peer_of(self, addr: Any) -> str:
        """``uid N`` for a client on this host (the owner of its socket), else its address."""
        host = str(getattr(addr, "host", addr))
        local = None if self.port is None else self.port.getHost()
        if local is not None and hasattr(addr, "port"):
            uid = self.uids.uid((host, addr.port), (local.host, local.port))
            if uid is not None:
                return f"uid {uid}"
        return host

    def buildProtocol(self, addr: Any) -> Any:
        peer = self.peer_of(addr)
        if len(self.protocols) >= self.max_total:
            self._refuse("total", f"{len(self.protocols)} connections, max_connections")
            return None
        if self.per_peer[peer] >= self.max_per_peer:
            self._refuse("peer", f"{peer} holds {self.per_peer[peer]}, max_connections_per_peer")
            return None
        if self.budget.exhausted(accepting=1):
            self.refused["descriptors"] += 1
            self._pause()
            return None
        p: Any = super().buildProtocol(addr)
        if p is not None:
            p.peer = peer
            self.per_peer[peer] += 1
        return p

    def _refuse(self, reason: str, what: str) -> None:
        """Count a refusal; log it at most once a minute per reason."""
        self.refused[reason] += 1
        now = self.reactor.seconds()
        if now - self._logged.get(reason, -float("inf")) >= 60:
            self._logged[reason] = now
            _log.warn(
                "metrics endpoint: {what}: refusing connections ({n} so far)",
                what=what,
                n=self.refused[reason],
            )

    def unregisterProtocol(self, p: Any) -> None:
        unregister: Any = super().unregisterProtocol
        unregister(p)
        peer = getattr(p, "peer", "")
        if self.per_peer[peer] <= 1:
            self.per_peer.pop(peer, None)
        else:
            self.per_peer[peer] -= 1

    def _pause(self) -> None:
        if self.paused or self.port is None:
            return
        self.paused = True
        self.port.stopReading()
        _log.warn(
            "metrics endpoint: {count} descriptors open, within {reserve} of the limit "
            "{limit}: not accepting connections until some are free",
            count=self.budget.measure(),
            reserve=self.budget.reserve,
            limit=self.budget.threshold + self.budget.reserve,
        )
        self._resume = self.reactor.callLater(0.5, self._try_resume)

    def _try_resume(self) -> None:
        self._resume = None
        if self.port is None:
            return
        self.budget.measure()
        if self.budget.exhausted():
            self._resume = self.reactor.callLater(0.5, self._try_resume)
            return
        self.paused = False
        self.port.startReading()
        _log.info("metrics endpoint: accepting connections again")

    def doStop(self) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        self.uids.close()
        stop: Any = super().doStop
        stop()


class ConnectionCollector(Collector):
    """``shyped_metrics_http_*``: the endpoint's own connections and refusals."""

    def __init__(self, factory: BudgetedFactory) -> None:
        self.factory = factory

    def collect(self) -> Iterable[Metric]:
        f = self.factory
        open_ = GaugeMetricFamily(
            "shyped_metrics_http_connections", "Connections the metrics endpoint holds now."
        )
        open_.add_metric([], len(f.protocols))
        refused = CounterMetricFamily(
            "shyped_metrics_http_refused_connections",
            "Connections the metrics endpoint closed at once or cut (total or per-peer cap, "
            "descriptor reserve, lifetime).",
            labels=["reason"],
        )
        for reason in ("total", "peer", "descriptors", "lifetime"):
            refused.add_metric([reason], f.refused[reason])
        paused = GaugeMetricFamily(
            "shyped_metrics_http_paused",
            "1 while the endpoint does not accept connections (descriptor reserve reached).",
        )
        paused.add_metric([], 1 if f.paused else 0)
        return [open_, refused, paused]

    def describe(self) -> Iterable[Metric]:
        return []


def start_metrics_server(
    reactor: Any,
    config: MetricsConfig,
    registry: CollectorRegistry,
    access: MetricsAccess | None = None,
) -> IListeningPort:
    """Listen on ``config.address:config.port`` (loopback only; port 0 picks a free one), over
    TLS when configured, with `access` (default: `load_access(config)`) and the budgets."""
    check_loopback(config.address)
    if access is None:
        access = load_access(config)
    site: Any = metrics_site(reactor, registry, access, idle_timeout=config.idle_timeout)
    if access.tls is not None:  # TLS inside the budgets: a refused client costs no handshake
        from twisted.protocols.tls import TLSMemoryBIOFactory

        site = TLSMemoryBIOFactory(access.tls, False, site)
    factory = BudgetedFactory(site, config, reactor)
    port: Any = reactor.listenTCP(config.port, factory, interface=config.address)
    factory.port = port
    return port  # type: ignore[no-any-return]
