"""The access log: every way a TCP connection or a UDP session ends gives one line with the
right fields (HAProxy's tcplog and Envoy's TCP access log, see dataplane/access_log.py).

Most tests drive a real ``ListenerSet`` with real sockets on 127.173.x.y and the real
sweep (called with a loop time past the deadline, so no test waits out a timeout); one runs
the whole proxy with ``--access-log`` in text format and ends it, so the wiring, the
shutdown drain and the flush at exit are covered too.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.backends import Backend, UdpBackend, echo
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, running_proxy
from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane import access_log
from userproxy.dataplane import access_log as ends
from userproxy.dataplane.access_log import AccessLog
from userproxy.dataplane.deadlines import TcpTimeouts
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.dataplane.udp_session import UdpSettings
from userproxy.model import (
    AddressKind,
    Endpoint,
    ListenerSpec,
    PoolSpec,
    Protocol,
    ServiceKey,
    ServicePortName,
)

pytestmark = pytest.mark.both_loops

PORT = 8080
LINGER_ZERO = struct.pack("ii", 1, 0)
_nets = itertools.count(2)
KEY = ServiceKey("default", "web")


def net() -> int:
    """A fresh 127.173.N.0/24 for this test (N even: the service side; N+1 backends)."""
    return next(_nets) * 2 % 250


def records(path: Path, count: int, within: float = 5.0) -> list[dict[str, Any]]:
    """The first ``count`` JSON lines of ``path``, waiting for the writer thread."""
    deadline = time.monotonic() + within
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            assert len(lines) >= count, lines
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


class Rig:
    """A ListenerSet with a JSON access log and one TCP or UDP Service port."""

    def __init__(self, tmp_path: Path, protocol: Protocol = Protocol.TCP) -> None:
        n = net()
        self.ip = f"127.173.{n}.1"
        self.backend_ip = f"127.173.{n + 1}.1"
        self.spn = ServicePortName("default", "web", "http", protocol)
        self.path = tmp_path / "access.log"
        self.log = AccessLog(str(self.path), "json")
        self.set = ListenerSet(
            BalancerRegistry(),
            ConnectionLimit(8, service_share=100, client_share=25),
            TcpTimeouts(fin=5.0, idle=5.0),
            UdpSettings(idle_timeout=5.0),
        )
        self.set.access_log = self.log

    def serve(self, *endpoints: Endpoint, **spec: Any) -> None:
        pool = PoolSpec(tuple(endpoints), "round-robin")
        self.set.set_listeners(
            KEY, [ListenerSpec(self.spn, AddressKind.CLUSTER_IP, self.ip, PORT, pool, **spec)]
        )

    def lines(self, count: int = 1) -> list[dict[str, Any]]:
        return records(self.path, count)

    async def close(self) -> None:
        self.set.stop_accepting()
        await self.set.drain(0.0)
        self.log.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = Rig(tmp_path)
    try:
        yield rig
    finally:
        await rig.close()


def check_common(line: dict[str, Any], rig: Rig, client: tuple[str, int] | None) -> None:
    assert line["protocol"] == "tcp"
    assert line["listener"] == f"{rig.ip}:{PORT}"
    assert line["service_port"] == "default/web:http/TCP"
    if client is not None:
        assert line["client"] == f"{client[0]}:{client[1]}"
    assert line["duration_ms"] >= 0
    assert abs(line["time"] - time.time()) < 60


async def connected_line(rig: Rig, backend: Backend, line: dict[str, Any]) -> None:
    assert line["endpoint"] == f"{rig.backend_ip}:{backend.port}"
    assert line["attempts"] == 1
    assert 0 <= line["connect_ms"] <= line["duration_ms"]


# -- clean ends and resets ------------------------------------------------------------------
async def test_client_closed(rig: Rig) -> None:
    backend = Backend(rig.backend_ip, echo)
    rig.serve(Endpoint(rig.backend_ip, backend.port))

    def talk() -> tuple[str, int]:
        with socket.create_connection((rig.ip, PORT), 5) as sock:
            sock.sendall(b"x" * 1000)
            sock.shutdown(socket.SHUT_WR)  # the client's FIN first
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            assert len(got) == 1000
            return sock.getsockname()  # type: ignore[no-any-return]

    try:
        client = await asyncio.to_thread(talk)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        backend.stop()
    check_common(line, rig, client)
    await connected_line(rig, backend, line)
    assert (line["bytes_in"], line["bytes_out"], line["end"]) == (1000, 1000, ends.CLIENT_CLOSED)


async def test_endpoint_closed(rig: Rig) -> None:
    def greet(conn: socket.socket) -> None:
        conn.sendall(b"hello")  # server-first, then the endpoint's FIN

    backend = Backend(rig.backend_ip, greet)
    rig.serve(Endpoint(rig.backend_ip, backend.port))

    def talk() -> None:
        with socket.create_connection((rig.ip, PORT), 5) as sock:
            assert sock.recv(100) == b"hello"
            assert sock.recv(100) == b""

    try:
        await asyncio.to_thread(talk)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        backend.stop()
    check_common(line, rig, None)
    await connected_line(rig, backend, line)
    assert (line["bytes_in"], line["bytes_out"], line["end"]) == (0, 5, ends.ENDPOINT_CLOSED)


async def test_client_reset(rig: Rig) -> None:
    got = threading.Event()

    def wait(conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.recv(10)
        got.set()
        conn.recv(10)

    backend = Backend(rig.backend_ip, wait)
    rig.serve(Endpoint(rig.backend_ip, backend.port))

    def talk() -> None:
        sock = socket.create_connection((rig.ip, PORT), 5)
        sock.sendall(b"abc")
        assert got.wait(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        sock.close()

    try:
        await asyncio.to_thread(talk)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        backend.stop()
    check_common(line, rig, None)
    await connected_line(rig, backend, line)
    assert (line["bytes_in"], line["end"]) == (3, ends.CLIENT_RESET)


async def test_endpoint_reset(rig: Rig) -> None:
    def reset(conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.recv(10)
        conn.sendall(b"partial")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)

    backend = Backend(rig.backend_ip, reset)
    rig.serve(Endpoint(rig.backend_ip, backend.port))

    def talk() -> None:
        with socket.create_connection((rig.ip, PORT), 5) as sock:
            sock.sendall(b"go")
            sock.settimeout(5)
            try:
                while sock.recv(100):
                    pass
            except ConnectionResetError:
                return
            raise AssertionError("no reset")

    try:
        await asyncio.to_thread(talk)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        backend.stop()
    check_common(line, rig, None)
    await connected_line(rig, backend, line)
    assert line["bytes_in"] == 2
    assert line["end"] == ends.ENDPOINT_RESET


# -- timeouts and shutdown --------------------------------------------------------------------
def hold(conn: socket.socket) -> None:
    """An endpoint that never ends a connection itself (not even after the client's FIN);
    ``Backend.stop`` resets it."""
    conn.settimeout(10)
    while conn.recv(10):
        pass
    time.sleep(10)


async def _open_idle(rig: Rig, half_close: bool) -> tuple[socket.socket, Backend]:
    backend = Backend(rig.backend_ip, hold)
    rig.serve(Endpoint(rig.backend_ip, backend.port))
    sock = await asyncio.to_thread(socket.create_connection, (rig.ip, PORT), 5)
    if half_close:
        sock.shutdown(socket.SHUT_WR)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while not any(
        c.endpoint is not None and (c.half_closed_at is not None or not half_close)
        for c in rig.set.connections()
    ):
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    return sock, backend


async def test_idle_timeout(rig: Rig) -> None:
    sock, backend = await _open_idle(rig, half_close=False)
    try:
        now = asyncio.get_running_loop().time()
        await rig.set.sweep(now)  # marks it idle
        await rig.set.sweep(now + 6)  # past --tcp-idle-timeout (5 s here)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        sock.close()
        backend.stop()
    check_common(line, rig, None)
    await connected_line(rig, backend, line)
    assert line["end"] == ends.IDLE_TIMEOUT


async def test_half_close_timeout(rig: Rig) -> None:
    sock, backend = await _open_idle(rig, half_close=True)
    try:
        await rig.set.sweep(asyncio.get_running_loop().time() + 6)  # past --tcp-fin-timeout
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        sock.close()
        backend.stop()
    check_common(line, rig, None)
    assert line["end"] == ends.HALF_CLOSE_TIMEOUT


async def test_drained_at_shutdown(rig: Rig) -> None:
    sock, backend = await _open_idle(rig, half_close=False)
    try:
        rig.set.stop_accepting()
        assert await rig.set.drain(0.0) == 1
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        sock.close()
        backend.stop()
    check_common(line, rig, None)
    await connected_line(rig, backend, line)
    assert line["end"] == ends.DRAINED


# -- refusals ---------------------------------------------------------------------------------
def _refused(ip: str) -> tuple[str, int]:
    """Connect; the proxy resets at once (seen by connect, send or recv, depending on
    when the RST arrives).  The client's own address."""
    with socket.socket() as sock:
        sock.bind((ip.rsplit(".", 1)[0] + ".9", 0))
        client: tuple[str, int] = sock.getsockname()
        sock.settimeout(5)
        try:
            sock.connect((ip, PORT))
            sock.sendall(b"x")
            sock.recv(10)
        except (ConnectionResetError, BrokenPipeError):
            return client
    raise AssertionError("not reset")


async def test_no_endpoint_reachable(rig: Rig) -> None:
    closed = socket.socket()
    closed.bind((rig.backend_ip, 0))  # bound, not listening: every dial is refused
    port = closed.getsockname()[1]
    rig.serve(Endpoint(rig.backend_ip, port))
    try:
        client = await asyncio.to_thread(_refused, rig.ip)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        closed.close()
    check_common(line, rig, client)
    assert line["endpoint"] is None
    assert line["connect_ms"] is None
    assert line["attempts"] >= 1
    assert line["end"] == ends.NO_ENDPOINT_REACHABLE


async def test_source_range_refused(rig: Rig) -> None:
    rig.serve(Endpoint(rig.backend_ip, 1), source_ranges=("10.0.0.0/8",))
    client = await asyncio.to_thread(_refused, rig.ip)
    [line] = await asyncio.to_thread(rig.lines)
    check_common(line, rig, client)
    assert (line["endpoint"], line["attempts"], line["bytes_in"]) == (None, 0, 0)
    assert line["end"] == ends.SOURCE_RANGE_REFUSED


async def test_no_endpoints_for_class(rig: Rig) -> None:
    # externalTrafficPolicy: Local with no local endpoint: node-local clients (loopback
    # always is) have none, while the socket is open for the others.
    rig.serve(Endpoint(rig.backend_ip, 1), node_pool=PoolSpec((), "round-robin"))
    client = await asyncio.to_thread(_refused, rig.ip)
    [line] = await asyncio.to_thread(rig.lines)
    check_common(line, rig, client)
    assert line["end"] == ends.NO_ENDPOINTS_FOR_CLASS


async def test_connection_limit_refused(rig: Rig) -> None:
    backend = Backend(rig.backend_ip, hold)
    rig.serve(Endpoint(rig.backend_ip, backend.port))
    # ConnectionLimit(8, client_share=25): one client IP may hold 2.
    client_ip = rig.ip.rsplit(".", 1)[0] + ".9"
    held = [
        await asyncio.to_thread(socket.create_connection, (rig.ip, PORT), 5, (client_ip, 0))
        for _ in range(2)
    ]
    try:
        deadline = time.monotonic() + 5
        while sum(1 for _ in rig.set.connections()) < 2:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        client = await asyncio.to_thread(_refused, rig.ip)
        [line] = await asyncio.to_thread(rig.lines)
    finally:
        for sock in held:
            sock.close()
        backend.stop()
    check_common(line, rig, client)
    assert line["end"] == ends.CONNECTION_LIMIT_REFUSED


# -- UDP --------------------------------------------------------------------------------------
async def test_udp_session_idle_and_drained(tmp_path: Path) -> None:
    rig = Rig(tmp_path, Protocol.UDP)
    backend = UdpBackend(rig.backend_ip)
    rig.serve(Endpoint(rig.backend_ip, backend.port))

    def ask(sock: socket.socket, data: bytes) -> None:
        sock.settimeout(5)
        sock.sendto(data, (rig.ip, PORT))
        assert sock.recv(100) == data

    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    second = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    clients = []
    for sock in (first, second):
        sock.bind(("127.0.0.1", 0))
        clients.append("{}:{}".format(*sock.getsockname()))
    try:
        await asyncio.to_thread(ask, first, b"ping")
        await rig.set.sweep(asyncio.get_running_loop().time() + 6)  # past --udp-idle-timeout
        [idle] = await asyncio.to_thread(rig.lines)
        await asyncio.to_thread(ask, second, b"hello")
        await rig.close()
        _, drained = await asyncio.to_thread(rig.lines, 2)
    finally:
        first.close()
        second.close()
        backend.stop()
    for line, client, size, end in ((idle, clients[0], 4, ends.IDLE_TIMEOUT),
                                    (drained, clients[1], 5, ends.DRAINED)):  # fmt: skip
        assert line["protocol"] == "udp"
        assert line["client"] == client
        assert line["listener"] == f"{rig.ip}:{PORT}"
        assert line["service_port"] == "default/web:http/UDP"
        assert line["endpoint"] == f"{rig.backend_ip}:{backend.port}"
        assert (line["bytes_in"], line["bytes_out"], line["end"]) == (size, size, end)


# -- the whole proxy, text format ---------------------------------------------------------------
def echo_service_manifests(tmp_path: Path) -> tuple[Path, str, Backend]:
    """Manifests of one Service (``default/web``, port ``http``) over one echo backend:
    the directory, the cluster IP and the backend (stopped by the caller)."""
    n = net()
    cluster_ip, backend_ip = f"127.173.{n}.1", f"127.173.{n + 1}.1"
    backend = Backend(backend_ip, echo)
    manifests = tmp_path / "m"
    manifests.mkdir()
    write(
        manifests / "s.json",
        service("web", cluster_ip, PORT, port_name="http"),
        endpoint_slice("web-1", "web", backend.port, [backend_ip], port_name="http"),
    )
    return manifests, cluster_ip, backend


async def test_proxy_writes_text_lines_and_flushes_at_exit(tmp_path: Path) -> None:
    manifests, cluster_ip, backend = echo_service_manifests(tmp_path)
    backend_ip = backend.ip
    log_path = tmp_path / "access.log"

    def talk() -> socket.socket:
        sock = socket.create_connection((cluster_ip, PORT), 5)
        sock.sendall(b"0123456789")
        assert sock.recv(100) == b"0123456789"
        return sock

    try:
        async with running_proxy(manifests, access_log=str(log_path), shutdown_grace=0.2):
            sock = await asyncio.to_thread(talk)  # left open: drained at shutdown
        client = sock.getsockname()
        sock.close()
    finally:
        backend.stop()
    [line] = log_path.read_text().splitlines()  # written before run() returned
    assert f" tcp {client[0]}:{client[1]} -> {cluster_ip}:{PORT} default/web:http/TCP " in line
    assert f" endpoint={backend_ip}:{backend.port} attempts=1 connect=" in line
    assert line.endswith(" bytes_in=10 bytes_out=10 end=drained"), line


# -- a writer that falls behind ---------------------------------------------------------------
async def test_full_queue_drops_and_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Beyond QUEUE_LIMIT waiting lines, new ones are dropped, counted and warned about
    (once per interval, not per line); the rest are written."""
    monkeypatch.setattr(access_log, "QUEUE_LIMIT", 10)
    log = AccessLog(str(tmp_path / "a.log"), "json")
    spn = ServicePortName("default", "web", "http", Protocol.TCP)
    for port in range(1000):  # far faster than the writer's 50 ms wake-ups
        log.record((time.time(), "tcp", "127.0.0.1", port, "127.0.0.2", 80, spn, None, 0,
                    -1.0, 0.0, 0, 0, ends.CLIENT_CLOSED))  # fmt: skip
    await asyncio.to_thread(log.close)
    lines = (tmp_path / "a.log").read_text().splitlines()
    assert log.dropped > 0
    assert len(lines) == log.written == 1000 - log.dropped
    assert all(json.loads(line)["end"] == "client_closed" for line in lines)
    warnings = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(warnings) == 1, warnings


async def test_lines_written_dropped_and_failed_are_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``userproxy_access_log_lines_total{outcome}`` counts what the writer did with each
    line, parsed from /metrics' text with prometheus_client's parser."""
    manifests, cluster_ip, backend = echo_service_manifests(tmp_path)

    def talk(count: int) -> None:
        for _ in range(count):
            with socket.create_connection((cluster_ip, PORT), 5) as sock:
                sock.sendall(b"x")
                assert sock.recv(10) == b"x"

    def lines(proxy: Any) -> dict[str, float]:
        text = generate_latest(proxy.metrics.registry).decode()
        return {
            sample.labels["outcome"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "userproxy_access_log_lines"
            for sample in family.samples
            if sample.name.endswith("_total")
        }

    try:
        async with running_proxy(manifests, access_log=str(tmp_path / "access.log")) as proxy:
            await asyncio.to_thread(talk, 3)
            await eventually(lambda: lines(proxy)["written"] == 3, 5, "3 lines written")
            monkeypatch.setattr(access_log, "QUEUE_LIMIT", 0)  # the writer "falls behind"
            await asyncio.to_thread(talk, 2)
            await eventually(lambda: lines(proxy)["dropped"] == 2, 5, "2 lines dropped")
            monkeypatch.undo()
            log = proxy.listeners.access_log
            assert log is not None
            log._stream.close()  # the file goes away under the writer (as a full disk)
            await asyncio.to_thread(talk, 1)
            await eventually(lambda: lines(proxy)["failed"] == 1, 5, "1 line lost")
            assert lines(proxy) == {"written": 3, "dropped": 2, "failed": 1}
    finally:
        backend.stop()
