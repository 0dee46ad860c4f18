"""Prometheus metrics: kube-proxy's core set under its own names, plus ``userproxy_*``.

One ``Metrics`` object owns its ``CollectorRegistry`` (never the global one).  The data path
keeps plain integer counters, read by a collector at scrape time, so the hot path pays an
integer add, not a lock; ``PORT_FAMILIES`` says which counter feeds which family.  Labels
stay bounded (service port ``namespace/name:port``, protocol, reason...): never a client
address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from userproxy.control.endpoint_counts import EndpointCount
    from userproxy.control.proxier import SyncStatus
    from userproxy.control.trackers import ChangeRecorder
    from userproxy.dataplane.listener import PortTotals
    from userproxy.dataplane.listener_set import ListenerSet

#: kube-proxy's sync duration buckets: from 1 ms, doubling, 15 of them.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
#: network_programming_duration_seconds: 0.25 s steps to 1 s, then 1 s to 60 s, 5 s to
#: 120 s, 30 s to 300 s (as upstream merges its linear buckets).
PROGRAMMING_BUCKETS = (0.25, 0.5, *range(1, 60), *range(60, 120, 5), *range(120, 301, 30))
#: Event-loop lag: a healthy loop is in the first buckets; anything past 0.1 s is a stall
#: every connection of the process felt.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        #: Where /metrics reads the per-port families (``watch``, ``watch_endpoints``).
        self.listeners: ListenerSet | None = None
        self.endpoint_counts: Callable[[], Iterable[EndpointCount]] | None = None
        r = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            buckets=SYNC_BUCKETS,
            registry=r,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            registry=r,
        )
        self.programming = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency in seconds",
            buckets=PROGRAMMING_BUCKETS,
            registry=r,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            ["traffic_policy"],
            registry=r,
        )
        for policy in ("internal", "external"):
            self.no_local_endpoints.labels(policy).set(0)
        self.healthz = Counter(
            "kubeproxy_proxy_healthz", "Cumulative proxy healthz HTTP status", ["code"], registry=r
        )
        self.livez = Counter(
            "kubeproxy_proxy_livez", "Cumulative proxy livez HTTP status", ["code"], registry=r
        )
        for code in ("200", "503"):  # present from the first scrape, as dashboards expect
            self.healthz.labels(code)
            self.livez.labels(code)
        self.health_check_bind_errors = Counter(
            "userproxy_health_check_bind_errors",
            "healthCheckNodePort servers that could not bind (retried every sync)",
            registry=r,
        )
        self.handoffs = Counter(
            "userproxy_handoffs",
            "Listening-socket handoffs (--handoff-socket) completed, by this process's role: "
            "given (it drained afterwards) or taken (it took over)",
            ["role"],
            registry=r,
        )
        self.handoff_refusals = Counter(
            "userproxy_handoff_refusals",
            "Handoffs this process refused, by reason (credentials, exchange, version, "
            "draining, busy)",
            ["reason"],
            registry=r,
        )
        for role in ("given", "taken"):
            self.handoffs.labels(role)
        self.reload_errors = Counter(
            "userproxy_manifest_reload_errors",
            "Manifest reloads that failed (the last good state kept serving)",
            registry=r,
        )
        self.source_events = {
            event: Counter(f"userproxy_{event}s", text, ["resource"], registry=r)
            for event, text in (
                ("watch_restart", "API watches that ended and were started again"),
                ("relist", "Full re-lists of an API resource (410 Gone, resync)"),
                ("invalid_object", "API objects skipped because they failed validation"),
                ("api_error", "Failed API requests"),
            )
        }
        for counter in self.source_events.values():
            for resource in ("services", "endpointslices", "nodes"):
                counter.labels(resource)
        # The standard process_* / python_* families, on this registry (never the global).
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(
            "userproxy_build_info",
            "Always 1; the labels say which userproxy, Python, event loop and TCP relay "
            "(compiled or python) serve",
            ["version", "python", "loop", "relay"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "userproxy_event_loop_lag_seconds",
            "How late the event loop ran a periodic callback (a stall delays every "
            "connection by as much)",
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.loop_lag_max = Gauge(
            "userproxy_event_loop_lag_max_seconds",
            "The largest event-loop lag seen since the process started",
            registry=r,
        )
        self._lag_max = 0.0

    def set_build_info(self, version: str, python: str, loop: str, relay: str) -> None:
        """``userproxy_build_info{version,python,loop,relay} 1`` (set once the loop runs)."""
        self.build_info.clear()
        self.build_info.labels(version, python, loop, relay).set(1)

    def observe_loop_lag(self, lag: float) -> None:
        """One sample of ``userproxy.loop_lag.LoopLagProbe``."""
        self.loop_lag.observe(lag)
        if lag > self._lag_max:
            self._lag_max = lag
            self.loop_lag_max.set(lag)

    def observe_sync(self, status: SyncStatus, wall_now: float) -> None:
        self.sync_duration.observe(status.last_duration)
        self.last_sync.set(wall_now)
        for delay in status.programming_delays:
            self.programming.observe(delay)
        self.no_local_endpoints.labels("internal").set(status.no_local_internal)
        self.no_local_endpoints.labels("external").set(status.no_local_external)

    def source_event(self, event: str, resource: str) -> None:
        """Count an event reported by the API source (``KubernetesSource(on_event=...)``)."""
        counter = self.source_events.get(event)
        if counter is not None:
            counter.labels(resource).inc()

    def watch(self, recorder: ChangeRecorder, listeners: ListenerSet) -> None:
        """Register the scrape-time collectors over the recorder and the data plane; the
        per-port families are read from ``listeners`` by admin/metrics_scrape.py."""
        self.registry.register(_ControlCollector(recorder))
        self.registry.register(_DataplaneCollector(listeners))
        self.listeners = listeners

    def watch_endpoints(self, counts: Callable[[], Iterable[EndpointCount]]) -> None:
        """``userproxy_endpoints{service_port,protocol,state}`` from ``counts()`` (the
        counts of the proxier's current plans), read at scrape time (metrics_scrape.py)."""
        self.endpoint_counts = counts


class _ControlCollector(Collector):
    """kube-proxy's change counters, read from the recorder's trackers at scrape time."""

    def __init__(self, recorder: ChangeRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterable[Metric]:
        rec = self.recorder
        for family, name, text, value in (
            (GaugeMetricFamily, "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
             "Pending proxy rules Endpoint changes", len(rec.slices)),
            (CounterMetricFamily, "kubeproxy_sync_proxy_rules_endpoint_changes",
             "Cumulative proxy rules Endpoint changes", rec.slices.total),
            (GaugeMetricFamily, "kubeproxy_sync_proxy_rules_service_changes_pending",
             "Pending proxy rules Service changes", len(rec.services)),
            (CounterMetricFamily, "kubeproxy_sync_proxy_rules_service_changes",
             "Cumulative proxy rules Service changes", rec.services.total),
            (GaugeMetricFamily, "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
             "The last time a sync of proxy rules was queued", rec.last_queued_wall or 0.0),
        ):  # fmt: skip
            yield family(name, text, value=value)


@dataclass(frozen=True, slots=True)
class PortFamily:
    """One data-path family, labelled by service port and protocol, read off ``PortTotals``.

    ``read`` names the ``PortTotals`` counter, or maps each value of one more label
    (``split``: direction, reason) to the counter behind it."""

    name: str
    kind: Literal["counter", "gauge"]
    text: str
    read: str | Mapping[str, str]
    split: str | None = None
    #: The protocol whose ports have this family (None: both).
    protocol: Literal["TCP", "UDP"] | None = None

    @property
    def labels(self) -> list[str]:
        return ["service_port", "protocol", *([self.split] if self.split else [])]

    def family(self) -> CounterMetricFamily | GaugeMetricFamily:
        kind = CounterMetricFamily if self.kind == "counter" else GaugeMetricFamily
        return kind(self.name, self.text, labels=self.labels)

    def samples(self, totals: PortTotals) -> Iterator[tuple[list[str], int]]:
        """(extra label values, value) for one port."""
        if isinstance(self.read, str):
            yield [], getattr(totals, self.read)
        else:
            for label, counter in self.read.items():
                yield [label], getattr(totals, counter)


#: Every data-path family: name, kind, help, the PortTotals counter(s) read, the extra label.
PORT_FAMILIES = (
    PortFamily("userproxy_udp_sessions_active", "gauge", "UDP sessions open now",
               "sessions_active", protocol="UDP"),
    PortFamily("userproxy_udp_sessions_created", "counter", "UDP sessions created",
               "sessions_created", protocol="UDP"),
    PortFamily("userproxy_udp_sessions_expired", "counter",
               "UDP sessions ended by --udp-idle-timeout", "sessions_expired", protocol="UDP"),
    PortFamily("userproxy_udp_sessions_evicted", "counter",
               "UDP sessions evicted because the table was full (--udp-max-sessions)",
               "sessions_evicted", protocol="UDP"),
    PortFamily("userproxy_udp_datagrams", "counter", "UDP datagrams relayed",
               {"upstream": "datagrams_up", "downstream": "datagrams_down"}, "direction", "UDP"),
    PortFamily("userproxy_udp_drops", "counter",
               "UDP datagrams dropped: rate_limit (a client over --udp-session-rate), "
               "send_failed (socket buffer full or no session socket), no_endpoints (none "
               "for the client's traffic class), source_range, backend_unreachable (ICMP "
               "error from the endpoint; the session ends)",
               {"rate_limit": "drops_rate", "send_failed": "drops_send",
                "no_endpoints": "refused_no_endpoints", "source_range": "refused_source_range",
                "backend_unreachable": "sessions_closed_by_icmp"}, "reason", "UDP"),
    PortFamily("userproxy_connections_accepted", "counter", "Connections accepted",
               "accepted", protocol="TCP"),
    PortFamily("userproxy_connections_active", "gauge", "Connections open now",
               "active", protocol="TCP"),
    PortFamily("userproxy_connections_refused", "counter",
               "Connections accepted and then reset: reason dial_failed (no endpoint could "
               "be reached), source_range (loadBalancerSourceRanges), no_endpoints (none "
               "for the client's traffic class), client_limit (the client IP held its "
               "share of --max-connections, --client-connection-share). With no endpoints "
               "at all the listener is closed and the kernel refuses, uncounted.",
               {"dial_failed": "dial_exhausted", "source_range": "refused_source_range",
                "no_endpoints": "refused_no_endpoints", "client_limit": "refused_client_limit"},
               "reason", "TCP"),
    PortFamily("userproxy_upstream_dial_failures", "counter", "Failed dials to endpoints",
               "dial_failures", protocol="TCP"),
    PortFamily("userproxy_upstream_dial_retries", "counter",
               "Dials that were a retry on another endpoint", "dial_retries", protocol="TCP"),
    PortFamily("userproxy_listeners_open", "gauge", "Listening sockets open", "listening"),
    PortFamily("userproxy_listener_bind_errors", "gauge",
               "Listeners that could not bind their address (retried every sync)", "bind_errors"),
    PortFamily("userproxy_bytes", "counter", "Bytes relayed",
               {"upstream": "bytes_up", "downstream": "bytes_down"}, "direction"),
)  # fmt: skip


class _DataplaneCollector(Collector):
    """The data plane's process-wide families (the per-port ones, ``PORT_FAMILIES`` and
    the ejections, are written in slices by admin/metrics_scrape.py)."""

    def __init__(self, listeners: ListenerSet) -> None:
        self.listeners = listeners

    def collect(self) -> Iterator[Metric]:
        access_log = self.listeners.access_log
        if access_log is not None:
            lines = CounterMetricFamily(
                "userproxy_access_log_lines",
                "Access-log lines written, dropped (the writer was behind) and lost to write "
                "errors",
                labels=["outcome"],
            )
            lines.add_metric(["written"], access_log.written)
            lines.add_metric(["dropped"], access_log.dropped)
            lines.add_metric(["failed"], access_log.failed)
            yield lines
        # Unlabelled: the refused Service is named in the log line that reports it.
        yield GaugeMetricFamily(
            "userproxy_listener_conflicts",
            "Service addresses not listened on because another Service already serves the "
            "same protocol, IP and port ((address, Service) pairs refused now)",
            value=self.listeners.conflicts,
        )
