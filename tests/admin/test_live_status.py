"""The status page's live stream, ``/status/events`` (admin/live.py), over real sockets:
the first message, a message within a second of a manifest change, keep-alive comments, a
message when the connection counters move, the stream's bounded lifetime, a client that
leaves leaves no handler or task behind, the stream limit, and a proxy with open streams
stops at once.  Also ``/?fragment=1`` and ``/status.js``, which the page uses, and the
EventLog's wake-up that the notifier sleeps on.

Each stream is read by a plain blocking HTTP/1.1 client (http.client, which undoes the
chunked encoding) in a thread, independent of the loop under test.

Addresses: Services on 127.215.1.x, backends on 127.215.1.1x, the metrics server on
127.215.1.100 (no other test module uses 127.215 but tests/browser).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.backends import Backend, echo
from tests.support.manifests import endpoint_slice, service, write
from tests.support.proxyrun import eventually, running_proxy, wait_listening
from userproxy.admin import live, metrics_server
from userproxy.admin.events import EventLog
from userproxy.admin.live import LiveFeed
from userproxy.admin.status import StatusView
from userproxy.proxy import Proxy

pytestmark = pytest.mark.both_loops

METRICS_IP = "127.215.1.100"
WEB = ("127.215.1.1", 8080)
BACKEND_IP = "127.215.1.11"


def free_port(ip: str = METRICS_IP) -> int:
    """A TCP port on ``ip`` that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind((ip, 0))
        port: int = probe.getsockname()[1]
        return port


class Stream:
    """One ``GET /status/events`` read line by line: ``block()`` is the next message or
    comment (its lines), or None once the server ended the stream."""

    def __init__(self, port: int, path: str = "/status/events") -> None:
        self.conn = http.client.HTTPConnection(METRICS_IP, port, timeout=5)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()

    def block(self, timeout: float = 5.0) -> list[str] | None:
        assert self.conn.sock is not None
        self.conn.sock.settimeout(timeout)
        lines: list[str] = []
        while True:
            line = self.response.readline()
            if not line:
                return None
            text = line.decode().rstrip("\n")
            if not text:
                return lines
            lines.append(text)

    def close(self) -> None:
        self.conn.close()


def data(block: list[str] | None) -> dict[str, Any]:
    """The JSON of a message block (not a comment)."""
    assert block is not None, "the stream ended"
    (line,) = [x for x in block if x.startswith("data: ")]
    value: dict[str, Any] = json.loads(line.removeprefix("data: "))
    assert f"id: {value['generation']}" in block
    return value


def next_message(stream: Stream, within: float) -> dict[str, Any]:
    """The next message (comments skipped) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        block = stream.block(max(0.01, deadline - time.monotonic()))
        if block and not block[0].startswith(":"):
            return data(block)
        assert time.monotonic() < deadline, f"no message within {within}s (last: {block})"


def fetch(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], str]:
    conn = http.client.HTTPConnection(METRICS_IP, port, timeout=10)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        conn.close()


def http_tasks() -> int:
    """aiohttp's tasks on this loop: one per open connection, one per request handled."""
    return sum(
        1
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").startswith("RequestHandler.")
    )


@pytest.fixture
def feeds(monkeypatch: pytest.MonkeyPatch) -> list[LiveFeed]:
    """Every LiveFeed the metrics server makes during the test (the proxy keeps its app to
    itself)."""
    made: list[LiveFeed] = []

    def add_live_routes(app: Any, view: StatusView) -> LiveFeed:
        feed = live.add_live_routes(app, view)
        made.append(feed)
        return feed

    monkeypatch.setattr(metrics_server, "add_live_routes", add_live_routes)
    return made


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend(BACKEND_IP, echo)
    yield b
    b.stop()


def manifests(path: Path, backend: Backend, *, ready: bool = True, api: bool = False) -> None:
    objects = [
        service("web", WEB[0], WEB[1]),
        endpoint_slice("web-1", "web", backend.port, [backend.ip], ready=[ready]),
    ]
    if api:
        objects.append(service("api", "127.215.1.2", 8081))
    write(path / "m.json", *objects)


@contextlib.asynccontextmanager
async def proxy_with_metrics(tmp_path: Path, backend: Backend) -> AsyncIterator[tuple[Proxy, int]]:
    """A proxy serving ``manifests`` with its metrics server on METRICS_IP, and its port."""
    manifests(tmp_path, backend)
    port = free_port()
    async with running_proxy(tmp_path, metrics_bind_address=f"{METRICS_IP}:{port}") as proxy:
        yield proxy, port


