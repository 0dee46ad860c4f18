"""UDP through the proxy on both loops: full-size datagrams, replies from the service
address the client used, session stickiness, endpoint removal, idle expiry, eviction."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import UdpBackend
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import (
    eventually,
    open_socket_inodes,
    running_proxy,
    socket_inode,
    wait_for_sync,
)
from userproxy.dataplane.udp_listener import UdpListener

pytestmark = pytest.mark.both_loops

PORT = 5353


def udp_service(name: str, cluster_ip: str) -> dict[str, Any]:
    svc = service(name, cluster_ip, PORT, port_name="dns")
    svc["spec"]["ports"][0]["protocol"] = "UDP"
    return svc


def udp_slice(name: str, service_name: str, backend: UdpBackend) -> dict[str, Any]:
    eps = endpoint_slice(name, service_name, backend.port, [backend.ip], port_name="dns")
    eps["ports"][0]["protocol"] = "UDP"
    return eps


class Scene:
    def __init__(self, tmp_path: Path, count: int = 2) -> None:
        net = fresh_net()
        self.cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
        self.address = (self.cluster_ip, PORT)
        self.manifest = tmp_path / "m" / "udp.json"
        self.manifest.parent.mkdir()
        self.backends = [
            UdpBackend(f"127.{net // 200 + 150}.{net % 200}.{i + 1}", tagger(f"b{i + 1}"))
            for i in range(count)
        ]
        # An echo backend (no tag) for the full-size datagrams.
        self.echo = UdpBackend(f"127.{net // 200 + 150}.{net % 200}.9")

    def publish(self, only: list[int] | None = None, *, echo: bool = False) -> None:
        chosen = range(len(self.backends)) if only is None else only
        backends = [self.echo] if echo else [self.backends[i] for i in chosen]
        write(self.manifest, udp_service("dns", self.cluster_ip),
              *(udp_slice(f"dns-{b.port}", "dns", b) for b in backends))  # fmt: skip

    def close(self) -> None:
        for backend in (*self.backends, self.echo):
            backend.stop()


def tagger(name: str) -> Callable[[bytes], bytes]:
    """A backend handler answering ``name:`` followed by the datagram."""
    return lambda data: f"{name}:".encode() + data


@pytest.fixture
def scene(tmp_path: Path) -> Iterator[Scene]:
    s = Scene(tmp_path)
    yield s
    s.close()


def exchange(sock: socket.socket, address: tuple[str, int], data: bytes) -> tuple[bytes, Any]:
    sock.sendto(data, address)
    return sock.recvfrom(70000)


@pytest.mark.parametrize("size", [1, 1400, 9000, 65507])
async def test_datagrams_of_every_size_pass_intact(scene: Scene, size: int) -> None:
    scene.publish(echo=True)
    async with running_proxy(scene.manifest.parent):
        payload = os.urandom(size)

        def run() -> tuple[bytes, Any]:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.settimeout(3)
                return exchange(sock, scene.address, payload)

        reply, source = await asyncio.to_thread(run)
    assert reply == payload
    assert source == scene.address  # from the exact service address and port


async def test_session_sticks_and_moves_when_its_endpoint_leaves(scene: Scene) -> None:
    scene.publish()
    async with running_proxy(scene.manifest.parent) as proxy:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(3)
        with sock:
            first = (await asyncio.to_thread(exchange, sock, scene.address, b"x"))[0]
            chosen = int(first[1:2]) - 1
            for _ in range(10):
                reply, _ = await asyncio.to_thread(exchange, sock, scene.address, b"x")
                assert reply == first
            # The session's endpoint leaves the pool: the next datagram goes elsewhere.
            other = 1 - chosen
            syncs = proxy.proxier.status.syncs
            scene.publish(only=[other])
            await wait_for_sync(proxy, syncs)
            before = scene.backends[chosen].received
            for _ in range(10):
                reply, _ = await asyncio.to_thread(exchange, sock, scene.address, b"y")
                assert reply == f"b{other + 1}:y".encode()
            assert scene.backends[chosen].received == before


async def test_idle_sessions_expire_and_release_descriptors(scene: Scene) -> None:
    scene.publish(only=[0])
    async with running_proxy(scene.manifest.parent, udp_idle_timeout=1.0) as proxy:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(20)]
        try:
            for sock in socks:
                sock.settimeout(3)
                await asyncio.to_thread(exchange, sock, scene.address, b"hello")
            assert len(proxy.listeners.udp_sessions) == 20
            listener = next(iter(proxy.listeners))
            assert isinstance(listener, UdpListener)
            session_socks = [s.sock for s in proxy.listeners.udp_sessions.sessions(listener)]
            # Name each session's socket by its kernel inode, not by a count of the
            # process's descriptors: other code (the netlink reads of the node's addresses,
            # a client thread) opens and closes descriptors at any moment.
            session_inodes = {socket_inode(sock.fileno()) for sock in session_socks}
            assert len(session_inodes) == 20
            assert session_inodes <= open_socket_inodes()
            await eventually(lambda: len(proxy.listeners.udp_sessions) == 0, within=4.0,
                             what="idle sessions to expire")  # fmt: skip
            assert all(sock.fileno() == -1 for sock in session_socks)
            assert not session_inodes & open_socket_inodes()
            totals = proxy.listeners.totals()[("default/dns:dns", "UDP")]
            assert totals.sessions_expired == 20
            assert not any(t.get_name().startswith("udp") for t in asyncio.all_tasks())
        finally:
            for sock in socks:
                sock.close()


async def test_table_is_bounded_with_lru_eviction(scene: Scene) -> None:
    scene.publish(only=[0])
    async with running_proxy(scene.manifest.parent, udp_max_sessions=10) as proxy:
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(25)]
        try:
            for sock in socks:
                sock.settimeout(3)
                await asyncio.to_thread(exchange, sock, scene.address, b"hello")
                assert len(proxy.listeners.udp_sessions) <= 10
            totals = proxy.listeners.totals()[("default/dns:dns", "UDP")]
            assert totals.sessions_evicted == 15
            assert totals.sessions_active == 10
            # An evicted client just gets a new session.
            reply, _ = await asyncio.to_thread(exchange, socks[0], scene.address, b"again")
            assert reply == b"b1:again"
        finally:
            for sock in socks:
                sock.close()
