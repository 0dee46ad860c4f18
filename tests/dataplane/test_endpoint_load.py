"""The active connections per endpoint that load-aware balancers read (EndpointLoad): a TCP
connection counts from its upstream join to its end, once, whichever way it ends."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane.test_tcp_proxy import Scene
from tests.support.proxyrun import eventually, running_proxy
from userproxy.model import Endpoint

pytestmark = pytest.mark.both_loops


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path, count=1)
    yield s
    s.close()


async def test_connections_count_while_open_and_not_after(scene: Scene) -> None:
    scene.publish()
    backend = scene.backends[0]
    endpoint = Endpoint(backend.ip, backend.port)
    async with running_proxy(scene.manifest.parent) as proxy:
        load = proxy.registry.context.load
        socks = []
        try:
            for _ in range(3):
                sock = await asyncio.to_thread(socket.create_connection, scene.address, 5)
                socks.append(sock)
            await eventually(lambda: load.of(endpoint) == 3, what="3 active connections")
            socks.pop().close()  # an orderly close
            await eventually(lambda: load.of(endpoint) == 2, what="2 active connections")
            reset = socks.pop()  # a reset from the client
            reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.close()
            await eventually(lambda: load.of(endpoint) == 1, what="1 active connection")
        finally:
            for sock in socks:
                sock.close()
        await eventually(lambda: not load.active, what="no active connection left")
