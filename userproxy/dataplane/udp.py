"""UDP: one listening socket per (ServicePort, address), one session per client.

Where kube-proxy's old userspace mode failed its users, this module does otherwise:

* Datagrams of any size up to 65 507 bytes pass intact: every receive uses a 64 KiB buffer.
* A session is keyed by the client's (ip, port). Its first datagram picks an endpoint
  through the Service's balancer (and affinity); the session then owns a *connected*
  socket to that endpoint, so replies are matched by the kernel, and they go back to the
  client from the listening socket, i.e. from the exact address and port the client used
  (resolvers check this).
* Sessions live in one LRU table for the whole process, bounded by ``max_sessions`` (and
  so are their descriptors): a new session beyond it evicts the least recently used one.
  Idle sessions (``idle_timeout``, default 30 s like the kernel's UDP conntrack) are expired
  by the listener set's once-a-second sweep from the old end of the table: no timer and no
  task per session or datagram.
* When a session's endpoint leaves the pool, the session's next datagram finds out (a
  pool version check) and picks a current endpoint: nothing more is sent to the old one.
  An ICMP error from the endpoint (ECONNREFUSED on the connected socket) closes the session,
  so the next datagram picks again.
* Optional fairness (``--udp-session-rate``, off by default): each session gets a token
  bucket of ``session_rate`` datagrams per second (burst a tenth of that, at least 64); a
  client beyond it has its datagrams dropped at the cost of one ``recvfrom``, so one
  flooding client cannot take the proxy's forwarding capacity (or the endpoints') from
  the others.  Off by default because a legitimate busy client (a DNS forwarder sends all
  its queries from one socket) looks exactly like a flood, and nginx stream and HAProxy
  drop nothing on purpose either.  Every drop is counted and logged (one line at most
  every ``DROP_LOG_INTERVAL`` seconds for the process, with how many were held back).

The data path uses ``loop.add_reader`` on plain non-blocking sockets: a readiness callback
drains up to ``BATCH`` datagrams and returns, so one busy socket cannot starve the others.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections import OrderedDict
from dataclasses import dataclass

from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane.classify import NodeLocal
from userproxy.dataplane.listener import Listener
from userproxy.dataplane.pool import BackendPool
from userproxy.logs import RateLimitedLog
from userproxy.model import Endpoint, ListenerSpec

log = logging.getLogger(__name__)

#: Largest UDP payload over IPv4 (65 535 - 8 UDP - 20 IP); the receive buffer size.
MAX_DATAGRAM = 65535
#: Datagrams handled per readiness event before yielding to the loop.
BATCH = 128
#: How stale a session's activity mark may get before the LRU order is refreshed.
TOUCH_GRANULARITY = 1.0
#: Kernel buffer asked for on listening sockets (the kernel may cap it at rmem_max).
SOCKET_BUFFER = 4 * 1024 * 1024
#: Receive buffer asked for on each session's socket (the endpoint's replies).  The
#: default (~208 KiB, some 270 small datagrams) overflowed when a loop stall of ~50 ms met
#: one busy client at 5 000 datagrams/s; this holds about a quarter of a second of that.
#: It is a cap, not an allocation, and all UDP memory is bounded by net.ipv4.udp_mem.
SESSION_BUFFER = 1024 * 1024
#: Dropped datagrams are logged at most once per this many seconds (per kind of drop).
DROP_LOG_INTERVAL = 5.0
_session_error_log = RateLimitedLog(log)
_rate_drop_log = RateLimitedLog(log, DROP_LOG_INTERVAL)
_send_drop_log = RateLimitedLog(log, DROP_LOG_INTERVAL)

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class UdpSettings:
    idle_timeout: float = 30.0
    max_sessions: int = 10_000
    #: Datagrams per second one client session may send (0: unlimited, the default).
    session_rate: float = 0.0


class UdpSession:
    """One client's flow through one listener to one endpoint."""

    __slots__ = (
        "client",
        "endpoint",
        "last",
        "listener",
        "pool",
        "sock",
        "token_time",
        "tokens",
        "version",
    )

    def __init__(
        self,
        listener: UdpListener,
        client: Address,
        pool: BackendPool,
        endpoint: Endpoint,
        *,
        sock: socket.socket,
        now: float,
    ) -> None:
        self.listener = listener
        self.client = client
        self.pool = pool
        self.endpoint = endpoint
        self.sock = sock
        self.last = now
        self.version = listener.version
        self.tokens = listener.burst
        self.token_time = now

    def on_readable(self) -> None:
        """Replies from the endpoint: back to the client from the listening socket."""
        listener = self.listener
        out = listener.sock
        sock = self.sock
        for _ in range(BATCH):
            try:
                data = sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # ECONNREFUSED: the endpoint answered ICMP port unreachable. The session
                # ends; the client's next datagram picks again.
                listener.stats.sessions_closed_by_icmp += 1
                log.debug("%s: session %s -> %s ended: %s", listener.spec.spn, self.client,
                          self.endpoint, exc)  # fmt: skip
                listener.table.remove(self)
                return
            if out is None:
                listener.table.remove(self)
                return
            try:
                out.sendto(data, self.client)
            except OSError:
                listener.stats.drops_send += 1
                continue
            listener.stats.datagrams_down += 1
            listener.stats.bytes_down += len(data)
        listener.table.touch(self, listener.now())

    def drop(self) -> None:
        """Forget the session and close its socket (the table has already let it go)."""
        listener = self.listener
        if listener.sessions.get(self.client) is self:
            del listener.sessions[self.client]
        listener.loop.remove_reader(self.sock.fileno())
        self.sock.close()


