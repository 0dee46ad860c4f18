"""A /metrics scrape (prometheus_client's parser) after UDP traffic carries every UDP metric
of the Service port, their values moved exactly as the traffic says, and no label names
a client."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import UdpBackend
from tests.support.manifests import write
from tests.support.proxyrun import eventually, free_port, running_proxy
from tests.udp.dns_backend import (
    DNS_PORT,
    Samples,
    addresses,
    scrape,
    udp_objects,
    udp_value,
)
from userproxy.admin.metrics_scrape import sample_value

pytestmark = pytest.mark.both_loops

MAX_SESSIONS = 3
CLIENTS = 5
EXCHANGES = 2  # per client
PAYLOAD = b"hello"
SESSION_RATE = 100  # a burst of max(64, rate / 10) = 64 datagrams
FLOOD = 300
LABELS = {"service_port", "protocol", "direction", "reason"}


@pytest.fixture
def backend() -> Iterator[UdpBackend]:
    _, (ip,), _ = addresses(1)
    b = UdpBackend(ip, lambda data: b"re:" + data)
    yield b
    b.stop()


def exchanges(client_ip: str, address: tuple[str, int]) -> None:
    """CLIENTS clients, one after another, EXCHANGES request/answer pairs each."""
    for _ in range(CLIENTS):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((client_ip, 0))
            sock.settimeout(3)
            for _ in range(EXCHANGES):
                sock.sendto(PAYLOAD, address)
                data, source = sock.recvfrom(2048)
                assert (data, source) == (b"re:" + PAYLOAD, address)


def flood(client_ip: str, address: tuple[str, int]) -> None:
    """FLOOD datagrams as fast as possible from one client (far over SESSION_RATE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((client_ip, 0))
        for _ in range(FLOOD):
            sock.sendto(PAYLOAD, address)


def check_labels(samples: Samples, client_ip: str) -> None:
    for name, labels in samples:
        assert not any(client_ip in value for _, value in labels), (name, labels)
        if name.startswith(("userproxy_udp_", "userproxy_bytes")):
            assert {key for key, _ in labels} <= LABELS, (name, labels)


async def test_udp_metrics_move_with_traffic(tmp_path: Path, backend: UdpBackend) -> None:
    cluster_ip, _, client_prefix = addresses(0)
    client_ip = f"{client_prefix}.1"
    address = (cluster_ip, DNS_PORT)
    write(tmp_path / "udp.json", *udp_objects(cluster_ip, [(backend.ip, backend.port)]))
    port = free_port()
    async with running_proxy(
        tmp_path,
        metrics_bind_address=f"127.0.0.1:{port}",
        udp_max_sessions=MAX_SESSIONS,
        udp_idle_timeout=1.0,
        udp_session_rate=SESSION_RATE,
    ) as proxy:
        before = await asyncio.to_thread(scrape, port)
        for name in (
            "userproxy_udp_sessions_active",
            "userproxy_udp_sessions_created_total",
            "userproxy_udp_sessions_expired_total",
            "userproxy_udp_sessions_evicted_total",
        ):
            assert udp_value(before, name) == 0
        for direction in ("upstream", "downstream"):
            assert udp_value(before, "userproxy_udp_datagrams_total", direction=direction) == 0
            assert udp_value(before, "userproxy_bytes_total", direction=direction) == 0
        for reason in ("rate_limit", "send_failed", "no_endpoints", "source_range",
                       "backend_unreachable"):  # fmt: skip
            assert udp_value(before, "userproxy_udp_drops_total", reason=reason) == 0

        # Five clients, two exchanges each, through a table of three sessions.
        await asyncio.to_thread(exchanges, client_ip, address)
        after = await asyncio.to_thread(scrape, port)
        count = CLIENTS * EXCHANGES
        assert udp_value(after, "userproxy_udp_sessions_created_total") == CLIENTS
        assert udp_value(after, "userproxy_udp_sessions_evicted_total") == CLIENTS - MAX_SESSIONS
        assert udp_value(after, "userproxy_udp_sessions_active") == MAX_SESSIONS
        assert udp_value(after, "userproxy_udp_datagrams_total", direction="upstream") == count
        assert udp_value(after, "userproxy_udp_datagrams_total", direction="downstream") == count
        up = udp_value(after, "userproxy_bytes_total", direction="upstream")
        down = udp_value(after, "userproxy_bytes_total", direction="downstream")
        assert (up, down) == (count * len(PAYLOAD), count * len(b"re:" + PAYLOAD))
        assert udp_value(after, "userproxy_udp_drops_total", reason="rate_limit") == 0

        # A flooding client: over its session rate, the excess is dropped and counted.
        await asyncio.to_thread(flood, f"{client_prefix}.2", address)

        def rate_limited() -> float:
            value = sample_value(
                proxy.metrics,
                "userproxy_udp_drops_total",
                {"service_port": "default/dns:dns", "protocol": "UDP", "reason": "rate_limit"},
            )
            return value or 0.0

        await eventually(lambda: rate_limited() + backend.received >= count + FLOOD,
                         what="the flood to be forwarded or dropped")  # fmt: skip
        flooded = await asyncio.to_thread(scrape, port)
        dropped = udp_value(flooded, "userproxy_udp_drops_total", reason="rate_limit")
        forwarded = udp_value(flooded, "userproxy_udp_datagrams_total", direction="upstream")
        assert dropped > 0
        assert dropped + forwarded == count + FLOOD
        evicted = udp_value(flooded, "userproxy_udp_sessions_evicted_total")
        assert evicted == CLIENTS + 1 - MAX_SESSIONS

        # Idle sessions expire (1 s, by the once-a-second sweep).
        await eventually(lambda: len(proxy.listeners.udp_sessions) == 0, within=4.0,
                         what="the sessions to expire")  # fmt: skip
        expired = await asyncio.to_thread(scrape, port)
        assert udp_value(expired, "userproxy_udp_sessions_expired_total") == MAX_SESSIONS
        assert udp_value(expired, "userproxy_udp_sessions_active") == 0
        assert udp_value(expired, "userproxy_udp_sessions_created_total") == CLIENTS + 1

    for samples in (before, after, flooded, expired):
        check_labels(samples, client_prefix)
