"""Outlier ejection end to end, on both loops: a backend that refuses connections while it
is listed ready is ejected after N failed dials, then gets no dial at all (the retry
counter stands still), comes back after the ejection time and is ejected for twice as long
if it still fails; the cap on the ejected fraction holds; metrics and log lines.

Addresses: 127.213.x.y (Service .1, backends .11 and up), x fresh per test.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, running_proxy
from userproxy.admin.metrics_scrape import exposition
from userproxy.dataplane.outliers import OutlierDetector
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.proxy import Proxy

pytestmark = pytest.mark.both_loops

SERVICE_PORT = 8080
_nets = itertools.count(1 + (os.getpid() % 50) * 5)
LOGGER = "userproxy.dataplane.outliers"


def reset_at_once(conn: socket.socket) -> None:
    """Accept, then reset before a byte goes back (a crashing server)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reset_after_request(conn: socket.socket) -> None:
    """Read the request, then reset before a byte goes back (so the dial surely
    succeeded: the connection was up and carried the request)."""
    conn.makefile("rb").readline()
    reset_at_once(conn)


def answer_then_reset(conn: socket.socket) -> None:
    """Answer, then reset: a reset after bytes came back is the application's business."""
    conn.makefile("rb").readline()
    conn.sendall(b"flaky\n")
    time.sleep(0.05)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class Scene:
    """A Service at 127.213.x.1 over ``good`` name backends and ``dead`` endpoints whose
    port is bound but not listening (every connect is refused), each ready in its slice."""

    def __init__(
        self,
        tmp_path: Path,
        good: int,
        dead: int,
        odd: Callable[[socket.socket], None] | None = None,
    ) -> None:
        net = next(_nets) % 250
        self.address = (f"127.213.{net}.1", SERVICE_PORT)
        self.backends = [
            Backend(f"127.213.{net}.{11 + i}", name_server(f"b{i + 1}")) for i in range(good)
        ]
        #: A backend that accepts but misbehaves (``odd``), listed after the good ones.
        self.odd = None if odd is None else Backend(f"127.213.{net}.{10 + good + dead + 1}", odd)
        self.dead: list[socket.socket] = []
        for i in range(dead):
            sock = socket.socket()
            sock.bind((f"127.213.{net}.{11 + good + i}", 0))
            self.dead.append(sock)
        directory = tmp_path / "manifests"
        directory.mkdir()
        ports = [(b.ip, b.port) for b in self.backends] + [s.getsockname() for s in self.dead]
        if self.odd is not None:
            ports.append((self.odd.ip, self.odd.port))
        slices = [
            endpoint_slice(f"web-{i}", "web", port, [ip]) for i, (ip, port) in enumerate(ports)
        ]
        write(directory / "web.json", service("web", self.address[0], SERVICE_PORT), *slices)
        self.manifests = directory
        self.dead_endpoints = {f"{ip}:{port}" for ip, port in (s.getsockname() for s in self.dead)}

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()
        if self.odd is not None:
            self.odd.stop()
        for sock in self.dead:
            sock.close()


@pytest.fixture
def scenes(tmp_path: Path) -> Iterator[list[Scene]]:
    made: list[Scene] = []
    yield made
    for scene in made:
        scene.close()


def detector_of(proxy: Proxy) -> OutlierDetector:
    (listener,) = list(proxy.listeners)
    assert isinstance(listener, TcpListener)
    return listener.outliers


def dial_counts(proxy: Proxy) -> tuple[int, int]:
    (totals,) = proxy.listeners.totals().values()
    return totals.dial_retries, totals.dial_failures


async def answers(address: tuple[str, int], count: int) -> Counter[str]:
    def run() -> Counter[str]:
        return Counter(ask(address) for _ in range(count))

    return await asyncio.to_thread(run)