async def test_hello_then_a_message_within_a_second_of_a_change(
    tmp_path: Path, backend: Backend, feeds: list[LiveFeed]
) -> None:
    async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
        stream = await asyncio.to_thread(Stream, port)
        try:
            assert stream.response.status == 200
            assert stream.response.getheader("Content-Type") == "text/event-stream"
            assert stream.response.getheader("Cache-Control") == "no-cache"
            first = await asyncio.to_thread(stream.block)
            assert first is not None
            assert first[0] == "retry: 1000"
            hello = data(first)
            assert hello["reason"] == "hello"
            (feed,) = feeds
            await eventually(lambda: feed.streams == 1 and feed.notifying)

            # The endpoint goes not ready and a Service comes: one sync, told at once.
            started = time.monotonic()
            manifests(tmp_path, backend, ready=False, api=True)
            message = await asyncio.to_thread(next_message, stream, 1.0)
            took = time.monotonic() - started
            print(f"\nmessage {took * 1000:.0f} ms after the manifest change")
            assert message["reason"] == "events"
            assert message["generation"] > hello["generation"]
            code, _, page = await asyncio.to_thread(fetch, port, "/?fragment=1")
            assert code == 200
            assert "<h2 id='default/api'>" in page
            assert "<html" not in page
            assert "class='not-ready'" in page
        finally:
            stream.close()


async def test_a_timeline_event_between_syncs_is_told(tmp_path: Path, backend: Backend) -> None:
    """A manifest that cannot be reloaded changes no Service (no sync) but adds a timeline
    event: told within a second too."""
    async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
        stream = await asyncio.to_thread(Stream, port)
        try:
            assert data(await asyncio.to_thread(stream.block))["reason"] == "hello"
            started = time.monotonic()
            (tmp_path / "m.json").write_text("{ not json")
            message = await asyncio.to_thread(next_message, stream, 1.0)
            print(f"\nmessage {(time.monotonic() - started) * 1000:.0f} ms after the bad file")
            assert message["reason"] == "events"
            code, _, page = await asyncio.to_thread(fetch, port, "/?fragment=1")
            assert code == 200
            assert "manifests not reloaded" in page
        finally:
            stream.close()


