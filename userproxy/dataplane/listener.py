"""What TCP and UDP listeners share: the socket's lifecycle, the pools, the traffic class.

A listener serves one ``ListenerSpec`` (one protocol, address and port of one
ServicePort).  Its socket is open exactly while the listener is not closed and some traffic
class has endpoints: with none at all the socket is closed, so the kernel refuses (TCP RST
on SYN, ICMP port unreachable for UDP), which is what kube-proxy answers.

Opening never raises: any ``OSError`` (EMFILE/ENFILE from ``socket()``, an address another
process holds, ``listen()``) leaves the listener without a socket and the error in
``bind_error``; ``retry_bind`` tries again (the listener set calls it at every sync of the
Service and every few seconds).  An address problem is logged once per listener and errno;
running out of descriptors or memory once a second for all listeners together.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import errno
import logging
import socket
from dataclasses import dataclass

from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane.classify import NodeLocal, in_networks, parse_networks
from userproxy.dataplane.pool import BackendPool
from userproxy.hostnet.listen import listening_socket
from userproxy.logs import RateLimitedLog
from userproxy.model import ListenerSpec, Protocol, ServiceKey, ServicePortName

log = logging.getLogger(__name__)

#: Errors that say "the process or system is out of something", not "this address".
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_resource_log = RateLimitedLog(log)


class _StateLog:
    """INFO lines for listeners opened and closed, at most ``burst`` per ``window`` seconds
    for all listeners together (a first sync of 10 000 Services opens 10 000 listeners):
    the rest go to DEBUG, and the next INFO line says how many did."""

    def __init__(self, burst: int = 50, window: float = 10.0) -> None:
        self.burst, self.window = burst, window
        self._start = float("-inf")
        self._count = 0
        self._held = 0

    def info(self, loop: asyncio.AbstractEventLoop, msg: str, *args: object) -> None:
        now = loop.time()
        if now - self._start >= self.window:
            self._start, self._count = now, 0
        if self._count >= self.burst:
            self._held += 1
            log.debug(msg, *args)
            return
        self._count += 1
        if self._held:
            msg += " (%d more listener changes logged at DEBUG only)"
            args = (*args, self._held)
            self._held = 0
        log.info(msg, *args)


_state_log = _StateLog()


def _hint(exc: OSError, port: int) -> str:
    """What would let the bind succeed, where the errno alone does not say it."""
    if exc.errno == errno.EACCES and 0 < port < 1024:
        # Privileged ports: the retry succeeds only once the process gets the capability
        # or the sysctl is lowered; until then the listener counts in bind errors.
        return (
            f"; port {port} is below 1024: it needs CAP_NET_BIND_SERVICE, or "
            f"net.ipv4.ip_unprivileged_port_start <= {port}"
        )
    return ""


def _endpoints(spec: ListenerSpec) -> str:
    """The pools' sizes for the "listening on" line."""
    size = len(spec.pool.endpoints)
    if spec.node_pool is None:
        return f"{size} endpoint{'' if size == 1 else 's'}"
    return f"{size} endpoints for external clients, {len(spec.node_pool.endpoints)} for the node's"


@dataclass(slots=True)
class ListenerStats:
    """Plain counters of one listener, read by the metrics collector at scrape time."""

    accepted: int = 0
    dial_failures: int = 0
    dial_retries: int = 0
    dial_exhausted: int = 0
    refused_source_range: int = 0
    refused_no_endpoints: int = 0
    #: TCP connections reset because their client held its share of --max-connections.
    refused_client_limit: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    # UDP
    sessions_created: int = 0
    sessions_expired: int = 0
    sessions_evicted: int = 0
    sessions_closed_by_icmp: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    drops_rate: int = 0
    drops_send: int = 0


@dataclass(slots=True)
class PortTotals(ListenerStats):
    """Counters of one service port and protocol over all its listeners, past and present
    (``ListenerSet.totals``): the listeners' own counters summed, plus what is open now."""

    active: int = 0
    sessions_active: int = 0
    listening: int = 0
    bind_errors: int = 0

    def add(self, listener: Listener) -> None:
        stats = listener.stats
        for name in _STATS_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(stats, name))