async def until_ejected(scene: Scene, detector: OutlierDetector, ejections: int) -> None:
    """Connect in small batches until ``ejections`` ejections happened; every connection
    is answered by a good backend (a refused dial is retried on another endpoint)."""
    for _ in range(40):
        if detector.ejections >= ejections:
            return
        seen = await answers(scene.address, 3)
        assert set(seen) <= {f"b{i + 1}" for i in range(len(scene.backends))}, seen
    raise AssertionError(f"not ejected {ejections} times: {detector.status()}")


async def metric_lines(proxy: Proxy, name: str) -> list[str]:
    text = (await exposition(proxy.metrics))[0].decode()
    return [line for line in text.splitlines() if line.startswith(name)]


async def test_refusing_backend_is_ejected_then_1000_connections_see_no_retry(
    tmp_path: Path, scenes: list[Scene], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    scene = Scene(tmp_path, good=2, dead=1)
    scenes.append(scene)
    (dead,) = scene.dead_endpoints
    async with running_proxy(scene.manifests) as proxy:
        detector = detector_of(proxy)
        assert detector.settings.consecutive_failures == 5  # the defaults
        await until_ejected(scene, detector, 1)
        (ejection,) = detector.status()
        assert str(ejection.endpoint) == dead
        assert ejection.duration == 30.0
        retries, failures = dial_counts(proxy)
        assert failures == 5, "ejected after exactly N failed dials"

        seen = await answers(scene.address, 1000)

        assert sum(seen.values()) == 1000
        assert set(seen) == {"b1", "b2"}
        assert min(seen.values()) >= 300, seen  # the two good ones share the load
        assert dial_counts(proxy) == (retries, failures), "a dial went to the ejected one"
        service_port = 'protocol="TCP",service_port="default/web:tcp"'
        assert await metric_lines(proxy, "userproxy_endpoint_ejections_total") == [
            f"userproxy_endpoint_ejections_total{{{service_port}}} 1.0"
        ]
        assert await metric_lines(proxy, "userproxy_endpoints_ejected") == [
            f"userproxy_endpoints_ejected{{{service_port}}} 1.0"
        ]
        (remaining,) = await metric_lines(proxy, "userproxy_endpoint_ejection_remaining_seconds")
        assert f'endpoint="{dead}"' in remaining
        assert 0 < float(remaining.split()[-1]) <= 30
        assert await metric_lines(proxy, "userproxy_upstream_dial_retries_total") == [
            f"userproxy_upstream_dial_retries_total{{{service_port}}} {retries}.0"
        ]
    ejected = [r for r in caplog.records if r.name == LOGGER]
    assert [(r.levelname, r.getMessage()) for r in ejected] == [
        (
            "WARNING",
            f"default/web:tcp/TCP: endpoint {dead} ejected for 30s after 5 failed dials in "
            "a row (ejection 1 in a row; 1 of 3 endpoints out)",
        )
    ]


async def test_ejected_backend_returns_and_is_ejected_twice_as_long(
    tmp_path: Path, scenes: list[Scene], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    scene = Scene(tmp_path, good=2, dead=1)
    scenes.append(scene)
    (dead,) = scene.dead_endpoints
    async with running_proxy(
        scene.manifests, outlier_base_ejection=0.3, outlier_max_ejection=3.0
    ) as proxy:
        detector = detector_of(proxy)
        await until_ejected(scene, detector, 1)
        # Back after its time, without traffic (the sweeper returns it) ...
        await eventually(lambda: not detector.ejected, 5.0, "the endpoint's return")
        _, failures = dial_counts(proxy)
        # ... dialed again, and out again, for twice as long, after N more failures.
        await until_ejected(scene, detector, 2)
        assert dial_counts(proxy)[1] == failures + 5
        await eventually(lambda: not detector.ejected, 5.0, "the second return")
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == LOGGER]
    assert lines == [
        (
            "WARNING",
            f"default/web:tcp/TCP: endpoint {dead} ejected for 300ms after 5 failed dials "
            "in a row (ejection 1 in a row; 1 of 3 endpoints out)",
        ),
        (
            "INFO",
            f"default/web:tcp/TCP: endpoint {dead} is back from ejection (ejected 1 time in a row)",
        ),
        (
            "WARNING",
            f"default/web:tcp/TCP: endpoint {dead} ejected for 600ms after 5 failed dials "
            "in a row (ejection 2 in a row; 1 of 3 endpoints out)",
        ),
        (
            "INFO",
            f"default/web:tcp/TCP: endpoint {dead} is back from ejection (ejected 2 times "
            "in a row)",
        ),
    ]


async def test_at_most_half_the_endpoints_are_ejected(
    tmp_path: Path, scenes: list[Scene], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    scene = Scene(tmp_path, good=1, dead=2)
    scenes.append(scene)
    async with running_proxy(scene.manifests) as proxy:
        detector = detector_of(proxy)
        await until_ejected(scene, detector, 1)
        # Enough connections for the other dead one to fail N times over.
        seen = await answers(scene.address, 60)
        assert seen == Counter({"b1": 60})
        assert detector.ejections == 1
        assert len(detector.status()) == 1
        assert dial_counts(proxy)[1] > 5 + 5, "the second dead endpoint kept being dialed"
        service_port = 'protocol="TCP",service_port="default/web:tcp"'
        assert await metric_lines(proxy, "userproxy_endpoints_ejected") == [
            f"userproxy_endpoints_ejected{{{service_port}}} 1.0"
        ]
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2, messages
    assert "ejected for 30s" in messages[0]
    assert messages[1].endswith(
        "is not ejected: 1 of 3 endpoints are already out (at most 50%, never the last one)"
    )


def ask_or_reset(address: tuple[str, int]) -> str:
    try:
        return ask(address) or "closed"
    except ConnectionResetError:
        return "reset"


async def test_reset_before_any_byte_counts_as_a_failed_dial(
    tmp_path: Path, scenes: list[Scene]
) -> None:
    scene = Scene(tmp_path, good=2, dead=0, odd=reset_after_request)
    scenes.append(scene)
    assert scene.odd is not None
    async with running_proxy(scene.manifests) as proxy:
        detector = detector_of(proxy)
        for _ in range(60):
            if detector.ejections:
                break
            await asyncio.to_thread(ask_or_reset, scene.address)
        (ejection,) = detector.status()
        assert ejection.endpoint.ip == scene.odd.ip
        # Its dials succeeded: the connections it reset were the failures.
        assert dial_counts(proxy) == (0, 0)
        accepted = scene.odd.connections
        seen = Counter(
            await asyncio.to_thread(lambda: [ask_or_reset(scene.address) for _ in range(100)])
        )
        assert set(seen) == {"b1", "b2"}, seen
        assert scene.odd.connections == accepted


async def test_reset_after_an_answer_is_no_failure(tmp_path: Path, scenes: list[Scene]) -> None:
    scene = Scene(tmp_path, good=1, dead=0, odd=answer_then_reset)
    scenes.append(scene)
    assert scene.odd is not None
    async with running_proxy(scene.manifests) as proxy:
        detector = detector_of(proxy)
        seen = Counter(
            await asyncio.to_thread(lambda: [ask_or_reset(scene.address) for _ in range(40)])
        )
        assert seen["flaky"] >= 10, seen
        assert scene.odd.connections >= 10
        assert detector.ejections == 0


async def test_backend_resetting_at_accept_leaves_no_socket_to_close_twice(
    tmp_path: Path, scenes: list[Scene]
) -> None:
    """A regression test found here: on uvloop, a dialed socket whose transport closed
    before uvloop attached it was closed again by its finaliser (a ResourceWarning, which
    fails the test; in production a double close of a reused fd number)."""
    scene = Scene(tmp_path, good=1, dead=0, odd=reset_at_once)
    scenes.append(scene)
    async with running_proxy(scene.manifests, outlier_consecutive_failures=0):
        for _ in range(3):
            await asyncio.to_thread(lambda: [ask_or_reset(scene.address) for _ in range(40)])
            gc.collect()
