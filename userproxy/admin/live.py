"""The status page's live stream: ``/status/events``, server-sent events that tell an open
page (``/status.js``, admin/status.js) when what it shows may have changed, so it fetches
itself again.  docs/status.md, "Live updates", is the format:

    retry: 1000                        in the first message: reconnect 1 s after an end
    id: 6
    data: {"generation": 6, "reason": "hello"}

    id: 7
    data: {"generation": 7, "reason": "events"}

    : keep-alive                       a comment when nothing was sent for KEEPALIVE s

``reason`` is "hello" (the first message of every stream: the page may have changed since
it was rendered), "events" (the timeline changed: a sync changed something, a reload
failed, a listener could not bind, an endpoint was ejected ...; admin/events.py) or
"counters" (connections, bytes, listeners open or endpoints ejected changed, compared once
a TICK).  ``generation`` counts the changes this server has told of.

Invariants:
- one notifier per app (:class:`LiveFeed`): one task, running only while a stream is open,
  sleeps on the EventLog (``EventLog.wait_added``) and once a TICK sums the listeners'
  counters in slices; streams never read the proxier, so N open pages cost N small writes
  per change, not N polls;
- every stream ends: after LIFETIME s (EventSource reconnects by itself), when its client
  is gone (seen by the notifier at its next TICK, or by the next write), when a write
  does not finish within WRITE_TIMEOUT, and at once when the app shuts down
  (``on_shutdown``: else aiohttp would wait up to 60 s for the handler);
- at most MAX_STREAMS streams at a time; more get 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from importlib import resources

from aiohttp import web

from userproxy.admin.status import StatusView
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.slices import Slicer

__all__ = ["LIVE_FEED", "LiveFeed", "add_live_routes"]

log = logging.getLogger(__name__)

#: Seconds between two looks at the counters (and for gone clients).
TICK = 1.0
#: Seconds of silence after which a stream sends a comment (proxies drop idle streams).
KEEPALIVE = 15.0
#: Seconds after which a stream ends; the page's EventSource opens a new one.
LIFETIME = 300.0
#: Seconds a write may wait for a client that does not read.
WRITE_TIMEOUT = 10.0
#: Streams open at a time (each is one connection and one waiting handler).
MAX_STREAMS = 256
#: What the stream asks EventSource to wait before reconnecting (milliseconds).
RETRY_MS = 1000

Counters = tuple[int, ...]


class _Stream:
    """One open ``/status/events`` response and the event that wakes its handler."""

    __slots__ = ("request", "wake")

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.wake = asyncio.Event()

    @property
    def gone(self) -> bool:
        """The client closed the connection (aiohttp drops the transport then)."""
        transport = self.request.transport
        return transport is None or transport.is_closing()


class LiveFeed:
    """The one notifier of a metrics app and the handler of its streams.

    ``generation`` grows by one per change told; each stream sends one message per wake-up
    with the latest generation, so changes that come faster than a client reads are
    merged, never queued."""

    def __init__(
        self,
        view: StatusView,
        *,
        tick: float | None = None,
        keepalive: float | None = None,
        lifetime: float | None = None,
    ) -> None:
        self.view = view
        # The module's values are read now, not at import: tests shorten them.
        self.tick = TICK if tick is None else tick
        self.keepalive = KEEPALIVE if keepalive is None else keepalive
        self.lifetime = LIFETIME if lifetime is None else lifetime
        self.generation = 0
        self.reason = "hello"
        self._streams: set[_Stream] = set()
        #: The notifier, and every notifier task not yet ended (owned: close() waits).
        self._task: asyncio.Task[None] | None = None
        self._notifiers: set[asyncio.Task[None]] = set()
        self._closed = False
        self._counters: Counters | None = None

    @property
    def streams(self) -> int:
        """Streams open now."""
        return len(self._streams)

    @property
    def notifying(self) -> bool:
        """Whether a notifier task exists: from the first stream's start to just after the
        last one's end."""
        return bool(self._notifiers)

    def publish(self, reason: str) -> None:
        """Tell every open stream that something changed."""
        self.generation += 1
        self.reason = reason
        for stream in self._streams:
            stream.wake.set()

    async def close(self, _app: web.Application | None = None) -> None:
        """End every stream now and stop the notifier (the app's ``on_shutdown``)."""
        self._closed = True
        for stream in self._streams:
            stream.wake.set()
        if self._notifiers:
            for task in self._notifiers:
                task.cancel()
            # wait(), not await: the notifier's CancelledError is not ours to raise.
            await asyncio.wait(list(self._notifiers))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /status/events``: the stream, until one of the ends in the module docstring."""
        if self._closed or len(self._streams) >= MAX_STREAMS:
            raise web.HTTPServiceUnavailable(
                text="too many status streams\n", headers={"Retry-After": "5"}
            )
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # nginx in front: pass each message on at once
            }
        )
        await response.prepare(request)
        stream = _Stream(request)
        self._join(stream)
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.lifetime
        try:
            seen = self.generation
            await _send(response, f"retry: {RETRY_MS}\n" + _message(seen, "hello"))
            while not self._closed and not stream.gone and loop.time() < ends:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(self.keepalive, ends - loop.time())):
                        await stream.wake.wait()
                woken = stream.wake.is_set()
                stream.wake.clear()
                if self._closed or stream.gone or loop.time() >= ends:
                    break
                if self.generation != seen:
                    seen = self.generation
                    await _send(response, _message(seen, self.reason))
                elif not woken:
                    await _send(response, ": keep-alive\n\n")
        except (ConnectionResetError, TimeoutError):
            # The client went away mid-write, or stopped reading: the stream just ends.
            log.debug("status stream to %s ended early", request.remote)
        finally:
            self._streams.discard(stream)
            if not self._streams and self._task is not None:
                self._task.cancel()  # the last stream left: the notifier has no one to tell
        return response

    def _join(self, stream: _Stream) -> None:
        self._streams.add(stream)
        task = self._task
        # A notifier cancelled by the last stream's end may not have ended yet: a new one.
        if task is None or task.done() or task.cancelling():
            self._task = asyncio.get_running_loop().create_task(
                self._notify(), name="status-live-notifier"
            )
            self._notifiers.add(self._task)
            self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        self._notifiers.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("status notifier failed", exc_info=task.exception())

    async def _notify(self) -> None:
        """The notifier: publishes each time the timeline grows and, once a TICK, when the
        counters moved; wakes the streams whose client left.  Cancelled when the last
        stream leaves (``handle``); a stream that joins later starts a new one."""
        loop = asyncio.get_running_loop()
        events = self.view.events
        seen = events.generation
        next_tick = loop.time()
        while self._streams and not self._closed:
            try:
                async with asyncio.timeout_at(next_tick):
                    await events.wait_added(seen)
            except TimeoutError:
                next_tick = loop.time() + self.tick
                for stream in self._streams:
                    if stream.gone:
                        stream.wake.set()
                counters = await self._read_counters()
                if counters != self._counters:
                    # The first reading has nothing to differ from: "hello" covered it.
                    if self._counters is not None:
                        self.publish("counters")
                    self._counters = counters
            else:
                seen = events.generation
                self.publish("events")

    async def _read_counters(self) -> Counters:
        """What the page shows that changes without a sync, summed over every listener:
        accepted, open now, dial failures, bytes each way, listening, endpoints ejected.
        In slices, as a node may have 10 000 listeners and more connections."""
        listeners = self.view.listeners
        accepted = active = failures = up = down = listening = 0
        slicer = Slicer(every=64)
        for listener in list(listeners.listeners.values()):
            stats = listener.stats
            failures += stats.dial_failures
            up += stats.bytes_up
            down += stats.bytes_down
            listening += listener.listening
            if isinstance(listener, TcpListener):
                accepted += stats.accepted
                active += len(listener.connections)
                for conn in list(listener.connections):
                    up += conn.bytes_up
                    down += conn.bytes_down
            else:
                accepted += stats.sessions_created
                active += len(listener.sessions)
            await slicer.tick()
        ejected = sum(len(now) for _, now in listeners.ejections().values())
        return (accepted, active, failures, up, down, listening, ejected)


def _message(generation: int, reason: str) -> str:
    data = json.dumps({"generation": generation, "reason": reason})
    return f"id: {generation}\ndata: {data}\n\n"


async def _send(response: web.StreamResponse, text: str) -> None:
    async with asyncio.timeout(WRITE_TIMEOUT):
        await response.write(text.encode())


#: The app's feed (tests look at its streams).
LIVE_FEED = web.AppKey("live_feed", LiveFeed)


def add_live_routes(app: web.Application, view: StatusView) -> LiveFeed:
    """``/status/events`` and ``/status.js`` on ``app``; the feed ends with the app."""
    feed = LiveFeed(view)
    script = resources.files("userproxy.admin").joinpath("status.js").read_text()

    async def serve_script(_: web.Request) -> web.Response:
        return web.Response(
            text=script, content_type="text/javascript", headers={"Cache-Control": "no-cache"}
        )

    app[LIVE_FEED] = feed
    app.router.add_get("/status/events", feed.handle, allow_head=False)  # HEAD: 405
    app.router.add_get("/status.js", serve_script)
    app.on_shutdown.append(feed.close)
    return feed
