"""Passive health: outlier ejection of endpoints whose dials keep failing, per Service port.

Modelled on Envoy's outlier detection (``consecutive_local_origin_failure`` /
``consecutive_gateway_failure`` with ``base_ejection_time``, ``max_ejection_time`` and
``max_ejection_percent``) and HAProxy's ``observe layer4``: an endpoint whose dials fail
``consecutive_failures`` times in a row (refused, timed out, unreachable) is ejected for
``base_ejection`` seconds times the number of ejections it had in a row, at most
``max_ejection``; a successful dial resets its failure count, and a successful dial after
it came back resets the ejection streak too.  A connection that the endpoint resets before
any byte came back counts as a failed dial, so a dial counts as successful when its
connection ends otherwise (``ObservedUpstream``).  Kubernetes readiness stays the primary
signal: ejection only covers the gap until it catches up, and an endpoint that leaves the
Service port's pools is forgotten (``set_endpoints``).

Ejection never touches a balancer: the dial ladder passes ``excluding(tried)`` as the
``exclude`` argument of ``Balancer.pick``, which prefers endpoints not excluded and falls
back to excluded ones when every endpoint is (so with all endpoints ejected, traffic goes
to all of them, as Envoy's panic threshold does).

Invariants: ``ejected`` (by address: ``Endpoint`` hashes in Python, an address tuple in C)
holds exactly the endpoints ejected now (once due ones were
returned by ``refresh``), each one of the known endpoints; an ejection happens only while
fewer than ``min(max(1, known * max_ejected_percent // 100), known - 1)`` are out (so the
sole endpoint of a Service port is never ejected; a pool that shrinks later can be all
ejected, and then the balancer's fallback sends to all); ``ejections`` only grows.  The
pick path costs one truthiness test when nothing is ejected, else a clock read and one
small view object per dial attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass

from userproxy.config_rules import format_duration
from userproxy.dataplane.tcp_relay import DownstreamProtocol, UpstreamProtocol
from userproxy.model import Endpoint

log = logging.getLogger(__name__)

Address = tuple[str, int]

#: Where the data plane tells what happened, as ``(kind, sentence)``: the status page's
#: timeline (admin/events.py ``EventLog.add``); never raises, never blocks.
EventSink = Callable[[str, str], None]


def ignore_event(kind: str, message: str) -> None:
    """The ``EventSink`` of a proxy without a timeline (tests, ``userproxy check``)."""


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    """``consecutive_failures`` 0 turns ejection off.  Durations in seconds."""

    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejected_percent: int = 50

    @property
    def enabled(self) -> bool:
        return self.consecutive_failures > 0


@dataclass(frozen=True, slots=True)
class Ejection:
    """One ejected endpoint as the status page and the metrics show it."""

    endpoint: Endpoint
    #: The detector's clock (monotonic) when it returns, the seconds left until then,
    #: and how long it is out for in all.
    until: float
    remaining: float
    duration: float
    #: Ejections in a row, this one included (the duration's multiplier).
    streak: int


class _State:
    """What the detector remembers of one endpoint (by address)."""

    __slots__ = ("capped", "failures", "streak", "until")

    def __init__(self) -> None:
        self.failures = 0
        self.streak = 0
        self.until: float | None = None
        #: The cap kept it in once already in this run of failures (logged once).
        self.capped = False


class Excluding:
    """``tried`` plus the ejected endpoints, as one ``Container`` for ``Balancer.pick``;
    built per dial attempt while some endpoint is ejected, it reads both live (no copy)."""

    __slots__ = ("out", "tried")

    def __init__(self, out: set[Address], tried: list[Endpoint]) -> None:
        self.out = out
        self.tried = tried

    def __contains__(self, endpoint: object) -> bool:
        if not isinstance(endpoint, Endpoint):
            return False
        return (endpoint.ip, endpoint.port) in self.out or endpoint in self.tried


class OutlierDetector:
    """The ejection state of one Service port, shared by all of its listeners."""

    __slots__ = (
        "_clock",
        "_endpoints",
        "_next_return",
        "_out",
        "_state",
        "ejections",
        "name",
        "on_event",
        "settings",
    )

    def __init__(
        self,
        name: str,
        settings: OutlierSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The Service port in log lines (``namespace/name:port/TCP``).
        self.name = name
        self.settings = settings
        self._clock = clock
        #: The known endpoints by address (the union of the Service port's pools).
        self._endpoints: dict[Address, Endpoint] = {}
        self._state: dict[Address, _State] = {}
        #: The addresses of the endpoints ejected now (kept as one set object: views
        #: read it live).
        self._out: set[Address] = set()
        #: Told each ejection and return (set by the listener set).
        self.on_event: EventSink = ignore_event
        #: The earliest ``until`` among the ejected (inf: none), so ``refresh`` is O(1)
        #: until one is due.
        self._next_return = float("inf")
        self.ejections = 0

    # -- the pool ------------------------------------------------------------------------
    def set_endpoints(self, endpoints: Iterable[Endpoint]) -> None:
        """The Service port's endpoints now: the state of those that left is forgotten (no
        return is logged for them: readiness took over); an ejected endpoint whose
        conditions changed (ready -> terminating) stays ejected under its new value."""
        known = {(e.ip, e.port): e for e in endpoints}
        self._endpoints = known
        for address in self._state.keys() - known.keys():
            del self._state[address]
        self._out &= known.keys()
        self._recompute_next()

    # -- the dial ladder's calls ---------------------------------------------------------
    @property
    def ejected(self) -> set[Endpoint]:
        """The endpoints ejected now (a copy, for views and tests)."""
        return {self._endpoints[address] for address in self._out}

    def excluding(self, tried: list[Endpoint]) -> Container[Endpoint]:
        """What ``Balancer.pick`` must avoid: ``tried`` and the ejected endpoints (called
        per dial attempt; ``tried`` itself while nothing is ejected)."""
        if not self._out:
            return tried
        self.refresh()
        return Excluding(self._out, tried) if self._out else tried

    def failure(self, endpoint: Endpoint) -> None:
        """A dial to ``endpoint`` failed (refused, timed out, reset before any byte)."""
        settings = self.settings
        if not settings.enabled:
            return
        address = (endpoint.ip, endpoint.port)
        if address not in self._endpoints:
            return  # it left the pool meanwhile: readiness has spoken
        state = self._state.get(address)
        if state is None:
            state = self._state[address] = _State()
        if state.until is not None:
            return  # already out; failures of dials begun before are not news
        state.failures += 1
        if state.failures >= settings.consecutive_failures:
            self._eject(address, state)

    def success(self, endpoint: Endpoint) -> None:
        """A dial to ``endpoint`` succeeded: its failure count (and, once it is back, its
        ejection streak) starts again."""
        state = self._state.get((endpoint.ip, endpoint.port))
        if state is None:
            return
        if state.until is None:
            del self._state[(endpoint.ip, endpoint.port)]
        else:
            state.failures = 0

    def refresh(self) -> None:
        """Return the endpoints whose ejection is over (also called by the sweeper, so a
        return is logged on time even without traffic)."""
        if not self._out:
            return
        now = self._clock()
        if now < self._next_return:
            return
        for address, state in self._state.items():
            if state.until is not None and state.until <= now:
                state.until = None
                state.failures = 0
                state.capped = False
                endpoint = self._endpoints[address]
                self._out.discard(address)
                times = f"{state.streak} time{'' if state.streak == 1 else 's'}"
                log.info(
                    "%s: endpoint %s is back from ejection (ejected %s in a row)",
                    self.name,
                    endpoint,
                    times,
                )
                self.on_event(
                    "ejection", f"{self.name}: {endpoint} is back (ejected {times} in a row)"
                )
        self._recompute_next()

    # -- views -----------------------------------------------------------------------------
    def status(self) -> list[Ejection]:
        """The endpoints ejected now, with the time each returns (for status and metrics)."""
        self.refresh()
        now = self._clock()
        result = []
        for address, state in self._state.items():
            if state.until is not None:
                result.append(
                    Ejection(
                        self._endpoints[address],
                        state.until,
                        max(0.0, state.until - now),
                        self._duration(state.streak),
                        state.streak,
                    )
                )
        return sorted(result, key=lambda e: (e.endpoint.ip, e.endpoint.port))

    @property
    def max_ejected(self) -> int:
        """How many of the known endpoints may be out at once: the percentage, at least one
        (Envoy's rule), and never all of them."""
        known = len(self._endpoints)
        share = known * self.settings.max_ejected_percent // 100
        return min(max(1, share), known - 1)

    # -- internals -------------------------------------------------------------------------
    def _duration(self, streak: int) -> float:
        settings = self.settings
        return min(settings.base_ejection * streak, settings.max_ejection)

    def _eject(self, address: Address, state: _State) -> None:
        endpoint = self._endpoints[address]
        self.refresh()  # a due return frees room under the cap first
        if len(self._out) >= self.max_ejected:
            if not state.capped:
                state.capped = True
                log.warning(
                    "%s: endpoint %s failed %d dials in a row but is not ejected: %d of %d "
                    "endpoints are already out (at most %d%%, never the last one)",
                    self.name,
                    endpoint,
                    state.failures,
                    len(self._out),
                    len(self._endpoints),
                    self.settings.max_ejected_percent,
                )
            return
        failures = state.failures
        state.streak += 1
        duration = self._duration(state.streak)
        state.until = self._clock() + duration
        state.failures = 0
        state.capped = False
        self._out.add(address)
        self.ejections += 1
        self._next_return = min(self._next_return, state.until)
        log.warning(
            "%s: endpoint %s ejected for %s after %d failed dials in a row "
            "(ejection %d in a row; %d of %d endpoints out)",
            self.name,
            endpoint,
            format_duration(duration),
            failures,
            state.streak,
            len(self._out),
            len(self._endpoints),
        )
        self.on_event(
            "ejection",
            f"{self.name}: {endpoint} ejected for {format_duration(duration)} after "
            f"{failures} failed dials in a row",
        )

    def _recompute_next(self) -> None:
        self._next_return = min(
            (s.until for s in self._state.values() if s.until is not None),
            default=float("inf"),
        )


class ObservedUpstream(UpstreamProtocol):
    """The upstream side of a connection that reports how it ended to its detector: a
    reset before any byte came back is a failed dial (the endpoint accepted and then gave
    up: a crashing process, a full accept queue behind a proxy), anything else a success.

    The verdict waits for the end because the success must not wipe out the failure count
    before a reset could count (HAProxy's ``observe layer4`` sees the same).  One call at
    the end of each connection; nothing per read.
    """

    __slots__ = ("detector", "endpoint")

    def __init__(
        self, conn: DownstreamProtocol, detector: OutlierDetector, endpoint: Endpoint
    ) -> None:
        super().__init__(conn)
        self.detector = detector
        self.endpoint = endpoint

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is not None:  # None: refused as a second upstream, says nothing of it
            if exc is not None and not conn.bytes_down:
                self.detector.failure(self.endpoint)
            else:
                self.detector.success(self.endpoint)
        super().connection_lost(exc)


#: The detector of a listener no Service port's detector was given to: it ejects nothing
#: and keeps no state (``failure`` returns at once when disabled).
NO_EJECTION = OutlierDetector("", OutlierSettings(consecutive_failures=0))


def union(endpoint_lists: Iterable[Sequence[Endpoint]]) -> list[Endpoint]:
    """The endpoints of several pools, each once (by address, the first seen kept)."""
    seen: dict[Address, Endpoint] = {}
    for endpoints in endpoint_lists:
        for endpoint in endpoints:
            seen.setdefault((endpoint.ip, endpoint.port), endpoint)
    return list(seen.values())
