"""The TCP relay: two asyncio Protocols joined back to back, no task and no stream.

``DownstreamProtocol`` is the client's side, ``UpstreamProtocol`` the endpoint's side.  Bytes
read on one side are written to the other; flow control is symmetric: when one side's
transport write buffer passes its high-water mark (``pause_writing``), the *other* side
stops reading until it drains (``resume_writing``).  Memory per connection is thus bounded
by the two write-buffer limits plus one read chunk, and by ``PRECONNECT_LIMIT`` before the
upstream connection exists.

Half-close: an EOF from one side is forwarded to the other as a FIN (see
``_shutdown_write``), and the connection is closed once both directions have finished or
``fin_timeout`` passes.  See docs/architecture.md ("Half-close and uvloop") for why the
sequence is exactly as it is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from userproxy.model import Endpoint

log = logging.getLogger(__name__)

#: Bytes a client may send before its upstream connection is up; beyond this the
#: downstream transport stops reading (the first read chunk may overshoot it: uvloop
#: delivers data that arrived before ``pause_reading`` took effect).
PRECONNECT_LIMIT = 256 * 1024
#: Write-buffer limits of both transports (asyncio's default high water is 64 KiB; a
#: larger buffer keeps throughput up on fast paths while staying bounded).
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024


class ConnectionOwner(Protocol):
    """What a relay reports back to its listener."""

    def connection_finished(self, conn: DownstreamProtocol) -> None: ...


def _shutdown_write(transport: asyncio.Transport) -> None:
    """Send a FIN on ``transport`` once its buffered bytes are written."""
    if not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()


class UpstreamProtocol(asyncio.Protocol):
    """The endpoint side of one relayed connection; forwards everything to ``conn``."""

    __slots__ = ("conn",)

    def __init__(self, conn: DownstreamProtocol) -> None:
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. The
        # transport lives in ``conn.upstream``: one place for the relay's state.
        self.conn.upstream_made(cast("asyncio.Transport", transport))

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        conn.active = True
        conn.bytes_down += len(data)
        downstream = conn.downstream
        if downstream is not None:
            downstream.write(data)

    def eof_received(self) -> bool:
        return self.conn.upstream_eof()

    def pause_writing(self) -> None:
        # The endpoint cannot keep up: stop reading from the client.
        downstream = self.conn.downstream
        if downstream is not None and not downstream.is_closing():
            downstream.pause_reading()

    def resume_writing(self) -> None:
        downstream = self.conn.downstream
        if downstream is not None and not downstream.is_closing():
            downstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.upstream_lost(exc)


class DownstreamProtocol(asyncio.Protocol):
    """The client side of one relayed connection, and the owner of the relay's state.

    Invariants: ``pending`` is not None exactly while no upstream transport exists;
    ``finished`` becomes True once, when the client transport is gone, and the owner is
    told exactly once.
    """

    __slots__ = (
        "active",
        "bytes_down",
        "bytes_up",
        "client_eof",
        "client_ip",
        "deadline",
        "dial_task",
        "dialing",
        "downstream",
        "endpoint",
        "finished",
        "half_closed_at",
        "idle_since",
        "loop",
        "owner",
        "pending",
        "preconnect_paused",
        "server_eof",
        "upstream",
    )

    def __init__(
        self, owner: ConnectionOwner, client_ip: str, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.owner = owner
        self.client_ip = client_ip
        self.loop = loop
        self.downstream: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.endpoint: Endpoint | None = None
        self.pending: bytearray | None = bytearray()
        self.preconnect_paused = False
        self.client_eof = False
        self.server_eof = False
        self.finished = False
        #: The task wrapping the socket and dialing; cancelled if the client goes away
        #: while ``dialing``.
        self.dial_task: asyncio.Task[None] | None = None
        self.dialing = False
        # Timeout bookkeeping, read by the listener set's sweeper (no timer per connection).
        self.active = True
        self.idle_since = 0.0
        self.half_closed_at: float | None = None
        self.deadline: float | None = None
        self.bytes_up = 0
        self.bytes_down = 0

    # -- client transport events ------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast("asyncio.Transport", transport)
        stream.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.downstream = stream

    def data_received(self, data: bytes) -> None:
        self.active = True
        self.bytes_up += len(data)
        upstream = self.upstream
        if upstream is not None:
            upstream.write(data)
            return
        pending = self.pending
        if pending is None:  # upstream already lost; nothing will read this
            return
        pending += data
        if len(pending) >= PRECONNECT_LIMIT and not self.preconnect_paused:
            self.preconnect_paused = True
            assert self.downstream is not None
            self.downstream.pause_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        self._half_closed()
        if self.upstream is not None:
            _shutdown_write(self.upstream)
            self._maybe_close()
        # Keep the client transport open: the response still has to come back.
        return True

    def pause_writing(self) -> None:
        # The client cannot keep up: stop reading from the endpoint.
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            upstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finished = True
        self.pending = None
        if self.dialing and self.dial_task is not None:
            self.dial_task.cancel()
        self.dial_task = None
        upstream = self.upstream
        if upstream is not None and not upstream.is_closing():
            if exc is not None:
                upstream.abort()
            else:
                upstream.close()
        self.owner.connection_finished(self)

    # -- upstream events (called by UpstreamProtocol and the dialer) ------------------------
    def upstream_made(self, transport: asyncio.Transport) -> None:
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.upstream = transport
        downstream = self.downstream
        if self.finished or downstream is None:
            transport.abort()
            return
        pending, self.pending = self.pending, None
        if self.preconnect_paused:
            self.preconnect_paused = False
            downstream.resume_reading()
        if pending:
            transport.write(pending)
        if self.client_eof:
            _shutdown_write(transport)

    def upstream_eof(self) -> bool:
        self.server_eof = True
        self._half_closed()
        downstream = self.downstream
        if downstream is not None:
            _shutdown_write(downstream)
        self._maybe_close()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        downstream = self.downstream
        if downstream is None or downstream.is_closing():
            return
        if exc is not None:
            downstream.abort()
        else:
            downstream.close()

    # -- closing ------------------------------------------------------------------------------
    def _half_closed(self) -> None:
        if self.half_closed_at is None:
            self.half_closed_at = self.loop.time()

    def _maybe_close(self) -> None:
        """Both directions have ended: close both transports (each flushes its buffer)."""
        if not (self.client_eof and self.server_eof):
            return
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()
        if self.downstream is not None and not self.downstream.is_closing():
            self.downstream.close()

    def abort(self) -> None:
        """Reset both sides at once (dial failure, timeouts, end of the grace period)."""
        self.pending = None
        if self.upstream is not None:
            self.upstream.abort()
        if self.downstream is not None:
            self.downstream.abort()
