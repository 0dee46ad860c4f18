"""State in metrics and logs: build info, process metrics, endpoints by state per Service
port, event-loop lag (a stall injected into the loop shows), and the INFO lines a proxy
writes as its listeners and endpoint counts change.

In-process, on both loops; metrics scraped over HTTP from the metrics server and parsed
with prometheus_client's parser; peers are blocking sockets in threads.

Addresses: Services on 127.224.N.1, backends on 127.225.N.x, N fresh per test (no other
test uses these nets).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import itertools
import logging
import platform
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

import userproxy.dataplane.listener as listener_module
from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, free_port, running_proxy, wait_for_sync
from userproxy import __version__
from userproxy.dataplane.fast_relay import relay_name
from userproxy.dataplane.listener import _StateLog

pytestmark = pytest.mark.both_loops

PORT = 8080
_nets = itertools.count(1)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample by (name, sorted labels), through prometheus_client's parser."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return parse(response.read().decode())


def by_name(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


def endpoints_slice(name: str, service_name: str, backends: list[dict[str, Any]]) -> dict[str, Any]:
    """An EndpointSlice with explicit conditions per endpoint: (ip, port, conditions)."""
    return endpoint_slice(name, service_name, {"http": backends[0]["port"]}, endpoints=[
        {"addresses": [b["ip"]], "conditions": b["conditions"]} for b in backends
    ])  # fmt: skip


def ready(ip: str, port: int) -> dict[str, Any]:
    return {"ip": ip, "port": port, "conditions": {"ready": True}}


def not_ready(ip: str, port: int) -> dict[str, Any]:
    return {"ip": ip, "port": port, "conditions": {"ready": False, "serving": False}}


def terminating(ip: str, port: int) -> dict[str, Any]:
    conditions = {"ready": False, "serving": True, "terminating": True}
    return {"ip": ip, "port": port, "conditions": conditions}


@pytest.fixture(autouse=True)
def _fresh_state_log(monkeypatch: pytest.MonkeyPatch) -> None:
    """Listener lines are bounded per process; earlier tests must not use this one's share."""
    monkeypatch.setattr(listener_module, "_state_log", _StateLog())


def loop_label() -> str:
    loop = asyncio.get_running_loop()
    if type(loop).__module__.startswith("uvloop"):
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return "asyncio"


