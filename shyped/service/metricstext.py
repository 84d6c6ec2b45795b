"""The exposition text of a scrape, with every domain's samples rendered once (scrape thread).

prometheus_client formats every sample of every scrape; at thousands of domains that was 90%
of a scrape. Here the per-domain samples (`shyped.service.metricsfamilies.DOMAIN_FAMILIES`
and `METERING_FAMILIES`) are rendered into exposition lines per domain and kept while the
domain's account (the same object: `shyped.core.accounting.AccountCache` keeps unchanged
accounts) and its metering values (equal) stay the same; a scrape joins the cached lines. The
rest — the daemon's own families, the quota table, and every other collector of the registry
(process, audit, the endpoint's own) — is formatted by prometheus_client's own encoder, chosen
by its own content negotiation (`choose_encoder`: the Prometheus text format, or OpenMetrics
when the scraper asks for it, as Prometheus does). The result is byte for byte what
``generate_latest`` / OpenMetrics' ``generate_latest`` make of the same registry (tested).

`metrics_app` is the WSGI application the endpoint serves: the fast path for ``GET``, and
prometheus_client's own ``make_wsgi_app`` for the rest (``name[]`` filtered scrapes, other
methods).
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import make_wsgi_app
from prometheus_client.core import Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from shyped.core.accounting import DomainAccount
from shyped.core.metering import DomainMeter
from shyped.service.metrics import MetricsSnapshot
from shyped.service.metricsfamilies import MetricsRegistry, head_families, tail_families
from shyped.service.metricsrows import (
    DOMAIN_FAMILIES,
    METERING_FAMILIES,
    FamilySpec,
    Row,
    Rows,
    domain_rows,
    metering_rows,
    sample_name,
)

Encoder = Callable[[Collector], bytes]
Chunks = tuple[bytes, ...]
_EOF = b"# EOF\n"
#: gzip level for compressed answers: 1 compresses the repetitive exposition text several times
#: at a fraction of the default level's (9) time.
GZIP_LEVEL = 1


class _Families(Collector):
    """A collector over fixed families, for prometheus_client's encoders."""

    def __init__(self, fams: Iterable[Metric]) -> None:
        self._fams = list(fams)

    def collect(self) -> Iterable[Metric]:
        return self._fams


def _encode(encoder: Encoder, fams: Iterable[Metric]) -> bytes:
    """`fams` in `encoder`'s format, without OpenMetrics' closing ``# EOF``."""
    return encoder(_Families(fams)).removesuffix(_EOF)


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _lines(name: str, rows: Sequence[Row]) -> bytes:
    """The exposition lines of `rows` (the same in both formats for our legacy-valid names:
    labels sorted by name, values as prometheus_client's ``floatToGoString``)."""
    out = []
    for labels, value in rows:
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(labels))
        out.append(f"{name}{{{inner}}} {floatToGoString(value)}\n")  # type: ignore[no-untyped-call]
    return "".join(out).encode()


def _render(specs: Sequence[FamilySpec], rows: Rows) -> Chunks:
    return tuple(_lines(sample_name(s), r) for s, r in zip(specs, rows, strict=True))


