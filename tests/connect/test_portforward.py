"""The pod port-forward over WebSocket, against the fake API server's endpoint
(tests/support/fake_portforward.py, framed as upstream's kubelet frames it:
pkg/kubelet/cri/streaming/portforward/websocket.go).

Addresses: the fake pods' ports on 127.0.132.N, the local listeners on 127.0.133.N (no
other test uses these).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.support.backends import Backend, echo, echo_through
from tests.support.fake_apiserver import FakeApiServer
from userproxy.connect.portforward import (
    PROTOCOL,
    ApiEndpoint,
    PortForwardError,
    open_forward,
)
from userproxy.connect.relay import ForwardedConnection

POD_IP = "127.0.132.1"
LOCAL_IP = "127.0.133.1"


@pytest.fixture
async def api() -> AsyncIterator[FakeApiServer]:
    async with FakeApiServer() as server:
        server.pods[("default", "web-1")] = POD_IP
        yield server


async def test_the_framing_is_the_kubelets(api: FakeApiServer) -> None:
    """Channel byte first; the port, little-endian uint16, first on data (0) and error (1)."""
    backend = Backend(POD_IP, echo)
    try:
        url = f"{api.url}/api/v1/namespaces/default/pods/web-1/portforward?ports={backend.port}"
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, protocols=(PROTOCOL,)) as ws,
        ):
            assert ws.protocol == PROTOCOL
            first = {(await ws.receive_bytes())[:1] for _ in range(2)}
            port = struct.pack("<H", backend.port)
            assert first == {b"\x00", b"\x01"}
            await ws.send_bytes(b"\x00hello")
            assert await ws.receive_bytes() == b"\x00hello"
            # The announcements themselves, checked byte for byte on a fresh connection.
            async with session.ws_connect(url, protocols=(PROTOCOL,)) as again:
                got = sorted([await again.receive_bytes(), await again.receive_bytes()])
                assert got == [b"\x00" + port, b"\x01" + port]
    finally:
        backend.stop()


async def test_a_refused_port_and_an_unknown_pod_are_clear_errors(api: FakeApiServer) -> None:
    endpoint = ApiEndpoint(api.url)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((POD_IP, 0))
        closed_port = probe.getsockname()[1]
    async with aiohttp.ClientSession() as session:
        forward = await open_forward(session, endpoint, "default", "web-1", closed_port)
        with pytest.raises(PortForwardError, match=f"error forwarding port {closed_port} to pod"):
            await forward.read()
        await forward.close()
        with pytest.raises(PortForwardError, match="404"):
            await open_forward(session, endpoint, "default", "nope", 80)
        with pytest.raises(PortForwardError, match="cannot reach the API server"):
            await open_forward(session, ApiEndpoint("http://127.0.133.9:9"), "default", "x", 80)


@pytest.mark.both_loops
async def test_ten_megabytes_keep_their_sha256_both_ways(api: FakeApiServer) -> None:
    """A local listener whose connections go through the port-forward to an echo pod."""
    backend = Backend(POD_IP, echo)
    endpoint = ApiEndpoint(api.url)
    errors: list[str] = []
    async with aiohttp.ClientSession() as session:

        def factory() -> ForwardedConnection:
            return ForwardedConnection(
                lambda: open_forward(session, endpoint, "default", "web-1", backend.port),
                on_error=errors.append,
            )

        server = await asyncio.get_running_loop().create_server(factory, LOCAL_IP, 0)
        try:
            address = server.sockets[0].getsockname()[:2]
            payload = os.urandom(10 * 1024 * 1024)
            got = await asyncio.to_thread(echo_through, address, payload)
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
            assert errors == []
        finally:
            server.close()
            await server.wait_closed()
            backend.stop()


@pytest.mark.both_loops
async def test_a_failed_forward_resets_the_client(api: FakeApiServer) -> None:
    endpoint = ApiEndpoint(api.url)
    errors: list[str] = []
    async with aiohttp.ClientSession() as session:

        def factory() -> ForwardedConnection:
            return ForwardedConnection(
                lambda: open_forward(session, endpoint, "default", "gone", 80),
                on_error=errors.append,
            )

        server = await asyncio.get_running_loop().create_server(factory, LOCAL_IP, 0)
        try:
            address = server.sockets[0].getsockname()[:2]

            def ask() -> str:
                try:  # the reset may come before the connect or the send returned
                    with socket.create_connection(address, timeout=10) as conn:
                        conn.sendall(b"hi")
                        return "EOF" if conn.recv(10) == b"" else "DATA"
                except (ConnectionResetError, BrokenPipeError):
                    return "RESET"

            assert await asyncio.to_thread(ask) == "RESET"
            assert len(errors) == 1
            assert "404" in errors[0]
        finally:
            server.close()
            await server.wait_closed()
