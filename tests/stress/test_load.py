"""Load tests against a proxy subprocess: memory under backpressure, and survival of a
mixed storm of short connections under uvloop with no descriptor left behind.

Every loop here is bounded in count and time and talks only to 127.0.0.0/8.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.backends import Backend, recv_all, slow_reader
from tests.support.manifests import endpoint_slice, fresh_ips, service, write
from tests.support.proxyrun import (
    assert_clean_log,
    open_fds,
    proxy_process,
    rss_bytes,
    stop_process,
    wait_listening,
)

PORT = 8080


@contextlib.contextmanager
def echo_process(ip: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.echo_process", ip],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        stop_process(proc)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_backpressure_bounds_memory(tmp_path: Path, loop: str) -> None:
    """200 MB toward a backend reading at ~50 MB/s: the proxy's RSS grows < 64 MB."""
    cluster_ip, backend_ip = fresh_ips()
    backend = Backend(backend_ip, slow_reader(delay=0.004, chunk=256 * 1024))
    write(
        tmp_path / "s.json",
        service("sink", cluster_ip, PORT),
        endpoint_slice("sink-1", "sink", backend.port, [backend.ip]),
    )
    total = 200 * 1024 * 1024
    chunk = b"\0" * (1024 * 1024)
    try:
        with proxy_process(["run", "--manifests", str(tmp_path), "--loop", loop]) as proc:
            wait_listening((cluster_ip, PORT))
            baseline = rss_bytes(proc.pid)
            peak = baseline
            done = threading.Event()

            def sample() -> None:
                nonlocal peak
                while not done.wait(0.02):
                    peak = max(peak, rss_bytes(proc.pid))

            sampler = threading.Thread(target=sample)
            sampler.start()
            try:
                with socket.create_connection((cluster_ip, PORT), timeout=60) as sock:
                    for _ in range(total // len(chunk)):
                        sock.sendall(chunk)
                    sock.shutdown(socket.SHUT_WR)
                    received = int(recv_all(sock))
            finally:
                done.set()
                sampler.join()
    finally:
        backend.stop()
    assert received == total
    growth = peak - baseline
    print(f"{loop}: RSS baseline {baseline >> 20} MiB, peak growth {growth / 2**20:.1f} MiB")
    assert growth < 64 * 1024 * 1024


MODES = (
    "clean",  # request, full echo, client closes
    "half-close",  # request, SHUT_WR, echo until EOF
    "server-close",  # the backend closes first (HTTP "Connection: close")
    "close-early",  # client closes while the echo is in flight
    "rst-after-send",  # request, then an RST (SO_LINGER 0)
    "rst-at-once",  # RST without sending anything
    "read-half-then-rst",  # part of the echo read, then an RST
)


def _read(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        data = sock.recv(65536)
        if not data:
            break
        got += data
    return got


def _one(address: tuple[str, int], i: int) -> str:
    """One short connection in one of the MODES; returns the mode, or what went wrong."""
    mode = MODES[i % len(MODES)]
    payload = f"request {i}\n".encode() * (1 + i % 50)
    sock = socket.create_connection(address, timeout=10)
    try:
        if mode == "clean":
            sock.sendall(payload)
            return mode if _read(sock, len(payload)) == payload else f"{mode}: short echo"
        if mode == "half-close":
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            return mode if recv_all(sock) == payload else f"{mode}: short echo"
        if mode == "server-close":
            sock.sendall(b"close " + payload)
            return mode if recv_all(sock) == b"close " + payload else f"{mode}: short echo"
        if mode == "close-early":
            sock.sendall(payload)
            return mode
        if mode == "rst-after-send":
            sock.sendall(payload)
        if mode == "read-half-then-rst":
            sock.sendall(payload)
            _read(sock, len(payload) // 2)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        return mode
    finally:
        sock.close()


def test_stress_mixed_connections_under_uvloop(tmp_path: Path) -> None:
    """21 000 short connections in seven ways (clean close, half-close, server close,
    early close, three kinds of RST), 100 at once, through a uvloop proxy: every exchange
    is right, the process survives, logs no callback error, and its open descriptors
    return to the baseline within 10 s.  This guards the two uvloop traps described in
    docs/architecture.md ("Half-close and uvloop")."""
    cluster_ip, backend_ip = fresh_ips()
    total = 3000 * len(MODES)
    log_path = tmp_path / "proxy.log"
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    args = ["run", "--manifests", str(manifests), "--loop", "uvloop", "--log-level", "warning"]
    with echo_process(backend_ip) as backend_port:
        write(
            manifests / "s.json",
            service("echo", cluster_ip, PORT),
            endpoint_slice("echo-1", "echo", backend_port, [backend_ip]),
        )
        with proxy_process(args, log=log_path) as proc:
            address = (cluster_ip, PORT)
            wait_listening(address)
            for i in range(len(MODES)):  # warm up (libuv opens a reserve descriptor)
                _one(address, i)
            time.sleep(0.2)
            baseline = open_fds(proc.pid)
            started = time.monotonic()
            with ThreadPoolExecutor(max_workers=100) as pool:
                results = Counter(pool.map(lambda i: _one(address, i), range(total)))
            elapsed = time.monotonic() - started
            assert proc.poll() is None, "the proxy died"
            deadline = time.monotonic() + 10
            while (fds := open_fds(proc.pid)) > baseline and time.monotonic() < deadline:
                time.sleep(0.1)
            print(f"{total} connections in {elapsed:.1f}s; {results}; fds {baseline} -> {fds}")
            assert results == Counter({mode: total // len(MODES) for mode in MODES})
            assert fds <= baseline
            assert _one(address, 0) == "clean"
            assert proc.poll() is None
    assert_clean_log(log_path)