async def test_build_process_and_endpoint_metrics_and_info_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    net = next(_nets)
    cluster_ip = f"127.224.{net}.1"
    b1 = Backend(f"127.225.{net}.1", name_server("b1"))
    b2 = Backend(f"127.225.{net}.2", name_server("b2"), port=b1.port)
    gone = [f"127.225.{net}.{i}" for i in (3, 4)]  # never listened on: traffic never goes there
    manifest = tmp_path / "web.json"

    def apply(*backends: dict[str, Any]) -> None:
        objects = [service("web", cluster_ip, PORT, port_name="http")]
        if backends:
            objects.append(endpoints_slice("web-1", "web", list(backends)))
        write(manifest, *objects)

    apply(
        ready(b1.ip, b1.port),
        ready(b2.ip, b1.port),
        terminating(gone[0], b1.port),
        not_ready(gone[1], b1.port),
    )
    metrics_port = free_port()
    port_labels = (("protocol", "TCP"), ("service_port", "default/web:http"))

    def states(samples: Samples) -> dict[str, float]:
        found = by_name(samples, "userproxy_endpoints")
        return {
            dict(labels)["state"]: value
            for labels, value in found.items()
            if tuple(sorted((k, v) for k, v in labels if k != "state")) == port_labels
        }

    try:
        async with running_proxy(
            tmp_path, metrics_bind_address=f"127.0.0.1:{metrics_port}"
        ) as proxy:
            assert await asyncio.to_thread(ask, (cluster_ip, PORT)) in {"b1", "b2"}
            first = await asyncio.to_thread(scrape, metrics_port)

            # Build info: one sample, value 1, naming this version, Python and loop.
            assert by_name(first, "userproxy_build_info") == {
                (
                    ("loop", loop_label()),
                    ("python", platform.python_version()),
                    ("relay", relay_name()),
                    ("version", __version__),
                ): 1.0
            }
            # The standard process and platform collectors, on the proxy's own registry.
            for name in (
                "process_cpu_seconds_total",
                "process_open_fds",
                "process_resident_memory_bytes",
                "process_start_time_seconds",
                "python_info",
            ):
                assert by_name(first, name), f"{name} missing"
            assert by_name(first, "process_open_fds")[()] > 0
            # Endpoints by state: every state present, each endpoint in exactly one.
            assert states(first) == {"ready": 2, "serving_terminating": 1, "not_ready": 1}

            # One endpoint goes not ready: the counts move, one INFO line says so.
            syncs = proxy.proxier.status.syncs
            apply(
                ready(b1.ip, b1.port),
                not_ready(b2.ip, b1.port),
                terminating(gone[0], b1.port),
                not_ready(gone[1], b1.port),
            )
            await wait_for_sync(proxy, syncs)
            second = await asyncio.to_thread(scrape, metrics_port)
            assert states(second) == {"ready": 1, "serving_terminating": 1, "not_ready": 2}
            change = (
                "default/web:http/TCP: 2 -> 1 ready endpoints (1 serving terminating, 2 not ready)"
            )
            assert [r.getMessage() for r in caplog.records].count(change) == 1
            for _ in range(4):
                assert await asyncio.to_thread(ask, (cluster_ip, PORT)) == "b1"

            # No endpoint left at all: the listener closes, and says why.
            syncs = proxy.proxier.status.syncs
            apply()
            await wait_for_sync(proxy, syncs)
            third = await asyncio.to_thread(scrape, metrics_port)
            assert states(third) == {"ready": 0, "serving_terminating": 0, "not_ready": 0}
            # Back again: the listener reopens and says so.
            syncs = proxy.proxier.status.syncs
            apply(ready(b1.ip, b1.port))
            await wait_for_sync(proxy, syncs)
            assert await asyncio.to_thread(ask, (cluster_ip, PORT)) == "b1"
            # The Service is deleted: its port leaves the metric and the listener closes.
            syncs = proxy.proxier.status.syncs
            write(manifest)
            await wait_for_sync(proxy, syncs)
            fourth = await asyncio.to_thread(scrape, metrics_port)
            assert states(fourth) == {}
    finally:
        b1.stop()
        b2.stop()

    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    where = f"{cluster_ip}:{PORT}"
    expected = [
        "default/web:http/TCP: 0 -> 2 ready endpoints (1 serving terminating, 1 not ready)",
        f"default/web:http/TCP: listening on {where} (ClusterIP, 2 endpoints)",
        change,
        "default/web:http/TCP: 1 -> 0 ready endpoints",
        f"default/web:http/TCP: stopped listening on {where}: no endpoints (the kernel "
        "refuses new clients, as kube-proxy's REJECT)",
        "default/web:http/TCP: 0 -> 1 ready endpoints",
        f"default/web:http/TCP: listening on {where} again: endpoints are back",
        "default/web:http/TCP: 1 -> 0 ready endpoints (port removed)",
        f"default/web:http/TCP: stopped listening on {where}: Service port removed",
    ]
    for line in expected:
        assert lines.count(line) == 1, f"{line!r} not logged once in:\n" + "\n".join(lines)
    # In that order (each change logged once, where it happened).
    positions = [lines.index(line) for line in expected]
    assert positions == sorted(positions), "\n".join(lines)
    starts = [line for line in lines if line.startswith("userproxy ")]
    assert starts[0] == (
        f"userproxy {__version__} on {loop_label()}, Python {platform.python_version()}"
    )


async def test_a_stalled_loop_shows_in_the_lag_metric(tmp_path: Path) -> None:
    write(tmp_path / "empty.json")
    async with running_proxy(tmp_path) as proxy:
        registry = proxy.metrics.registry

        def lag() -> Samples:
            return parse(generate_latest(registry).decode())

        def count(samples: Samples) -> float:
            return samples[("userproxy_event_loop_lag_seconds_count", ())]

        # The probe runs from the start (Proxy.run's TaskGroup): samples arrive, 4 a second.
        await eventually(lambda: count(lag()) >= 2, what="two lag samples")
        before = lag()
        # A stall: a loop callback that blocks for 0.8 s, as a blocking call would.
        stall = 0.8
        asyncio.get_running_loop().call_soon(time.sleep, stall)
        await eventually(lambda: count(lag()) >= count(before) + 2, what="samples after the stall")
        after = lag()
        # The wake-up due during the stall came at least (stall - interval) late.
        floor = stall - proxy.loop_lag.interval - 0.05
        assert after[("userproxy_event_loop_lag_max_seconds", ())] >= floor
        slow_before = (
            count(before) - before[("userproxy_event_loop_lag_seconds_bucket", (("le", "0.25"),))]
        )
        slow_after = (
            count(after) - after[("userproxy_event_loop_lag_seconds_bucket", (("le", "0.25"),))]
        )
        assert slow_after >= slow_before + 1
        assert (
            after[("userproxy_event_loop_lag_seconds_sum", ())]
            - before[("userproxy_event_loop_lag_seconds_sum", ())]
            >= floor
        )
