"""A UDP listener for one (ServicePort, address): datagrams in, one session per client.

Where kube-proxy's old userspace mode failed its users, this module does otherwise:

* Datagrams of any size up to 65 507 bytes pass intact: every receive uses a 64 KiB buffer.
* Each client gets a session (``udp_session``): replies go back from the exact address
  and port the client used.  After a pool update (``version``) a session's next datagram
  checks that its endpoint is still in the pool and picks again if not.
* Optional fairness (``--udp-session-rate``): a token bucket per session; a client beyond
  it has its datagrams dropped at the cost of one ``recvfrom``, so one flooding client
  cannot take the forwarding capacity (or the endpoints') from the others.  Off by default
  because a legitimate busy client (a DNS forwarder sends all its queries from one socket)
  looks exactly like a flood; nginx stream and HAProxy drop nothing on purpose either.
  Every drop is counted and logged (at most once every ``DROP_LOG_INTERVAL`` seconds).
"""

from __future__ import annotations

import errno
import logging
import socket

from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane import access_log as ends
from userproxy.dataplane.access_log import AccessLog
from userproxy.dataplane.classify import NodeLocal
from userproxy.dataplane.listener import Listener
from userproxy.dataplane.udp_session import BATCH, MAX_DATAGRAM, Address, SessionTable, UdpSession
from userproxy.logs import RateLimitedLog
from userproxy.model import ListenerSpec

log = logging.getLogger(__name__)

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
        #: Active connections per endpoint: a session counts from its opening to its close.
        self.load = registry.context.load
        #: This listener's sessions by client address (the per-datagram lookup).
        self.sessions: dict[Address, UdpSession] = {}
        #: Bumped at every pool update; sessions re-check their endpoint when it differs.
        self.version = 0
        self.rate = rate = table.settings.session_rate
        #: Each session's token bucket holds at most this many datagrams (0: no bucket).
        self.burst = max(64.0, rate / 10) if rate else 0.0
        #: The access log (``--access-log``), None while it is off (the listener set sets it).
        self.access_log: AccessLog | None = None
        #: How its sessions end when the listener closes (``drained`` at shutdown).
        self.session_end = ends.LISTENER_CLOSED
        #: Set by ``stop_reading``: never reads again, still replies.
        self.replying_only = False
        self._open_or_close()

    @property
    def sock(self) -> socket.socket | None:
        return self._sock

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

    def stop_reading(self) -> None:
        """Take no more datagrams (a successor reads this socket now: a handoff); the
        sessions go on, their replies sent from this socket, until ``close``."""
        self.replying_only = True
        self._pause()

    def _can_read(self) -> bool:
        return not self.replying_only

    # -- datagrams from clients ------------------------------------------------------------
    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        now = self.loop.time()
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
                # An ICMP error from an earlier datagram surfaces here: the session ends.
                stats.sessions_closed_by_icmp += 1
                table.remove(session, ends.ENDPOINT_UNREACHABLE)
                continue
            stats.datagrams_up += 1
            stats.bytes_up += len(data)
            session.bytes_up += len(data)

    def _revalidate(self, session: UdpSession) -> UdpSession | None:
        """After a pool change: keep the session only if its endpoint is still usable."""
        if session.endpoint in session.pool.spec.endpoints:
            session.version = self.version
            return session
        self.table.remove(session, ends.ENDPOINT_REMOVED)
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
        session = UdpSession(
            self, client, pool, endpoint, sock,
            last=now, version=self.version, tokens=self.burst, token_time=now, started=now,
        )  # fmt: skip
        self.loop.add_reader(sock.fileno(), session.on_readable)
        self.table.add(session)
        self.load.start(endpoint)
        self.stats.sessions_created += 1
        return session
