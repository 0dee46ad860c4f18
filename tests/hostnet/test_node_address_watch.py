"""A node address that appears gets its NodePort listeners within about a second (the
watcher asks for a sync), not at the next periodic sync 30 s later; one that goes away
loses them the same way.

The address is a /32 on ``lo`` in this network namespace (127.0.0.0/8 is local already,
so nothing else changes); it needs CAP_NET_ADMIN, and the test is skipped without it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dataplane.test_nodeport import answer, node_port_service
from tests.support.backends import Backend, name_server
from tests.support.manifests import endpoint_slice, fresh_net, write
from tests.support.proxyrun import eventually, free_port, running_proxy
from userproxy.model import Protocol

pytestmark = pytest.mark.both_loops


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def node_ip() -> Iterator[str]:
    """An address in 127.77.0.0/16 that is not on any interface yet (deleted at the end)."""
    address = f"127.77.{os.getpid() % 250}.{fresh_net() % 250 + 1}"
    ip("addr", "del", f"{address}/32", "dev", "lo")  # a leftover of a killed run
    yield address
    ip("addr", "del", f"{address}/32", "dev", "lo")


async def test_a_new_node_address_gets_its_node_port_within_a_second(
    tmp_path: Path, node_ip: str
) -> None:
    net = fresh_net()
    cluster_ip = f"127.{net // 200 + 100}.{net % 200}.1"
    backend = Backend(f"127.{net // 200 + 150}.{net % 200}.1", name_server("b"))
    node_port = free_port()
    write(
        tmp_path / "s.json",
        node_port_service("np", cluster_ip, node_port),
        endpoint_slice("np-1", "np", backend.port, [backend.ip]),
    )
    key = (Protocol.TCP, node_ip, node_port)
    try:
        async with running_proxy(tmp_path, nodeport_addresses=("127.77.0.0/16",)) as proxy:
            assert key not in proxy.listeners.listeners
            assert await asyncio.to_thread(answer, (node_ip, node_port)) == "ConnectionRefusedError"
            added = ip("addr", "add", f"{node_ip}/32", "dev", "lo")
            if added.returncode != 0:
                pytest.skip(f"cannot add an address to lo: {added.stderr.strip()}")
            start = time.monotonic()
            await eventually(
                lambda: (
                    key in proxy.listeners.listeners and proxy.listeners.listeners[key].listening
                ),
                within=3.0,
                what=f"a NodePort listener on {node_ip}",
            )
            elapsed = time.monotonic() - start
            assert await asyncio.to_thread(answer, (node_ip, node_port)) == "b"
            # About a second at most (the watcher waits 50 ms for more events, then one
            # read on a thread and one sync); the periodic sync would take 30 s.
            assert elapsed < 1.5, elapsed
            assert proxy.proxier.node_addresses == (node_ip,)

            ip("addr", "del", f"{node_ip}/32", "dev", "lo")
            await eventually(
                lambda: key not in proxy.listeners.listeners,
                within=3.0,
                what=f"the NodePort listener on {node_ip} to close",
            )
            assert node_ip not in proxy.proxier.node_addresses
    finally:
        backend.stop()
