"""A busy UDP client is not a flood: by default nothing limits one client's datagram rate
(a DNS forwarder sends every query from one socket), and when ``--udp-session-rate`` is
set, what it drops is logged, not only counted."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import UdpBackend
from tests.support.manifests import write
from tests.support.proxyrun import eventually, running_proxy
from tests.udp.dns_backend import DNS_PORT, addresses, udp_objects
from userproxy.dataplane import udp_listener as udp
from userproxy.logs import RateLimitedLog

pytestmark = pytest.mark.both_loops

RATE = 5000  # datagrams per second, for
SECONDS = 2.0
TICK = 0.01  # sent in bursts of RATE * TICK every TICK, as a forwarder batches queries


@pytest.fixture
def backend() -> Iterator[UdpBackend]:
    _, (ip,), _ = addresses(1)
    b = UdpBackend(ip)  # echo
    yield b
    b.stop()


def paced_client(client_ip: str, address: tuple[str, int], count: int) -> set[int]:
    """Send ``count`` numbered datagrams at RATE per second from one socket, reading the
    echoes on another thread; return the numbers that came back."""
    seen: set[int] = set()
    done = threading.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        sock.bind((client_ip, 0))
        sock.settimeout(0.2)

        def receive() -> None:
            while not done.is_set():
                try:
                    data = sock.recv(64)
                except TimeoutError:
                    continue
                seen.add(struct.unpack("!I", data[:4])[0])

        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        burst = int(RATE * TICK)
        start = time.monotonic()
        for first in range(0, count, burst):
            for n in range(first, min(count, first + burst)):
                sock.sendto(struct.pack("!I", n) + b"q" * 28, address)
            pause = start + (first + burst) / RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        deadline = time.monotonic() + 3.0
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        done.set()
        reader.join(timeout=2)
    return seen


async def test_one_client_at_5000_per_second_loses_nothing_by_default(
    tmp_path: Path, backend: UdpBackend
) -> None:
    cluster_ip, _, client_prefix = addresses(0)
    write(tmp_path / "udp.json", *udp_objects(cluster_ip, [(backend.ip, backend.port)]))
    count = int(RATE * SECONDS)
    async with running_proxy(tmp_path) as proxy:
        assert proxy.settings.udp_session_rate == 0  # the default: no per-client limit
        seen = await asyncio.to_thread(
            paced_client, f"{client_prefix}.1", (cluster_ip, DNS_PORT), count
        )
        (totals,) = (
            t for (_, protocol), t in proxy.listeners.totals().items() if protocol == "UDP"
        )
    assert totals.drops_rate == 0
    assert totals.drops_send == 0
    assert len(seen) == count, f"lost {count - len(seen)} of {count}"


async def test_rate_limit_drops_are_logged_at_most_every_few_seconds(
    tmp_path: Path,
    backend: UdpBackend,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The limiter is process-wide: a fresh one, so an earlier test's line does not count.
    monkeypatch.setattr(udp, "_rate_drop_log", RateLimitedLog(udp.log, udp.DROP_LOG_INTERVAL))

    cluster_ip, _, client_prefix = addresses(0)
    client_ip = f"{client_prefix}.1"
    write(tmp_path / "udp.json", *udp_objects(cluster_ip, [(backend.ip, backend.port)]))

    def flood() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((client_ip, 0))
            for _ in range(500):
                sock.sendto(b"x", (cluster_ip, DNS_PORT))

    with caplog.at_level(logging.WARNING, logger="userproxy.dataplane.udp_listener"):
        async with running_proxy(tmp_path, udp_session_rate=100) as proxy:
            await asyncio.to_thread(flood)

            def dropped() -> int:
                return sum(
                    t.drops_rate for (_, p), t in proxy.listeners.totals().items() if p == "UDP"
                )

            await eventually(lambda: dropped() + backend.received >= 500, what="the flood")
            assert dropped() > 100
    lines = [r.getMessage() for r in caplog.records if "--udp-session-rate" in r.getMessage()]
    # Hundreds of drops within a second or two: one line (the next would come 5 s later).
    assert len(lines) == 1, lines
    assert client_ip in lines[0]
    assert "default/dns:dns" in lines[0]
