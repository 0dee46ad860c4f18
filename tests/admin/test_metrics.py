"""A scrape of /metrics carries every kube-proxy core metric and the userproxy_* data-path
metrics, and their values move with traffic and syncs; /metrics negotiates OpenMetrics and
gzip; /proxyMode, /configz, /healthz."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import urllib.request
from pathlib import Path
from typing import cast

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import eventually, free_port, running_proxy, wait_for_sync
from userproxy.admin.metrics_server import metrics_app
from userproxy.control.health import HealthState
from userproxy.dataplane.listener import PortTotals
from userproxy.metrics import PORT_FAMILIES, Metrics

pytestmark = pytest.mark.both_loops

CORE = (
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "kubeproxy_network_programming_duration_seconds",
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "kubeproxy_sync_proxy_rules_endpoint_changes_total",
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "kubeproxy_sync_proxy_rules_service_changes_total",
    "kubeproxy_proxy_healthz_total",
    "kubeproxy_proxy_livez_total",
    "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
)
DATAPATH = (
    "userproxy_connections_accepted_total",
    "userproxy_connections_active",
    "userproxy_connections_refused_total",
    "userproxy_bytes_total",
    "userproxy_upstream_dial_failures_total",
    "userproxy_upstream_dial_retries_total",
    "userproxy_manifest_reload_errors_total",
    "userproxy_watch_restarts_total",
    "userproxy_relists_total",
)


def fetch(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics by (name, sorted labels)."""
    status, text = fetch(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> set[str]:
    found = set()
    for name, _ in samples:
        found.add(name)
        for suffix in ("_bucket", "_count", "_sum", "_created"):
            if name.endswith(suffix):
                found.add(name.removesuffix(suffix))
    return found


async def test_metrics_cover_kube_proxy_and_the_data_path(tmp_path: Path) -> None:
    net = fresh_net()
    cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
    b1 = Backend(f"127.{net // 200 + 150}.{net % 200}.1", name_server("b1"))
    b2 = Backend(f"127.{net // 200 + 150}.{net % 200}.2", name_server("b2"))
    manifest = tmp_path / "s.json"
    write(manifest, service("web", cluster_ip, 8080),
          endpoint_slice("web-1", "web", b1.port, [b1.ip]))  # fmt: skip
    metrics_port, health_port = free_port(), free_port()
    try:
        async with running_proxy(
            tmp_path,
            metrics_bind_address=f"127.0.0.1:{metrics_port}",
            healthz_bind_address=f"127.0.0.1:{health_port}",
        ) as proxy:
            async with asyncio.timeout(10):
                await proxy.health_ready.wait()
            before = await asyncio.to_thread(scrape, metrics_port)
            missing = {*CORE, *DATAPATH} - names(before)
            assert not missing, f"missing metrics: {sorted(missing)}"

            # Traffic: 5 connections of one line each.
            for _ in range(5):
                assert await asyncio.to_thread(ask, (cluster_ip, 8080)) == "b1"
            # A sync: a second endpoint appears (an EndpointSlice change).
            syncs = proxy.proxier.status.syncs
            write(manifest, service("web", cluster_ip, 8080),
                  endpoint_slice("web-1", "web", b1.port, [b1.ip]),
                  endpoint_slice("web-2", "web", b2.port, [b2.ip]))  # fmt: skip
            await wait_for_sync(proxy, syncs)
            # A broken reload is counted.
            manifest.write_text("{ not json")
            await eventually(
                lambda: (
                    proxy.metrics.registry.get_sample_value(
                        "userproxy_manifest_reload_errors_total"
                    )
                    == 1.0
                )
            )
            health_status, _ = await asyncio.to_thread(
                fetch, f"http://127.0.0.1:{health_port}/healthz"
            )
            assert health_status == 200
            after = await asyncio.to_thread(scrape, metrics_port)

            port = ("service_port", "default/web:tcp"), ("protocol", "TCP")
            accepted = "userproxy_connections_accepted_total"
            assert value(after, accepted, **dict(port)) - value(before, accepted, **dict(port)) == 5
            sent = value(after, "userproxy_bytes_total", **dict(port), direction="upstream")
            received = value(after, "userproxy_bytes_total", **dict(port), direction="downstream")
            assert sent == 5 * len(b"hi\n")
            assert received == 5 * len(b"b1\n")
            assert value(after, "userproxy_connections_active", **dict(port)) == 0
            count = "kubeproxy_sync_proxy_rules_duration_seconds_count"
            assert value(after, count) > value(before, count)
            changes = "kubeproxy_sync_proxy_rules_endpoint_changes_total"
            assert value(after, changes) > value(before, changes)
            last = "kubeproxy_sync_proxy_rules_last_timestamp_seconds"
            assert value(after, last) > value(before, last) > 0
            queued = "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
            assert value(after, queued) > value(before, queued) > 0
            assert value(after, "kubeproxy_proxy_healthz_total", code="200") >= 1
            assert value(after, "userproxy_manifest_reload_errors_total") == 1
            for _name, labels in after:
                assert "client" not in dict(labels), "a client label would be unbounded"

            mode = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/proxyMode")
            assert mode == (200, "userspace")
            status, body = await asyncio.to_thread(
                fetch, f"http://127.0.0.1:{metrics_port}/configz"
            )
            assert status == 200
            config = json.loads(body)
            assert config["kubeproxy.config.k8s.io"]["metricsBindAddress"] == (
                f"127.0.0.1:{metrics_port}"
            )
            assert config["userproxy.io"]["hostname"] == "test-node"
            status, _ = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics_port}/healthz")
            assert status == 200
    finally:
        b1.stop()
        b2.stop()


async def test_metrics_negotiate_openmetrics_and_gzip() -> None:
    # Only /metrics is asked for: no HealthState is needed.
    app = metrics_app(Metrics(), cast("HealthState", None), {})
    async with TestClient(TestServer(app), auto_decompress=False) as client:
        plain = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
        assert plain.headers["Content-Type"].startswith("text/plain")
        assert "Content-Encoding" not in plain.headers
        assert "kubeproxy_proxy_healthz_total" in await plain.text()
        accept = "application/openmetrics-text; version=1.0.0"
        open_metrics = await client.get(
            "/metrics", headers={"Accept": accept, "Accept-Encoding": "identity"}
        )
        assert open_metrics.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await open_metrics.text()).endswith("# EOF\n")
        zipped = await client.get("/metrics", headers={"Accept-Encoding": "gzip"})
        assert zipped.headers["Content-Encoding"] == "gzip"
        assert b"kubeproxy_proxy_healthz_total" in gzip.decompress(await zipped.read())


def test_every_port_counter_is_exported_once_per_protocol() -> None:
    read: dict[str, list[str]] = {"TCP": [], "UDP": []}
    for spec in PORT_FAMILIES:
        counters = [spec.read] if isinstance(spec.read, str) else list(spec.read.values())
        for protocol in (spec.protocol,) if spec.protocol else ("TCP", "UDP"):
            read[protocol] += counters
    fields = {field.name for field in dataclasses.fields(PortTotals)}
    assert set(read["TCP"]) | set(read["UDP"]) == fields
    for counters in read.values():
        assert len(counters) == len(set(counters)), counters
