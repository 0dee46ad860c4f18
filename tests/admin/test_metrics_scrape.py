"""admin/metrics_scrape.py writes the per-port families exactly as prometheus-client would,
in both formats, and in slices that each hold the loop briefly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import cast

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from userproxy.admin import metrics_scrape
from userproxy.admin.metrics_scrape import exposition, port_text
from userproxy.control.endpoint_counts import EndpointCount
from userproxy.dataplane.listener import PortTotals
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.dataplane.outliers import Ejection
from userproxy.dataplane.port_outliers import EjectionCounts
from userproxy.metrics import PORT_FAMILIES, Metrics
from userproxy.model import Endpoint, Protocol, ServicePortName

ACCEPTS = ("", "application/openmetrics-text; version=1.0.0", "text/plain; version=1.0.0")


class FakeListeners:
    """What metrics_scrape reads of a ListenerSet: totals and ejections."""

    def __init__(self, totals: dict[tuple[str, str], PortTotals]) -> None:
        self._totals = totals
        self.ejected = {
            ("default/web:http", "TCP"): (
                3,
                [
                    Ejection(
                        Endpoint("10.0.0.1", 80), until=9.0, remaining=12.5, duration=30.0, streak=1
                    )
                ],
            ),
            ('odd/"na\\me":p', "TCP"): (0, []),
        }

    def retired_totals(self) -> dict[tuple[str, str], PortTotals]:
        return dict(self._totals)

    def all_listeners(self) -> list[object]:
        return []

    def add_totals(self, result: object, listeners: object) -> None:
        pass

    def ejections(
        self, part: list[tuple[str, str]], into: EjectionCounts | None = None
    ) -> EjectionCounts:
        result = {} if into is None else into
        for key in part:
            result[key] = self.ejected[key]
        return result

    def ejecting_ports(self) -> list[tuple[str, str]]:
        return list(self.ejected)


def totals(ports: int) -> dict[tuple[str, str], PortTotals]:
    result = {}
    for i in range(ports):
        protocol = "UDP" if i % 3 == 0 else "TCP"
        port = PortTotals(accepted=i, bytes_up=10**i if i < 20 else i, active=i % 7)
        port.datagrams_up = 2 * i
        result[(f"ns-{i}/svc-{i}:p{i}", protocol)] = port
    # Label values prometheus-client escapes: backslash, quote, newline.
    result[('odd/"na\\me":p', "TCP")] = PortTotals(accepted=1)
    result[("odd/new\nline:p", "UDP")] = PortTotals(sessions_created=2)
    return result


def counts(ports: int) -> list[EndpointCount]:
    return [
        EndpointCount(
            ServicePortName("default", f"s{i}", "p", Protocol.TCP), ready=i, serving_terminating=1
        )
        for i in range(ports)
    ]


class Reference(Collector):
    """The same families, built with prometheus-client's own classes."""

    def __init__(self, listeners: FakeListeners, counts: list[EndpointCount]) -> None:
        self.listeners = listeners
        self.counts = counts

    def collect(self) -> Iterator[Metric]:
        all_totals = self.listeners.retired_totals()
        for spec in PORT_FAMILIES:
            family = spec.family()
            for (service_port, protocol), port in all_totals.items():
                if spec.protocol in (None, protocol):
                    for extra, value in spec.samples(port):
                        family.add_metric([service_port, protocol, *extra], value)
            yield family
        endpoints = GaugeMetricFamily(
            "userproxy_endpoints",
            "Endpoints of a Service port by state: ready, serving_terminating (not ready, "
            "serving and terminating: used only as a fallback), not_ready",
            labels=["service_port", "protocol", "state"],
        )
        for ports in self.counts:
            for state, value in ports.by_state():
                endpoints.add_metric([ports.service_port, str(ports.spn.protocol), state], value)
        yield endpoints
        total = CounterMetricFamily(
            "userproxy_endpoint_ejections",
            "Endpoints ejected by outlier detection (failed dials in a row), each time",
            labels=["service_port", "protocol"],
        )
        now = GaugeMetricFamily(
            "userproxy_endpoints_ejected",
            "Endpoints ejected by outlier detection now",
            labels=["service_port", "protocol"],
        )
        remaining = GaugeMetricFamily(
            "userproxy_endpoint_ejection_remaining_seconds",
            "Seconds until an ejected endpoint is tried again",
            labels=["service_port", "protocol", "endpoint"],
        )
        for (port_name, protocol), (count, ejected) in self.listeners.ejected.items():
            total.add_metric([port_name, protocol], count)
            now.add_metric([port_name, protocol], len(ejected))
            for ejection in ejected:
                remaining.add_metric(
                    [port_name, protocol, str(ejection.endpoint)], ejection.remaining
                )
        yield from (total, now, remaining)


@pytest.mark.parametrize("accept", ACCEPTS)
async def test_port_families_are_what_prometheus_client_writes(accept: str) -> None:
    listeners = FakeListeners(totals(40))
    endpoint_counts = counts(25)
    encoder, content_type = choose_encoder(accept)
    openmetrics = content_type.startswith("application/openmetrics-text")
    ours = "".join(
        await port_text(
            cast("ListenerSet", listeners), lambda: endpoint_counts, encoder, openmetrics
        )
    )
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Reference(listeners, endpoint_counts))
    theirs = encoder(registry).decode()
    if openmetrics:
        theirs = theirs.removesuffix("# EOF\n")
    assert ours == theirs


async def test_name_filter_and_whole_exposition() -> None:
    metrics = Metrics()
    metrics.listeners = cast("ListenerSet", FakeListeners(totals(5)))
    endpoint_counts = counts(3)
    metrics.endpoint_counts = lambda: endpoint_counts
    body, content_type = await exposition(metrics, ACCEPTS[1])
    text = body.decode()
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    assert text.count("# EOF") == 1
    assert "kubeproxy_sync_proxy_rules_duration_seconds" in text  # the registry's part
    names = ["userproxy_bytes_total", "kubeproxy_sync_proxy_rules_duration_seconds_count"]
    only, _ = await exposition(metrics, "", names)
    samples = [line for line in only.decode().splitlines() if not line.startswith("#")]
    assert samples
    assert all(line.startswith(tuple(names)) for line in samples), samples


async def test_a_large_scrape_yields_to_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many ports: the loop runs other callbacks while the text is built, and each
    stretch without them stays within a few slices (generous for a busy machine)."""
    monkeypatch.setattr(metrics_scrape, "SCRAPE_SLICE", 0.002)
    listeners = FakeListeners(totals(20_000))
    endpoint_counts = counts(20_000)
    gaps: list[float] = []
    done = False

    async def ticker() -> None:
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    encoder, _ = choose_encoder("")
    text = await port_text(
        cast("ListenerSet", listeners), lambda: endpoint_counts, encoder, openmetrics=False
    )
    done = True
    await task
    assert len(text) > 300_000
    assert len(gaps) > 20, "the ticker ran while the text was built"
    assert sorted(gaps)[len(gaps) // 2] < 0.02
