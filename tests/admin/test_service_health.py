"""Per-Service health-check ports: upstream's answers (200/503, exact body and headers),
in-place endpoint updates, closing, bind failures and their retry at the next sync, port
conflicts.  Each test drives the servers as the sync does: the full map of ports, then the
full map of local endpoint counts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
from collections.abc import AsyncIterator, Sequence

import pytest

from tests.support.proxyrun import free_port
from userproxy.admin.service_health import (
    FailedBind,
    HealthCheck,
    ServiceHealthServers,
    bind_addresses,
)
from userproxy.model import ServiceKey

pytestmark = pytest.mark.both_loops

WEB = ServiceKey("default", "web")
API = ServiceKey("prod", "api")


class Harness:
    def __init__(self) -> None:
        self.healthy = True
        self.addresses: list[str] = ["127.0.0.1"]
        self.errors: list[tuple[int, OSError]] = []
        self.servers = ServiceHealthServers(
            lambda: self.healthy, self.get_addresses, lambda p, e: self.errors.append((p, e))
        )

    def get_addresses(self) -> Sequence[str]:
        return self.addresses

    def want(self, *checks: HealthCheck) -> None:
        """One sync wanting exactly these health checks (none: every port closes)."""
        self.servers.sync_services({check.service: check.port for check in checks})
        self.servers.sync_endpoints({check.service: check.local_endpoints for check in checks})


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    await harness.servers.close()


Answer = tuple[int, dict[str, str], bytes]


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/"
) -> Answer:
    """One HTTP/1.1 request on an open (keep-alive) connection."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    async with asyncio.timeout(5):
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        status_line, *lines = head.split("\r\n")
        headers = {}
        for line in lines:
            if line:
                name, value = line.split(":", 1)
                headers[name.lower()] = value.strip()
        body = await reader.readexactly(int(headers["content-length"]))
    return int(status_line.split()[1]), headers, body


@contextlib.asynccontextmanager
async def connected(
    port: int, host: str = "127.0.0.1"
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A keep-alive connection to ``host:port``, closed on the way out."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def get(port: int, path: str = "/", host: str = "127.0.0.1") -> Answer:
    async with connected(port, host) as (reader, writer):
        return await exchange(reader, writer, path)


async def is_refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


async def until_refused(port: int, host: str = "127.0.0.1") -> None:
    async with asyncio.timeout(5):
        # Polling on purpose: a refused connect signals nobody.
        while not await is_refused(port, host):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def body(service: ServiceKey, endpoints: int, healthy: bool) -> bytes:
    """Upstream's body, as its Go template prints it."""
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": "{service.namespace}",\n'
        f'\t\t"name": "{service.name}"\n'
        "\t},\n"
        f'\t"localEndpoints": {endpoints},\n'
        f'\t"serviceProxyHealthy": {str(healthy).lower()}\n'
        "}"
    ).encode()


async def test_serves_200_with_upstream_body_and_headers_on_any_path(h: Harness) -> None:
    port = free_port()
    check = HealthCheck(WEB, port, 2)
    h.want(check)
    assert h.servers.ports() == {port: check}
    for path in ("/", "/healthz", "/any/path?x=1"):
        status, headers, data = await get(port, path)
        assert status == 200
        assert headers["content-type"] == "application/json"
        assert headers["x-content-type-options"] == "nosniff"
        assert data == body(WEB, 2, True)
        assert json.loads(data) == {
            "service": {"namespace": "default", "name": "web"},
            "localEndpoints": 2,
            "serviceProxyHealthy": True,
        }
    assert h.errors == []
    assert h.servers.answers() == {200: 3}


async def test_503_without_local_endpoints(h: Harness) -> None:
    port = free_port()
    h.want(HealthCheck(WEB, port, 0))
    status, headers, data = await get(port)
    assert status == 503
    assert headers["content-type"] == "application/json"
    assert headers["x-content-type-options"] == "nosniff"
    assert data == body(WEB, 0, True)


async def test_503_when_the_proxy_is_unhealthy_even_with_endpoints(h: Harness) -> None:
    port = free_port()
    h.healthy = False
    h.want(HealthCheck(WEB, port, 3))
    status, _, data = await get(port)
    assert status == 503
    assert data == body(WEB, 3, False)
    h.healthy = True  # read per request
    assert (await get(port))[0] == 200
    assert h.servers.answers() == {200: 1, 503: 1}


async def test_count_update_switches_status_without_closing_the_port(h: Harness) -> None:
    port = free_port()
    h.want(HealthCheck(WEB, port, 0))
    async with connected(port) as (reader, writer):
        assert (await exchange(reader, writer))[0] == 503
        h.want(HealthCheck(WEB, port, 1))
        status, _, data = await exchange(reader, writer)  # the same keep-alive connection
        assert (status, data) == (200, body(WEB, 1, True))
        h.want(HealthCheck(WEB, port, 0))
        assert (await exchange(reader, writer))[0] == 503
    assert h.servers.ports() == {port: HealthCheck(WEB, port, 0)}
    assert h.errors == []


async def test_a_service_left_out_closes_its_port_and_connections(h: Harness) -> None:
    port = free_port()
    h.want(HealthCheck(WEB, port, 1))
    async with connected(port) as (reader, writer):
        assert (await exchange(reader, writer))[0] == 200
        h.want()
        assert h.servers.ports() == {}
        await until_refused(port)
        async with asyncio.timeout(5):
            assert await reader.read() == b""  # the idle keep-alive connection is closed
    h.want()  # again: nothing to do


