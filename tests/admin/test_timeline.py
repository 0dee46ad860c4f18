"""The status timeline beyond syncs: manifests that could not be reloaded, the API watch
restarting and re-listing, listeners that cannot bind (and can again), endpoints ejected
and back; each read from ``/status`` of a running proxy, as a page or a script reads it.

Addresses: Services on 127.218.x.1, backends on 127.218.x.1x (no other test uses 127.218).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, ask, name_server
from tests.support.fake_apiserver import FakeApiServer
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import free_port, running_proxy
from userproxy.admin.events import REPEAT_WINDOW, EventLog

pytestmark = pytest.mark.both_loops

PORT = 8080
_nets = itertools.count(1 + (os.getpid() % 50) * 5)


def _get_timeline(metrics_port: int) -> list[tuple[str, str]]:
    url = f"http://127.0.0.1:{metrics_port}/status?page_size=1"
    with urllib.request.urlopen(url, timeout=5) as answer:
        data = json.load(answer)
    return [(event["kind"], event["message"]) for event in data["events"]]


async def timeline(metrics_port: int) -> list[tuple[str, str]]:
    """The ``(kind, message)`` of every event ``/status`` serves now (read from a thread:
    the proxy answering runs on this loop)."""
    return await asyncio.to_thread(_get_timeline, metrics_port)


async def wait_event(metrics_port: int, kind: str, text: str, within: float = 10.0) -> str:
    """The first event of ``kind`` whose message contains ``text``, polled from /status."""
    seen: list[tuple[str, str]] = []
    try:
        async with asyncio.timeout(within):
            while True:
                seen = await timeline(metrics_port)
                found = [m for k, m in seen if k == kind and text in m]
                if found:
                    return found[0]
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"no {kind} event with {text!r} in {within} s: {seen}") from None


@contextlib.asynccontextmanager
async def proxy_with_metrics(manifests: Path | None = None, **overrides: Any) -> AsyncIterator[int]:
    """A running proxy with its metrics server on 127.0.0.1; yields the server's port."""
    port = free_port()
    async with running_proxy(manifests, metrics_bind_address=f"127.0.0.1:{port}", **overrides):
        yield port


@pytest.fixture
def net() -> int:
    """A fresh 127.218.NET.0/24 for the test."""
    return next(_nets)


@pytest.fixture
def backend(net: int) -> Iterator[Backend]:
    """The Service's one good backend, at 127.218.NET.11, answering ``b1``."""
    started = Backend(f"127.218.{net}.11", name_server("b1"))
    yield started
    started.stop()


async def test_a_broken_manifest_is_a_reload_event_naming_the_problem(
    tmp_path: Path, net: int, backend: Backend
) -> None:
    path = tmp_path / "web.json"
    web = service("web", f"127.218.{net}.1", PORT)
    write(path, web, endpoint_slice("web-1", "web", backend.port, [backend.ip]))
    async with proxy_with_metrics(tmp_path) as metrics:
        bad = dict(web, spec={"clusterIP": f"127.218.{net}.1", "ports": [{"port": 70000}]})
        write(path, bad)
        message = await wait_event(metrics, "reload", "70000")
        assert message.startswith("manifests not reloaded, keeping the last good state: ")
        assert "web.json" in message, message
        assert "spec.ports[0].port" in message, message
        # The last good state still serves.
        assert await asyncio.to_thread(ask, (f"127.218.{net}.1", PORT)) == "b1"


async def test_listener_bind_error_and_its_end_are_events(
    tmp_path: Path, net: int, backend: Backend
) -> None:
    address = (f"127.218.{net}.1", PORT)
    squatter = socket.socket()
    squatter.bind(address)
    squatter.listen()
    write(
        tmp_path / "web.json",
        service("web", address[0], PORT),
        endpoint_slice("web-1", "web", backend.port, [backend.ip]),
    )
    try:
        async with proxy_with_metrics(tmp_path) as metrics:
            message = await wait_event(metrics, "bind", "cannot listen")
            assert message == (
                f"default/web:tcp/TCP: {address[0]}:{PORT}: cannot listen: Address already in use"
            )
            squatter.close()
            # Retried by the sweeper every BIND_RETRY_INTERVAL (5 s).
            message = await wait_event(metrics, "bind", "listening now", within=12)
            assert message == (
                f"default/web:tcp/TCP: {address[0]}:{PORT}: listening now (the bind error is over)"
            )
            assert await asyncio.to_thread(ask, address) == "b1"
            binds = [m for k, m in await timeline(metrics) if k == "bind"]
            assert len(binds) == 2, binds  # failed retries in between say nothing
    finally:
        squatter.close()


