"""Transport security and authentication for the etcd client (docs/pool.md, "Deployment").

`EtcdSecurity` holds what etcd's own documentation asks a client for: the CA that signed the
members' certificates (``--trusted-ca-file`` on the members), a client certificate and key
(members run with ``--client-cert-auth``), and a user and password when etcd's role-based
access control is on (``etcdctl auth enable``: the client trades them for a token at
``/v3/auth/authenticate`` and sends it in the ``Authorization`` header). The files are read
once at start (bounded, regular files only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
from twisted.internet import ssl
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer  # type: ignore[import-untyped]

from shyped.fileio.boundedread import read_bounded

_PEM_MAX = 1024 * 1024


@attrs.frozen
class EtcdSecurity:
    ca_pem: bytes | None = None
    cert_pem: bytes | None = None
    key_pem: bytes | None = None
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def from_files(
        cls,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        user: str | None = None,
        password_file: Path | None = None,
    ) -> EtcdSecurity:
        """Read the files (`OSError` says which cannot be read)."""

        def read(path: Path | None, what: str) -> bytes | None:
            return None if path is None else read_bounded(path, _PEM_MAX, what)

        password = read(password_file, "etcd password")
        return cls(
            ca_pem=read(ca_file, "etcd CA certificate"),
            cert_pem=read(cert_file, "etcd client certificate"),
            key_pem=read(key_file, "etcd client key"),
            user=user,
            password=None if password is None else password.decode().rstrip("\n"),
        )


@implementer(IPolicyForHTTPS)
class _ClientTLS:
    """Every https endpoint: verified against the CA, with the client certificate if any."""

    def __init__(self, security: EtcdSecurity) -> None:
        if security.ca_pem is None:
            raise ValueError("https endpoints need the CA certificate (pool.ca_file)")
        self._trust = ssl.Certificate.loadPEM(security.ca_pem)
        self._client: Any = None
        if security.cert_pem is not None and security.key_pem is not None:
            self._client = ssl.PrivateCertificate.loadPEM(  # type: ignore[no-untyped-call]
                security.cert_pem + b"\n" + security.key_pem
            )

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return ssl.optionsForClientTLS(
            hostname.decode("ascii"), trustRoot=self._trust, clientCertificate=self._client
        )


def make_agent(reactor: Any, pool: Any, timeout: float, security: EtcdSecurity | None) -> Any:
    """A twisted.web Agent for the endpoints: TLS-verified when `security` has a CA."""
    kwargs: dict[str, Any] = {"pool": pool, "connectTimeout": timeout}
    if security is not None and security.ca_pem is not None:
        kwargs["contextFactory"] = _ClientTLS(security)
    return Agent(reactor, **kwargs)  # type: ignore[no-untyped-call]