async def test_a_new_port_moves_the_server(h: Harness) -> None:
    first, second = free_port(), free_port()
    h.want(HealthCheck(WEB, first, 1))
    assert (await get(first))[0] == 200
    h.want(HealthCheck(WEB, second, 1))
    assert h.servers.ports() == {second: HealthCheck(WEB, second, 1)}
    assert (await get(second))[0] == 200
    await until_refused(first)


async def test_taken_port_is_reported_and_opened_by_a_later_sync(h: Harness) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    check = HealthCheck(WEB, port, 1)
    try:
        h.want(check)
        assert h.servers.ports() == {}
        [(failed_port, error)] = h.errors
        assert (failed_port, error.errno) == (port, errno.EADDRINUSE)
        assert h.servers.failed() == {port: FailedBind(check, error)}
        h.want(check)  # still taken: the same error is not reported twice
        assert len(h.errors) == 1
        assert port in h.servers.failed()
    finally:
        blocker.close()
    h.want(check)
    assert h.servers.failed() == {}
    assert h.servers.ports() == {port: check}
    assert (await get(port))[0] == 200
    h.want(check)  # nothing failed: nothing happens
    assert h.servers.ports() == {port: check}


async def test_a_port_is_all_addresses_or_none(h: Harness) -> None:
    h.addresses = ["127.0.0.1", "127.0.0.2"]
    blocker = socket.socket()
    blocker.bind(("127.0.0.2", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        h.want(HealthCheck(WEB, port, 1))
        assert port in h.servers.failed()
        assert await is_refused(port, "127.0.0.1")  # not left half open
    finally:
        blocker.close()
    h.want(HealthCheck(WEB, port, 1))
    assert (await get(port, host="127.0.0.1"))[0] == 200
    assert (await get(port, host="127.0.0.2"))[0] == 200


async def test_a_non_local_address_binds_all_the_same(h: Harness) -> None:
    h.addresses = ["127.0.0.1", "192.0.2.1"]  # TEST-NET-1: bound (FREEBIND), never dialled
    port = free_port()
    h.want(HealthCheck(WEB, port, 1))
    assert h.servers.failed() == {}
    assert (await get(port))[0] == 200


def test_bind_addresses_empty_means_all() -> None:
    assert bind_addresses([]) == ("0.0.0.0", "::")
    assert bind_addresses(["10.0.0.1", "10.0.0.1", "fd00::1"]) == ("10.0.0.1", "fd00::1")


async def test_second_service_on_a_port_is_refused_until_the_first_lets_go(h: Harness) -> None:
    port = free_port()
    web, api = HealthCheck(WEB, port, 1), HealthCheck(API, port, 0)
    h.want(web)
    h.want(web, api)
    [(failed_port, error)] = h.errors
    assert (failed_port, error.errno) == (port, errno.EADDRINUSE)
    assert "default/web" in str(error)
    assert "prod/api" in str(error)
    assert h.servers.ports() == {port: web}
    assert h.servers.refused() == {API: api}
    assert (await get(port))[2] == body(WEB, 1, True)
    h.want(web, HealthCheck(API, port, 2))  # an update of a refused claim: quiet
    assert len(h.errors) == 1
    h.want(HealthCheck(API, port, 2))  # the first lets go: the waiting claim takes over
    assert h.servers.ports() == {port: HealthCheck(API, port, 2)}
    assert h.servers.refused() == {}
    assert (await get(port))[2] == body(API, 2, True)


async def test_of_two_new_claims_in_one_sync_the_first_listed_wins(h: Harness) -> None:
    port = free_port()
    api, web = HealthCheck(API, port, 1), HealthCheck(WEB, port, 0)
    h.want(api, web)
    assert h.servers.ports() == {port: api}
    assert h.servers.refused() == {WEB: web}
    [(failed_port, error)] = h.errors
    assert (failed_port, error.errno) == (port, errno.EADDRINUSE)
    assert (await get(port))[2] == body(API, 1, True)


async def test_close_closes_everything(h: Harness) -> None:
    ports = [free_port(), free_port()]
    h.want(HealthCheck(WEB, ports[0], 1), HealthCheck(API, ports[1], 1))
    async with connected(ports[0]) as (reader, writer):
        assert (await exchange(reader, writer))[0] == 200
        await h.servers.close()
        assert await reader.read() == b""
    assert h.servers.ports() == {}
    for port in ports:
        assert await is_refused(port)
    h.want(HealthCheck(WEB, ports[0], 1))  # after close: ignored
    assert h.servers.ports() == {}


async def test_close_right_after_a_sync(h: Harness) -> None:
    port = free_port()
    h.want(HealthCheck(WEB, port, 1))
    await h.servers.close()  # before the serving task ever ran
    assert await is_refused(port)


def test_invalid_checks_are_rejected() -> None:
    with pytest.raises(ValueError, match="out of range"):
        HealthCheck(WEB, 0, 1)
    with pytest.raises(ValueError, match="negative"):
        HealthCheck(WEB, 30000, -1)


async def test_sync_rejects_invalid_ports_and_counts_and_changes_nothing(h: Harness) -> None:
    with pytest.raises(ValueError, match="out of range"):
        h.servers.sync_services({WEB: free_port(), API: 70000})
    with pytest.raises(ValueError, match="negative"):
        h.servers.sync_endpoints({WEB: 1, API: -1})
    assert h.servers.ports() == {}
    assert h.servers.refused() == {}