async def test_an_ejection_and_the_return_are_events(
    tmp_path: Path, net: int, backend: Backend
) -> None:
    dead = socket.socket()  # bound, never listening: every dial to it is refused
    dead.bind((f"127.218.{net}.12", 0))
    dead_port = dead.getsockname()[1]
    address = (f"127.218.{net}.1", PORT)
    write(
        tmp_path / "web.json",
        service("web", address[0], PORT),
        endpoint_slice("web-1", "web", backend.port, [backend.ip]),
        endpoint_slice("web-2", "web", dead_port, [f"127.218.{net}.12"]),
    )
    try:
        async with proxy_with_metrics(
            tmp_path, outlier_consecutive_failures=2, outlier_base_ejection=0.5
        ) as metrics:
            dead_ep = f"127.218.{net}.12:{dead_port}"
            for _ in range(20):
                if any(k == "ejection" for k, _m in await timeline(metrics)):
                    break
                assert await asyncio.to_thread(ask, address) == "b1"  # retried elsewhere
            message = await wait_event(metrics, "ejection", "ejected", within=1)
            assert message == (
                f"default/web:tcp/TCP: {dead_ep} ejected for 500ms after 2 failed dials in a row"
            )
            message = await wait_event(metrics, "ejection", "is back", within=5)
            assert message == f"default/web:tcp/TCP: {dead_ep} is back (ejected 1 time in a row)"
    finally:
        dead.close()


async def test_watch_restarts_and_relists_of_the_api_source_are_events(
    tmp_path: Path, net: int, backend: Backend
) -> None:
    async with FakeApiServer() as api:
        api.create("services", service("web", f"127.218.{net}.1", PORT))
        api.create("endpointslices", endpoint_slice("web-1", "web", backend.port, [backend.ip]))
        async with proxy_with_metrics(
            kubeconfig=api.kubeconfig(tmp_path / "kubeconfig")
        ) as metrics:
            await api.wait_watching()
            assert api.drop_watches() >= 3
            for resource in ("services", "endpointslices", "nodes"):
                await wait_event(metrics, "source", f"{resource}: watch broke")
            # Resumed at a resourceVersion the server no longer has: 410 Gone, re-list.
            await api.wait_watching()
            api.create("services", service("other", f"127.218.{net}.2", PORT))
            api.compact()
            api.drop_watches()
            message = await wait_event(metrics, "source", "re-listing")
            assert message.endswith("watch fell too far behind (410 Gone); re-listing")
            assert await asyncio.to_thread(ask, (f"127.218.{net}.1", PORT)) == "b1"


def test_a_repeated_event_is_counted_on_one_entry_not_added_again() -> None:
    now = [100.0]
    events = EventLog(size=10, clock=lambda: now[0])
    for _ in range(50):  # an API outage retried every second
        events.source_event("api_error", "services")
        now[0] += 1.0
    events.add("sync", "sync 2: ...")
    events.source_event("api_error", "services")
    now[0] += REPEAT_WINDOW + 1  # a repeat after a long quiet is news again
    events.source_event("api_error", "services")
    assert [(e["kind"], e["message"]) for e in events.as_json()] == [
        ("source", "services: API request failed; retrying with backoff (and 49 more times)"),
        ("sync", "sync 2: ..."),
        ("source", "services: API request failed; retrying with backoff"),
        ("source", "services: API request failed; retrying with backoff"),
    ]
    assert events.as_json()[0]["time"] == 149.0  # the latest repeat's time
