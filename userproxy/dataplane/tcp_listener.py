"""A TCP listener for one (ServicePort, address): its own accept loop and the dialer.

The accept loop is a reader callback on a non-blocking listening socket, not
``loop.create_server``, to control three things the same way on both loops:

* no usable endpoints -> the socket is closed, so new clients get ECONNREFUSED at once
  (never accept-then-close, never a hang); it is opened again when endpoints return;
* ``--max-connections``, or this Service's share of it, reached -> accepting pauses
  (clients wait in the backlog); a client IP over its share is reset (``ConnectionLimit``);
* EMFILE/ENFILE in ``accept()`` -> accepting backs off, logged at most once a second,
  instead of libuv's accept-and-drop trick or a per-attempt traceback.

Each accepted socket gets one short-lived task that wraps it and dials, ending once the
upstream is up (the relay needs no task), so dialing never blocks accepting.

Where the compiled relay is built and selected (fast_relay.py), accepting, dialing and
relaying go through it instead, with the same counters, limits, logs and ends; this
module's accept loop, ``_serve`` and tcp_relay.py stay the reference it is tested against.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane import access_log as ends
from userproxy.dataplane import fast_relay
from userproxy.dataplane.access_log import AccessLog, ConnTrace
from userproxy.dataplane.classify import NodeLocal
from userproxy.dataplane.dial import Dialer, dial
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener import RESOURCE_ERRNOS, Listener
from userproxy.dataplane.outliers import NO_EJECTION, ObservedUpstream, OutlierDetector
from userproxy.dataplane.pool import BackendPool
from userproxy.dataplane.proxy_protocol import header_for
from userproxy.dataplane.tcp_relay import (
    DownstreamProtocol,
    Relayed,
    UpstreamProtocol,
    set_linger_zero,
)
from userproxy.logs import RateLimitedLog
from userproxy.model import Endpoint, ListenerSpec, ServiceKey

log = logging.getLogger(__name__)

#: kube-proxy userspace's dial ladder: each attempt goes to the balancer's next endpoint.
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
#: Connections accepted per readiness event before yielding to the loop.
ACCEPT_BATCH = 64
BACKLOG = 4096
_accept_error_log = RateLimitedLog(log)
_dial_error_log = RateLimitedLog(log)


def _reset(sock: socket.socket) -> None:
    set_linger_zero(sock)
    sock.close()


class TcpListener(Listener):
    """Serves one TCP ListenerSpec with its own accept loop.

    Invariants (beyond ``Listener``'s): a client whose class has no endpoint, or outside
    the source ranges, or holding its share of the connection limit, is reset at once; the
    reader is registered exactly while the socket is open and accepting is neither paused
    by the connection limit (in all, or this Service's share) nor backing off after a
    resource error; every connection in ``connections`` is counted once in ``limit`` under
    this listener's Service and its client's IP.
    """

    SOCK_TYPE = socket.SOCK_STREAM

    def __init__(
        self,
        spec: ListenerSpec,
        registry: BalancerRegistry,
        limit: ConnectionLimit,
        node_local: NodeLocal,
        dialer: Dialer | None = None,
    ) -> None:
        super().__init__(spec, registry, node_local)
        self.limit = limit
        #: How endpoints are reached when not by their address (None: ``dial``).
        self.dialer = dialer
        #: The Service the connection limit counts this listener's connections under: all
        #: its ports and addresses share one budget.
        self.service = ServiceKey(spec.spn.namespace, spec.spn.name)
        self.connections: set[Relayed] = set()
        self._backoff: asyncio.TimerHandle | None = None
        self._backoff_delay = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        #: The outlier detector of this listener's Service port, shared with its other
        #: listeners (the listener set assigns it; this one ejects nothing).
        self.outliers: OutlierDetector = NO_EJECTION
        #: The access log (``--access-log``), None while it is off (the listener set sets it).
        self.access_log: AccessLog | None = None
        self._last_source_refusals = 0
        #: The compiled relay's accept and dial, None on the pure-Python path (also taken
        #: with a dialer of its own: the engine dials addresses only).
        self._fast = fast_relay.FastPath(self) if fast_relay.selected and dialer is None else None
        if self._fast is None:
            fast_relay.announce_python_relay(
                None if dialer is None else "endpoints are reached through a dialer of its own"
            )
        limit.register(self, self._pause, self._resume, self.service)
        self._open_or_close()

    def close(self) -> None:
        self.limit.unregister(self)
        super().close()
        # The fast path refers to this listener (its connections report their end to
        # it, and it counts them here): without this, the two would be a cycle that only
        # the cyclic collector frees, and never once a bulk sync froze them
        # (userproxy/slices.py).  Nothing accepts through it after close.
        self._fast = None

    def _prepare(self, sock: socket.socket) -> None:
        # Accepted sockets inherit TCP_NODELAY: the compiled relay sets it nowhere else
        # (the Python relay's transports set it again).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(BACKLOG)

    def _can_read(self) -> bool:
        return self._backoff is None and not self.limit.blocked(self.service)

    def _close_socket(self) -> None:
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        super()._close_socket()

    # -- accepting -------------------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        if self._fast is not None:
            self._fast.on_readable(sock.fileno(), ACCEPT_BATCH)
            return
        limit = self.limit
        service = self.service
        for _ in range(ACCEPT_BATCH):
            if limit.blocked(service):
                self._pause()
                return
            try:
                client, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    self._back_off(exc)
                    return
                # ECONNABORTED, EPROTO and friends concern one client only.
                log.debug("%s: accept failed: %s", self.spec.spn, exc)
                continue
            self._backoff_delay = 0.0
            self.stats.accepted += 1
            client_ip = address[0]
            pool = self._pool_for(client_ip)
            if pool is None:
                _reset(client)
                if self.access_log is not None:
                    self._log_refused(address, self._refusal())
                continue
            if not limit.acquire(service, client_ip):
                # This client holds its share (logged by the limit, at most every 5 s).
                self.stats.refused_client_limit += 1
                _reset(client)
                if self.access_log is not None:
                    self._log_refused(address, ends.CONNECTION_LIMIT_REFUSED)
                continue
            conn = DownstreamProtocol(self, client_ip, self.loop)
            if self.access_log is not None:
                conn.trace = ConnTrace(address[1], self.loop.time())
            version = self.spec.proxy_protocol
            if version is not None:  # the Service asked for the client's address upstream
                conn.preamble = header_for(version, client, address)
            task = self.loop.create_task(self._serve(conn, client, pool))
            # Kept, not looked up with current_task() later: every get_running_loop() costs
            # a getpid() system call, and this runs once per connection.
            conn.dial_task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _back_off(self, exc: OSError) -> None:
        self._pause()
        self._backoff_delay = min(1.0, max(0.05, self._backoff_delay * 2))
        _accept_error_log.log(
            logging.ERROR,
            "%s: accept() failed: %s; backing off %.2fs",
            self.spec.spn,
            exc.strerror or exc,
            self._backoff_delay,
        )
        self._backoff = self.loop.call_later(self._backoff_delay, self._end_backoff)

    def _end_backoff(self) -> None:
        self._backoff = None
        self._resume()

    # -- one connection --------------------------------------------------------------------
    async def _serve(
        self, conn: DownstreamProtocol, client: socket.socket, pool: BackendPool
    ) -> None:
        self.connections.add(conn)
        try:
            # Both loops set TCP_NODELAY on the transports they make.
            await self.loop.connect_accepted_socket(lambda: conn, client)
        except (OSError, asyncio.CancelledError) as exc:
            client.close()
            self.connection_finished(conn)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("%s: cannot wrap accepted socket: %s", self.spec.spn, exc)
            return
        if conn.finished:  # the client went away before connection_made returned
            return
        conn.dialing = True
        try:
            await self._dial(conn, pool)
        finally:
            conn.dialing = False

    async def _dial(self, conn: DownstreamProtocol, pool: BackendPool) -> None:
        tried: list[Endpoint] = []
        outliers = self.outliers
        load = self._registry.context.load
        for attempt, timeout in enumerate(DIAL_TIMEOUTS):
            # Ejected endpoints are avoided like tried ones: the balancer falls back to
            # them only when every endpoint is excluded.
            endpoint = pool.balancer.pick(conn.client_ip, outliers.excluding(tried))
            if endpoint is None:
                break
            if attempt:
                self.stats.dial_retries += 1
            tried.append(endpoint)
            if conn.trace is not None:
                conn.trace.attempts = attempt + 1
            # Counted from the pick, not from the join: a burst of connections accepted
            # together sees the ones still dialing and spreads at once (least-connections).
            load.start(endpoint)
            try:
                if self.dialer is None:
                    sock = await dial(self.loop, endpoint.ip, endpoint.port, timeout)
                else:
                    sock = await self.dialer(self.loop, self.spec, endpoint, timeout)
            except BaseException as exc:
                if not isinstance(exc, (OSError, TimeoutError)):
                    load.end(endpoint)
                    raise  # cancelled: the client left
                self._dial_failed(conn.client_ip, pool, endpoint, attempt, exc)
                if conn.finished:
                    return
                continue
            await self._join(conn, sock, endpoint)
            return
        # No endpoint could be reached: reset the client rather than leave it hanging.
        self.stats.dial_exhausted += 1
        conn.abort(ends.NO_ENDPOINT_REACHABLE)

    def _dial_failed(
        self, client_ip: str, pool: BackendPool, endpoint: Endpoint, attempt: int, exc: OSError
    ) -> None:
        """Count and log a failed dial of ``endpoint`` (both relays' ladders)."""
        self._registry.context.load.failed(endpoint)  # ends its count and counts the failure
        self.stats.dial_failures += 1
        self.outliers.failure(endpoint)
        # Forget the client's pin so the next attempt (and the next connection) goes
        # elsewhere: kube-proxy's fix for clients stuck on a dead pod.
        pool.balancer.failed(client_ip, endpoint)
        _dial_error_log.log(
            logging.WARNING,
            "%s: dial %s failed (attempt %d, timeout %.2fs): %s",
            self.spec.spn,
            endpoint,
            attempt + 1,
            DIAL_TIMEOUTS[attempt],
            "timed out" if isinstance(exc, TimeoutError) else exc,
        )

    async def _join(
        self, conn: DownstreamProtocol, sock: socket.socket, endpoint: Endpoint
    ) -> None:
        """Wrap the connected ``sock`` as ``conn``'s one upstream transport; ``endpoint``
        is counted in the load already and stays counted while the connection lasts.

        No deadline here: this await only waits for ``connection_made``, and cancelling it
        after that would close a transport the relay already holds (see dial.py).  It is
        cancelled only when the client has gone, and then the relay drops the upstream.
        """
        outliers = self.outliers
        # With ejection on, the upstream reports how it ended (a reset before any byte
        # is a failed dial, anything else the success that resets the failure count).
        upstream: Callable[[], UpstreamProtocol] = (
            (lambda: ObservedUpstream(conn, outliers, endpoint))
            if outliers.settings.enabled
            else (lambda: UpstreamProtocol(conn))
        )
        load = self._registry.context.load
        try:
            await self.loop.create_connection(upstream, sock=sock)
        except OSError as exc:
            # The endpoint accepted and then failed at once: pass it on as a reset.
            sock.close()
            load.end(endpoint)
            outliers.failure(endpoint)
            log.debug("%s: cannot wrap upstream socket: %s", self.spec.spn, exc)
            conn.abort(ends.ENDPOINT_RESET)
            return
        except asyncio.CancelledError:
            sock.close()
            load.end(endpoint)
            conn.drop_upstream()
            raise
        if not isinstance(self.loop, asyncio.BaseEventLoop):
            # uvloop owns the descriptor now, but attaches ``sock`` to the transport only
            # after connection_made: when the endpoint reset at once, the transport closed
            # (and libuv closed the fd) before that, nothing detaches ``sock``, and its
            # finaliser closed the same fd number again, by then maybe another
            # connection's.  Detached, ``sock`` can never close it (uvloop's own detach
            # at close is then a no-op).  asyncio's transport uses ``sock`` itself.
            sock.detach()
        if conn in self.connections:  # not finished meanwhile: it counts until it ends
            conn.endpoint = endpoint
            if conn.trace is not None:
                conn.trace.connected = self.loop.time()
        else:
            load.end(endpoint)

    def connection_finished(self, conn: Relayed) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.bytes_up += conn.bytes_up
            self.stats.bytes_down += conn.bytes_down
            self.limit.release(self.service, conn.client_ip)
            if conn.endpoint is not None:  # ends its count, adds to its totals
                self._registry.context.load.finished(conn.endpoint, conn.bytes_up, conn.bytes_down)
            if self.access_log is not None:
                self._log_finished(conn)

    def abort_all(self, end: str = ends.DRAINED) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.abort(end)

    # -- the access log (only called while it is on) -------------------------------------------
    def _refusal(self) -> str:
        """Why ``_pool_for`` just turned a client away (it checks source ranges first)."""
        stats = self.stats
        if stats.refused_source_range != self._last_source_refusals:
            self._last_source_refusals = stats.refused_source_range
            return ends.SOURCE_RANGE_REFUSED
        return ends.NO_ENDPOINTS_FOR_CLASS

    def _log_refused(self, address: tuple[str, int], end: str) -> None:
        assert self.access_log is not None
        spec = self.spec
        self.access_log.record(
            (time.time(), "tcp", address[0], address[1], spec.ip, spec.port, spec.spn,
             None, 0, -1.0, 0.0, 0, 0, end)
        )  # fmt: skip

    def _log_finished(self, conn: Relayed) -> None:
        assert self.access_log is not None
        trace = conn.trace
        if trace is None:  # accepted before the log was switched on
            return
        spec = self.spec
        now = self.loop.time()
        connected = trace.connected
        self.access_log.record(
            (time.time(), "tcp", conn.client_ip, trace.client_port, spec.ip, spec.port,
             spec.spn, conn.endpoint, trace.attempts,
             -1.0 if connected is None else connected - trace.started, now - trace.started,
             conn.bytes_up, conn.bytes_down, conn.end or ends.CLIENT_CLOSED)
        )  # fmt: skip
