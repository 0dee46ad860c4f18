"""NodePort listeners on the node's addresses, and a NodePort taken by another process:
a clear error, other Services unaffected, and the listener appears once the port is free."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import eventually, free_port, running_proxy

pytestmark = pytest.mark.both_loops


def node_port_service(name: str, cluster_ip: str, node_port: int) -> dict[str, Any]:
    svc = service(name, cluster_ip, 8080)
    svc["spec"]["type"] = "NodePort"
    svc["spec"]["ports"][0]["nodePort"] = node_port
    return svc


def answer(address: tuple[str, int]) -> str:
    try:
        return ask(address, timeout=2)
    except OSError as exc:
        return type(exc).__name__


async def test_node_port_clash_is_reported_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = fresh_net()
    cluster_a = f"127.{net // 200 + 100}.{net % 200}.1"
    cluster_b = f"127.{net // 200 + 100}.{net % 200}.2"
    backend = Backend(f"127.{net // 200 + 150}.{net % 200}.1", name_server("b"))
    node_port = free_port()
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", node_port))
    blocker.listen(1)
    write(
        tmp_path / "s.json",
        node_port_service("clash", cluster_a, node_port),
        endpoint_slice("clash-1", "clash", backend.port, [backend.ip]),
        service("other", cluster_b, 8080),
        endpoint_slice("other-1", "other", backend.port, [backend.ip]),
    )
    try:
        with caplog.at_level(logging.INFO, logger="userproxy.dataplane.listener"):
            async with running_proxy(tmp_path, nodeport_addresses=("127.0.0.1/32",)) as proxy:
                errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
                assert any(
                    f"cannot listen on 127.0.0.1:{node_port}" in m and "in use" in m for m in errors
                ), errors
                # The other Service and the clashing Service's ClusterIP work meanwhile.
                assert await asyncio.to_thread(answer, (cluster_b, 8080)) == "b"
                assert await asyncio.to_thread(answer, (cluster_a, 8080)) == "b"
                totals = proxy.listeners.totals()
                assert totals[("default/clash:tcp", "TCP")].bind_errors == 1
                blocker.close()
                # Retried every 5 s by the sweeper: the NodePort appears.
                await eventually(
                    lambda: proxy.listeners.totals()[("default/clash:tcp", "TCP")].bind_errors == 0,
                    within=8.0,
                    what="the NodePort listener to bind",
                )
                assert await asyncio.to_thread(answer, ("127.0.0.1", node_port)) == "b"
                recovered = f"listening on 127.0.0.1:{node_port} now"
                assert any(recovered in r.getMessage() for r in caplog.records)
    finally:
        blocker.close()
        backend.stop()
