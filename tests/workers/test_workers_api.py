"""``userproxy run --workers 2 --kubeconfig``: the parent alone watches the API (one LIST and
one WATCH per resource, not one per worker), and a change reaches both workers within
100 ms of the API server sending it.

The fake API server (tests/support/fake_apiserver.py) runs on the test's loop, counting
requests; the proxy is a child process (its workers on asyncio and on uvloop); everything
blocking runs in a thread, so the fake server keeps answering.  A worker's state is read
from its own admin socket (named in the parent's /status), so each worker is seen alone.
Addresses: 127.241.N.x (support.py); the API server at 127.241.N.250.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.fake_apiserver import FakeApiServer
from tests.support.manifests import endpoint_slice, node, service
from tests.support.proxyrun import assert_clean_log
from tests.workers.support import fresh_net, wait_serving, workers_proxy

PORT = 8080
#: The bound of issue 14: a change reaches every worker within this many seconds.
REACH = 0.100
CHANGES = 5


@pytest.fixture
async def net_and_api() -> AsyncIterator[tuple[int, FakeApiServer]]:
    net = fresh_net()
    async with FakeApiServer(host=f"127.241.{net}.250") as fake:
        yield net, fake


async def _pools(session: aiohttp.ClientSession) -> list[str]:
    """The endpoints of "web"'s pool as one worker applied them."""
    async with session.get("http://worker/status?q=web") as response:
        document: dict[str, Any] = await response.json()
    (web,) = document["services"]
    (port,) = web["ports"]
    endpoints: list[str] = port["pools"].get("internal", [])
    return endpoints


async def _reached(sessions: list[aiohttp.ClientSession], want: list[str]) -> float:
    """Seconds until every worker's pool is ``want``, polling them all back to back."""
    start = time.monotonic()
    waiting = set(range(len(sessions)))
    while waiting:
        for index in list(waiting):
            if await _pools(sessions[index]) == want:
                waiting.discard(index)
        if time.monotonic() - start > 10:
            raise AssertionError(f"workers {sorted(waiting)} never served {want}")
    return time.monotonic() - start


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_one_watch_and_every_change_reaches_both_workers_within_100ms(
    tmp_path: Path, net_and_api: tuple[int, FakeApiServer], loop: str
) -> None:
    net, fake = net_and_api
    backends = [Backend(f"127.241.{net}.11", name_server("b11"))]
    backends.append(Backend(f"127.241.{net}.12", name_server("b12"), backends[0].port))
    port = backends[0].port
    fake.create("nodes", node("n1", "z1"))
    fake.create("services", service("web", f"127.241.{net}.1", PORT))
    fake.create("endpointslices", endpoint_slice("web-a", "web", port, [backends[0].ip]))
    log = tmp_path / "proxy.log"
    kubeconfig = fake.kubeconfig(tmp_path / "kubeconfig")
    sessions: list[aiohttp.ClientSession] = []
    try:
        with workers_proxy(["--kubeconfig", str(kubeconfig)], net, log, loop):
            rows = await asyncio.to_thread(wait_serving, net)
            assert await asyncio.to_thread(ask, (f"127.241.{net}.1", PORT)) == "b11"
            # One LIST and one WATCH per resource: the parent's, whatever the workers.
            assert dict(fake.list_requests) == {"services": 1, "endpointslices": 1, "nodes": 1}
            assert dict(fake.watch_requests) == {"services": 1, "endpointslices": 1, "nodes": 1}
            sessions = [
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=row["admin_socket"]))
                for row in rows
            ]
            taken = []
            for change in range(CHANGES):
                index = (change + 1) % 2
                want = [f"{backends[index].ip}:{port}"]
                fake.update(
                    "endpointslices",
                    endpoint_slice("web-a", "web", port, [backends[index].ip]),
                )
                taken.append(await _reached(sessions, want))
                answer = await asyncio.to_thread(ask, (f"127.241.{net}.1", PORT))
                assert answer == f"b{11 + index}"
            # The median of five changes (one change can meet a machine busy elsewhere);
            # every one of them well within a second.
            assert statistics.median(taken) <= REACH, taken
            assert max(taken) < 1.0, taken
            # Still the first watches: nothing restarted them.
            assert dict(fake.watch_requests) == {"services": 1, "endpointslices": 1, "nodes": 1}
    finally:
        for session in sessions:
            await session.close()
        for backend in backends:
            backend.stop()
    assert_clean_log(log)
