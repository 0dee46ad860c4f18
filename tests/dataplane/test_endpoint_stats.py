"""Per-endpoint totals (balancers/load.py ``EndpointLoad.totals``) as ``/status`` shows them:
connections (UDP: sessions), bytes each way and failed dials, counted by the data path
over real sockets; what each backend saw is the reference.  Totals of an endpoint that
left every pool are dropped.

Addresses: 127.217.x.y only (no other test uses 127.217).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.admin.test_status import fetch
from tests.support.backends import Backend, UdpBackend
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, free_port, running_proxy, wait_for_sync
from userproxy.proxy import Proxy

pytestmark = pytest.mark.both_loops

SERVICE = ("127.217.1.1", 8080)
BACKENDS = ("127.217.1.11", "127.217.1.12")


class Counting:
    """A backend handler: reads to EOF, answers ``2 * received + 7`` bytes, closes; keeps
    what it saw (connections, bytes received and sent) under a lock."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = self.received = self.sent = 0

    def __call__(self, conn: socket.socket) -> None:
        got = 0
        while data := conn.recv(1 << 16):
            got += len(data)
        answer = b"a" * (2 * got + 7)
        conn.sendall(answer)
        with self.lock:
            self.connections += 1
            self.received += got
            self.sent += len(answer)


def exchange(payload: bytes) -> int:
    """One connection to the Service: send ``payload``, half-close, read everything."""
    with socket.create_connection(SERVICE, timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        total = 0
        while data := sock.recv(1 << 16):
            total += len(data)
        return total


async def endpoints(base: str, name: str) -> dict[str, dict[str, Any]]:
    """The endpoint rows of Service ``name``'s one port, by IP, from /status."""
    code, body = await asyncio.to_thread(fetch, f"{base}/status?q={name}")
    assert code == 200
    (svc,) = [s for s in json.loads(body)["services"] if s["name"] == name]
    (port,) = svc["ports"]
    return {e["address"].split(":")[0]: e for e in port["endpoints"]}


def slice_for(name: str, port: int, addresses: tuple[str, ...]) -> dict[str, Any]:
    return endpoint_slice(f"{name}-1", name, {"http": port}, addresses, port_name="http")


async def test_tcp_totals_match_what_each_backend_saw(tmp_path: Path) -> None:
    handlers = [Counting(), Counting()]
    first = Backend(BACKENDS[0], handlers[0])
    second = Backend(BACKENDS[1], handlers[1], port=first.port)
    manifest = tmp_path / "m.json"
    write(manifest, service("web", SERVICE[0], {"http": SERVICE[1]}),
          slice_for("web", first.port, BACKENDS))  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        async with running_proxy(tmp_path, metrics_bind_address=f"127.0.0.1:{port}") as proxy:
            sizes = [1, 100, 1000, 5000, 65536, 200_000, 3, 70_001, 12, 0]
            for size in sizes:
                assert await asyncio.to_thread(exchange, b"x" * size) == 2 * size + 7
            load = proxy.registry.context.load
            await eventually(lambda: not load.active, what="every connection finished")
            rows = await endpoints(base, "web")
            assert sum(h.connections for h in handlers) == len(sizes)
            assert all(h.connections for h in handlers), "round-robin used both"
            for ip, handler in zip(BACKENDS, handlers, strict=True):
                row = rows[ip]
                assert row["connections_total"] == handler.connections, row
                assert row["bytes_up"] == handler.received, row
                assert row["bytes_down"] == handler.sent, row
                assert row["dial_failures"] == 0
                assert row["active_connections"] == 0
            # The HTML page's endpoint rows show the same figures.
            code, page = await asyncio.to_thread(fetch, f"{base}/?q=web")
            assert code == 200
            assert "<th>dial failures</th>" in page
            for ip, handler in zip(BACKENDS, handlers, strict=True):
                assert f"<td>{handler.received}</td><td>{handler.sent}</td><td>0</td>" in page, ip

            # An open connection counts, with its bytes so far, before it ends.
            with socket.create_connection(SERVICE, timeout=5) as sock:
                await asyncio.to_thread(sock.sendall, b"y" * 4321)
                before = {ip: rows[ip]["bytes_up"] for ip in BACKENDS}

                async def counted() -> bool:
                    now = await endpoints(base, "web")
                    added: int = sum(now[ip]["bytes_up"] - before[ip] for ip in BACKENDS)
                    return added == 4321

                for _ in range(100):
                    if await counted():
                        break
                    await asyncio.sleep(0.05)
                else:
                    pytest.fail("the open connection's bytes are not in /status")
                now = await endpoints(base, "web")
                assert sum(now[ip]["connections_total"] for ip in BACKENDS) == len(sizes) + 1
                assert sum(now[ip]["active_connections"] for ip in BACKENDS) == 1
    finally:
        first.stop()
        second.stop()


async def test_dial_failures_count_on_the_dead_endpoint(tmp_path: Path) -> None:
    """One endpoint stopped (nothing listens) but still ready: its dials fail, counted
    there; the clients are served by the other one."""
    live = Backend("127.217.2.11", Counting())
    dead = Backend("127.217.2.12", Counting(), port=live.port)
    dead.stop()
    address = ("127.217.2.1", 8080)
    write(tmp_path / "m.json", service("api", address[0], {"http": address[1]}),
          slice_for("api", live.port, ("127.217.2.11", "127.217.2.12")))  # fmt: skip
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        async with running_proxy(tmp_path, metrics_bind_address=f"127.0.0.1:{port}") as proxy:

            def one() -> int:
                with socket.create_connection(address, timeout=5) as sock:
                    sock.sendall(b"ping")
                    sock.shutdown(socket.SHUT_WR)
                    return len(sock.recv(1 << 16))

            for _ in range(6):
                assert await asyncio.to_thread(one) == 15
            load = proxy.registry.context.load
            await eventually(lambda: not load.active, what="every connection finished")
            rows = await endpoints(base, "api")
            code, body = await asyncio.to_thread(fetch, f"{base}/status?q=api")
            assert code == 200
            (svc,) = json.loads(body)["services"]
            port_failures = svc["ports"][0]["totals"]["dial_failures"]
            assert rows["127.217.2.12"]["dial_failures"] >= 1
            assert rows["127.217.2.12"]["dial_failures"] == port_failures
            assert rows["127.217.2.12"]["connections_total"] == 0
            assert rows["127.217.2.11"]["dial_failures"] == 0
            assert rows["127.217.2.11"]["connections_total"] == 6
            assert rows["127.217.2.11"]["bytes_up"] == 6 * 4

            # Five failures in a row eject it (the defaults): the row and the count say so.
            detector = proxy.listeners.outliers(next(iter(proxy.listeners)).spec.spn)
            assert detector is not None
            for _ in range(40):
                if detector.ejected:
                    break
                assert await asyncio.to_thread(one) == 15
            rows = await endpoints(base, "api")
            assert rows["127.217.2.12"]["ejected"] is True
            assert rows["127.217.2.11"]["ejected"] is False
            assert rows["127.217.2.12"]["dial_failures"] >= 5
            code, body = await asyncio.to_thread(fetch, f"{base}/status?q=api")
            assert json.loads(body)["services"][0]["ports"][0]["counts"]["ejected"] == 1
    finally:
        live.stop()


async def test_udp_sessions_and_bytes_per_endpoint(tmp_path: Path) -> None:
    backends = [UdpBackend("127.217.3.11")]
    address = ("127.217.3.1", 5353)
    udp_service = service("dns", address[0], {"dns": address[1]}, protocol="UDP")
    eps = endpoint_slice("dns-1", "dns", {"dns": backends[0].port}, ("127.217.3.11",),
                         port_name="dns")  # fmt: skip
    eps["ports"][0]["protocol"] = "UDP"
    write(tmp_path / "m.json", udp_service, eps)
    try:
        async with running_proxy(tmp_path) as proxy:
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(3)]
            try:
                for i, client in enumerate(clients):
                    client.settimeout(5)
                    for size in (10, 200 + i):
                        client.sendto(b"q" * size, address)
                        data, _ = await asyncio.to_thread(client.recvfrom, 65536)
                        assert len(data) == size
                view = proxy.status
                assert view is not None
                page = await view.build("dns")
                (row,) = page.services[0]["ports"][0]["endpoints"]  # type: ignore[index]
                assert row["connections_total"] == 3  # the open sessions count
                assert row["bytes_up"] == row["bytes_down"] == 3 * 210 + 3
            finally:
                for client in clients:
                    client.close()
            # Sessions that ended (the listener closed with the port) keep nothing: the
            # endpoint left every pool.
            syncs = proxy.proxier.status.syncs
            write(tmp_path / "m.json", udp_service)
            await wait_for_sync(proxy, syncs)
            load = proxy.registry.context.load
            await eventually(lambda: ("127.217.3.11", backends[0].port) not in load.held)
            assert ("127.217.3.11", backends[0].port) not in load.totals
    finally:
        for backend in backends:
            backend.stop()


