"""UDP sessions: one per client of a listener, all of them in one LRU table for the process.

kube-proxy's old userspace mode (pkg/proxy/userspace, udpProxySocket) kept a map of
client address -> connection, with a goroutine and a read deadline each; here:

* A session is keyed by the client's (ip, port) and owns a *connected* socket to the
  endpoint its first datagram picked, so the kernel matches the replies; they go back from
  the listening socket, i.e. from the exact address and port the client used (resolvers
  check this).  An ICMP error (ECONNREFUSED on that socket) ends the session, so the next
  datagram picks again.
* Sessions live in one LRU table for the whole process, bounded by ``max_sessions`` (and
  so are their descriptors): a new session beyond it evicts the least recently used one.
  Idle sessions (``idle_timeout``, default 30 s like the kernel's UDP conntrack) are expired
  by the listener set's once-a-second sweep from the old end of the table: no timer and no
  task per session or datagram.

Replies are read with ``loop.add_reader`` on the session's non-blocking socket, up to
``BATCH`` datagrams per readiness event, so one busy session cannot starve the others.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from userproxy.dataplane import access_log as ends

if TYPE_CHECKING:
    from userproxy.dataplane.pool import BackendPool
    from userproxy.dataplane.udp_listener import UdpListener
    from userproxy.model import Endpoint

log = logging.getLogger(__name__)

#: Receive buffer size: holds the largest UDP payload (65 507 bytes over IPv4: 65 535
#: less 20 for the IP header and 8 for UDP's).
MAX_DATAGRAM = 65535
#: Datagrams handled per readiness event before yielding to the loop.
BATCH = 128
#: How stale a session's activity mark may get before the LRU order is refreshed.
TOUCH_GRANULARITY = 1.0

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class UdpSettings:
    """``--udp-idle-timeout``, ``--udp-max-sessions`` and ``--udp-session-rate``."""

    idle_timeout: float = 30.0
    max_sessions: int = 10_000
    #: Datagrams per second one client session may send (0: unlimited, the default).
    session_rate: float = 0.0


@dataclass(slots=True, eq=False)  # hashed by identity: the LRU table's key
class UdpSession:
    """One client's flow through one listener to one endpoint."""

    listener: UdpListener
    client: Address
    pool: BackendPool
    endpoint: Endpoint
    #: Connected to ``endpoint``; open exactly while the session is in the table.
    sock: socket.socket
    #: Last activity (loop time); the table reorders on it at most every TOUCH_GRANULARITY.
    last: float
    #: The listener's pool version the endpoint was last checked against.
    version: int
    #: The ``--udp-session-rate`` token bucket: tokens left, and when they were counted.
    tokens: float
    token_time: float
    #: When it opened (loop time), and the bytes it carried each way (for the access log).
    started: float = 0.0
    bytes_up: int = 0
    bytes_down: int = 0

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
                # ECONNREFUSED: the endpoint answered ICMP port unreachable; the session ends.
                listener.stats.sessions_closed_by_icmp += 1
                log.debug("%s: session %s -> %s ended: %s", listener.spec.spn, self.client,
                          self.endpoint, exc)  # fmt: skip
                listener.table.remove(self, ends.ENDPOINT_UNREACHABLE)
                return
            if out is None:
                listener.table.remove(self, ends.LISTENER_CLOSED)
                return
            try:
                out.sendto(data, self.client)
            except OSError:
                listener.stats.drops_send += 1
                continue
            listener.stats.datagrams_down += 1
            listener.stats.bytes_down += len(data)
            self.bytes_down += len(data)
        listener.table.touch(self, listener.loop.time())

    def close(self, end: str) -> None:
        """Forget the session and close its socket (the table has already let it go);
        ``end`` says why, for the access log.

        Called exactly once per session, so the session's count in the endpoint load
        (which least-connections and power-of-two read) ends here too, and the session
        is added to the endpoint's totals (the status page's per-endpoint figures).
        """
        listener = self.listener
        access_log = listener.access_log
        if access_log is not None:
            spec = listener.spec
            client = self.client
            access_log.record(
                (time.time(), "udp", client[0], client[1], spec.ip, spec.port, spec.spn,
                 self.endpoint, 1, 0.0, listener.loop.time() - self.started,
                 self.bytes_up, self.bytes_down, end)
            )  # fmt: skip
        listener.load.finished(self.endpoint, self.bytes_up, self.bytes_down)
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
            oldest.close(ends.EVICTED)
        self._lru[session] = None
        session.listener.sessions[session.client] = session

    def remove(self, session: UdpSession, end: str) -> None:
        if session in self._lru:
            del self._lru[session]
            session.close(end)

    def expire(self, now: float) -> None:
        """Close the sessions idle for ``idle_timeout``; cheap: stops at the first live one."""
        idle = self.settings.idle_timeout
        while self._lru:
            oldest = next(iter(self._lru))
            if now - oldest.last < idle:
                break
            del self._lru[oldest]
            oldest.listener.stats.sessions_expired += 1
            oldest.close(ends.IDLE_TIMEOUT)

    def close_all(self, listener: UdpListener) -> None:
        end = listener.session_end
        for session in list(listener.sessions.values()):
            self.remove(session, end)

    def sessions(self, listener: UdpListener) -> list[UdpSession]:
        return list(listener.sessions.values())
