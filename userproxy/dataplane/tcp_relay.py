"""The TCP relay: two asyncio Protocols joined back to back, no task and no stream.

``DownstreamProtocol`` is the client's side, ``UpstreamProtocol`` the endpoint's side.  Bytes
read on one side are written to the other; flow control is symmetric: when one side's
transport write buffer passes its high-water mark (``pause_writing``), the *other* side
stops reading until it drains (``resume_writing``).  Memory per connection is thus bounded
by the two write-buffer limits plus one read chunk, and by ``PRECONNECT_LIMIT`` before the
upstream connection exists.

Half-close: an EOF from one side is forwarded to the other as a FIN, and the connection is
closed once both directions have finished or ``fin_timeout`` passes (docs/architecture.md,
"Half-close and uvloop", says why exactly so).  Resets pass through: a side that ends with
an error (a peer's RST, a failed write) is answered with a RST on the other side
(``reset``); a clean end stays a clean end.

Invariants: a client is joined to at most one upstream transport in its life
(``upstream_made`` refuses and resets any other); once a transport is lost, the relay holds
no reference to it, so nothing writes into a closed handle; neither side outlives the other;
a ``preamble`` (the PROXY protocol header) is the first thing written to the upstream, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import TYPE_CHECKING, Protocol, TypeAlias, cast

from userproxy.dataplane import access_log as ends
from userproxy.model import Endpoint

if TYPE_CHECKING:
    from userproxy.dataplane._relay import Connection as CompiledConnection
    from userproxy.dataplane.access_log import ConnTrace

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

    def connection_finished(self, conn: Relayed) -> None: ...


_LINGER_ZERO = struct.pack("ii", 1, 0)


def set_linger_zero(sock: socket.socket) -> None:
    """Make the next close of ``sock`` send a RST instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)


