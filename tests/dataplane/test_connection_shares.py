"""Fair shares of --max-connections: one client, or one Service, cannot take the whole
budget and stop every other Service (HAProxy's per-frontend maxconn and per-source
connection limits do the same).

With ``max_connections=40`` and the default shares (50 % per Service, 25 % per client
IP), a Service holds at most 20 connections and a client IP at most 10.  A client over
its share is reset at once; a Service at its share leaves its new clients in the backlog
while other Services go on accepting."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import running_proxy

pytestmark = pytest.mark.both_loops

MAXIMUM = 40
PER_SERVICE = 20  # 50 %
PER_CLIENT = 10  # 25 %
PORT = 8080


@dataclass
class Scene:
    manifest: Path
    a: tuple[str, int]
    b: tuple[str, int]
    client_prefix: str


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    net = fresh_net()
    base = f"{net // 200 + 100}.{net % 200}"
    backend_a = Backend(f"127.{net // 200 + 150}.{net % 200}.1", name_server("a"))
    backend_b = Backend(f"127.{net // 200 + 150}.{net % 200}.2", name_server("b"))
    manifest = tmp_path / "s.json"
    write(
        manifest,
        service("a", f"127.{base}.1", PORT),
        endpoint_slice("a-1", "a", backend_a.port, [backend_a.ip]),
        service("b", f"127.{base}.2", PORT),
        endpoint_slice("b-1", "b", backend_b.port, [backend_b.ip]),
    )
    yield Scene(
        manifest,
        (f"127.{base}.1", PORT),
        (f"127.{base}.2", PORT),
        f"127.{net // 200 + 200}.{net % 200}",
    )
    backend_a.stop()
    backend_b.stop()


def hold(address: tuple[str, int], source: str, count: int) -> tuple[list[socket.socket], int]:
    """Open ``count`` connections from ``source``; keep those the backend answers through,
    and count those reset (or not answered within 2 s)."""
    held: list[socket.socket] = []
    refused = 0
    for _ in range(count):
        sock: socket.socket | None = None
        try:
            # A reset can come before connect() returns on loopback: refused all the same.
            sock = socket.create_connection(address, timeout=2, source_address=(source, 0))
            sock.sendall(b"hi\n")
            if sock.recv(16):
                held.append(sock)
                continue
        except OSError:
            pass
        refused += 1
        if sock is not None:
            sock.close()
    return held, refused


def timed_ask(address: tuple[str, int], source: str) -> tuple[str, float]:
    start = time.monotonic()
    return ask(address, source=source, timeout=3), time.monotonic() - start


async def test_one_client_cannot_take_the_budget(scene: Scene) -> None:
    """One client asks for the whole budget on Service a: it gets its share, the rest is
    reset, and another client is answered by both Services at once."""
    greedy, other = f"{scene.client_prefix}.1", f"{scene.client_prefix}.2"
    held: list[socket.socket] = []
    async with running_proxy(scene.manifest.parent, max_connections=MAXIMUM) as proxy:
        try:
            held, refused = await asyncio.to_thread(hold, scene.a, greedy, MAXIMUM)
            assert (len(held), refused) == (PER_CLIENT, MAXIMUM - PER_CLIENT)
            assert proxy.limit.client_connections(greedy) == PER_CLIENT
            for address, name in ((scene.b, "b"), (scene.a, "a")):
                answer, took = await asyncio.to_thread(timed_ask, address, other)
                assert answer == name
                assert took < 1.0, took
            refusals = sum(t.refused_client_limit for t in proxy.listeners.totals().values())
            assert refusals == MAXIMUM - PER_CLIENT
        finally:
            for sock in held:
                sock.close()


async def test_a_service_at_its_share_waits_while_others_accept(scene: Scene) -> None:
    """Two clients fill Service a's share: a's next client waits in the backlog (served
    once a connection ends), while a third client is answered by Service b at once."""
    first, second, third = (f"{scene.client_prefix}.{n}" for n in (1, 2, 3))
    held: list[socket.socket] = []
    async with running_proxy(scene.manifest.parent, max_connections=MAXIMUM) as proxy:
        try:
            for client in (first, second):
                some, refused = await asyncio.to_thread(hold, scene.a, client, PER_CLIENT)
                held += some
                assert refused == 0
            assert len(held) == PER_SERVICE
            waiting = asyncio.create_task(asyncio.to_thread(ask, scene.a, b"hi\n", third, 10))
            answer, took = await asyncio.to_thread(timed_ask, scene.b, third)
            assert answer == "b"
            assert took < 1.0, took
            await asyncio.sleep(0.3)
            assert not waiting.done()  # in the backlog, not reset
            held.pop().close()
            async with asyncio.timeout(5):
                assert await waiting == "a"
            assert proxy.limit.active <= PER_SERVICE + 1
        finally:
            for sock in held:
                with contextlib.suppress(OSError):
                    sock.close()
