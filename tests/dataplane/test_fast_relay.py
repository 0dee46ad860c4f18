"""The compiled relay (_relay.c, fast_relay.py) on its own: that it is built where a
compiler is, how it is selected, and its engine driven directly, without a proxy: bytes
and the preamble in order, half-close, resets, a refused join, descriptors returned.

The proxy-level behaviour of both relays is tested by the rest of tests/dataplane, which
runs each TCP test on the Python relay and on the compiled one (tests/conftest.py).
Addresses: 127.243.0.0/16.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pytest

from userproxy.dataplane import fast_relay

if TYPE_CHECKING:
    from userproxy.dataplane._relay import Connection

pytestmark = pytest.mark.both_loops

FRONT, BACK = "127.243.0.1", "127.243.0.2"


def test_extension_is_built_where_a_compiler_is() -> None:
    """CI has a compiler: an extension that failed to build must fail here, not leave
    the compiled relay's tests running the Python relay unnoticed."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert fast_relay.AVAILABLE, "userproxy/dataplane/_relay.c did not build"


@pytest.mark.parametrize(("value", "expected"), [("1", "python"), ("", "compiled")])
def test_environment_selects_the_relay(value: str, expected: str) -> None:
    env = {**os.environ, fast_relay.ENV: value}
    code = "from userproxy.dataplane import fast_relay; print(fast_relay.relay_name())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected


class Owner:
    """Records the engine's reports."""

    def __init__(self) -> None:
        self.finished: list[Connection] = []
        self.event = asyncio.Event()

    def connection_finished(self, conn: Connection) -> None:
        self.finished.append(conn)
        self.event.set()


@contextmanager
def listening(ip: str) -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind((ip, 0))
    sock.listen(16)
    try:
        yield sock
    finally:
        sock.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Counting descriptors: no collection meanwhile (collecting an earlier test's engine
    closes its descriptors whenever it happens)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def relayed(
    front: socket.socket, back: socket.socket, preamble: bytes = b""
) -> tuple[Connection, socket.socket, socket.socket, Owner]:
    """A client connected to ``front``, relayed by the loop's engine to ``back``: (the
    connection, the client socket, the backend's accepted socket, the owner)."""
    from userproxy.dataplane import _relay

    loop = asyncio.get_running_loop()
    engine = fast_relay.engine_for(loop)
    owner = Owner()
    client = socket.create_connection(front.getsockname(), 5)
    client.sendall(b"early ")  # before the upstream exists: held, then sent after the preamble
    await asyncio.sleep(0.05)
    got = _relay.accept(front.fileno())
    assert got is not None
    fd, ip, port = got
    assert (ip, port) == client.getsockname()
    conn = engine.connection(owner, ip, fd)
    await asyncio.sleep(0.05)  # the engine reads "early " into the upstream's buffer
    ufd, connected = _relay.connect(*back.getsockname())
    assert connected  # loopback: done before connect() returned
    assert conn.join(ufd, preamble)
    server, _ = await asyncio.to_thread(back.accept)
    server.settimeout(5)
    client.settimeout(5)
    return conn, client, server, owner


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest.mark.usefixtures("no_gc")
async def test_bytes_preamble_and_half_close_in_order() -> None:
    with listening(FRONT) as front, listening(BACK) as back:
        fast_relay.engine_for(asyncio.get_running_loop())
        before = open_fds()
        conn, client, server, owner = await relayed(front, back, b"PROXY x\r\n")
        payload = os.urandom(3 << 20)
        await asyncio.to_thread(client.sendall, payload)
        client.shutdown(socket.SHUT_WR)  # the client's FIN first
        got = await asyncio.to_thread(read_all, server)
        assert got == b"PROXY x\r\nearly " + payload
        assert conn.half_closed_at is not None
        answer = os.urandom(2 << 20)
        await asyncio.to_thread(server.sendall, answer)
        server.close()
        assert await asyncio.to_thread(read_all, client) == answer
        await asyncio.wait_for(owner.event.wait(), 5)
        client.close()
        assert owner.finished == [conn]
        assert conn.finished
        assert conn.end == "client_closed"
        assert not conn.upstream_reset
        assert (conn.bytes_up, conn.bytes_down) == (len(payload) + 6, len(answer))
        assert open_fds() <= before  # both of the engine's descriptors closed


