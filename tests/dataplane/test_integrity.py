"""Regression tests for the data path's integrity under a stalled event loop.

A busy loop (a loaded machine, a large manifest being read) must never make the proxy join
two upstream connections to one client, write into a transport that is already closed, or
count a connect that finished during the stall as a timeout.  Each stall here is placed
exactly where the original faults needed it, so every test is deterministic:

* after the upstream's ``connection_made`` and before the dialing task resumes: the dial
  timeout used to cancel ``create_connection`` at that point; uvloop then closed the
  transport without telling the relay and the proxy dialed again, so the client read a
  second backend's greeting (asyncio sent the client a FIN instead);
* right after ``connect()`` was issued: after a stall uvloop runs expired timers before it
  polls for I/O, so a connect the kernel had finished long before was counted as timed out
  and retried on another endpoint.

The backends greet each connection with their name and a connection number and tag every
answer with both, so a byte from any other connection is seen.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import running_proxy
from userproxy.balancers.roundrobin import RoundRobin
from userproxy.dataplane.tcp_relay import UpstreamProtocol
from userproxy.model import Endpoint

pytestmark = pytest.mark.both_loops

PORT = 8080
#: Longer than the first rung of the dial ladder (250 ms).
STALL = 0.4


def tagged_echo(name: str) -> Callable[[socket.socket], None]:
    """Greets with ``H <name> <n>`` and answers each line with ``<name> <n> <line>``."""
    numbers = itertools.count(1)
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        with lock:
            number = next(numbers)
        tag = f"{name} {number}".encode()
        conn.sendall(b"H " + tag + b"\n")
        reader = conn.makefile("rb")
        for line in reader:
            conn.sendall(tag + b" " + line)

    return handle


class Tagged:
    """Two tagged backends behind one Service."""

    def __init__(self, tmp_path: Path) -> None:
        net = fresh_net()
        self.cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
        first = Backend(f"127.{net // 200 + 150}.{net % 200}.1", tagged_echo("alpha"))
        second = Backend(
            f"127.{net // 200 + 150}.{net % 200}.2", tagged_echo("beta"), port=first.port
        )
        self.backends = [first, second]
        write(
            tmp_path / "s.json",
            service("tagged", self.cluster_ip, PORT),
            endpoint_slice("tagged-1", "tagged", first.port, [first.ip, second.ip]),
        )

    def close(self) -> None:
        for backend in self.backends:
            backend.stop()


@pytest.fixture
def tagged(tmp_path: Path) -> Iterator[Tagged]:
    scene = Tagged(tmp_path)
    yield scene
    scene.close()


def converse(address: tuple[str, int], lines: int = 3) -> list[bytes]:
    """Read the greeting, send ``lines`` lines, read what comes back until EOF after SHUT_WR."""
    with socket.create_connection(address, timeout=5) as sock:
        reader = sock.makefile("rb")
        received = [reader.readline()]
        for i in range(lines):
            sock.sendall(f"line {i}\n".encode())
            received.append(reader.readline())
        sock.shutdown(socket.SHUT_WR)
        received.extend(reader)
        return received


def check_one_upstream(received: list[bytes]) -> None:
    """Exactly one greeting, then every line tagged by the same backend connection."""
    greeting = received[0]
    assert greeting.startswith(b"H "), received
    tag = greeting[2:].rstrip(b"\n")
    assert received[1:] == [tag + f" line {i}\n".encode() for i in range(len(received) - 1)], (
        received
    )


async def four_clean_conversations(tagged: Tagged, tmp_path: Path) -> None:
    """Four connections, each with one upstream from greeting to end; no dial failed or
    was retried; each backend connection served exactly one client."""
    async with running_proxy(tmp_path) as proxy:
        for _ in range(4):
            received = await asyncio.to_thread(converse, (tagged.cluster_ip, PORT))
            check_one_upstream(received)
        stats = [listener.stats for listener in proxy.listeners]
        assert sum(s.dial_failures for s in stats) == 0
        assert sum(s.dial_retries for s in stats) == 0
    assert sum(b.connections for b in tagged.backends) == 4


async def test_stall_after_upstream_connect_joins_one_upstream(
    tagged: Tagged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop stalls right after the upstream transport reached the relay."""
    original = UpstreamProtocol.connection_made

    def stalled(self: UpstreamProtocol, transport: asyncio.BaseTransport) -> None:
        original(self, transport)
        time.sleep(STALL)

    monkeypatch.setattr(UpstreamProtocol, "connection_made", stalled)
    await four_clean_conversations(tagged, tmp_path)


async def test_connect_finished_during_stall_is_not_a_timeout(
    tagged: Tagged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop stalls right after the connect was issued; the kernel finishes it meanwhile."""
    original = RoundRobin.pick

    def pick_then_stall(self: RoundRobin, client_ip: str, exclude: Any = ()) -> Endpoint | None:
        asyncio.get_running_loop().call_soon(time.sleep, STALL)
        return original(self, client_ip, exclude)

    monkeypatch.setattr(RoundRobin, "pick", pick_then_stall)
    await four_clean_conversations(tagged, tmp_path)


async def test_concurrent_clients_under_repeated_stalls(tagged: Tagged, tmp_path: Path) -> None:
    """20 clients for 4 s while the loop stalls 200-400 ms every 50 ms: every byte in place."""
    failures: list[object] = []
    done = 0
    stop = threading.Event()

    def client() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                received = converse((tagged.cluster_ip, PORT))
                check_one_upstream(received)
                done += 1
            except (AssertionError, OSError) as exc:
                failures.append(exc)

    async with running_proxy(tmp_path):
        threads = [threading.Thread(target=client) for _ in range(20)]
        for thread in threads:
            thread.start()
        try:
            for i in range(10):
                await asyncio.sleep(0.05)
                time.sleep(0.2 + 0.02 * i)  # noqa: ASYNC251 - the stall under test
        finally:
            stop.set()
            for thread in threads:
                await asyncio.to_thread(thread.join, 30)
    assert not failures, failures[:5]
    assert done > 0
