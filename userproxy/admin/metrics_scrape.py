"""``/metrics`` without holding the loop: the per-Service-port families written in slices.

prometheus-client renders a registry in one synchronous call.  With 10 000 Services the
per-port families are some 170 000 samples (16 MB of text), and one scrape held the event
loop about 2 s (``python -m bench.status``): every connection of the node paused at each
scrape.  So the ``Metrics`` registry keeps the process-wide metrics, still rendered by
prometheus-client, and the families with a sample per Service port (``PORT_FAMILIES``,
``userproxy_endpoints`` and the ejection families) are computed and formatted here in
slices of at most ``SCRAPE_SLICE`` seconds (``Slicer``), yielding to the loop in between,
and the answer is streamed in pieces of about 200 KB (aiohttp compresses each as it goes
when the scraper asks for gzip).

The text is what prometheus-client itself writes for the same families, in the classic
text format and in OpenMetrics: the headers come from its encoder, the sample lines follow
its rules (labels sorted by name, values escaped and formatted with ``floatToGoString``);
tests/admin/test_metrics_scrape.py compares the two byte for byte.  ``name[]`` filters
both parts as prometheus-client's handler does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, cast

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from prometheus_client import utils
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from userproxy.metrics import PORT_FAMILIES, Metrics
from userproxy.slices import Slicer

if TYPE_CHECKING:
    from userproxy.control.endpoint_counts import EndpointCount
    from userproxy.dataplane.listener import PortTotals, TotalsKey
    from userproxy.dataplane.listener_set import ListenerSet
    from userproxy.dataplane.port_outliers import EjectionCounts

__all__ = [
    "SCRAPE_SLICE",
    "exposition",
    "exposition_pieces",
    "metrics_handler",
    "port_text",
    "port_text_now",
    "sample_value",
]

#: The longest stretch a scrape holds the loop (seconds).
SCRAPE_SLICE = 0.005
#: Listeners summed between two looks at the clock.
_LISTENERS_PER_TICK = 64
#: Lines joined into one piece of the answer (about 200 KB).
_LINES_PER_PIECE = 2048
_EOF = b"# EOF\n"

Encoder = Callable[[Collector], bytes]
#: prometheus-client's number format (``1.0``, ``1e+16``, ``NaN``), untyped there.
_go_string = cast("Callable[[float], str]", utils.floatToGoString)


class _One(Collector):
    """A collector of one family, for asking the encoder for that family's header."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


def _escape(value: str) -> str:
    if "\\" in value or "\n" in value or '"' in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


class _Family:
    """One family's header and the prefix and label order of its sample lines."""

    def __init__(
        self, family: Metric, labels: list[str], encoder: Encoder, openmetrics: bool
    ) -> None:
        header = encoder(_One(family))
        self.header = (header.removesuffix(_EOF) if openmetrics else header).decode()
        self.sample = family.name + ("_total" if family.type == "counter" else "")
        self.names = labels
        #: Positions of the label values in the order the lines list them (by name).
        self.order = sorted(range(len(labels)), key=labels.__getitem__)

    def line(self, values: list[str], value: float) -> str:
        names = self.names
        labels = ",".join(f'{names[i]}="{_escape(values[i])}"' for i in self.order)
        return f"{self.sample}{{{labels}}} {_go_string(value)}\n"


FamilyKind = type[CounterMetricFamily] | type[GaugeMetricFamily]
_PORT = ["service_port", "protocol"]
#: ``userproxy_endpoints``: the proxier's plans' endpoint counts.
_ENDPOINTS: tuple[FamilyKind, str, str, list[str]] = (
    GaugeMetricFamily,
    "userproxy_endpoints",
    "Endpoints of a Service port by state: ready, serving_terminating (not ready, serving "
    "and terminating: used only as a fallback), not_ready",
    [*_PORT, "state"],
)
#: Outlier ejection per TCP Service port, and per endpoint while it is ejected (only
#: ejected endpoints are listed: at most the ejectable share of each pool).
_EJECTIONS: tuple[tuple[FamilyKind, str, str, list[str]], ...] = (
    (CounterMetricFamily, "userproxy_endpoint_ejections",
     "Endpoints ejected by outlier detection (failed dials in a row), each time", _PORT),
    (GaugeMetricFamily, "userproxy_endpoints_ejected",
     "Endpoints ejected by outlier detection now", _PORT),
    (GaugeMetricFamily, "userproxy_endpoint_ejection_remaining_seconds",
     "Seconds until an ejected endpoint is tried again", [*_PORT, "endpoint"]),
)  # fmt: skip


async def _totals(listeners: ListenerSet, slicer: Slicer) -> dict[TotalsKey, PortTotals]:
    """``ListenerSet.totals()``, summed a few listeners at a time."""
    result = listeners.retired_totals()
    every = listeners.all_listeners()
    for start in range(0, len(every), _LISTENERS_PER_TICK):
        listeners.add_totals(result, every[start : start + _LISTENERS_PER_TICK])
        await slicer.check()
    return result


async def _ejections(listeners: ListenerSet, slicer: Slicer) -> EjectionCounts:
    """``ListenerSet.ejections()``, a few Service ports at a time."""
    result = listeners.ejections([])  # the ports gone
    ports = listeners.ejecting_ports()
    for start in range(0, len(ports), _LISTENERS_PER_TICK):
        listeners.ejections(ports[start : start + _LISTENERS_PER_TICK], result)
        await slicer.check()
    return result


async def _encoded(text: list[str], slicer: Slicer) -> list[bytes]:
    """``text`` joined and encoded a few thousand lines at a time (16 MB in one go held
    the loop about 30 ms)."""
    pieces = []
    for start in range(0, len(text), _LINES_PER_PIECE):
        pieces.append("".join(text[start : start + _LINES_PER_PIECE]).encode())
        await slicer.check()
    return pieces