_STATS_FIELDS = tuple(f.name for f in dataclasses.fields(ListenerStats))
TotalsKey = tuple[str, str]  # ("namespace/name:port", protocol)
#: A listener's place in the listener set: (protocol, address, port).
ListenerKey = tuple[Protocol, str, int]


def port_key(spn: ServicePortName) -> TotalsKey:
    """The labels a Service port's totals go by."""
    port = f":{spn.port}" if spn.port else ""
    return (f"{spn.namespace}/{spn.name}{port}", str(spn.protocol))


class Listener(abc.ABC):
    """Base of TcpListener and UdpListener; subclasses set ``SOCK_TYPE``, implement
    ``_prepare`` (after bind) and ``_on_readable``, and may override ``_can_read``."""

    SOCK_TYPE = socket.SOCK_STREAM

    def __init__(self, spec: ListenerSpec, registry: BalancerRegistry, node_local: NodeLocal):
        self.spec = spec
        self._registry = registry
        # Both pools share the Service port's affinity table (through ``spec.spn``).
        self.pool = BackendPool(spec.pool, registry, spec.spn)
        self.node_pool = (
            None if spec.node_pool is None else BackendPool(spec.node_pool, registry, spec.spn)
        )
        self._node_local = node_local
        self._source_ranges = parse_networks(spec.source_ranges)
        self.stats = ListenerStats()
        #: Why the socket the listener wants is not open (None: open, or not wanted).
        self.bind_error: OSError | None = None
        self.closed = False
        #: Why the listener stops serving when ``close`` is called (None: say nothing at
        #: INFO, as at shutdown, which has its own line).
        self.close_reason: str | None = "Service port removed"
        #: Whether the socket was ever open (a reopen says "again").
        self._was_open = False
        self.loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._reading = False

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec.spn} {self.spec.ip}:{self.spec.port}>"

    @property
    def listening(self) -> bool:
        return self._sock is not None

    # -- control ---------------------------------------------------------------------------
    def update(self, spec: ListenerSpec) -> None:
        """Swap in new pools (and retry a failed bind); open connections are untouched.

        ``spec`` is taken last: if a pool update raises, the old spec stays, so updating
        to the new one again is not mistaken for "unchanged"."""
        if spec.source_ranges != self.spec.source_ranges:
            self._source_ranges = parse_networks(spec.source_ranges)
            _state_log.info(
                self.loop,
                "%s: %s:%d now accepts clients from %s (loadBalancerSourceRanges)",
                spec.spn,
                spec.ip,
                spec.port,
                ", ".join(spec.source_ranges) or "everywhere",
            )
        # ``spec.spn``: a renamed port moves the pools to its own affinity table.
        self.pool.update(spec.pool, spec.spn)
        if spec.node_pool is None:
            if self.node_pool is not None:
                self.node_pool.release()
            self.node_pool = None
        elif self.node_pool is None:
            self.node_pool = BackendPool(spec.node_pool, self._registry, spec.spn)
        else:
            self.node_pool.update(spec.node_pool, spec.spn)
        self.spec = spec
        self._open_or_close()

    def retry_bind(self) -> None:
        """Try a failed open again."""
        if self.bind_error is not None:
            self._open_or_close()

    def close(self) -> None:
        """Stop serving new clients for good; what is open goes on (or is drained).
        ``close_reason`` is logged at INFO if the socket was open (None: DEBUG only)."""
        self.closed = True
        self._open_or_close()
        self.pool.release()
        if self.node_pool is not None:
            self.node_pool.release()

    def _open_or_close(self) -> None:
        want = not self.closed and self.spec.serves_anyone
        if want and self._sock is None:
            self._open()
        elif not want:
            self.bind_error = None  # nothing to retry: the socket is not wanted
            if self._sock is not None:
                self._close_socket()

    def _open(self) -> None:
        spec = self.spec
        sock: socket.socket | None = None
        try:
            # FREEBIND: a service IP may not be (yet) on any interface; the listener still
            # starts, and serves as soon as the address is local (see docs/addressing.md).
            sock = listening_socket(spec.ip, spec.port, self.SOCK_TYPE)
            self._prepare(sock)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._failed(exc)
            return
        previous = self.bind_error
        if previous is not None:
            why = "now (the bind error is over)"
        elif self._was_open:
            why = "again: endpoints are back"
        else:
            why = f"({spec.kind}, {_endpoints(spec)})"
        _state_log.info(self.loop, "%s: listening on %s:%d %s", spec.spn, spec.ip, spec.port, why)
        self.bind_error = None
        self._sock = sock
        self._was_open = True
        self._resume()

    def _failed(self, exc: OSError) -> None:
        spec = self.spec
        previous, self.bind_error = self.bind_error, exc
        message = "%s: cannot listen on %s:%d: %s%s (will retry)"
        args = (spec.spn, spec.ip, spec.port, exc.strerror or exc, _hint(exc, spec.port))
        if exc.errno in RESOURCE_ERRNOS:
            # Out of descriptors, every listener opened in a sync fails alike: one line.
            _resource_log.log(logging.ERROR, message, *args)
        elif previous is None or previous.errno != exc.errno:
            log.error(message, *args)
        else:
            log.debug(message, *args)

    def _close_socket(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            self._pause()
        finally:  # closed whatever happens: a stale listening socket would serve on
            self._sock = None
            self._reading = False
            sock.close()
        spec = self.spec
        if not self.closed:
            why: str | None = (
                "no endpoints (the kernel refuses new clients, as kube-proxy's REJECT)"
            )
        else:
            why = self.close_reason
        if why is None:
            log.debug("%s: stopped listening on %s:%d", spec.spn, spec.ip, spec.port)
        else:
            _state_log.info(
                self.loop, "%s: stopped listening on %s:%d: %s", spec.spn, spec.ip, spec.port, why
            )

    def _pause(self) -> None:
        if self._reading and self._sock is not None:
            self.loop.remove_reader(self._sock.fileno())
        self._reading = False

    def _resume(self) -> None:
        if self._reading or self._sock is None or not self._can_read():
            return
        self.loop.add_reader(self._sock.fileno(), self._on_readable)
        self._reading = True

    # -- traffic classes -------------------------------------------------------------------
    def _pool_for(self, client_ip: str) -> BackendPool | None:
        """The pool for this client, or None when it must be turned away (counted)."""
        if self._source_ranges and not in_networks(client_ip, self._source_ranges):
            self.stats.refused_source_range += 1
            return None
        pool = self.pool
        if self.node_pool is not None and self._node_local.is_local(client_ip):
            pool = self.node_pool
        if pool.empty:
            # The other traffic class has endpoints, so the socket is open; this one has
            # none: turn the client away (TCP: an immediate reset; UDP: a drop).
            self.stats.refused_no_endpoints += 1
            return None
        return pool

    # -- for subclasses --------------------------------------------------------------------
    @abc.abstractmethod
    def _prepare(self, sock: socket.socket) -> None:
        """Called after bind (TCP: listen; UDP: buffer sizes)."""

    def _can_read(self) -> bool:
        return True

    @abc.abstractmethod
    def _on_readable(self) -> None:
        """The listening socket is readable: accept connections or read datagrams."""


class ListenersNotOpen(Exception):
    """Some listeners ``set_listeners`` was asked for are not open (all else is done)."""

    def __init__(self, service: ServiceKey, failures: dict[ListenerKey, BaseException]):
        self.service = service
        self.failures = failures
        reasons = dict.fromkeys(_reason(exc) for exc in failures.values())
        super().__init__(
            f"{len(failures)} listener{'s' if len(failures) != 1 else ''} not open "
            f"({'; '.join(list(reasons)[:3])})"
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return f"{type(exc).__name__}: {exc}"