async def test_endpoint_reset_reaches_the_client_as_reset() -> None:
    with listening(FRONT) as front, listening(BACK) as back:
        conn, client, server, owner = await relayed(front, back)
        assert await asyncio.to_thread(server.recv, 100) == b"early "
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        server.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(read_all, client)
        await asyncio.wait_for(owner.event.wait(), 5)
        client.close()
        assert conn.end == "endpoint_reset"
        assert conn.upstream_reset
        assert conn.bytes_down == 0


async def test_client_reset_reaches_the_endpoint_as_reset() -> None:
    with listening(FRONT) as front, listening(BACK) as back:
        conn, client, server, owner = await relayed(front, back)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(read_all, server)
        await asyncio.wait_for(owner.event.wait(), 5)
        server.close()
        assert conn.end == "client_reset"
        assert not conn.upstream_reset


async def test_abort_resets_both_and_a_later_join_is_refused() -> None:
    from userproxy.dataplane import _relay

    with listening(FRONT) as front, listening(BACK) as back:
        conn, client, server, owner = await relayed(front, back)
        conn.abort("drained")
        assert owner.finished == [conn]
        assert conn.end == "drained"
        conn.abort("idle_timeout")  # once finished, nothing changes and nobody is told again
        assert owner.finished == [conn]
        assert conn.end == "drained"
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(read_all, client)
        with pytest.raises(ConnectionResetError):
            await asyncio.to_thread(read_all, server)
        ufd, _ = _relay.connect(*back.getsockname())
        assert not conn.join(ufd, b"")  # not taken: the caller still owns ufd
        _relay.reset(ufd)
        client.close()
        server.close()


@pytest.mark.usefixtures("no_gc")
async def test_many_connections_return_every_descriptor() -> None:
    with listening(FRONT) as front, listening(BACK) as back:
        fast_relay.engine_for(asyncio.get_running_loop())
        before = open_fds()
        for _ in range(20):
            conn, client, server, owner = await relayed(front, back)
            client.shutdown(socket.SHUT_WR)
            server.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(owner.event.wait(), 5)
            assert conn.end in {"client_closed", "endpoint_closed"}
            client.close()
            server.close()
        assert open_fds() <= before  # other tests' stragglers may close meanwhile, never open


def epoll_entries(epfd: int) -> set[int]:
    """The descriptors registered in the epoll set ``epfd`` (/proc/self/fdinfo)."""
    with open(f"/proc/self/fdinfo/{epfd}") as info:
        return {int(line.split()[1]) for line in info if line.startswith("tfd:")}


async def test_a_finished_connection_leaves_the_epoll_set_even_when_duplicated() -> None:
    """close() alone would leave the entry while a duplicate of the socket lives (a fork,
    a dup): the engine removes it first, so no later poll reports a freed connection."""
    with listening(FRONT) as front, listening(BACK) as back:
        conn, client, server, owner = await relayed(front, back)
        engine = fast_relay.engine_for(asyncio.get_running_loop())
        registered = epoll_entries(engine.fileno())
        assert len(registered) >= 2  # the relay's two descriptors
        copies = [os.dup(fd) for fd in registered]
        try:
            conn.abort("drained")
            assert owner.finished == [conn]
            assert epoll_entries(engine.fileno()) == set(), "an entry outlived its connection"
            client.sendall(b"after the end")  # the socket lives on through the copy
            await asyncio.sleep(0.05)  # the engine's poll runs, and must find nothing
        finally:
            for fd in copies:
                os.close(fd)
        client.close()
        server.close()


async def test_closing_the_engine_resets_what_it_holds() -> None:
    """An engine closed with connections open cuts them with a RST, not a FIN that would
    pass a truncated stream off as complete."""
    from userproxy.dataplane import _relay

    with listening(FRONT) as front, listening(BACK) as back:
        engine = _relay.Engine()
        try:
            client = socket.create_connection(front.getsockname(), 5)
            got = _relay.accept(front.fileno())
            assert got is not None
            fd, ip, _ = got
            conn = engine.connection(Owner(), ip, fd)
            ufd, connected = _relay.connect(*back.getsockname())
            assert connected
            assert conn.join(ufd, b"")
            server, _ = back.accept()
        finally:
            engine.close()
        client.settimeout(5)
        server.settimeout(5)
        with pytest.raises(ConnectionResetError):
            read_all(client)
        with pytest.raises(ConnectionResetError):
            read_all(server)
        client.close()
        server.close()