def _lines(
    totals: dict[TotalsKey, PortTotals],
    counts: list[EndpointCount],
    ejections: EjectionCounts,
    encoder: Encoder,
    *,
    openmetrics: bool,
    wanted: set[str] | None,
) -> Iterator[str | None]:
    """The per-port families' lines, headers included (even for no sample); ``None``
    after each port is a point where the caller may yield to the loop.  ``wanted``
    (``name[]``) keeps only the families with a sample of one of those names."""

    def family(metric: Metric, labels: list[str]) -> _Family | None:
        made = _Family(metric, labels, encoder, openmetrics)
        return None if wanted is not None and made.sample not in wanted else made

    for spec in PORT_FAMILIES:
        if (made := family(spec.family(), spec.labels)) is not None:
            yield made.header
            for (service_port, protocol), port in totals.items():
                if spec.protocol in (None, protocol):
                    for extra, value in spec.samples(port):
                        yield made.line([service_port, protocol, *extra], value)
                yield None
    kind, name, text, labels = _ENDPOINTS
    if (made := family(kind(name, text, labels=labels), labels)) is not None:
        yield made.header
        for endpoints in counts:
            port_name, protocol = endpoints.service_port, str(endpoints.spn.protocol)
            for state, value in endpoints.by_state():
                yield made.line([port_name, protocol, state], value)
            yield None
    for index, (kind, name, text, labels) in enumerate(_EJECTIONS):
        if (made := family(kind(name, text, labels=labels), labels)) is None:
            continue
        yield made.header
        for (port_name, protocol), (count, ejected) in ejections.items():
            if index == 0:  # ejections so far
                yield made.line([port_name, protocol], count)
            elif index == 1:  # ejected now
                yield made.line([port_name, protocol], len(ejected))
            else:  # each ejected endpoint's time left
                for ejection in ejected:
                    yield made.line(
                        [port_name, protocol, str(ejection.endpoint)], ejection.remaining
                    )
            yield None


async def port_text(
    listeners: ListenerSet | None,
    counts: Callable[[], Iterable[EndpointCount]] | None,
    encoder: Encoder,
    openmetrics: bool,
    wanted: set[str] | None = None,
) -> list[str]:
    """The per-port families' text, built in slices (``_lines``)."""
    slicer = Slicer(every=32, seconds=SCRAPE_SLICE)
    totals = await _totals(listeners, slicer) if listeners is not None else {}
    ejections = await _ejections(listeners, slicer) if listeners is not None else {}
    out: list[str] = []
    lines = _lines(
        totals, _counts(counts), ejections, encoder, openmetrics=openmetrics, wanted=wanted
    )
    for line in lines:
        if line is None:
            await slicer.tick()
        else:
            out.append(line)
    return out


def port_text_now(
    listeners: ListenerSet | None,
    counts: Callable[[], Iterable[EndpointCount]] | None,
    encoder: Encoder,
    openmetrics: bool = False,
) -> list[str]:
    """``port_text`` in one go, for tests and tools that cannot await (never the route)."""
    totals = listeners.totals() if listeners is not None else {}
    ejections = listeners.ejections() if listeners is not None else {}
    lines = _lines(
        totals, _counts(counts), ejections, encoder, openmetrics=openmetrics, wanted=None
    )
    return [line for line in lines if line is not None]


def _counts(counts: Callable[[], Iterable[EndpointCount]] | None) -> list[EndpointCount]:
    return [] if counts is None else list(counts())


def sample_value(metrics: Metrics, name: str, labels: Mapping[str, str]) -> float | None:
    """One per-port sample's value now, like ``CollectorRegistry.get_sample_value`` (tests)."""
    encoder, _ = choose_encoder("")
    text = "".join(port_text_now(metrics.listeners, metrics.endpoint_counts, encoder))
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


async def exposition_pieces(
    metrics: Metrics, accept: str = "", names: list[str] | None = None
) -> tuple[list[bytes], str]:
    """The whole scrape in pieces, and its content type, as ``Accept: accept`` asks
    (prometheus-client's negotiation); ``names`` keeps only those samples' families
    (``name[]``).  Built in slices: no piece of the work holds the loop long."""
    encoder, content_type = choose_encoder(accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    registry = metrics.registry.restricted_registry(names) if names else metrics.registry
    head = encoder(registry)
    slicer = Slicer(every=1, seconds=SCRAPE_SLICE)
    text = await port_text(
        metrics.listeners,
        metrics.endpoint_counts,
        encoder,
        openmetrics,
        set(names) if names else None,
    )
    pieces = [head.removesuffix(_EOF) if openmetrics else head, *await _encoded(text, slicer)]
    if openmetrics:
        pieces.append(_EOF)
    return pieces, content_type


async def exposition(
    metrics: Metrics, accept: str = "", names: list[str] | None = None
) -> tuple[bytes, str]:
    """``exposition_pieces`` joined (tests and tools; the route streams the pieces)."""
    pieces, content_type = await exposition_pieces(metrics, accept, names)
    return b"".join(pieces), content_type


def metrics_handler(metrics: Metrics) -> Handler:
    """The ``/metrics`` route: ``exposition_pieces`` streamed (each write waits for the
    client to take the last), compressed by aiohttp as the client allows."""

    async def handle(request: web.Request) -> web.StreamResponse:
        pieces, content_type = await exposition_pieces(
            metrics,
            ",".join(request.headers.getall(hdrs.ACCEPT, [])),
            request.query.getall("name[]", []),
        )
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_compression()
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    return handle
