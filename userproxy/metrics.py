"""Prometheus metrics: kube-proxy's core set under its own names, plus ``userproxy_*``.

One ``Metrics`` object owns its ``CollectorRegistry`` (never the global one) and is
injected where events happen.  Data-path numbers are not counted per packet in
prometheus_client objects: the relay keeps plain integer counters and a collector reads
them at scrape time, so the hot path pays an integer add, not a lock.

Labels stay bounded: service port (``namespace/name:port``), protocol, resource, code,
traffic policy, reason; never a client address.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from userproxy.control.proxier import SyncStatus
    from userproxy.control.trackers import ChangeRecorder
    from userproxy.dataplane.listener_set import ListenerSet

#: kube-proxy's sync duration buckets: from 1 ms, doubling, 15 of them.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
#: network_programming_duration_seconds: 0.25 s steps to 1 s, then 1 s to 60 s, 5 s to
#: 120 s, 30 s to 300 s (as upstream merges its linear buckets).
PROGRAMMING_BUCKETS = (
    0.25,
    0.5,
    *(float(s) for s in range(1, 60)),
    *(float(s) for s in range(60, 120, 5)),
    *(float(s) for s in range(120, 301, 30)),
)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
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
        """Register the scrape-time collectors over the recorder and the data plane."""
        self.registry.register(_ControlCollector(recorder))
        self.registry.register(_DataplaneCollector(listeners))


class _ControlCollector(Collector):
    """kube-proxy's change counters, read from the recorder's trackers at scrape time."""

    def __init__(self, recorder: ChangeRecorder) -> None:
        self.recorder = recorder

    def collect(self) -> Iterable[Metric]:
        rec = self.recorder
        yield GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
            "Pending proxy rules Endpoint changes",
            value=len(rec.slices),
        )
        yield CounterMetricFamily(
            "kubeproxy_sync_proxy_rules_endpoint_changes",
            "Cumulative proxy rules Endpoint changes",
            value=rec.slices.total,
        )
        yield GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_service_changes_pending",
            "Pending proxy rules Service changes",
            value=len(rec.services),
        )
        yield CounterMetricFamily(
            "kubeproxy_sync_proxy_rules_service_changes",
            "Cumulative proxy rules Service changes",
            value=rec.services.total,
        )
        yield GaugeMetricFamily(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            value=rec.last_queued_wall or 0.0,
        )


class _DataplaneCollector(Collector):
    """Per service port and protocol, from the listeners' plain counters."""

    def __init__(self, listeners: ListenerSet) -> None:
        self.listeners = listeners

    def collect(self) -> Iterator[Metric]:
        labels = ["service_port", "protocol"]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "accepted": CounterMetricFamily(
                "userproxy_connections_accepted", "Connections accepted", labels=labels
            ),
            "active": GaugeMetricFamily(
                "userproxy_connections_active", "Connections open now", labels=labels
            ),
            "refused": CounterMetricFamily(
                "userproxy_connections_refused",
                "Connections accepted and then reset: reason dial_failed (no endpoint could "
                "be reached), source_range (loadBalancerSourceRanges), no_endpoints (none "
                "for the client's traffic class), client_limit (the client IP held its "
                "share of --max-connections, --client-connection-share). With no endpoints "
                "at all the listener is closed and the kernel refuses, uncounted.",
                labels=[*labels, "reason"],
            ),
            "dial_failures": CounterMetricFamily(
                "userproxy_upstream_dial_failures", "Failed dials to endpoints", labels=labels
            ),
            "dial_retries": CounterMetricFamily(
                "userproxy_upstream_dial_retries",
                "Dials that were a retry on another endpoint",
                labels=labels,
            ),
            "listening": GaugeMetricFamily(
                "userproxy_listeners_open", "Listening sockets open", labels=labels
            ),
            "bind_errors": GaugeMetricFamily(
                "userproxy_listener_bind_errors",
                "Listeners that could not bind their address (retried every sync)",
                labels=labels,
            ),
        }
        bytes_family = CounterMetricFamily(
            "userproxy_bytes", "Bytes relayed", labels=[*labels, "direction"]
        )
        udp: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "active": GaugeMetricFamily(
                "userproxy_udp_sessions_active", "UDP sessions open now", labels=labels
            ),
            "created": CounterMetricFamily(
                "userproxy_udp_sessions_created", "UDP sessions created", labels=labels
            ),
            "expired": CounterMetricFamily(
                "userproxy_udp_sessions_expired",
                "UDP sessions ended by --udp-idle-timeout",
                labels=labels,
            ),
            "evicted": CounterMetricFamily(
                "userproxy_udp_sessions_evicted",
                "UDP sessions evicted because the table was full (--udp-max-sessions)",
                labels=labels,
            ),
            "datagrams": CounterMetricFamily(
                "userproxy_udp_datagrams", "UDP datagrams relayed", labels=[*labels, "direction"]
            ),
            "drops": CounterMetricFamily(
                "userproxy_udp_drops",
                "UDP datagrams dropped: rate_limit (a client over --udp-session-rate), "
                "send_failed (socket buffer full or no session socket), no_endpoints (none "
                "for the client's traffic class), source_range, backend_unreachable (ICMP "
                "error from the endpoint; the session ends)",
                labels=[*labels, "reason"],
            ),
        }
        for key, totals in self.listeners.totals().items():
            spn, protocol = key
            port = [spn, protocol]
            bytes_family.add_metric([*port, "upstream"], totals.bytes_up)
            bytes_family.add_metric([*port, "downstream"], totals.bytes_down)
            families["listening"].add_metric(port, totals.listening)
            families["bind_errors"].add_metric(port, totals.bind_errors)
            if protocol == "UDP":
                udp["active"].add_metric(port, totals.sessions_active)
                udp["created"].add_metric(port, totals.sessions_created)
                udp["expired"].add_metric(port, totals.sessions_expired)
                udp["evicted"].add_metric(port, totals.sessions_evicted)
                udp["datagrams"].add_metric([*port, "upstream"], totals.datagrams_up)
                udp["datagrams"].add_metric([*port, "downstream"], totals.datagrams_down)
                for reason, count in (
                    ("rate_limit", totals.drops_rate),
                    ("send_failed", totals.drops_send),
                    ("no_endpoints", totals.refused_no_endpoints),
                    ("source_range", totals.refused_source_range),
                    ("backend_unreachable", totals.sessions_closed_by_icmp),
                ):
                    udp["drops"].add_metric([*port, reason], count)
                continue
            families["accepted"].add_metric(port, totals.accepted)
            families["active"].add_metric(port, totals.active)
            for reason, count in (
                ("dial_failed", totals.dial_exhausted),
                ("source_range", totals.refused_source_range),
                ("no_endpoints", totals.refused_no_endpoints),
                ("client_limit", totals.refused_client_limit),
            ):
                families["refused"].add_metric([*port, reason], count)
            families["dial_failures"].add_metric(port, totals.dial_failures)
            families["dial_retries"].add_metric(port, totals.dial_retries)
        yield from udp.values()
        yield from families.values()
        yield bytes_family
        # Unlabelled: the refused Service is named in the log line that reports it.
        yield GaugeMetricFamily(
            "userproxy_listener_conflicts",
            "Service addresses not listened on because another Service already serves the "
            "same protocol, IP and port ((address, Service) pairs refused now)",
            value=self.listeners.conflicts,
        )
