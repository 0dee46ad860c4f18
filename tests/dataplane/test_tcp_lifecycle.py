"""Connection lifetimes and listener churn: half-close and idle timeouts, no restart of
listeners whose spec did not change, and both IP families."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import weakref
from pathlib import Path

import pytest

from tests.support.backends import Backend, ask, echo, name_server
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import eventually, running_proxy, wait_for_sync

pytestmark = pytest.mark.both_loops


def _hold(conn: socket.socket) -> None:
    """A backend that reads until EOF and then never answers nor closes (until stopped)."""
    while conn.recv(65536):
        pass
    time.sleep(30)


def _addresses() -> tuple[str, str]:
    net = fresh_net()
    return f"127.{net // 200 + 100}.{net % 200}.1", f"127.{net // 200 + 150}.{net % 200}.1"


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the proxy ends ``sock`` (EOF or reset); fails after ``seconds``."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


async def test_half_closed_connection_ends_after_fin_timeout(tmp_path: Path) -> None:
    cluster_ip, backend_ip = _addresses()
    backend = Backend(backend_ip, _hold)
    write(
        tmp_path / "s.json",
        service("hold", cluster_ip, 8080),
        endpoint_slice("hold-1", "hold", backend.port, [backend.ip]),
    )
    try:
        async with running_proxy(tmp_path, tcp_fin_timeout=1.0) as proxy:
            sock = await asyncio.to_thread(socket.create_connection, (cluster_ip, 8080), 5)
            with sock:
                await asyncio.to_thread(sock.sendall, b"request")
                sock.shutdown(socket.SHUT_WR)
                waited = await asyncio.to_thread(_closed_within, sock, 5.0)
            assert 0.9 <= waited <= 3.5, waited
            async with asyncio.timeout(3):
                await proxy.limit.wait_empty()
    finally:
        backend.stop()


async def test_idle_connection_ends_after_idle_timeout(tmp_path: Path) -> None:
    cluster_ip, backend_ip = _addresses()
    backend = Backend(backend_ip, echo)
    write(
        tmp_path / "s.json",
        service("echo", cluster_ip, 8080),
        endpoint_slice("echo-1", "echo", backend.port, [backend.ip]),
    )
    try:
        async with running_proxy(tmp_path, tcp_idle_timeout=1.5) as proxy:
            busy = await asyncio.to_thread(socket.create_connection, (cluster_ip, 8080), 5)
            idle = await asyncio.to_thread(socket.create_connection, (cluster_ip, 8080), 5)
            with busy, idle:
                # The busy connection talks every 0.3 s for 3 s and must survive.
                for _ in range(10):
                    await asyncio.to_thread(busy.sendall, b"x")
                    assert await asyncio.to_thread(busy.recv, 1) == b"x"
                    await asyncio.sleep(0.3)
                waited = await asyncio.to_thread(_closed_within, idle, 0.1)
                assert waited < 0.2, "the idle connection should be gone by now"
                await asyncio.to_thread(busy.sendall, b"y")
                assert await asyncio.to_thread(busy.recv, 1) == b"y"
            async with asyncio.timeout(3):
                await proxy.limit.wait_empty()
    finally:
        backend.stop()


async def test_unchanged_listeners_are_not_restarted(tmp_path: Path) -> None:
    ip_a, backend_a = _addresses()
    ip_b, backend_b = _addresses()
    a = Backend(backend_a, name_server("a"))
    b1 = Backend(backend_b, name_server("b1"))
    b2 = Backend(backend_b.rsplit(".", 1)[0] + ".2", name_server("b2"))
    manifest_a, manifest_b = tmp_path / "a.json", tmp_path / "b.json"
    write(manifest_a, service("a", ip_a, 8080), endpoint_slice("a-1", "a", a.port, [a.ip]))
    write(manifest_b, service("b", ip_b, 8080), endpoint_slice("b-1", "b", b1.port, [b1.ip]))
    try:
        async with running_proxy(tmp_path) as proxy:
            before = {key: (lst, lst.listening) for key, lst in proxy.listeners.listeners.items()}
            held = await asyncio.to_thread(socket.create_connection, (ip_a, 8080), 5)
            with held:
                syncs = proxy.proxier.status.syncs
                write(
                    manifest_b,
                    service("b", ip_b, 8080),
                    endpoint_slice("b-1", "b", b2.port, [b2.ip]),
                )
                await wait_for_sync(proxy, syncs)
                after = proxy.listeners.listeners
                assert set(after) == set(before)
                key_a = next(k for k in after if k[1] == ip_a)
                assert after[key_a] is before[key_a][0], "Service a's listener was replaced"
                assert await asyncio.to_thread(ask, (ip_b, 8080)) == "b2"
                await asyncio.to_thread(held.sendall, b"still\n")
                assert await asyncio.to_thread(held.makefile("rb").readline) == b"a\n"
    finally:
        for backend in (a, b1, b2):
            backend.stop()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


async def test_dual_stack_service_uses_each_familys_endpoints(tmp_path: Path) -> None:
    if not _ipv6_loopback():
        pytest.fail("this machine has no ::1; the dual-stack test needs IPv6 loopback")
    ip4, backend4 = _addresses()
    v4 = Backend(backend4, name_server("v4"))
    v6 = Backend("::1", name_server("v6"))
    # One port number for both families, free on ::1 (cluster IPs share the ServicePort).
    with socket.socket(socket.AF_INET6) as probe:
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]
    svc = service("dual", ip4, port)
    svc["spec"]["clusterIPs"] = [ip4, "::1"]
    svc["spec"]["ipFamilies"] = ["IPv4", "IPv6"]
    svc["spec"]["ipFamilyPolicy"] = "RequireDualStack"
    slice6 = endpoint_slice("dual-v6", "dual", v6.port, ["::1"])
    slice6["addressType"] = "IPv6"
    write(tmp_path / "s.json", svc, endpoint_slice("dual-v4", "dual", v4.port, [v4.ip]), slice6)
    try:
        async with running_proxy(tmp_path):
            assert await asyncio.to_thread(ask, (ip4, port)) == "v4"
            assert await asyncio.to_thread(ask, ("::1", port)) == "v6"
    finally:
        v4.stop()
        v6.stop()


async def test_a_removed_listener_is_freed_without_the_cyclic_collector(tmp_path: Path) -> None:
    """A removed Service's listeners (and, on the compiled relay, their fast path) hold no
    reference cycle: reference counting frees them.  A cycle would be freed only by the
    cyclic collector, and never once a bulk sync had frozen the heap (slices.py): a soak
    writing big manifests grew the proxy by about 100 MB a minute that way."""
    cluster_ip, backend_ip = _addresses()
    backend = Backend(backend_ip, echo)
    path = tmp_path / "s.json"
    write(
        path,
        service("gone", cluster_ip, 8080),
        endpoint_slice("gone-1", "gone", backend.port, [backend.ip]),
    )
    try:
        async with running_proxy(tmp_path) as proxy:
            assert await asyncio.to_thread(ask, (cluster_ip, 8080)) == "hi"
            listeners = [weakref.ref(listener) for listener in proxy.listeners.listeners.values()]
            assert listeners
            gc.collect()
            gc.disable()
            try:
                syncs = proxy.proxier.status.syncs
                write(path, service("other", "127.0.0.254", 8080))
                await wait_for_sync(proxy, syncs)
                await eventually(lambda: all(ref() is None for ref in listeners), 3.0)
            finally:
                gc.enable()
    finally:
        backend.stop()
