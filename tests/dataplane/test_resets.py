"""Resets pass through the relay as resets; clean ends stay clean.

kube-proxy's kernel path forwards a RST unchanged.  A relay that answered a RST with a
plain close would send a FIN, so a stream cut short would look complete to the other side
(a truncated download, or a partial upload the backend commits).  Each test here checks
what the far peer's kernel reports: ``ConnectionResetError`` for a reset, ``b""`` (EOF)
after every byte for a clean end.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.backends import Backend, echo
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import free_port, running_proxy, wait_for_sync

pytestmark = pytest.mark.both_loops

PORT = 8080
LINGER_ZERO = struct.pack("ii", 1, 0)
Address = tuple[str, int]
T = TypeVar("T")


def addresses() -> tuple[str, str]:
    net = fresh_net()
    return f"127.{net // 200 + 100}.{net % 200}.1", f"127.{net // 200 + 150}.{net % 200}.1"


def read_until_end(sock: socket.socket) -> tuple[int, str]:
    """Bytes read and how the stream ended: "eof" or "reset"."""
    total = 0
    sock.settimeout(10)
    try:
        while chunk := sock.recv(65536):
            total += len(chunk)
    except ConnectionResetError:
        return total, "reset"
    return total, "eof"


def publish(tmp_path: Path, cluster_ip: str, backend: Backend) -> None:
    write(
        tmp_path / "s.json",
        service("r", cluster_ip, PORT),
        endpoint_slice("r-1", "r", backend.port, [backend.ip]),
    )


async def relay(
    tmp_path: Path, handle: Callable[[socket.socket], None], talk: Callable[[Address], T]
) -> T:
    """Run ``talk`` (in a thread) against a Service whose one backend runs ``handle``."""
    cluster_ip, backend_ip = addresses()
    backend = Backend(backend_ip, handle)
    publish(tmp_path, cluster_ip, backend)
    try:
        async with running_proxy(tmp_path):
            return await asyncio.to_thread(talk, (cluster_ip, PORT))
    finally:
        backend.stop()


def send_go_and_read(address: Address) -> tuple[int, str]:
    with socket.create_connection(address, 5) as sock:
        sock.sendall(b"go")
        return read_until_end(sock)


async def test_backend_reset_mid_stream_reaches_the_client_as_reset(tmp_path: Path) -> None:
    """A backend that resets after 2 MB of a 20 MB stream: the client sees a RST, not EOF."""

    def send_then_reset(conn: socket.socket) -> None:
        conn.recv(16)
        block = os.urandom(65536)
        for _ in range(32):
            conn.sendall(block)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)

    received, end = await relay(tmp_path, send_then_reset, send_go_and_read)
    assert end == "reset", (received, end)
    assert received <= 32 * 65536


async def test_client_reset_mid_upload_reaches_the_backend_as_reset(tmp_path: Path) -> None:
    """A client that resets after 50 000 bytes: the backend sees a RST, not a clean EOF."""
    seen: list[tuple[int, str]] = []
    got_some = threading.Event()
    ended = threading.Event()

    def record(conn: socket.socket) -> None:
        total = 0
        conn.settimeout(10)
        try:
            while chunk := conn.recv(65536):
                total += len(chunk)
                if total >= 50_000:
                    got_some.set()
        except ConnectionResetError:
            seen.append((total, "reset"))
        else:
            seen.append((total, "eof"))
        ended.set()

    def upload_then_reset(address: Address) -> None:
        sock = socket.create_connection(address, 5)
        sock.sendall(os.urandom(50_000))
        assert got_some.wait(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        sock.close()
        assert ended.wait(5)

    await relay(tmp_path, record, upload_then_reset)
    assert seen == [(50_000, "reset")]


async def test_clean_end_stays_clean(tmp_path: Path) -> None:
    """A backend that sends 2 MB and closes: the client gets every byte and then EOF."""

    def send_then_close(conn: socket.socket) -> None:
        conn.recv(16)
        conn.sendall(b"x" * (2 * 1024 * 1024))

    assert await relay(tmp_path, send_then_close, send_go_and_read) == (2 * 1024 * 1024, "eof")


async def test_all_dials_failing_resets_the_client(tmp_path: Path) -> None:
    """Every endpoint refuses: the client is reset, not sent a FIN."""
    cluster_ip, backend_ip = addresses()
    dead = socket.socket()
    dead.bind((backend_ip, 0))  # bound, never listening: connects are refused
    try:
        write(
            tmp_path / "s.json",
            service("r", cluster_ip, PORT),
            endpoint_slice("r-1", "r", dead.getsockname()[1], [backend_ip]),
        )
        async with running_proxy(tmp_path):

            def client() -> tuple[int, str]:
                try:
                    sock = socket.create_connection((cluster_ip, PORT), 5)
                except ConnectionResetError:
                    # The reset can land before connect() returns to a descheduled thread:
                    # the kernel then reports it from connect() itself.
                    return 0, "reset"
                with sock:
                    return read_until_end(sock)

            assert await asyncio.to_thread(client) == (0, "reset")
    finally:
        dead.close()


async def test_deleted_service_keeps_its_connection_after_the_grace(tmp_path: Path) -> None:
    """A removed Service's open connection goes on echoing after the shutdown grace and
    several sweeps, as kube-proxy's conntrack keeps a deleted Service's established flows;
    only new connections are refused."""
    cluster_ip, backend_ip = addresses()
    backend = Backend(backend_ip, echo)
    publish(tmp_path, cluster_ip, backend)
    other = tmp_path / "other.json"
    try:
        async with running_proxy(tmp_path, shutdown_grace=0.5) as proxy:
            sock = await asyncio.to_thread(socket.create_connection, (cluster_ip, PORT), 5)
            with sock:
                sock.settimeout(5)
                await asyncio.to_thread(sock.sendall, b"before\n")
                assert await asyncio.to_thread(sock.recv, 64) == b"before\n"
                after = proxy.proxier.status.syncs
                (tmp_path / "s.json").unlink()
                write(other, service("o", addresses()[0], free_port()))
                await wait_for_sync(proxy, after)
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.to_thread(socket.create_connection, (cluster_ip, PORT), 5)
                # Past the grace by several sweeps (once a second): still relayed.
                await asyncio.sleep(0.5 + 2.5)
                for round_ in range(3):
                    line = f"after {round_}\n".encode()
                    await asyncio.to_thread(sock.sendall, line)
                    assert await asyncio.to_thread(sock.recv, 64) == line
                assert proxy.limit.active == 1
                assert sum(1 for _ in proxy.listeners.connections()) == 1
    finally:
        backend.stop()


async def test_shutdown_grace_over_resets_both_sides(tmp_path: Path) -> None:
    """A connection still open when the process's shutdown grace ends is reset both ways."""
    backend_end: list[str] = []

    def hold(conn: socket.socket) -> None:
        conn.sendall(b"hello")
        backend_end.append(read_until_end(conn)[1])

    cluster_ip, backend_ip = addresses()
    backend = Backend(backend_ip, hold)
    publish(tmp_path, cluster_ip, backend)
    try:
        sock: socket.socket | None = None
        async with running_proxy(tmp_path, shutdown_grace=0.5):
            sock = await asyncio.to_thread(socket.create_connection, (cluster_ip, PORT), 5)
            assert await asyncio.to_thread(sock.recv, 5) == b"hello"
        # running_proxy's exit stopped the proxy: the grace passed with the connection open.
        assert sock is not None
        with sock:
            assert (await asyncio.to_thread(read_until_end, sock))[1] == "reset"
        for _ in range(100):
            if backend_end:
                break
            await asyncio.sleep(0.05)
        assert backend_end == ["reset"]
    finally:
        backend.stop()