class SessionTable:
    """All UDP sessions of the process, least recently used first.

    Invariants: at most ``max_sessions`` entries; each entry's socket is open and has a
    reader registered and it is also in its listener's ``sessions`` (the per-datagram
    lookup); a session leaves both exactly when its socket is closed.  The order is
    refreshed at most once per ``TOUCH_GRANULARITY`` seconds per session, so "least
    recently used" and idle expiry are exact to that granularity, and the per-datagram
    path does no reordering.
    """

    def __init__(self, settings: UdpSettings) -> None:
        self.settings = settings
        self._lru: OrderedDict[UdpSession, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def touch(self, session: UdpSession, now: float) -> None:
        """Mark activity (called per datagram: cheap unless the mark is stale)."""
        if now - session.last >= TOUCH_GRANULARITY and session in self._lru:
            self._lru.move_to_end(session)
        session.last = now

    def add(self, session: UdpSession) -> None:
        while len(self._lru) >= self.settings.max_sessions:
            oldest, _ = self._lru.popitem(last=False)
            oldest.listener.stats.sessions_evicted += 1
            oldest.drop()
        self._lru[session] = None
        session.listener.sessions[session.client] = session

    def remove(self, session: UdpSession) -> None:
        if session in self._lru:
            del self._lru[session]
            session.drop()

    def expire(self, now: float) -> int:
        """Close the sessions idle for ``idle_timeout``; cheap: stops at the first live one."""
        idle = self.settings.idle_timeout
        expired = 0
        while self._lru:
            oldest = next(iter(self._lru))
            if now - oldest.last < idle:
                break
            del self._lru[oldest]
            oldest.listener.stats.sessions_expired += 1
            oldest.drop()
            expired += 1
        return expired

    def close_all(self, listener: UdpListener) -> None:
        for session in list(listener.sessions.values()):
            self.remove(session)

    def sessions(self, listener: UdpListener) -> list[UdpSession]:
        return list(listener.sessions.values())


class UdpListener(Listener):
    """Serves one UDP ListenerSpec.

    Invariants (beyond ``Listener``'s): every session of this listener is in ``table``;
    when the listening socket closes, all of them are closed (replies could not be sent).
    """

    SOCK_TYPE = socket.SOCK_DGRAM

    def __init__(
        self,
        spec: ListenerSpec,
        registry: BalancerRegistry,
        table: SessionTable,
        node_local: NodeLocal,
    ) -> None:
        super().__init__(spec, registry, node_local)
        self.table = table
        #: This listener's sessions by client address (the per-datagram lookup).
        self.sessions: dict[Address, UdpSession] = {}
        #: Bumped at every pool update; sessions re-check their endpoint when it differs.
        self.version = 0
        rate = table.settings.session_rate
        self.rate = rate
        self.burst = max(64.0, rate / 10) if rate else 0.0
        self.loop = self._loop
        self.now = self._loop.time
        self._apply()

    @property
    def sock(self) -> socket.socket | None:
        return self._sock

    @property
    def session_count(self) -> int:
        return len(self.sessions)

    def update(self, spec: ListenerSpec) -> None:
        self.version += 1
        super().update(spec)

    def _prepare(self, sock: socket.socket) -> None:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                log.debug("cannot set a %d-byte socket buffer", SOCKET_BUFFER)

    def _close_socket(self) -> None:
        super()._close_socket()
        self.table.close_all(self)

    # -- datagrams from clients ------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = self._loop.time()
        table = self.table
        stats = self.stats
        sessions = self.sessions
        for _ in range(BATCH):
            try:
                data, client = sock.recvfrom(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("%s: recvfrom failed: %s", self.spec.spn, exc)
                continue
            if len(client) > 2:
                client = client[:2]  # IPv6 addresses come with flowinfo and scope id
            session = sessions.get(client)
            if session is not None and session.version != self.version:
                session = self._revalidate(session)
            if session is None:
                session = self._open_session(client, now)
                if session is None:
                    continue
            elif self.rate:
                tokens = min(self.burst, session.tokens + (now - session.token_time) * self.rate)
                session.token_time = now
                if tokens < 1.0:
                    session.tokens = tokens
                    stats.drops_rate += 1
                    _rate_drop_log.log(
                        logging.WARNING,
                        "%s: client %s sends more than --udp-session-rate %g datagrams/s; "
                        "dropping its excess (%d dropped on this listener so far)",
                        self.spec.spn,
                        client[0],
                        self.rate,
                        stats.drops_rate,
                    )
                    continue
                session.tokens = tokens - 1.0
            table.touch(session, now)
            try:
                session.sock.send(data)
            except (BlockingIOError, InterruptedError):
                stats.drops_send += 1
                _send_drop_log.log(
                    logging.WARNING,
                    "%s: dropped a datagram to %s: the socket's send buffer is full "
                    "(%d dropped on this listener so far)",
                    self.spec.spn,
                    session.endpoint,
                    stats.drops_send,
                )
                continue
            except OSError:
                # An ICMP error from an earlier datagram surfaces here: end the session;
                # the client's next datagram picks again.
                stats.sessions_closed_by_icmp += 1
                table.remove(session)
                continue
            stats.datagrams_up += 1
            stats.bytes_up += len(data)

    def _revalidate(self, session: UdpSession) -> UdpSession | None:
        """After a pool change: keep the session only if its endpoint is still usable."""
        if session.endpoint in session.pool.spec.endpoints:
            session.version = self.version
            return session
        self.table.remove(session)
        return None

    def _open_session(self, client: Address, now: float) -> UdpSession | None:
        pool = self._pool_for(client[0])
        if pool is None:
            return None
        endpoint = pool.balancer.pick(client[0])
        if endpoint is None:
            self.stats.refused_no_endpoints += 1
            return None
        family = socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            self.stats.drops_send += 1
            _session_error_log.log(logging.ERROR if exc.errno in (errno.EMFILE, errno.ENFILE)
                                   else logging.WARNING, "%s: cannot open a UDP session socket: %s",
                                   self.spec.spn, exc)  # fmt: skip
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SESSION_BUFFER)
            sock.connect(endpoint.address)
        except OSError as exc:
            sock.close()
            pool.balancer.failed(client[0], endpoint)
            self.stats.drops_send += 1
            _session_error_log.log(logging.WARNING, "%s: cannot reach %s: %s",
                                   self.spec.spn, endpoint, exc)  # fmt: skip
            return None
        session = UdpSession(self, client, pool, endpoint, sock=sock, now=now)
        self._loop.add_reader(sock.fileno(), session.on_readable)
        self.table.add(session)
        self.stats.sessions_created += 1
        return session
