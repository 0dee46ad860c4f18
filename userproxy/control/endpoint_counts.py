"""Endpoints by state per Service port, and the INFO line when those counts change.

Every endpoint of a Service port (all families, whatever the traffic policy or topology
hints select) is in exactly one state, after the EndpointSlice conditions upstream's
``pkg/proxy/topology.go`` reads:

* ``ready``: ``ready`` (the endpoint gets new connections);
* ``serving_terminating``: not ready, but ``serving`` and ``terminating`` (used only when a
  pool has no ready endpoint: kube-proxy's terminating-endpoint fallback, KEP-1669);
* ``not_ready``: the rest (never sent traffic).

``plan_service`` counts them into ``ServicePlan.endpoint_counts``; the proxier hands each
Service's old and new counts to :class:`EndpointCountLog` as it applies a plan, and the
metrics collector reads the counts of the current plans at scrape time
(``userproxy_endpoints{service_port,protocol,state}``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from userproxy.model import Endpoint, ServicePortName

log = logging.getLogger(__name__)

#: Port lines logged at INFO per sync; the rest are summed up in one line (a first sync of
#: 10 000 Services, or a re-list after an outage, must not write 10 000 lines at INFO).
LINES_PER_SYNC = 20
STATES = ("ready", "serving_terminating", "not_ready")


@dataclass(frozen=True, slots=True)
class EndpointCount:
    """How many endpoints of one Service port are in each state."""

    spn: ServicePortName
    ready: int = 0
    serving_terminating: int = 0
    not_ready: int = 0

    @property
    def service_port(self) -> str:
        """The ``service_port`` metric label: "namespace/name:port" (":port" only if named)."""
        spn = self.spn
        port = f":{spn.port}" if spn.port else ""
        return f"{spn.namespace}/{spn.name}{port}"

    def by_state(self) -> tuple[tuple[str, int], ...]:
        return (
            ("ready", self.ready),
            ("serving_terminating", self.serving_terminating),
            ("not_ready", self.not_ready),
        )


def count_endpoints(spn: ServicePortName, endpoints: Iterable[Endpoint]) -> EndpointCount:
    """The states of ``endpoints`` (all families of one Service port) counted."""
    ready = serving_terminating = not_ready = 0
    for endpoint in endpoints:
        if endpoint.ready:
            ready += 1
        elif endpoint.serving and endpoint.terminating:
            serving_terminating += 1
        else:
            not_ready += 1
    return EndpointCount(spn, ready, serving_terminating, not_ready)


def describe(old: EndpointCount | None, new: EndpointCount | None) -> str | None:
    """The change as one line (e.g. "default/web:http/TCP: 3 -> 2 ready endpoints (1 not
    ready)"), or None if unchanged.

    The ready count is always named (it is what serves); the other states are named when
    they are not zero now."""
    if old == new:
        return None
    before = old.ready if old is not None else 0
    if new is None:
        assert old is not None  # they differ
        return f"{old.spn}: {before} -> 0 ready endpoints (port removed)"
    spn, after = new.spn, new.ready
    others = [f"{count} {state.replace('_', ' ')}" for state, count in new.by_state()[1:] if count]
    tail = f" ({', '.join(others)})" if others else ""
    return f"{spn}: {before} -> {after} ready endpoints{tail}"


class EndpointCountLog:
    """Logs the count changes of each sync: one line per changed Service port as the plan is
    applied (``note``: before its listeners change, so the cause comes first), the first
    ``lines`` of a sync at INFO, the rest at DEBUG and counted in one line at the sync's end
    (``flush``).

    Off (``enabled`` False) by default: ``userproxy check`` plans without serving and has no
    use for the lines; the proxy turns it on."""

    def __init__(self, enabled: bool = False, lines: int = LINES_PER_SYNC) -> None:
        self.enabled = enabled
        self.lines = lines
        #: Told of every changed Service port, (before, after), logging or not (the status
        #: page's timeline listens here).
        self.on_change: Callable[[EndpointCount | None, EndpointCount | None], None] | None = None
        self._logged = 0
        self._held = 0

    def note(self, old: Iterable[EndpointCount], new: Iterable[EndpointCount]) -> None:
        """One Service's counts before and after a plan was applied."""
        if not self.enabled and self.on_change is None:
            return
        before: Mapping[ServicePortName, EndpointCount] = {c.spn: c for c in old}
        after: Mapping[ServicePortName, EndpointCount] = {c.spn: c for c in new}
        for spn in sorted(before.keys() | after.keys(), key=str):
            line = describe(before.get(spn), after.get(spn))
            if line is None:
                continue
            if self.on_change is not None:
                self.on_change(before.get(spn), after.get(spn))
            if not self.enabled:
                continue
            if self._logged < self.lines:
                self._logged += 1
                log.info("%s", line)
            else:
                self._held += 1
                log.debug("%s", line)

    def flush(self, sync: int) -> None:
        """The sync numbered ``sync`` has ended: say how many lines went to DEBUG only."""
        if self._held:
            log.info(
                "sync %d: %d more Service ports changed their endpoint counts (logged at "
                "DEBUG; all are in /metrics as userproxy_endpoints)",
                sync,
                self._held,
            )
        self._logged = self._held = 0