def reset(transport: asyncio.Transport) -> None:
    """End ``transport`` with a RST, dropping what its buffer still holds (a plain
    ``abort()`` sends a FIN, which would make a truncated stream look complete)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # asyncio's TransportSocket and uvloop's PseudoSocket both pass setsockopt on to
        # the descriptor; a transport already gone has none left to set.
        set_linger_zero(sock)
    transport.abort()


def _shutdown_write(transport: asyncio.Transport) -> None:
    """Send a FIN on ``transport`` once its buffered bytes are written."""
    if not transport.is_closing() and transport.can_write_eof():
        transport.write_eof()


class UpstreamProtocol(asyncio.Protocol):
    """The endpoint side of one relayed connection; forwards everything to ``conn``."""

    __slots__ = ("conn",)

    def __init__(self, conn: DownstreamProtocol) -> None:
        #: None once this side is lost, or if the client refused it as a second upstream.
        self.conn: DownstreamProtocol | None = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it. The
        # transport lives in ``conn.upstream``: one place for the relay's state.
        conn = self.conn
        if conn is not None and not conn.upstream_made(cast("asyncio.Transport", transport)):
            self.conn = None

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        conn.active = True
        conn.bytes_down += len(data)
        downstream = conn.downstream
        if downstream is not None:
            downstream.write(data)

    def eof_received(self) -> bool:
        conn = self.conn
        return conn.upstream_eof() if conn is not None else False

    def pause_writing(self) -> None:
        # The endpoint cannot keep up: stop reading from the client.
        downstream = self.conn.downstream if self.conn is not None else None
        if downstream is not None and not downstream.is_closing():
            downstream.pause_reading()

    def resume_writing(self) -> None:
        downstream = self.conn.downstream if self.conn is not None else None
        if downstream is not None and not downstream.is_closing():
            downstream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.upstream_lost(exc)


class DownstreamProtocol(asyncio.Protocol):
    """The client side of one relayed connection, and the owner of the relay's state.

    Invariants: ``pending`` is not None exactly until an upstream transport is joined or
    the client is gone, so it is the "may still join an upstream" flag; ``upstream`` and
    ``downstream`` are None once their transport is lost; ``finished`` becomes True once,
    when the client transport is gone, and the owner is told exactly once.
    """

    __slots__ = (
        "active",
        "bytes_down",
        "bytes_up",
        "client_eof",
        "client_ip",
        "dial_task",
        "dialing",
        "downstream",
        "end",
        "endpoint",
        "finished",
        "half_closed_at",
        "idle_since",
        "loop",
        "owner",
        "pending",
        "preamble",
        "preconnect_paused",
        "server_eof",
        "trace",
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
        self.pending: bytearray | None = bytearray()
        #: Bytes the upstream gets before anything relayed (a PROXY protocol header, see
        #: proxy_protocol.py), written once in ``upstream_made``; empty for most Services.
        self.preamble = b""
        self.preconnect_paused = False
        self.client_eof = False
        self.server_eof = False
        self.finished = False
        #: The task wrapping the socket and dialing (cancelled if the client leaves while dialing).
        self.dial_task: asyncio.Task[None] | None = None
        self.dialing = False
        #: The endpoint of the joined upstream, counted in the balancers' load while set.
        self.endpoint: Endpoint | None = None
        # Timeout bookkeeping, read by the listener set's sweeper (no timer per connection).
        self.active = True
        self.idle_since = 0.0
        self.half_closed_at: float | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        #: How the connection ended (access_log's end names), set once, by the first
        #: event that decided it; read only by the access log.
        self.end: str | None = None
        #: The access log's timings, None while the log is off.
        self.trace: ConnTrace | None = None

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
        if self.server_eof and self.end is None:
            self.end = ends.ENDPOINT_CLOSED  # the endpoint's FIN came first
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
        if self.end is None:
            self.end = ends.CLIENT_RESET if exc is not None else ends.CLIENT_CLOSED
        self.finished = True
        self.pending = None
        self.downstream = None
        if self.dialing and self.dial_task is not None:
            self.dial_task.cancel()
        self.dial_task = None
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            if exc is not None:
                reset(upstream)
            elif not upstream.is_closing():
                upstream.close()
        self.owner.connection_finished(self)

    # -- upstream events (called by UpstreamProtocol and the dialer) ------------------------
    def upstream_made(self, transport: asyncio.Transport) -> bool:
        """Join ``transport`` as the upstream; False (and the transport reset) if the client
        is gone or already had one."""
        pending, downstream = self.pending, self.downstream
        if pending is None or downstream is None:
            reset(transport)
            return False
        transport.set_write_buffer_limits(WRITE_HIGH, WRITE_LOW)
        self.upstream = transport
        self.pending = None
        if self.preconnect_paused:
            self.preconnect_paused = False
            downstream.resume_reading()
        preamble = self.preamble
        if preamble:
            # Written here, in the upstream's connection_made, so it is the endpoint's first
            # byte from us even for server-first protocols; with what the client already
            # sent, in one write (one segment: some receivers want the header whole).
            self.preamble = b""
            transport.write(preamble + pending if pending else preamble)
        elif pending:
            transport.write(pending)
        if self.client_eof:
            _shutdown_write(transport)
        return True

    def drop_upstream(self) -> None:
        """The upstream transport's wrapping was cancelled: forget it, with a reset (uvloop
        closes such a transport without calling ``connection_lost``)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            reset(upstream)

    def upstream_eof(self) -> bool:
        self.server_eof = True
        if self.client_eof and self.end is None:
            self.end = ends.CLIENT_CLOSED  # the client's FIN came first
        self._half_closed()
        downstream = self.downstream
        if downstream is not None:
            _shutdown_write(downstream)
        self._maybe_close()
        return True

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.end is None and self.downstream is not None:
            self.end = ends.ENDPOINT_RESET if exc is not None else ends.ENDPOINT_CLOSED
        self.upstream = None
        downstream = self.downstream
        if downstream is None:
            return
        if exc is not None:
            reset(downstream)
        elif not downstream.is_closing():
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

    def abort(self, end: str | None = None) -> None:
        """Reset both sides at once (dial failure, timeouts, end of the grace period);
        ``end`` says why, for the access log, unless an earlier event already did."""
        if self.end is None:
            self.end = end
        self.pending = None
        if self.upstream is not None:
            reset(self.upstream)
        if self.downstream is not None:
            reset(self.downstream)


if TYPE_CHECKING:
    #: A relayed connection of either relay: this module's, or the compiled fast path's
    #: (fast_relay.py), which has the attributes the listeners and the sweeper read.
    Relayed: TypeAlias = DownstreamProtocol | CompiledConnection
else:
    Relayed = DownstreamProtocol  # only ever used in annotations
