"""A sync that fails half-way on EMFILE is retried until the listeners match the plan.

The proxy runs on the test's loop.  One Service ("wide") listens on 300 ports.  Then the
process runs out of descriptors: the soft RLIMIT_NOFILE is lowered to the lowest
descriptor of wide's listeners and every free number below it is taken, so every
``socket()`` fails with EMFILE, and the descriptors wide gives back (all above the limit)
cannot be reused.  While so, 20 new Services (two ports each) arrive and wide shrinks to
10 of its ports, in one sync.  Then the descriptors are freed.  After the one sync retry
that follows, every planned listener answers and nothing else listens: 40 ports of the
new Services, wide's 10, and wide's other 290 refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.manifests import endpoint_slice, fresh_net, service, write
from tests.support.proxyrun import running_proxy
from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane.deadlines import TcpTimeouts
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener import ListenersNotOpen
from userproxy.dataplane.listener_set import ListenerSet
from userproxy.model import (
    AddressKind,
    Endpoint,
    EndpointSlice,
    ListenerSpec,
    PoolSpec,
    Protocol,
    Service,
    ServiceKey,
    ServicePortName,
)
from userproxy.sources.decode import decode_endpoint_slice, decode_service

pytestmark = pytest.mark.both_loops

WIDE_PORTS = 300
KEPT_PORTS = 10
SERVICES = 20
PORTS_PER_SERVICE = 2
WIDE_BASE_PORT = 20000


def service_obj(name: str, cluster_ip: str, ports: list[int]) -> dict[str, Any]:
    return service(name, cluster_ip, {f"p{port}": port for port in ports})


def slice_obj(name: str, ports: list[int], backend: Backend) -> dict[str, Any]:
    return endpoint_slice(
        f"{name}-1", name, {f"p{port}": backend.port for port in ports}, [backend.ip]
    )


def as_service(obj: dict[str, Any]) -> Service:
    return decode_service(obj)


def as_slice(obj: dict[str, Any]) -> EndpointSlice:
    decoded = decode_endpoint_slice(obj)
    assert decoded is not None
    return decoded


@contextlib.contextmanager
def descriptors_exhausted(limit: int) -> Iterator[int]:
    """Make every new descriptor of this process fail with EMFILE until exit: the soft
    limit becomes ``limit`` and every free number below it is taken.  Yields how many
    numbers were taken."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        while True:
            try:
                held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError as exc:
                if exc.errno != errno.EMFILE:
                    raise
                break
        yield len(held)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def answers(addresses: list[tuple[str, int]]) -> dict[str, int]:
    """Ask each address once; count the answers (a backend name or an error name)."""
    counts: dict[str, int] = {}
    for address in addresses:
        try:
            outcome = ask(address, timeout=3)
        except OSError as exc:
            outcome = type(exc).__name__
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


async def test_sync_failed_on_emfile_is_retried_until_the_plan_is_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    net = fresh_net()
    prefix = f"127.{net // 200 + 100}.{net % 200}"
    backend = Backend(f"127.{net // 200 + 150}.{net % 200}.1", name_server("b"))
    wide_ports = [WIDE_BASE_PORT + i for i in range(WIDE_PORTS)]
    wide = service_obj("wide", f"{prefix}.1", wide_ports)
    manifest = tmp_path / "wide.json"
    write(manifest, wide, slice_obj("wide", wide_ports, backend))
    new = [service_obj(f"svc-{i:02d}", f"{prefix}.{10 + i}", [8080, 8081]) for i in range(SERVICES)]
    new_addresses = [(f"{prefix}.{10 + i}", port) for i in range(SERVICES) for port in (8080, 8081)]
    kept = [(f"{prefix}.1", port) for port in wide_ports[:KEPT_PORTS]]
    dropped = [(f"{prefix}.1", port) for port in wide_ports[KEPT_PORTS:]]
    try:
        # The manifest is named as a file, so its polling only stats it (no descriptor).
        async with running_proxy(manifest, manifest_poll_interval=3600.0) as proxy:
            listeners = proxy.listeners
            assert sum(1 for lst in listeners if lst.listening) == WIDE_PORTS
            lowest = min(lst._sock.fileno() for lst in listeners if lst._sock is not None)
            recorder = proxy.recorder
            syncs = proxy.proxier.status.syncs
            caplog.clear()
            with (
                caplog.at_level(logging.INFO, logger="userproxy"),
                descriptors_exhausted(lowest) as taken,
            ):
                shrunk = service_obj("wide", f"{prefix}.1", wide_ports[:KEPT_PORTS])
                recorder.on_service_update(as_service(wide), as_service(shrunk))
                for obj in new:
                    name = obj["metadata"]["name"]
                    recorder.on_service_add(as_service(obj))
                    recorder.on_endpointslice_add(as_slice(slice_obj(name, [8080, 8081], backend)))
                async with asyncio.timeout(10):
                    await proxy.wait_sync(syncs)
                # Everything but the opens applied: the listener set matches the plan.
                failed_during = len(proxy.proxier.failed)
                wide_now = sorted(lst.spec.port for lst in listeners if lst.spec.spn.name == "wide")
                open_during = sum(1 for lst in listeners if lst.listening)
                emfile_during = sum(
                    1
                    for lst in listeners
                    if lst.bind_error is not None and lst.bind_error.errno == errno.EMFILE
                )
                freed_at = time.monotonic()
                syncs = proxy.proxier.status.syncs
            # Descriptors free again: the next sync (the runner's retry) opens the rest.
            async with asyncio.timeout(10):
                await proxy.wait_sync(syncs)
            retry_after = time.monotonic() - freed_at
            open_after = sum(1 for lst in listeners if lst.listening)
            failed_after = dict(proxy.proxier.failed)
            new_answers = await asyncio.to_thread(answers, new_addresses)
            kept_answers = await asyncio.to_thread(answers, kept)
            dropped_answers = await asyncio.to_thread(answers, dropped)
    finally:
        backend.stop()
    emfile_lines = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    print(
        f"\n{loop_name}: {taken} descriptors taken; during exhaustion: "
        f"{failed_during} Services failed, {emfile_during} listeners on EMFILE, "
        f"{open_during} open, wide listens on {len(wide_now)} ports; "
        f"retry sync {retry_after:.2f}s after the free: {open_after} open; "
        f"new Services {new_answers}, wide kept {kept_answers}, wide dropped {dropped_answers}; "
        f"{len(emfile_lines)} EMFILE log lines"
    )
    for record in emfile_lines:
        print(f"  {record.levelname} {record.name}: {record.getMessage()}")
    assert failed_during == SERVICES
    assert emfile_during == SERVICES * PORTS_PER_SERVICE
    assert wide_now == wide_ports[:KEPT_PORTS], "wide shrank although others failed first"
    assert open_during == KEPT_PORTS
    assert not failed_after, failed_after
    assert open_after == SERVICES * PORTS_PER_SERVICE + KEPT_PORTS
    assert new_answers == {"b": SERVICES * PORTS_PER_SERVICE}
    assert kept_answers == {"b": KEPT_PORTS}
    assert dropped_answers == {"ConnectionRefusedError": WIDE_PORTS - KEPT_PORTS}
    # Bounded: the listeners' rate-limited line and the sync's one line, not one per socket.
    assert 1 <= len(emfile_lines) <= 4, [r.getMessage() for r in emfile_lines]
    assert not [r for r in caplog.records if r.exc_info], caplog.text[-3000:]


