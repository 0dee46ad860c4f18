"""End-to-end TCP proxying over real sockets, on both event loops.

Each test writes manifests into a temporary directory, runs a Proxy on the test's loop and
talks to it with blocking sockets in threads (``asyncio.to_thread``), so the peers never
depend on the loop under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.backends import Backend, ask, echo, name_server, recv_all
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import running_proxy, wait_for_sync

pytestmark = pytest.mark.both_loops

SERVICE_PORT = 8080


class Scene:
    """A Service at a fresh 127.a.b.1 and name backends at 127.a.c.x, one slice each."""

    def __init__(self, tmp_path: Path, count: int = 3) -> None:
        net = fresh_net()
        self.cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
        self.address = (self.cluster_ip, SERVICE_PORT)
        self.manifest = tmp_path / "manifests" / "scene.json"
        self.manifest.parent.mkdir()
        self.backends = [
            Backend(f"127.{net // 200 + 150}.{net % 200}.{i + 1}", name_server(f"b{i + 1}"))
            for i in range(count)
        ]

    def publish(
        self,
        ready: dict[int, bool] | None = None,
        only: list[int] | None = None,
        affinity_timeout: int | None = None,
    ) -> None:
        """Write the manifests: every backend (or ``only`` those) with its ready flag."""
        chosen = range(len(self.backends)) if only is None else only
        slices = [
            endpoint_slice(
                f"web-{i}",
                "web",
                self.backends[i].port,
                [self.backends[i].ip],
                ready=[(ready or {}).get(i, True)],
            )
            for i in chosen
        ]
        svc = service("web", self.cluster_ip, SERVICE_PORT, affinity_timeout=affinity_timeout)
        write(self.manifest, svc, *slices)

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path)
    yield s
    s.close()


async def answers(address: tuple[str, int], count: int, source: str | None = None) -> Counter[str]:
    def run() -> Counter[str]:
        return Counter(ask(address, source=source) for _ in range(count))

    return await asyncio.to_thread(run)


async def test_balances_over_all_backends(scene: Scene) -> None:
    scene.publish()
    async with running_proxy(scene.manifest.parent):
        seen = await answers(scene.address, 30)
    assert set(seen) == {"b1", "b2", "b3"}
    assert min(seen.values()) >= 5, seen


async def test_not_ready_endpoint_gets_no_new_connections_but_keeps_open_ones(
    scene: Scene,
) -> None:
    scene.publish()
    async with running_proxy(scene.manifest.parent) as proxy:
        # Open connections until one lands on b1, and keep it open.
        def open_to_b1() -> tuple[socket.socket, list[socket.socket]]:
            others: list[socket.socket] = []
            for _ in range(20):
                sock = socket.create_connection(scene.address, timeout=5)
                sock.sendall(b"who\n")
                if sock.makefile("rb").readline().strip() == b"b1":
                    return sock, others
                others.append(sock)
            raise AssertionError("no connection reached b1")

        kept, others = await asyncio.to_thread(open_to_b1)
        try:
            syncs = proxy.proxier.status.syncs
            scene.publish(ready={0: False})
            changed_at = time.monotonic()
            await wait_for_sync(proxy, syncs)
            assert time.monotonic() - changed_at < 1.0
            seen = await answers(scene.address, 20)
            assert set(seen) == {"b2", "b3"}, seen

            def still_works() -> bytes:
                kept.sendall(b"again\n")
                return kept.makefile("rb").readline().strip()

            assert await asyncio.to_thread(still_works) == b"b1"
        finally:
            kept.close()
            for sock in others:
                sock.close()


async def test_no_endpoints_refuses_at_once_and_recovers(scene: Scene) -> None:
    scene.publish()
    async with running_proxy(scene.manifest.parent) as proxy:
        syncs = proxy.proxier.status.syncs
        scene.publish(only=[])
        await wait_for_sync(proxy, syncs)

        def connect() -> float:
            started = time.monotonic()
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(scene.address, timeout=5)
            return time.monotonic() - started

        assert await asyncio.to_thread(connect) < 0.5
        syncs = proxy.proxier.status.syncs
        scene.publish(only=[1])
        await wait_for_sync(proxy, syncs)
        assert await answers(scene.address, 3) == Counter({"b2": 3})


async def test_killed_backend_still_listed_ready_costs_no_connection(scene: Scene) -> None:
    scene.publish()
    scene.backends[1].stop()
    async with running_proxy(scene.manifest.parent) as proxy:
        seen = await answers(scene.address, 100)
        stats = [listener.stats for listener in proxy.listeners]
    assert sum(seen.values()) == 100, seen
    assert set(seen) == {"b1", "b3"}, seen
    assert sum(s.dial_failures for s in stats) >= 1


async def test_dial_timeout_moves_to_next_endpoint_and_delivers_early_bytes(
    tmp_path: Path,
) -> None:
    """A backend whose handshake never completes (full backlog) costs one 250 ms attempt;
    the bytes the client sent meanwhile reach the next endpoint, half-close included."""
    net = fresh_net()
    cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
    black = socket.socket()
    black.bind((f"127.{net // 200 + 150}.{net % 200}.9", 0))
    black.listen(0)
    fillers = []
    for _ in range(8):  # fill the accept queue so further SYNs are dropped
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(black.getsockname())
        fillers.append(filler)
    good = Backend(f"127.{net // 200 + 150}.{net % 200}.10", echo)
    manifests = tmp_path / "m"
    manifests.mkdir()
    svc = service("web", cluster_ip, SERVICE_PORT, annotations={"userproxy.io/balancer": "random"})
    write(
        manifests / "s.json",
        svc,
        endpoint_slice("a", "web", black.getsockname()[1], [black.getsockname()[0]]),
        endpoint_slice("b", "web", good.port, [good.ip]),
    )
    try:
        async with running_proxy(manifests):

            def exchange() -> bytes:
                with socket.create_connection((cluster_ip, SERVICE_PORT), timeout=10) as sock:
                    sock.sendall(b"early bytes")
                    sock.shutdown(socket.SHUT_WR)
                    return recv_all(sock)

            results = await asyncio.gather(*(asyncio.to_thread(exchange) for _ in range(6)))
        assert results == [b"early bytes"] * 6
    finally:
        good.stop()
        for filler in fillers:
            filler.close()
        black.close()


async def test_half_close_10_mb_round_trip(tmp_path: Path) -> None:
    net = fresh_net()
    cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
    backend = Backend(f"127.{net // 200 + 150}.{net % 200}.1", echo)
    manifests = tmp_path / "m"
    manifests.mkdir()
    write(
        manifests / "s.json",
        service("echo", cluster_ip, SERVICE_PORT),
        endpoint_slice("echo-1", "echo", backend.port, [backend.ip]),
    )
    payload = os.urandom(10 * 1024 * 1024)
    try:
        async with running_proxy(manifests):

            def round_trip() -> bytes:
                with socket.create_connection((cluster_ip, SERVICE_PORT), timeout=30) as sock:
                    sock.sendall(payload)
                    sock.shutdown(socket.SHUT_WR)
                    return recv_all(sock)

            echoed = await asyncio.to_thread(round_trip)
    finally:
        backend.stop()
    assert hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("affinity", [True, False], ids=["client-ip", "none"])
async def test_client_ip_affinity(scene: Scene, affinity: bool) -> None:
    if affinity:
        scene.publish(affinity_timeout=60)
    else:
        scene.publish()
    clients = [f"127.0.70.{i}" for i in range(1, 11)]
    async with running_proxy(scene.manifest.parent):

        def per_client() -> dict[str, Counter[str]]:
            seen: dict[str, Counter[str]] = {c: Counter() for c in clients}
            for _ in range(20):
                for client in clients:
                    seen[client][ask(scene.address, source=client)] += 1
            return seen

        seen = await asyncio.to_thread(per_client)
    if affinity:
        assert all(len(backends) == 1 for backends in seen.values()), seen
        assert len({next(iter(b)) for b in seen.values()}) > 1, "all clients on one backend"
    else:
        assert all(len(backends) == 3 for backends in seen.values()), seen


async def test_removed_endpoint_keeps_established_connection(scene: Scene) -> None:
    scene.publish(only=[0])
    async with running_proxy(scene.manifest.parent) as proxy:
        sock = await asyncio.to_thread(socket.create_connection, scene.address, 5)
        try:
            reader = sock.makefile("rb")
            await asyncio.to_thread(sock.sendall, b"1\n")
            assert (await asyncio.to_thread(reader.readline)).strip() == b"b1"
            syncs = proxy.proxier.status.syncs
            scene.publish(only=[1])
            await wait_for_sync(proxy, syncs)
            assert await answers(scene.address, 3) == Counter({"b2": 3})
            await asyncio.to_thread(sock.sendall, b"2\n")
            assert (await asyncio.to_thread(reader.readline)).strip() == b"b1"
        finally:
            sock.close()


async def test_deleted_service_stops_accepting_open_connections_finish(scene: Scene) -> None:
    scene.publish()
    async with running_proxy(scene.manifest.parent, shutdown_grace=5.0) as proxy:
        sock = await asyncio.to_thread(socket.create_connection, scene.address, 5)
        try:
            reader = sock.makefile("rb")
            await asyncio.to_thread(sock.sendall, b"1\n")
            first = (await asyncio.to_thread(reader.readline)).strip()
            syncs = proxy.proxier.status.syncs
            write(scene.manifest)  # an empty List: the Service is gone
            await wait_for_sync(proxy, syncs)
            with pytest.raises(ConnectionRefusedError):
                await asyncio.to_thread(socket.create_connection, scene.address, 5)
            await asyncio.to_thread(sock.sendall, b"2\n")
            assert (await asyncio.to_thread(reader.readline)).strip() == first
        finally:
            sock.close()


async def test_max_connections_pauses_accepting(scene: Scene) -> None:
    scene.publish()
    async with running_proxy(
        scene.manifest.parent,
        max_connections=2,
        service_connection_share=100,
        client_connection_share=100,
    ) as proxy:
        first = await asyncio.to_thread(socket.create_connection, scene.address, 5)
        second = await asyncio.to_thread(socket.create_connection, scene.address, 5)
        try:
            await asyncio.to_thread(first.sendall, b"x\n")
            await asyncio.to_thread(second.sendall, b"x\n")
            await asyncio.to_thread(first.makefile("rb").readline)
            await asyncio.to_thread(second.makefile("rb").readline)
            assert proxy.limit.active == 2
            # The third waits in the backlog (the kernel completes its handshake) ...
            third = asyncio.create_task(asyncio.to_thread(ask, scene.address))
            await asyncio.sleep(0.3)
            assert not third.done()
            first.close()  # ... and is served once a slot frees up.
            async with asyncio.timeout(5):
                assert await third in {"b1", "b2", "b3"}
        finally:
            first.close()
            second.close()


async def test_failed_dial_re_pins_an_affine_client(scene: Scene) -> None:
    """A client pinned to a backend that dies is served elsewhere and stays there."""
    scene.publish(affinity_timeout=600)
    client = "127.0.70.42"
    async with running_proxy(scene.manifest.parent):
        first = await asyncio.to_thread(ask, scene.address, b"hi\n", client)
        pinned = scene.backends[int(first[1:]) - 1]
        pinned.stop()

        def after() -> Counter[str]:
            return Counter(ask(scene.address, source=client) for _ in range(10))

        seen = await asyncio.to_thread(after)
    assert len(seen) == 1, seen
    assert first not in seen