async def test_totals_of_an_endpoint_that_left_every_pool_are_dropped(tmp_path: Path) -> None:
    handler = Counting()
    first = Backend("127.217.4.11", handler)
    second = Backend("127.217.4.12", handler, port=first.port)
    address = ("127.217.4.1", 8080)
    manifest = tmp_path / "m.json"
    svc = service("gone", address[0], {"http": address[1]})
    write(manifest, svc, slice_for("gone", first.port, ("127.217.4.11", "127.217.4.12")))
    try:
        async with running_proxy(tmp_path) as proxy:
            for _ in range(4):
                with socket.create_connection(address, timeout=5) as sock:
                    await asyncio.to_thread(sock.sendall, b"z")
                    sock.shutdown(socket.SHUT_WR)
                    await asyncio.to_thread(sock.recv, 64)
            load = proxy.registry.context.load
            keys = [("127.217.4.11", first.port), ("127.217.4.12", first.port)]
            # Every connection ended and counted (the last close reaches the proxy after
            # the client's recv returns): 2 each, round-robin.
            await eventually(
                lambda: sum(load.totals[k].connections for k in keys if k in load.totals) == 4,
                what="all 4 connections counted",
            )
            syncs = proxy.proxier.status.syncs
            write(manifest, svc, slice_for("gone", first.port, ("127.217.4.11",)))
            await wait_for_sync(proxy, syncs)
            await eventually(lambda: keys[1] not in load.held, what="released")
            assert keys[1] not in load.totals
            assert load.totals[keys[0]].connections == 2
            _check_held_matches_pools(proxy)
    finally:
        first.stop()
        second.stop()


def _check_held_matches_pools(proxy: Proxy) -> None:
    """``held`` counts exactly the pools' endpoints (the memory bound's invariant)."""
    expected: dict[tuple[str, int], int] = {}
    for listener in proxy.listeners:
        for pool in (listener.pool, listener.node_pool):
            if pool is not None:
                for e in pool.spec.endpoints:
                    expected[(e.ip, e.port)] = expected.get((e.ip, e.port), 0) + 1
    assert proxy.registry.context.load.held == expected