async def test_keep_alive_counters_and_lifetime(
    tmp_path: Path, backend: Backend, feeds: list[LiveFeed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With keep-alive every 0.3 s and a 4 s lifetime: comments while nothing happens, a
    "counters" message within two ticks of a connection through the proxy, then the end."""
    monkeypatch.setattr(live, "KEEPALIVE", 0.3)
    monkeypatch.setattr(live, "LIFETIME", 4.0)
    async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
        await asyncio.to_thread(wait_listening, WEB)
        stream = await asyncio.to_thread(Stream, port)
        opened = time.monotonic()
        try:
            assert data(await asyncio.to_thread(stream.block))["reason"] == "hello"
            assert await asyncio.to_thread(stream.block, 1.0) == [": keep-alive"]

            conn = await asyncio.to_thread(socket.create_connection, WEB, 5)
            try:
                await asyncio.to_thread(conn.sendall, b"ping\n")
                assert await asyncio.to_thread(conn.recv, 16) == b"ping\n"
                message = await asyncio.to_thread(next_message, stream, 2.5)
                assert message["reason"] == "counters"
            finally:
                conn.close()

            # The stream ends by itself once its lifetime is over (EventSource reconnects).
            while (block := await asyncio.to_thread(stream.block, 5.0)) is not None:
                assert time.monotonic() - opened < 4.0 + 2.0, block
            assert time.monotonic() - opened > 3.9
            (feed,) = feeds
            await eventually(lambda: feed.streams == 0)
        finally:
            stream.close()


async def test_a_client_that_leaves_leaves_nothing_behind(
    tmp_path: Path, backend: Backend, feeds: list[LiveFeed], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Five clients open streams and go away without a word (keep-alive is 15 s: only the
    notifier's look at the transports ends their handlers): within about a second no
    stream, no aiohttp task and no notifier is left."""
    async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
        (feed,) = feeds
        before = http_tasks()
        streams = [await asyncio.to_thread(Stream, port) for _ in range(5)]
        for stream in streams:
            assert data(await asyncio.to_thread(stream.block))["reason"] == "hello"
        await eventually(lambda: feed.streams == 5 and feed.notifying)
        assert http_tasks() >= before + 5
        left = time.monotonic()
        for stream in streams:
            stream.close()
        await eventually(
            lambda: feed.streams == 0 and not feed.notifying and http_tasks() == before,
            within=3.0,
            what="every stream handler, aiohttp task and the notifier to end",
        )
        print(f"\nhandlers gone {(time.monotonic() - left) * 1000:.0f} ms after the clients")

        # The feed still works for the next page.
        stream = await asyncio.to_thread(Stream, port)
        try:
            assert data(await asyncio.to_thread(stream.block))["reason"] == "hello"
            await eventually(lambda: feed.streams == 1 and feed.notifying)
        finally:
            stream.close()


async def test_streams_beyond_the_limit_are_refused(
    tmp_path: Path, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(live, "MAX_STREAMS", 2)
    async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
        streams = [await asyncio.to_thread(Stream, port) for _ in range(2)]
        try:
            for stream in streams:
                assert data(await asyncio.to_thread(stream.block))["reason"] == "hello"
            code, headers, _ = await asyncio.to_thread(fetch, port, "/status/events")
            assert code == 503
            assert headers["Retry-After"] == "5"
        finally:
            for stream in streams:
                stream.close()


async def test_shutdown_with_open_streams_is_prompt(
    tmp_path: Path, backend: Backend, feeds: list[LiveFeed]
) -> None:
    """aiohttp waits up to 60 s for a running handler when its server stops; the feed's
    on_shutdown ends the streams first, so the proxy stops at once and clients see the
    end of the stream."""
    streams: list[Stream] = []
    stopping = 0.0
    try:
        async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
            streams = [await asyncio.to_thread(Stream, port) for _ in range(3)]
            for stream in streams:
                assert data(await asyncio.to_thread(stream.block))["reason"] == "hello"
            (feed,) = feeds
            await eventually(lambda: feed.streams == 3)
            stopping = time.monotonic()
        took = time.monotonic() - stopping
        print(f"\nproxy stopped {took * 1000:.0f} ms after stop() with 3 open streams")
        assert took < 2.0
        for stream in streams:
            assert await asyncio.to_thread(stream.block, 2.0) is None
        assert feed.streams == 0
        assert not feed.notifying
    finally:
        for stream in streams:
            stream.close()


async def test_page_links_the_script_and_the_script_is_served(
    tmp_path: Path, backend: Backend
) -> None:
    async with proxy_with_metrics(tmp_path, backend) as (_proxy, port):
        code, _, page = await asyncio.to_thread(fetch, port, "/")
        assert code == 200
        assert "<main id='status'>" in page
        assert "<script src='/status.js'></script>" in page
        code, headers, fragment = await asyncio.to_thread(fetch, port, "/?fragment=1&q=web")
        assert code == 200
        assert fragment.startswith("<p>")
        assert "<h2 id='default/web'>" in fragment
        assert "<main" not in fragment
        assert "<input" not in fragment  # the search box is never swapped
        code, headers, script = await asyncio.to_thread(fetch, port, "/status.js")
        assert code == 200
        assert headers["Content-Type"].startswith("text/javascript")
        assert 'new EventSource("/status/events")' in script
        assert 'searchParams.set("fragment", "1")' in script
        # HEAD of the stream is refused, not held open for the stream's lifetime.
        code, _, _ = await asyncio.to_thread(fetch, port, "/status/events", "HEAD")
        assert code == 405


async def test_event_log_wakes_its_waiters_once_per_burst() -> None:
    """``EventLog.wait_added``: at once when already past ``seen``; else woken by the next
    add; a sync's many adds wake a waiter once (the notifier then publishes once)."""
    events = EventLog(size=5, clock=lambda: 1.0)
    events.add("sync", "one")
    async with asyncio.timeout(1):
        await events.wait_added(0)  # already past
    wakes = 0

    async def waiter() -> None:
        nonlocal wakes
        seen = events.generation
        while seen < 1 + 20:
            await events.wait_added(seen)
            wakes += 1
            seen = events.generation

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # the waiter sleeps on the log now
    assert wakes == 0
    for i in range(20):  # one sync's events, added with no await between
        events.add("endpoints", f"port {i}")
    async with asyncio.timeout(1):
        await task
    assert wakes == 1
    assert events.generation == 21
    assert len(events.events) == 5  # the ring buffer forgets; the generation does not
