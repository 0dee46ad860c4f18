"""``--endpoint-drain``: a TCP connection to an endpoint that left its pool is reset once
the drain duration has passed; connections to endpoints still in the pool go on; without
the flag (kube-proxy's behaviour) every connection goes on.

Each test: two name-answering backends behind one Service (round-robin), one long-lived
connection to each, then the slice loses one endpoint.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.backends import Backend, name_server
from tests.support.manifests import endpoint_slice, fresh_ips, service, write
from tests.support.proxyrun import running_proxy, wait_for_sync
from userproxy.proxy import Proxy

pytestmark = pytest.mark.both_loops


@contextmanager
def two_backends() -> Iterator[tuple[str, Backend, Backend]]:
    service_ip, backend_ip = fresh_ips()
    a = Backend(backend_ip, name_server("a"))
    b = Backend(backend_ip.rsplit(".", 1)[0] + ".2", name_server("b"), port=a.port)
    try:
        yield service_ip, a, b
    finally:
        a.stop()
        b.stop()


def ask_line(sock: socket.socket) -> str:
    """One request on a held connection: the backend's name, or why there was none."""
    try:
        sock.sendall(b"who\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                return "EOF"
            data += chunk
        return data.decode().strip()
    except ConnectionResetError:
        return "RESET"
    except BrokenPipeError:
        return "RESET"


async def held_to_each(ip: str) -> dict[str, socket.socket]:
    """Connections until one is held to each backend (round-robin: the first two)."""
    held: dict[str, socket.socket] = {}
    for _ in range(6):
        sock = await asyncio.to_thread(socket.create_connection, (ip, 8080), 5)
        sock.settimeout(5)
        name = await asyncio.to_thread(ask_line, sock)
        if name in held:
            sock.close()
        else:
            held[name] = sock
        if len(held) == 2:
            return held
    raise AssertionError(f"only reached {sorted(held)}")


async def remove_b(tmp_path: Path, proxy: Proxy, ip: str, a: Backend) -> None:
    syncs = proxy.proxier.status.syncs
    only_a = endpoint_slice("n", "names", a.port, [a.ip])
    write(tmp_path / "s.json", service("names", ip, 8080), only_a)
    await wait_for_sync(proxy, syncs)


async def answers_until_reset(sock: socket.socket, within: float) -> float:
    """Ask on ``sock`` every 0.1 s until the answer is a reset; the seconds it took (the
    backend answers "b" until then: never a clean end)."""
    started = time.monotonic()
    while (answer := await asyncio.to_thread(ask_line, sock)) == "b":
        assert time.monotonic() - started < within, f"not reset within {within} s"
        await asyncio.sleep(0.1)
    assert answer == "RESET", answer
    return time.monotonic() - started


@pytest.mark.parametrize("drain", [0.3, None], ids=["drain", "kube-proxy"])
async def test_connections_to_a_removed_endpoint_are_reset_after_the_drain(
    tmp_path: Path, drain: float | None
) -> None:
    with two_backends() as (ip, a, b):
        write(
            tmp_path / "s.json",
            service("names", ip, 8080),
            endpoint_slice("n", "names", a.port, [a.ip, b.ip]),
        )
        async with running_proxy(tmp_path, endpoint_drain=drain) as proxy:
            held = await held_to_each(ip)
            try:
                await remove_b(tmp_path, proxy, ip, a)
                if drain is None:
                    await asyncio.sleep(2.2)  # two sweeps: kept, as kube-proxy keeps it
                    assert await asyncio.to_thread(ask_line, held["b"]) == "b"
                else:
                    # The first sweep after the removal sees it, the next one past the
                    # duration resets it (sweeps are 1 s apart).
                    took = await answers_until_reset(held["b"], within=3.0)
                    assert took >= drain
                assert await asyncio.to_thread(ask_line, held["a"]) == "a"
                # A new connection goes to the endpoint that is left.
                fresh = await asyncio.to_thread(socket.create_connection, (ip, 8080), 5)
                with fresh:
                    assert await asyncio.to_thread(ask_line, fresh) == "a"
            finally:
                for sock in held.values():
                    sock.close()


async def test_an_endpoint_that_comes_back_keeps_its_connections(tmp_path: Path) -> None:
    with two_backends() as (ip, a, b):
        both = endpoint_slice("n", "names", a.port, [a.ip, b.ip])
        write(tmp_path / "s.json", service("names", ip, 8080), both)
        async with running_proxy(tmp_path, endpoint_drain=2.0) as proxy:
            held = await held_to_each(ip)
            try:
                await remove_b(tmp_path, proxy, ip, a)
                await asyncio.sleep(1.1)  # seen out of the pool by a sweep, not yet drained
                syncs = proxy.proxier.status.syncs
                write(tmp_path / "s.json", service("names", ip, 8080), both)
                await wait_for_sync(proxy, syncs)
                await asyncio.sleep(1.5)  # past the duration since the removal
                assert await asyncio.to_thread(ask_line, held["b"]) == "b"
            finally:
                for sock in held.values():
                    sock.close()
