"""Proxy health, as kube-proxy's health server judges it.

* live: no queued change has waited longer than ``2 x syncPeriod`` unapplied (a stuck sync
  loop is the failure this catches);
* healthy (``/healthz``): live, and the own Node is eligible: it has no deletionTimestamp
  and no ``ToBeDeletedByClusterAutoscaler`` taint, so load balancers drain the node before
  it goes away.

Both clocks are injected so the 2 x syncPeriod rule is tested without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from userproxy.control.proxier import Proxier
from userproxy.control.trackers import ChangeRecorder


def rfc3339(timestamp: float | None) -> str:
    """A UNIX time as Go's time.Time marshals it (RFC 3339, UTC); zero time when None."""
    if timestamp is None:
        return "0001-01-01T00:00:00Z"
    text = datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class HealthReport:
    live: bool
    node_eligible: bool
    last_updated: float | None  # wall clock of the last applied sync
    current_time: float  # wall clock
    #: Handed its listening sockets to a successor (``--handoff-socket``) and finishing
    #: what it holds: alive, but not the node's service proxy any more.
    draining: bool = False

    @property
    def healthy(self) -> bool:
        return self.live and self.node_eligible and not self.draining

    def livez_body(self) -> dict[str, object]:
        return {
            "lastUpdated": rfc3339(self.last_updated),
            "currentTime": rfc3339(self.current_time),
        }

    def healthz_body(self) -> dict[str, object]:
        body = {**self.livez_body(), "nodeEligible": self.node_eligible}
        if self.draining:  # only then: kube-proxy's body otherwise, field for field
            body["draining"] = True
        return body


class HealthState:
    """Reads the recorder (oldest pending change) and the proxier (last sync, Node)."""

    def __init__(
        self,
        recorder: ChangeRecorder,
        proxier: Proxier,
        sync_period: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.recorder = recorder
        self.proxier = proxier
        self.timeout = 2 * sync_period
        #: Set once the proxy handed off its listening sockets (``HealthReport.draining``).
        self.draining = False
        self._clock = clock
        self._wall_clock = wall_clock

    def report(self) -> HealthReport:
        now = self._clock()
        queued = self.recorder.queued_at
        live = queued is None or now - queued <= self.timeout
        node = self.proxier.state.node
        eligible = node is None or not (node.deleting or node.to_be_deleted_taint)
        status = self.proxier.status
        wall_now = self._wall_clock()
        last_updated = (
            None if status.last_sync_at is None else wall_now - (now - status.last_sync_at)
        )
        return HealthReport(live, eligible, last_updated, wall_now, self.draining)
