"""The compiled fast path of TCP listeners: accept, dial and relay with the C engine of
_relay.c (docs/architecture.md, "The compiled fast path").

The pure-Python path (tcp_listener.py's accept loop, dial.py, tcp_relay.py) is the
reference; this module does the same job with the same bookkeeping and fewer system calls
and Python objects per connection: accept returns a raw descriptor and address (no socket
object), connect is one C call that usually finds the endpoint already connected, and the
engine relays both descriptors from its own epoll set, which the loop watches as one
descriptor.  A connection costs no task, no transport and no protocol objects; only when a
connect is still in progress does a small waiter (a writer callback and one timer) exist.

Selection: used when the extension imports and ``USERPROXY_PURE_PYTHON`` is unset or
empty (``selected``); the startup log says which relay runs.

Invariants (beyond tcp_relay.py's, which the engine keeps):
- a descriptor is owned by exactly one party at a time: ``_relay.accept``/``connect`` hand
  it to this module, ``Engine.connection``/``Connection.join`` to the engine (which alone
  closes it from then on); a descriptor join refuses, a failed or cancelled dial's, and a
  refused client's are closed here, once;
- a dial deadline asks the kernel before it gives up (as dial.py does), so a stalled loop
  never turns a connected endpoint into a timeout; nothing is ever cancelled that the
  engine holds;
- every connection in the listener's ``connections`` is told finished exactly once (the
  engine calls ``connection_finished``), which ends its dial if one is under way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from typing import TYPE_CHECKING

from userproxy.dataplane import access_log as ends
from userproxy.dataplane.access_log import ConnTrace
from userproxy.dataplane.listener import RESOURCE_ERRNOS
from userproxy.dataplane.proxy_protocol import header_between
from userproxy.model import Endpoint

if TYPE_CHECKING:
    from userproxy.dataplane.pool import BackendPool
    from userproxy.dataplane.tcp_listener import TcpListener

try:
    from userproxy.dataplane import _relay
except ImportError:  # built without a compiler: the pure-Python relay runs
    _relay = None  # type: ignore[assignment]

__all__ = ["AVAILABLE", "ENV", "FastPath", "relay_name", "selected"]

log = logging.getLogger(__name__)

#: Set (non-empty) to run the pure-Python relay even where the extension is built.
ENV = "USERPROXY_PURE_PYTHON"
AVAILABLE = _relay is not None
#: Whether new TCP listeners use the compiled relay (tests switch it per test).
selected = AVAILABLE and not os.environ.get(ENV)

_engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _relay.Engine] = (
    weakref.WeakKeyDictionary()
)


def relay_name() -> str:
    """Which relay new TCP listeners use: "compiled" or "python"."""
    return "compiled" if selected else "python"


_announced = False


def announce_python_relay(why: str | None = None) -> None:
    """Log once per process that TCP listeners run the Python relay, and why (by default:
    not selected, or not built)."""
    global _announced  # noqa: PLW0603 - one line per process, whichever listener is first
    if not _announced:
        _announced = True
        if why is None:
            why = f"{ENV} is set" if AVAILABLE else "the compiled relay (_relay.c) is not built"
        log.info("TCP relay: the Python relay (%s)", why)


def engine_for(loop: asyncio.AbstractEventLoop) -> _relay.Engine:
    """The loop's engine, made and watched on first use (one per loop)."""
    engine = _engines.get(loop)
    if engine is None:
        engine = _relay.Engine()
        loop.add_reader(engine.fileno(), engine.poll)
        _engines[loop] = engine
        log.info("TCP relay: the compiled fast path (%s=1 selects the Python relay)", ENV)
    return engine


