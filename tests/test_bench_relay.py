"""bench/relay.py, the benchmarks' minimal uvloop relay, on both loops: a SHA-256-checked
stream both ways, UDP echoes, a refused backend, a clean stop; the ``python -m bench.relay``
command; and the per-unit arithmetic of bench/measure.py.  Addresses: 127.219.0.0/16."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench import relay
from bench.measure import per_unit, udp_crossings
from tests.support.backends import Backend, UdpBackend, echo

ROOT = Path(__file__).resolve().parent.parent
RELAY, BACKEND = "127.219.0.1", "127.219.0.2"
Address = tuple[str, int]


def _tcp_address(r: relay.Relay) -> Address:
    name: Address = r.servers[0].sockets[0].getsockname()[:2]
    return name


def _udp_address(r: relay.Relay) -> Address:
    transport = r.udp[0].transport
    assert transport is not None
    name: Address = transport.get_extra_info("sockname")[:2]
    return name


def _echo_through(address: Address, size: int) -> bool:
    """Send ``size`` random bytes (a writer thread) while reading the echo; True when the
    SHA-256 of what came back equals that of what was sent."""
    data = os.urandom(size)
    with socket.create_connection(address, timeout=10) as sock:
        writer = threading.Thread(target=sock.sendall, args=(data,))
        writer.start()
        digest, got = hashlib.sha256(), 0
        while got < size and (chunk := sock.recv(1 << 16)):
            digest.update(chunk)
            got += len(chunk)
        writer.join(10)
    return got == size and digest.digest() == hashlib.sha256(data).digest()


@pytest.mark.both_loops
async def test_streams_cross_both_ways_intact_and_close_with_the_client() -> None:
    backend = Backend(BACKEND, echo)
    r = await relay.start([((RELAY, 0), (BACKEND, backend.port))], [])
    try:
        address = _tcp_address(r)
        results = await asyncio.gather(
            *(asyncio.to_thread(_echo_through, address, 4 << 20) for _ in range(4))
        )
        assert results == [True] * 4
        assert backend.connections == 4
        for _ in range(200):  # the clients closed: the relay lets go of both sides
            if not r.conns:
                break
            await asyncio.sleep(0.01)
        assert not r.conns
    finally:
        await r.close()
        backend.stop()


@pytest.mark.both_loops
async def test_udp_echoes_come_back_from_the_relay_one_session_per_client() -> None:
    backend = UdpBackend(BACKEND)
    r = await relay.start([], [((RELAY, 0), (BACKEND, backend.port))])

    def client(sizes: list[int]) -> list[tuple[bytes, Address]]:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            out = []
            for size in sizes:
                sock.sendto(os.urandom(size), address)
                out.append(sock.recvfrom(2048))
            return out

    try:
        address = _udp_address(r)
        sizes = [1, 64, 512, 1400]
        answers = await asyncio.gather(*(asyncio.to_thread(client, sizes) for _ in range(2)))
        for replies in answers:
            assert [len(data) for data, _ in replies] == sizes
            assert {source for _, source in replies} == {address}
        assert len(r.udp[0].sessions) == 2
        assert backend.received == 8
    finally:
        await r.close()
        backend.stop()


@pytest.mark.both_loops
async def test_refused_backend_closes_the_client_and_close_ends_everything() -> None:
    with socket.socket() as closed:  # a port nobody listens on
        closed.bind((BACKEND, 0))
        refused = closed.getsockname()[1]
    backend = Backend(BACKEND, echo)
    r = await relay.start(
        [((RELAY, 0), (BACKEND, refused)), ((RELAY, 0), (BACKEND, backend.port))], []
    )
    dead, alive = (s.sockets[0].getsockname()[:2] for s in r.servers)

    def ended(sock: socket.socket) -> bool:
        """True once the relay has closed or reset ``sock`` (within its timeout)."""
        try:
            while sock.recv(10):
                pass
        except ConnectionResetError:
            pass
        return True

    def dial_refused(address: Address) -> bool:
        with socket.create_connection(address, timeout=5) as sock:
            return ended(sock)

    try:
        assert await asyncio.to_thread(dial_refused, dead)
        held = await asyncio.to_thread(socket.create_connection, alive, 5)
        try:
            held.sendall(b"ping")
            assert await asyncio.to_thread(held.recv, 10) == b"ping"
            await r.close()  # with a connection open: it is cut, the listeners go
            held.settimeout(5)
            assert await asyncio.to_thread(ended, held)
        finally:
            held.close()
        assert not r.tasks
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(alive, timeout=1).close()
    finally:
        await r.close()
        backend.stop()


@pytest.mark.slow
def test_the_command_relays_and_stops_cleanly_on_sigterm() -> None:
    backend, udp_backend = Backend(BACKEND, echo), UdpBackend(BACKEND)
    ports = []
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as probe:
            probe.bind(("127.219.0.3", 0))
            ports.append(probe.getsockname()[1])
    argv = [sys.executable, "-m", "bench.relay"]
    argv += ["--tcp", f"127.219.0.3:{ports[0]}={BACKEND}:{backend.port}"]
    argv += ["--udp", f"127.219.0.3:{ports[1]}={BACKEND}:{udp_backend.port}"]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"listening\n"
        assert _echo_through(("127.219.0.3", ports[0]), 1 << 20)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"dns?", ("127.219.0.3", ports[1]))
            assert sock.recvfrom(64) == (b"dns?", ("127.219.0.3", ports[1]))
        proc.terminate()
        _out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode()
        assert err == b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
        backend.stop()
        udp_backend.stop()


@pytest.mark.parametrize(
    ("cpu_s", "units", "scale", "expected"),
    [
        (0.5, 10_000, 1e6, 50.0),  # 0.5 s over 10 000 connections: 50 µs each
        (1.2, 2.0, 1.0, 0.6),  # 1.2 s over 2 GB: 0.6 s per GB
        (0.0, 100, 1e6, 0.0),
    ],
)
def test_per_unit(cpu_s: float, units: float, scale: float, expected: float) -> None:
    assert per_unit(cpu_s, units, scale) == pytest.approx(expected)


def test_per_unit_without_work_is_nan() -> None:
    assert math.isnan(per_unit(0.3, 0))


def test_udp_crossings_count_each_direction_once() -> None:
    # 1 000 requests reached the backend, 900 of their echoes reached the client.
    assert udp_crossings(1000, 900) == 1900
    assert per_unit(0.019, udp_crossings(1000, 900)) == pytest.approx(10.0)