class DomainText:
    """Per-domain exposition lines, re-rendered only for domains whose values changed.

    Reads and swaps whole dictionaries only, so concurrent scrapes (pool threads) see either
    the old or the new cache, never a half-updated one."""

    def __init__(self) -> None:
        self._accounts: dict[int, tuple[DomainAccount, Chunks]] = {}
        self._metering: dict[int, tuple[DomainMeter, Chunks]] = {}
        self._headers: dict[str, tuple[Chunks, Chunks]] = {}
        self._last: tuple[MetricsSnapshot, str, bytes] | None = None
        self._joined: Joined | None = None
        #: the format and accounts of the last render, and their families' text (headers too)
        self._steady: tuple[str, tuple[DomainAccount, ...] | None, list[bytes]] = ("", None, [])
        self.rendered = 0  # domains rendered so far (tests, benchmarks)

    def _headers_for(self, content_type: str, encoder: Encoder) -> tuple[Chunks, Chunks]:
        """Each per-domain family's HELP/TYPE lines in this format (made by the encoder)."""
        got = self._headers.get(content_type)
        if got is None:

            def heads(specs: Sequence[FamilySpec]) -> Chunks:
                return tuple(_encode(encoder, [Metric(n, doc, k)]) for n, k, doc, _ in specs)

            got = (heads(DOMAIN_FAMILIES), heads(METERING_FAMILIES))
            self._headers = {**self._headers, content_type: got}
        return got

    def shyped_text(self, snap: MetricsSnapshot, content_type: str, encoder: Encoder) -> bytes:
        """Everything the shyped collector exposes for `snap`, in the negotiated format."""
        last = self._last
        if last is not None and last[0] is snap and last[1] == content_type:
            return last[2]
        heads, mheads = self._headers_for(content_type, encoder)
        parts = [_encode(encoder, head_families(snap))]
        steady = self._steady
        if snap.host is not None and steady[0] == content_type and snap.host.domains == steady[1]:
            # the same accounts as last time (compared in C, by identity first): same text
            parts.extend(steady[2])
            if snap.metering is not None:
                parts.extend(_join(mheads, self._metering_chunks(snap.metering)))
        elif snap.host is not None:
            old, fresh = self._accounts, {}
            chunks: list[Chunks] = []
            changed = False
            for acc in snap.host.domains:
                hit = old.get(acc.domid)
                if hit is not None and hit[0] is acc:
                    text = hit[1]
                else:
                    text = _render(DOMAIN_FAMILIES, domain_rows(acc))
                    self.rendered += 1
                    changed = True
                fresh[acc.domid] = (acc, text)
                chunks.append(text)
            self._accounts = fresh
            self._joined, bodies = _joined(self._joined, changed, tuple(fresh), chunks)
            domain_parts = [x for pair in zip(heads, bodies, strict=True) for x in pair]
            self._steady = (content_type, snap.host.domains, domain_parts)
            parts.extend(domain_parts)
            if snap.metering is not None:
                parts.extend(_join(mheads, self._metering_chunks(snap.metering)))
        parts.append(_encode(encoder, tail_families(snap)))
        body = b"".join(parts)
        self._last = (snap, content_type, body)
        return body

    def _metering_chunks(self, samples: Sequence[DomainMeter]) -> list[Chunks]:
        old, fresh = self._metering, {}
        out: list[Chunks] = []
        for c in samples:
            hit = old.get(c.domid)
            text = hit[1] if hit is not None and hit[0] == c else None
            if text is None:
                text = _render(METERING_FAMILIES, metering_rows(c))
            fresh[c.domid] = (c, text)
            out.append(text)
        self._metering = fresh
        return out


Joined = tuple[tuple[int, ...], list[bytes]]


def _joined(
    last: Joined | None, changed: bool, order: tuple[int, ...], chunks: Sequence[Chunks]
) -> tuple[Joined, list[bytes]]:
    """Every domain's lines of each family, joined: the last join again when no domain was
    rendered anew and the domains are the same, in the same order (a steady host)."""
    if not changed and last is not None and last[0] == order:
        return last, last[1]
    width = len(chunks[0]) if chunks else len(DOMAIN_FAMILIES)
    bodies = [b"".join(c[i] for c in chunks) for i in range(width)]
    return (order, bodies), bodies


def _join(heads: Chunks, chunks: Sequence[Chunks]) -> Iterator[bytes]:
    """Family by family: its header, then every domain's lines of it."""
    for i, head in enumerate(heads):
        yield head
        yield b"".join(c[i] for c in chunks)


class Exposition:
    """The scrape of `registry`, its `MetricsCollector` served from `DomainText`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.text = DomainText()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The body and its content type for an ``Accept`` header (prometheus_client's
        negotiation); a registry other than a `MetricsRegistry` is all prometheus_client's."""
        encoder, content_type = choose_encoder(accept or "")
        registry = self.registry
        if not isinstance(registry, MetricsRegistry):
            return encoder(registry), content_type
        ours = self.text.shyped_text(registry.shyped.get_snapshot(), content_type, encoder)
        return ours + encoder(registry.others()), content_type


def metrics_app(registry: CollectorRegistry) -> Callable[..., Any]:
    """The WSGI app of ``/metrics``: `Exposition` for a plain ``GET``, prometheus_client's
    ``make_wsgi_app`` for everything else (``name[]`` filters, ``OPTIONS``, other methods)."""
    library = make_wsgi_app(registry)
    exposition = Exposition(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        params = parse_qs(environ.get("QUERY_STRING", ""))
        if environ["REQUEST_METHOD"] != "GET" or "name[]" in params:
            answer: list[bytes] = library(environ, start_response)
            return answer
        body, content_type = exposition.render(environ.get("HTTP_ACCEPT"))
        headers = [("Content-Type", content_type)]
        if gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING", "")):
            body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app
