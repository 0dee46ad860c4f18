"""Malformed HTTP to every admin port: a 400 or a closed connection, a bounded one-line log.

The health server, the metrics server and a Service's healthCheckNodePort server of a real
proxy each get 100 malformed requests over raw sockets (garbage, bad request lines, invalid
and oversized headers, bad chunked encoding, binary blobs, a 100 KB request line).  Each
must be answered 400 or closed; the log may carry at most one line per second about them,
without a traceback; and every server still answers a good request afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import free_port, running_proxy

pytestmark = pytest.mark.both_loops

REQUESTS_PER_PORT = 100

CHUNKED = b"POST /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
MALFORMED: dict[str, bytes] = {
    "garbage": b"\x00\x01\x02 garbage \xff\xfe\r\n\r\n",
    "no-target": b"GET\r\n\r\n",
    "bad-version": b"GET / HTTP/9.9x\r\nHost: x\r\n\r\n",
    "lowercase-method": b"get / HTTP/1.1\r\nHost: x\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "nul-in-header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "oversized-header": b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
    "too-many-headers": b"GET / HTTP/1.1\r\n"
    + b"".join(b"X-%d: y\r\n" % i for i in range(300))
    + b"\r\n",
    "bad-content-length": b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "two-content-lengths": (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    ),
    "bad-chunk-size": CHUNKED + b"zz\r\nabc\r\n0\r\n\r\n",
    "short-chunk": CHUNKED + b"5\r\nabc\r\n0\r\n\r\n",
    "chunked-and-length": (
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "binary-blob": bytes(range(256)) * 8,
    "tls-client-hello": bytes.fromhex("16030100a5010000a10303") + bytes(160),
    "100k-request-line": b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
}


def send_malformed(port: int, payload: bytes) -> str:
    """Send ``payload``; return "400" or "closed", or what else happened."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            return "closed"  # answered (or closed) before all of it was read
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            return f"no answer within 5 s (got {answer[:40]!r})"
    if not answer:
        return "closed"
    status_line = answer.split(b"\r\n", 1)[0]
    if status_line.split(b" ")[1:2] == [b"400"]:
        return "400"
    return f"unexpected answer {status_line!r}"


def good_request(port: int, path: str) -> int:
    """The status of a well-formed GET."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def barrage(port: int) -> dict[str, int]:
    """REQUESTS_PER_PORT malformed requests to ``port``, cycling through the kinds."""
    outcomes: dict[str, int] = {}
    kinds = itertools.cycle(MALFORMED.items())
    for _ in range(REQUESTS_PER_PORT):
        name, payload = next(kinds)
        outcome = send_malformed(port, payload)
        assert outcome in ("400", "closed"), f"{name} on port {port}: {outcome}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


def load_balancer(name: str, cluster_ip: str, node_port: int, check_port: int) -> dict[str, Any]:
    svc = service(name, cluster_ip, 8080)
    svc["spec"].update(
        type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=check_port
    )
    svc["spec"]["ports"][0]["nodePort"] = node_port
    return svc


def is_admin_record(record: logging.LogRecord) -> bool:
    return record.name.startswith(("aiohttp", "userproxy.admin"))


async def test_malformed_requests_get_400_and_a_bounded_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = fresh_net()
    cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
    backend_ip = f"127.{net // 200 + 150}.{net % 200}.1"
    health_port, metrics_port, check_port, node_port = (free_port() for _ in range(4))
    slice_ = endpoint_slice("lb-1", "lb", 9, [backend_ip])
    slice_["endpoints"][0]["nodeName"] = "test-node"
    write(tmp_path / "s.json", load_balancer("lb", cluster_ip, node_port, check_port), slice_)
    async with running_proxy(
        tmp_path,
        healthz_bind_address=f"127.0.0.1:{health_port}",
        metrics_bind_address=f"127.0.0.1:{metrics_port}",
        nodeport_addresses=("127.0.0.1/32",),
    ) as proxy:
        async with asyncio.timeout(10):
            await proxy.health_ready.wait()
            await proxy.metrics_ready.wait()
        assert check_port in proxy.service_health.ports()
        ports = {"health": health_port, "metrics": metrics_port, "service-health": check_port}
        caplog.clear()
        with caplog.at_level(logging.DEBUG):
            started = time.monotonic()
            outcomes = {
                name: await asyncio.to_thread(barrage, port) for name, port in ports.items()
            }
            elapsed = time.monotonic() - started
            records = [r for r in caplog.records if is_admin_record(r)]
            text = caplog.text
        print(
            f"{asyncio.get_running_loop().__class__.__module__}: {outcomes} in {elapsed:.1f}s, "
            f"{len(records)} log lines"
        )
        for record in records:
            print(f"  {record.levelname} {record.name}: {record.getMessage()}")
        assert "Traceback" not in text, text[-3000:]
        assert not [r for r in caplog.records if r.exc_info], text[-3000:]
        assert all(r.levelno <= logging.WARNING for r in records), text[-3000:]
        assert all("\n" not in r.getMessage() for r in records)
        assert len(records) <= elapsed + 1, text[-3000:]
        times = sorted(r.created for r in records)
        assert all(b - a >= 0.9 for a, b in itertools.pairwise(times)), times
        # A second later the next one is logged, with the count of those held back.
        await asyncio.sleep(1.0)
        with caplog.at_level(logging.DEBUG):
            caplog.clear()
            assert await asyncio.to_thread(send_malformed, health_port, MALFORMED["bad-version"])
            [line] = [r for r in caplog.records if is_admin_record(r)]
        print(f"  then: {line.levelname} {line.getMessage()}")
        assert line.levelno == logging.WARNING
        assert not line.exc_info
        assert "held back" in line.getMessage()
        # Still serving.
        assert await asyncio.to_thread(good_request, health_port, "/healthz") == 200
        assert await asyncio.to_thread(good_request, metrics_port, "/metrics") == 200
        assert await asyncio.to_thread(good_request, check_port, "/") == 200