def test_descriptors_exhausted_helper() -> None:
    """The helper really makes socket() fail, and gives everything back."""
    probe = socket.socket()
    limit = probe.fileno() + 1
    probe.close()
    with descriptors_exhausted(limit), pytest.raises(OSError, match="Too many open files"):
        socket.socket()
    socket.socket().close()


# -- the listener set on its own --------------------------------------------------------------


def tcp_spec(service: str, ip: str, port: int, backend: Backend) -> ListenerSpec:
    spn = ServicePortName("default", service, "p", Protocol.TCP)
    pool = PoolSpec((Endpoint(backend.ip, backend.port),), "round-robin")
    return ListenerSpec(spn, AddressKind.CLUSTER_IP, ip, port, pool)


def listening(address: tuple[str, int]) -> bool:
    try:
        socket.create_connection(address, timeout=2).close()
    except ConnectionRefusedError:
        return False
    return True


async def test_listener_set_raises_after_applying_all_and_retries_what_failed() -> None:
    net = fresh_net()
    prefix = f"127.{net // 200 + 100}.{net % 200}"
    backend = Backend(f"127.{net // 200 + 150}.{net % 200}.1", name_server("b"))
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind((f"{prefix}.1", 80))
    blocker.listen(1)
    listeners = ListenerSet(BalancerRegistry(), ConnectionLimit(100), TcpTimeouts())
    a, b = ServiceKey("default", "a"), ServiceKey("default", "b")
    taken = tcp_spec("a", f"{prefix}.1", 80, backend)
    free = tcp_spec("a", f"{prefix}.1", 81, backend)
    try:
        with pytest.raises(ListenersNotOpen, match="1 listener not open") as raised:
            listeners.set_listeners(a, [taken, free])
        assert list(raised.value.failures) == [taken.key]
        assert await asyncio.to_thread(listening, (f"{prefix}.1", 81)), "the rest is applied"
        blocker.close()
        listeners.set_listeners(a, [taken, free])  # the same plan again: the failed one is retried
        assert await asyncio.to_thread(ask, (f"{prefix}.1", 80)) == "b"

        # b wants a's address: refused while a holds it, served as soon as a lets go.
        listeners.set_listeners(b, [tcp_spec("b", f"{prefix}.1", 81, backend)])
        assert listeners.listeners[free.key].spec.spn.name == "a"
        listeners.set_listeners(a, [taken])
        assert listeners.listeners[free.key].spec.spn.name == "b"
        assert await asyncio.to_thread(ask, (f"{prefix}.1", 81)) == "b"
        listeners.set_listeners(a, [])
        listeners.set_listeners(b, [])
        assert not listeners.listeners
        assert not await asyncio.to_thread(listening, (f"{prefix}.1", 80))
        assert not await asyncio.to_thread(listening, (f"{prefix}.1", 81))
    finally:
        blocker.close()
        listeners.stop_accepting()
        await listeners.drain(0.1)
        backend.stop()
