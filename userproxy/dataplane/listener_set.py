"""The set of listeners: opened, updated and closed as the control plane's syncs say.

This is the part of kube-proxy's old userspace proxier (pkg/proxy/userspace/proxier.go)
that opened and stopped one proxy socket per service port; here the unit is a
``ListenerSpec``, and ``set_listeners(service, specs)``, the control plane's only entry
point, touches only that Service's listeners.  A closed TCP listener's connections go on
until they end by themselves (or time out), as kube-proxy's conntrack keeps a deleted
Service's established flows; only shutdown resets them, after ``--shutdown-grace``
(``drain``).  A closed UDP listener's sessions end with it (their replies would have no
socket).

One sweeper task (not a timer per connection) enforces the TCP and UDP timeouts once a
second, retries failed opens every ``BIND_RETRY_INTERVAL`` seconds and retires closed
listeners whose last connection has ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Iterator, Sequence

from userproxy.balancers.registry import BalancerRegistry
from userproxy.dataplane.access_log import DRAINED, AccessLog
from userproxy.dataplane.classify import NodeLocal
from userproxy.dataplane.deadlines import TcpTimeouts, sweep_timeouts
from userproxy.dataplane.dial import Dialer
from userproxy.dataplane.endpoint_drain import EndpointDrain
from userproxy.dataplane.limits import ConnectionLimit
from userproxy.dataplane.listener import (
    ListenerKey,
    ListenersNotOpen,
    PortTotals,
    TotalsKey,
    port_key,
)
from userproxy.dataplane.outliers import (
    EventSink,
    OutlierDetector,
    OutlierSettings,
    ignore_event,
)
from userproxy.dataplane.port_outliers import EjectionCounts, PortOutliers
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.dataplane.tcp_relay import Relayed
from userproxy.dataplane.udp_listener import UdpListener
from userproxy.dataplane.udp_session import SessionTable, UdpSettings
from userproxy.model import ListenerSpec, Protocol, ServiceKey, ServicePortName
from userproxy.slices import Slicer

log = logging.getLogger(__name__)

SWEEP_INTERVAL = 1.0
#: How often a listener whose address was taken tries to bind again.
BIND_RETRY_INTERVAL = 5.0


AnyListener = TcpListener | UdpListener


def _totals_key(listener: AnyListener) -> TotalsKey:
    return port_key(listener.spec.spn)


class ListenerSet:
    """Every listener of the process by (protocol, address, port), and the Service owning each."""

    def __init__(
        self,
        registry: BalancerRegistry,
        limit: ConnectionLimit,
        timeouts: TcpTimeouts,
        udp: UdpSettings | None = None,
        outliers: OutlierSettings | None = None,
    ) -> None:
        self.registry = registry
        self.limit = limit
        #: ``--access-log`` (None: off), given to every listener made from now on.
        self.access_log: AccessLog | None = None
        self.timeouts = timeouts
        self.udp_sessions = SessionTable(udp or UdpSettings())
        #: Classifies clients of NodePort/external/LB listeners (kept fresh by hostnet).
        self.node_local = NodeLocal()
        self._last_bind_retry = 0.0
        self.listeners: dict[ListenerKey, AnyListener] = {}
        self._owner: dict[ListenerKey, ServiceKey] = {}
        self._by_service: dict[ServiceKey, set[ListenerKey]] = {}
        #: What each Service asked for last (its plan), whatever could be applied.
        self._wanted: dict[ServiceKey, tuple[ListenerSpec, ...]] = {}
        #: Services refused an address because another Service holds it.
        self._refused: dict[ListenerKey, set[ServiceKey]] = {}
        #: Closed TCP listeners whose connections are still open; each is retired (its
        #: counters kept in ``_retired``) by the sweep after its last connection ends.
        self._draining: set[TcpListener] = set()
        #: UDP listeners that stopped reading after a handoff but still send their
        #: sessions' replies (``stop_accepting(keep_udp_replies=True)``); closed by ``drain``.
        self._replying: list[UdpListener] = []
        self._unsupported_warned: set[ListenerKey] = set()
        #: Counters of listeners that are gone, so totals never go backwards.
        self._retired: dict[TotalsKey, PortTotals] = {}
        #: One outlier detector per TCP Service port (port_outliers.py).  A lambda: the
        #: owner sets ``on_event`` after construction.
        self._outliers = PortOutliers(
            outliers or OutlierSettings(),
            lambda kind, text: self.on_event(kind, text),  # noqa: PLW0108
        )
        #: ``--endpoint-drain``: resets connections whose endpoint left its pool (the sweep).
        self.endpoint_drain = EndpointDrain()
        #: How TCP listeners made from now on reach endpoints (None: by their address).
        self.dialer: Dialer | None = None
        #: Told ``(kind, sentence)`` when a listener cannot bind (or can again) and when an
        #: endpoint is ejected or returns: the status page's timeline (admin/events.py).
        self.on_event: EventSink = ignore_event

    # -- the control plane's entry point ---------------------------------------------------
    def set_listeners(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        """Make the listeners of ``service`` exactly ``specs`` (empty: remove them all).

        Unchanged listeners are left alone (or their failed open retried), changed ones get
        their pools swapped, new ones are opened and the rest closed; one that cannot be
        opened is kept without a socket, and an exception for one does not stop the others.
        An address another Service holds is refused until that Service lets go of it.
        Raises ``ListenersNotOpen`` after doing all it could when some wanted listener is
        not open; calling ``set_listeners`` again with the same specs retries exactly those.
        """
        if specs:
            self._wanted[service] = tuple(specs)
        else:
            self._wanted.pop(service, None)
        # Affinity is per Service port, across its listeners: forget the tables of ports
        # that went away and pins to endpoints that left every pool of the port.
        self.registry.context.affinity.sync(service, specs)
        released: list[ListenerKey] = []
        failures = self._converge(service, released)
        # Addresses this Service let go of may be wanted by one that was refused them.
        waiting = {s for key in released for s in self._refused.pop(key, ())}
        for other in sorted(waiting - {service}, key=str):
            try:
                self._converge(other, [])
            except Exception:
                log.exception("%s: taking over a released address failed", other)
        if failures:
            raise ListenersNotOpen(service, failures)

    def _converge(
        self, service: ServiceKey, released: list[ListenerKey]
    ) -> dict[ListenerKey, BaseException]:
        """Bring ``service``'s listeners to its wanted specs; return what failed."""
        wanted = self._claim(service, self._wanted.get(service, ()))
        failures: dict[ListenerKey, BaseException] = {}
        for key in self._by_service.get(service, set()) - wanted.keys():
            released.append(key)
            try:
                self._remove(key)
            except Exception as exc:  # the socket is closed all the same (Listener.close)
                log.exception("%s: closing %s failed", service, key)
                failures[key] = exc
        for key, spec in wanted.items():
            try:
                listener = self._create_or_update(service, key, spec)
            except Exception as exc:
                failures[key] = exc
            else:
                if listener.bind_error is not None:
                    failures[key] = listener.bind_error
        owned = {key for key in wanted if self._owner.get(key) == service}
        if owned:
            self._by_service[service] = owned
        else:
            self._by_service.pop(service, None)
        self._outliers.update(service, {key: wanted[key] for key in owned}, self.listeners)
        return failures

    def _claim(
        self, service: ServiceKey, specs: Sequence[ListenerSpec]
    ) -> dict[ListenerKey, ListenerSpec]:
        """The specs ``service`` may have: not SCTP, not an address another Service holds."""
        wanted: dict[ListenerKey, ListenerSpec] = {}
        for spec in specs:
            key = spec.key
            if spec.spn.protocol is Protocol.SCTP:
                if key not in self._unsupported_warned:
                    self._unsupported_warned.add(key)
                    log.warning("%s: SCTP is not proxied by userproxy", spec.spn)
                continue
            owner = self._owner.get(key)
            if owner is not None and owner != service:
                refused = self._refused.setdefault(key, set())
                if service not in refused:
                    refused.add(service)
                    log.error(
                        "%s: %s:%d is already served for Service %s; not listening",
                        spec.spn,
                        spec.ip,
                        spec.port,
                        owner,
                    )
                continue
            wanted[key] = spec
        asked = {spec.key for spec in specs}
        for key, refused in list(self._refused.items()):
            if service in refused and key not in asked:
                refused.discard(service)  # no longer asks for it
                if not refused:
                    del self._refused[key]
        return wanted

    def _create_or_update(
        self, service: ServiceKey, key: ListenerKey, spec: ListenerSpec
    ) -> AnyListener:
        """The listener for ``key``, created, updated or retried as ``spec`` needs."""
        listener = self.listeners.get(key)
        if listener is None:
            listener = self._new_listener(spec)
            self.listeners[key] = listener
            self._owner[key] = service
            self._note_bind(listener, None)
            return listener
        before = listener.bind_error
        if listener.spec != spec:
            listener.update(spec)
        else:
            listener.retry_bind()
        self._note_bind(listener, before)
        return listener

    def _note_bind(self, listener: AnyListener, before: OSError | None) -> None:
        """Tell ``on_event`` when ``listener``'s bind error began, changed or ended (its
        own log lines say the same; a retry failing alike says nothing)."""
        after = listener.bind_error
        spec = listener.spec
        where = f"{spec.spn}: {spec.ip}:{spec.port}"
        if after is not None and (before is None or before.errno != after.errno):
            self.on_event("bind", f"{where}: cannot listen: {after.strerror or after}")
        elif before is not None and after is None and listener.listening:
            self.on_event("bind", f"{where}: listening now (the bind error is over)")

    def _new_listener(self, spec: ListenerSpec) -> AnyListener:
        if spec.spn.protocol is Protocol.UDP:
            udp = UdpListener(spec, self.registry, self.udp_sessions, self.node_local)
            udp.access_log = self.access_log
            return udp
        tcp = TcpListener(spec, self.registry, self.limit, self.node_local, self.dialer)
        tcp.access_log = self.access_log
        return tcp

    def _remove(self, key: ListenerKey) -> None:
        listener = self.listeners.pop(key)
        self._owner.pop(key, None)
        listener.close()
        if isinstance(listener, TcpListener) and listener.connections:
            # No deadline: established connections outlive their Service, as with
            # kube-proxy's conntrack (reset only at process shutdown, see ``drain``).
            self._draining.add(listener)
        else:
            self._retire(listener)

    def _retire(self, listener: AnyListener) -> None:
        self._retired.setdefault(_totals_key(listener), PortTotals()).add(listener)

    # -- views -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[AnyListener]:
        return iter(self.listeners.values())

    def connections(self) -> Iterator[Relayed]:
        for listener in (*self.listeners.values(), *self._draining):
            if isinstance(listener, TcpListener):
                yield from listener.connections

    @property
    def conflicts(self) -> int:
        """(address, Service) pairs refused now because another Service holds the address
        (``userproxy_listener_conflicts``): each is also logged once, when it begins."""
        return sum(len(services) for services in self._refused.values())

    def outliers(self, spn: ServicePortName) -> OutlierDetector | None:
        """The outlier detector of a TCP Service port served now."""
        return self._outliers.get(spn)

    def ejections(
        self, part: Sequence[ServicePortName] | None = None, into: EjectionCounts | None = None
    ) -> EjectionCounts:
        """``PortOutliers.ejections``: for the metrics and the status pages."""
        return self._outliers.ejections(part, into)

    def ejecting_ports(self) -> list[ServicePortName]:
        """The Service ports with an outlier detector now."""
        return self._outliers.ports()

    def totals(self) -> dict[TotalsKey, PortTotals]:
        """Counters per service port and protocol (metrics: read in slices there)."""
        result = self.retired_totals()
        self.add_totals(result, self.all_listeners())
        return result

    def retired_totals(self) -> dict[TotalsKey, PortTotals]:
        """A copy of the counters of the listeners gone (the base of ``totals``)."""
        return {key: dataclasses.replace(t) for key, t in self._retired.items()}

    def all_listeners(self) -> list[AnyListener]:
        """Every listener serving or draining now."""
        return [*self.listeners.values(), *self._draining]

    @staticmethod
    def add_totals(result: dict[TotalsKey, PortTotals], listeners: Iterable[AnyListener]) -> None:
        """Add ``listeners``' counters and what they hold open to ``result``."""
        for listener in listeners:
            totals = result.setdefault(_totals_key(listener), PortTotals())
            totals.add(listener)
            if isinstance(listener, UdpListener):
                totals.sessions_active += len(listener.sessions)
            else:
                totals.active += len(listener.connections)
                for conn in listener.connections:
                    totals.bytes_up += conn.bytes_up
                    totals.bytes_down += conn.bytes_down
            totals.listening += listener.listening
            totals.bind_errors += listener.bind_error is not None

    # -- timeouts --------------------------------------------------------------------------
    def retry_binds_soon(self) -> None:
        """Retry the failed binds at the next sweep, not a retry interval later (after a
        handoff: an address the old process opened after it listed its sockets is free
        now)."""
        self._last_bind_retry = float("-inf")

    async def run_sweeper(self) -> None:
        """Forever: ``sweep`` once a second."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            await self.sweep(asyncio.get_running_loop().time())

    async def sweep(self, now: float) -> None:
        """Returns from ejection, bind retries, TCP idle and half-close timeouts, endpoint
        drain (``--endpoint-drain``), retiring drained listeners: a walk over every
        listener and connection, in slices (with 10 000 listeners one walk takes 5-10 ms,
        which must not hold the loop at once).

        What changes between two slices is seen at the next sweep: the walk goes over
        snapshots, and a connection that ended meanwhile is skipped (its transports are
        gone: a reset through one could touch a reused descriptor)."""
        self.udp_sessions.expire(now)
        slicer = Slicer(every=256)
        for detector in self._outliers.detectors():
            detector.refresh()  # a return is logged on time even without traffic
            await slicer.tick()
        if now - self._last_bind_retry >= BIND_RETRY_INTERVAL:
            self._last_bind_retry = now
            for listener in list(self.listeners.values()):
                before = listener.bind_error
                if before is not None and not listener.closed:
                    listener.retry_bind()
                    self._note_bind(listener, before)
                await slicer.tick()
        walked = [*self.listeners.values(), *self._draining]
        await sweep_timeouts(now, walked, self.timeouts, slicer)
        await self.endpoint_drain.sweep(now, walked, slicer)
        for listener in [d for d in self._draining if not d.connections]:
            self._draining.discard(listener)
            self._retire(listener)

    # -- shutdown --------------------------------------------------------------------------
    def stop_accepting(self, *, keep_udp_replies: bool = False) -> None:
        """Close every listener; open TCP connections go on.  UDP sessions end now, or
        with ``keep_udp_replies`` (a handoff: a successor reads the same sockets) go on
        until they expire or ``drain`` ends them, their replies still sent from the
        listening socket."""
        for key in list(self.listeners):
            listener = self.listeners.pop(key)
            if isinstance(listener, UdpListener):
                listener.session_end = DRAINED  # its sessions end now, for the access log
                if keep_udp_replies:
                    listener.stop_reading()
                    self._replying.append(listener)
                    continue
            listener.close_reason = None  # the proxy logs one line for them all
            listener.close()
            if isinstance(listener, TcpListener):
                self._draining.add(listener)
            else:
                self._retire(listener)
        self._owner.clear()
        self._by_service.clear()
        self._wanted.clear()
        self._refused.clear()

    def sessions_replying(self) -> int:
        """UDP sessions still open on listeners that stopped reading (a handoff)."""
        return sum(len(listener.sessions) for listener in self._replying)

    async def drain(self, grace: float) -> int:
        """Wait up to ``grace`` seconds for open connections to end; abort the rest; end
        the UDP sessions kept for replies.

        Returns the number of connections that had to be aborted.
        """
        try:
            async with asyncio.timeout(grace):
                await self.limit.wait_empty()
        except TimeoutError:
            pass
        for udp in self._replying:
            udp.close_reason = None
            udp.close()
            self._retire(udp)
        self._replying.clear()
        left = list(self.connections())
        for listener in (*self.listeners.values(), *self._draining):
            if isinstance(listener, TcpListener):
                listener.abort_all()
        self._draining.clear()
        if left:
            # Let the aborts reach connection_lost before the loop goes away.
            await asyncio.sleep(0)
        return len(left)