class FastPath:
    """One TcpListener's accepting and dialing on the engine, and the owner the engine
    reports each connection's end to."""

    __slots__ = ("__weakref__", "engine", "listener", "loop")

    def __init__(self, listener: TcpListener) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.engine = engine_for(listener.loop)

    # -- accepting (the listener's reader callback, TcpListener._on_readable's twin) ------------
    def on_readable(self, lfd: int, batch: int) -> None:
        listener = self.listener
        limit, service, engine = listener.limit, listener.service, self.engine
        stats = listener.stats
        for _ in range(batch):
            if limit.blocked(service):
                listener._pause()
                return
            try:
                got = _relay.accept(lfd)
            except OSError as exc:
                if exc.errno in RESOURCE_ERRNOS:
                    listener._back_off(exc)
                    return
                log.debug("%s: accept failed: %s", listener.spec.spn, exc)
                continue
            if got is None:
                return
            fd, client_ip, client_port = got
            listener._backoff_delay = 0.0
            stats.accepted += 1
            pool = listener._pool_for(client_ip)
            if pool is None:
                _relay.reset(fd)
                if listener.access_log is not None:
                    listener._log_refused((client_ip, client_port), listener._refusal())
                continue
            if not limit.acquire(service, client_ip):
                stats.refused_client_limit += 1
                _relay.reset(fd)
                if listener.access_log is not None:
                    listener._log_refused((client_ip, client_port), ends.CONNECTION_LIMIT_REFUSED)
                continue
            try:
                conn = engine.connection(self, client_ip, fd)  # owns fd from here, even failing
            except (OSError, RuntimeError) as exc:
                limit.release(service, client_ip)
                log.debug("%s: cannot relay an accepted socket: %s", listener.spec.spn, exc)
                continue
            # Counted at once: whatever fails below, connection_finished finds it.
            listener.connections.add(conn)
            try:
                if listener.access_log is not None:
                    conn.trace = ConnTrace(client_port, self.loop.time())
                version = listener.spec.proxy_protocol
                preamble = (
                    b""
                    if version is None
                    else header_between(version, (client_ip, client_port), _relay.local_address(fd))
                )
                self.dial(conn, pool, preamble, [], 0)
            except BaseException:
                conn.abort(ends.PROXY_ERROR)  # never a client left hanging
                raise

    # -- dialing: the ladder of tcp_listener.DIAL_TIMEOUTS, without a task ----------------------
    def dial(
        self,
        conn: _relay.Connection,
        pool: BackendPool,
        preamble: bytes,
        tried: list[Endpoint],
        attempt: int,
    ) -> None:
        """Dial from ``attempt`` on; joins, or leaves a ``_Wait`` in ``conn.dial_task``, or
        resets the client when no endpoint can be reached."""
        from userproxy.dataplane.tcp_listener import DIAL_TIMEOUTS

        listener = self.listener
        outliers = listener.outliers
        load = listener._registry.context.load
        while attempt < len(DIAL_TIMEOUTS) and not conn.finished:
            endpoint = pool.balancer.pick(conn.client_ip, outliers.excluding(tried))
            if endpoint is None:
                break
            if attempt:
                listener.stats.dial_retries += 1
            tried.append(endpoint)
            if conn.trace is not None:
                conn.trace.attempts = attempt + 1
            load.start(endpoint)
            try:
                fd, connected = _relay.connect(endpoint.ip, endpoint.port)
            except OSError as exc:
                listener._dial_failed(conn.client_ip, pool, endpoint, attempt, exc)
                attempt += 1
                continue
            if connected:
                self.join(conn, fd, endpoint, preamble)
            else:
                conn.dial_task = _Wait(
                    self,
                    conn,
                    pool=pool,
                    preamble=preamble,
                    tried=tried,
                    attempt=attempt,
                    fd=fd,
                    endpoint=endpoint,
                )
            return
        if not conn.finished:
            listener.stats.dial_exhausted += 1
            conn.abort(ends.NO_ENDPOINT_REACHABLE)

    def join(self, conn: _relay.Connection, fd: int, endpoint: Endpoint, preamble: bytes) -> None:
        """Hand the connected ``fd`` to ``conn``; ``endpoint`` is counted in the load and
        stays counted until the connection ends (``TcpListener.connection_finished``)."""
        if conn.trace is not None:
            conn.trace.connected = self.loop.time()
        conn.endpoint = endpoint
        if not conn.join(fd, preamble):  # the client left meanwhile
            conn.endpoint = None
            _relay.reset(fd)
            self.listener._registry.context.load.end(endpoint)

    # -- the engine's report --------------------------------------------------------------------
    def connection_finished(self, conn: _relay.Connection) -> None:
        """Called once per connection by the engine, its descriptors closed."""
        wait = conn.dial_task
        if wait is not None:  # the client left while a connect was in progress
            wait.cancel()
        listener = self.listener
        endpoint = conn.endpoint
        outliers = listener.outliers
        try:
            if endpoint is not None and outliers.settings.enabled:
                # As ObservedUpstream: a reset before any byte came back is a failed dial.
                if conn.upstream_reset and not conn.bytes_down:
                    outliers.failure(endpoint)
                else:
                    outliers.success(endpoint)
        finally:  # the limit, the load and the access log hear of it whatever happened
            listener.connection_finished(conn)


class _Wait:
    """A connect still in progress: a writer callback and a deadline that asks the kernel
    before it calls a timeout (dial.py says why)."""

    __slots__ = ("attempt", "conn", "endpoint", "fd", "path", "pool", "preamble", "timer", "tried")

    def __init__(
        self,
        path: FastPath,
        conn: _relay.Connection,
        *,
        pool: BackendPool,
        preamble: bytes,
        tried: list[Endpoint],
        attempt: int,
        fd: int,
        endpoint: Endpoint,
    ) -> None:
        from userproxy.dataplane.tcp_listener import DIAL_TIMEOUTS

        self.path, self.conn, self.pool, self.preamble = path, conn, pool, preamble
        self.tried, self.attempt, self.fd, self.endpoint = tried, attempt, fd, endpoint
        path.loop.add_writer(fd, self._writable)
        self.timer = path.loop.call_later(DIAL_TIMEOUTS[attempt], self._deadline)

    def _stop(self) -> None:
        self.conn.dial_task = None
        self.path.loop.remove_writer(self.fd)
        self.timer.cancel()

    def _writable(self) -> None:
        self._stop()
        err = _relay.connect_error(self.fd)
        if err:
            self._failed(OSError(err, os.strerror(err)))
        else:
            self.path.join(self.conn, self.fd, self.endpoint, self.preamble)

    def _deadline(self) -> None:
        if _relay.connect_state(self.fd):
            # The connect completed while the loop was busy elsewhere: not a timeout.
            self._writable()
            return
        self._stop()
        self._failed(TimeoutError())

    def _failed(self, exc: OSError) -> None:
        os.close(self.fd)
        path = self.path
        path.listener._dial_failed(self.conn.client_ip, self.pool, self.endpoint, self.attempt, exc)
        path.dial(self.conn, self.pool, self.preamble, self.tried, self.attempt + 1)

    def cancel(self) -> None:
        """The client left: close the half-made upstream, uncount its endpoint."""
        self._stop()
        os.close(self.fd)
        self.path.listener._registry.context.load.end(self.endpoint)
