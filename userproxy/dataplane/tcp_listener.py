"""A TCP listener for one (ServicePort, address): its own accept loop and the dialer.

The accept loop is a reader callback on a non-blocking listening socket rather than
``loop.create_server``, because the proxy must control three things the stock servers do
not expose the same way on both loops:

* no usable endpoints -> the socket is closed, so new clients get ECONNREFUSED at once
  (never accept-then-close, never a hang); it is opened again when endpoints return;
* ``--max-connections`` reached -> accepting pauses (clients wait in the backlog);
* EMFILE/ENFILE in ``accept()`` -> accepting backs off and retries, logged at most once a
  second, instead of libuv's accept-and-drop trick or a per-attempt traceback.

Each accepted socket gets one short-lived task that wraps it in a transport and dials the
endpoint; the task ends as soon as the upstream connection is up (the relay itself needs
no task).  Dialing therefore never blocks accepting.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane.classify import in_networks, parse_networks
from userproxy.dataplane.limits import ConnectionLimit, RateLimitedLog
from userproxy.dataplane.pool import BackendPool
from userproxy.dataplane.tcp_relay import DownstreamProtocol, UpstreamProtocol
from userproxy.model import Endpoint, ListenerSpec

log = logging.getLogger(__name__)

#: kube-proxy userspace's dial ladder: each attempt goes to the balancer's next endpoint.
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
#: Connections accepted per readiness event before yielding to the loop.
ACCEPT_BATCH = 64
BACKLOG = 4096
# Linux socket options Python does not name (linux/in.h, linux/in6.h).
IP_FREEBIND = 15
IPV6_FREEBIND = 78
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_accept_error_log = RateLimitedLog()
_dial_error_log = RateLimitedLog()


@dataclass(slots=True)
class ListenerStats:
    accepted: int = 0
    dial_failures: int = 0
    dial_retries: int = 0
    dial_exhausted: int = 0
    refused_source_range: int = 0
    refused_no_endpoints: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _reset(sock: socket.socket) -> None:
    """Close an accepted socket with an RST (SO_LINGER 0), never a clean FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class TcpListener:
    """Serves one ListenerSpec; ``update`` swaps its pools, ``close`` stops accepting.

    Invariants: the listening socket is open exactly while the listener is not closed and
    some traffic class has endpoints (and binding succeeded); a client whose class has no
    endpoint, or outside the source ranges, is reset at once; the reader is registered exactly while
    the socket is open and accepting is neither paused by the connection limit nor backing
    off after a resource error.
    """

    def __init__(
        self,
        spec: ListenerSpec,
        registry: BalancerRegistry,
        limit: ConnectionLimit,
        node_local: Callable[[str], bool] = lambda _: False,
    ) -> None:
        self.spec = spec
        self._registry = registry
        self.pool = BackendPool(spec.pool, registry)
        self.node_pool = None if spec.node_pool is None else BackendPool(spec.node_pool, registry)
        self._node_local = node_local
        self._source_ranges = parse_networks(spec.source_ranges)
        self.limit = limit
        self.stats = ListenerStats()
        self.connections: set[DownstreamProtocol] = set()
        self.bind_error: OSError | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._reading = False
        self._backoff: asyncio.TimerHandle | None = None
        self._backoff_delay = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        limit.register(self, self._pause, self._resume)
        self._apply()

    def __repr__(self) -> str:
        return f"<TcpListener {self.spec.spn} {self.spec.ip}:{self.spec.port}>"

    @property
    def listening(self) -> bool:
        return self._sock is not None

    # -- control ---------------------------------------------------------------------------
    def update(self, spec: ListenerSpec) -> None:
        """Swap in new pools (and retry a failed bind); open connections are untouched."""
        if spec.source_ranges != self.spec.source_ranges:
            self._source_ranges = parse_networks(spec.source_ranges)
        self.spec = spec
        self.pool.update(spec.pool)
        if spec.node_pool is None:
            self.node_pool = None
        elif self.node_pool is None:
            self.node_pool = BackendPool(spec.node_pool, self._registry)
        else:
            self.node_pool.update(spec.node_pool)
        self._apply()

    def retry_bind(self) -> None:
        """Try a failed bind again (the sweeper calls this every few seconds)."""
        if self.bind_error is not None:
            self._apply()

    def close(self) -> None:
        """Stop accepting for good; open connections go on until they end or are drained."""
        self.closed = True
        self.limit.unregister(self)
        self._apply()

    def _apply(self) -> None:
        want = not self.closed and self.spec.serves_anyone
        if want and self._sock is None:
            self._open()
        elif not want and self._sock is not None:
            self._close_socket()

    def _open(self) -> None:
        spec = self.spec
        family = socket.AF_INET6 if ":" in spec.ip else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            # FREEBIND: a service IP may not be (yet) on any interface; the listener still
            # starts, and serves as soon as the address is local (see docs/addressing.md).
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
            sock.setblocking(False)
            sock.bind((spec.ip, spec.port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            if self.bind_error is None or self.bind_error.errno != exc.errno:
                log.error(
                    "%s: cannot listen on %s:%d: %s (will retry at the next sync)",
                    spec.spn,
                    spec.ip,
                    spec.port,
                    exc.strerror or exc,
                )
            self.bind_error = exc
            return
        if self.bind_error is not None:
            log.info("%s: listening on %s:%d now", spec.spn, spec.ip, spec.port)
        self.bind_error = None
        self._sock = sock
        log.debug("%s: listening on %s:%d", spec.spn, spec.ip, spec.port)
        self._resume()

    def _close_socket(self) -> None:
        self._pause()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        assert self._sock is not None
        self._sock.close()
        self._sock = None
        log.debug("%s: stopped listening on %s:%d", self.spec.spn, self.spec.ip, self.spec.port)

    def _pause(self) -> None:
        if self._reading and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = False

    def _resume(self) -> None:
        if self._reading or self._sock is None or self._backoff is not None:
            return
        if self.limit.full:
            return
        self._loop.add_reader(self._sock.fileno(), self._accept)
        self._reading = True

    # -- accepting -------------------------------------------------------------------------
    def _accept(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(ACCEPT_BATCH):
            if self.limit.full:
                self._pause()
                return
            try:
                client, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
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
                continue
            self.limit.acquire()
            task = self._loop.create_task(self._serve(client, client_ip, pool))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _back_off(self, exc: OSError) -> None:
        self._pause()
        self._backoff_delay = min(1.0, max(0.05, self._backoff_delay * 2))
        _accept_error_log(
            log,
            logging.ERROR,
            "%s: accept() failed: %s; backing off %.2fs",
            self.spec.spn,
            exc.strerror or exc,
            self._backoff_delay,
        )
        self._backoff = self._loop.call_later(self._backoff_delay, self._end_backoff)

    def _end_backoff(self) -> None:
        self._backoff = None
        self._resume()

    # -- one connection --------------------------------------------------------------------
    def _pool_for(self, client_ip: str) -> BackendPool | None:
        """The pool for this client, or None when it must be turned away (counted)."""
        if self._source_ranges and not in_networks(client_ip, self._source_ranges):
            self.stats.refused_source_range += 1
            return None
        node_pool = self.node_pool
        pool = node_pool if node_pool is not None and self._node_local(client_ip) else self.pool
        if pool.empty:
            # The other traffic class has endpoints, so the socket listens; this one has
            # none: an immediate reset is the closest a listener can come to a refusal.
            self.stats.refused_no_endpoints += 1
            return None
        return pool

    async def _serve(self, client: socket.socket, client_ip: str, pool: BackendPool) -> None:
        conn = DownstreamProtocol(self, client_ip)
        self.connections.add(conn)
        try:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await self._loop.connect_accepted_socket(lambda: conn, client)
        except (OSError, asyncio.CancelledError) as exc:
            client.close()
            self.connection_finished(conn)
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.debug("%s: cannot wrap accepted socket: %s", self.spec.spn, exc)
            return
        if conn.finished:  # the client went away before connection_made returned
            return
        conn.dial_task = asyncio.current_task()
        try:
            await self._dial(conn, pool)
        finally:
            conn.dial_task = None

    async def _dial(self, conn: DownstreamProtocol, pool: BackendPool) -> None:
        tried: list[Endpoint] = []
        for attempt, timeout in enumerate(DIAL_TIMEOUTS):
            endpoint = pool.balancer.pick(conn.client_ip, tried)
            if endpoint is None:
                break
            if attempt:
                self.stats.dial_retries += 1
            tried.append(endpoint)
            try:
                async with asyncio.timeout(timeout):
                    await self._loop.create_connection(
                        lambda: UpstreamProtocol(conn), endpoint.ip, endpoint.port
                    )
            except (OSError, TimeoutError) as exc:
                self.stats.dial_failures += 1
                # Forget the client's pin so the next attempt (and the next connection)
                # goes elsewhere: kube-proxy's fix for clients stuck on a dead pod.
                pool.balancer.failed(conn.client_ip, endpoint)
                _dial_error_log(
                    log,
                    logging.WARNING,
                    "%s: dial %s failed (attempt %d, timeout %.2fs): %s",
                    self.spec.spn,
                    endpoint,
                    attempt + 1,
                    timeout,
                    "timed out" if isinstance(exc, TimeoutError) else exc,
                )
                if conn.finished:
                    return
                continue
            conn.endpoint = endpoint
            return
        # No endpoint could be reached: reset the client rather than leave it hanging.
        self.stats.dial_exhausted += 1
        conn.abort()

    def connection_finished(self, conn: DownstreamProtocol) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.bytes_up += conn.bytes_up
            self.stats.bytes_down += conn.bytes_down
            self.limit.release()

    def abort_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.abort()
