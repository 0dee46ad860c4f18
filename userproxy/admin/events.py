"""The status page's timeline: a bounded log of what the syncs changed, in words.

``EventLog`` keeps the last ``EVENTS`` events: one per sync that changed something, one per
Service port whose count of ready endpoints changed ("default/web:http 3 -> 2 ready
endpoints"), told by the proxier's ``EndpointCountLog`` (control/endpoint_counts.py) as
each changed plan is applied, the same source as the INFO lines, so nothing is counted
twice; and one when Services could not be applied.  Between syncs, what the other parts
report through the callbacks they already have: manifests that could not be reloaded
(``ManifestSource(on_reload_error=...)``), the API watch restarting, re-listing or failing
(``KubernetesSource(on_event=...)``), listeners that cannot bind and outlier ejections
(``ListenerSet.on_event``).  Served in ``/status`` and on ``/`` (admin/status.py);
docs/status.md.

Invariant: memory is bounded (``size`` events) and a burst of one repeated event (an API
outage retried every few seconds) takes one entry, counted, not the whole timeline.

``generation`` counts the events ever added or repeated; :meth:`EventLog.wait_added` lets
the live page's notifier (admin/live.py) sleep until it moves, instead of polling.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from userproxy.control.endpoint_counts import EndpointCount
from userproxy.control.proxier import SyncStatus
from userproxy.model import Protocol, ServicePortName
from userproxy.sources.manifest_read import ManifestError

__all__ = ["EVENTS", "REPEAT_WINDOW", "SOURCE_EVENTS", "Event", "EventLog", "port_label"]

#: Events the timeline keeps (older ones are dropped first).
EVENTS = 200

#: A repeat of the last event within this many seconds is counted on it, not added.
REPEAT_WINDOW = 60.0

#: What the API source's events (sources/reflector.py ``EventKind``) say on the timeline.
SOURCE_EVENTS = {
    "watch_restart": "watch broke or was closed early; resuming it",
    "relist": "watch fell too far behind (410 Gone); re-listing",
    "api_error": "API request failed; retrying with backoff",
    "invalid_object": "invalid object skipped (see the log)",
}

Json = dict[str, object]


def port_label(spn: ServicePortName) -> str:
    """``namespace/name:port`` (``/UDP`` appended for a non-TCP port), as the timeline says it."""
    port = f":{spn.port}" if spn.port else ""
    proto = "" if spn.protocol is Protocol.TCP else f"/{spn.protocol}"
    return f"{spn.namespace}/{spn.name}{port}{proto}"


@dataclass(frozen=True, slots=True)
class Event:
    """One timeline entry: wall-clock ``time`` (UNIX seconds, of the latest repeat), a
    ``kind`` ("sync", "endpoints", "error", "reload", "source", "bind", "ejection") and a
    sentence; ``repeats`` counts the same event again within ``REPEAT_WINDOW``."""

    time: float
    kind: str
    message: str
    repeats: int = 0

    def as_json(self) -> Json:
        message = self.message
        if self.repeats:
            message += f" (and {self.repeats} more times)"
        return {"time": round(self.time, 3), "kind": self.kind, "message": message}


class EventLog:
    """A ring buffer of the last ``size`` events, fed by the proxy's syncs.

    ``note_counts`` is called for each Service port whose counts a sync changed;
    ``synced`` then turns what it noted into events.  Memory is bounded: the events by
    ``size``, the notes of one sync by ``size`` (a bulk load of
    10 000 Services keeps the last ones and counts the rest)."""

    def __init__(self, size: int = EVENTS, clock: Callable[[], float] = time.time) -> None:
        self.events: deque[Event] = deque(maxlen=size)
        self._clock = clock
        self._notes: deque[str] = deque(maxlen=size)
        self._noted = 0
        #: Events ever added or repeated (it only grows; the ring buffer forgets).
        self.generation = 0
        #: Set, and dropped, by the next ``add``; made only while someone waits.
        self._added: asyncio.Event | None = None

    def add(self, kind: str, message: str) -> None:
        now = self._clock()
        last = self.events[-1] if self.events else None
        if (
            last is not None
            and last.kind == kind
            and last.message == message
            and now - last.time < REPEAT_WINDOW
        ):
            self.events[-1] = Event(now, kind, message, last.repeats + 1)
        else:
            self.events.append(Event(now, kind, message))
        self._moved()

    def _moved(self) -> None:
        """The timeline changed (an event added, or a repeat counted): wake the waiters."""
        self.generation += 1
        if self._added is not None:
            # Wakes every waiter once; the other adds of the same sync find None (no
            # waiter has run yet), so a sync of 200 events costs one wake-up, not 200.
            self._added.set()
            self._added = None

    async def wait_added(self, seen: int) -> None:
        """Return once ``generation`` is past ``seen`` (at once if it already is)."""
        while self.generation <= seen:
            if self._added is None:
                self._added = asyncio.Event()
            await self._added.wait()

    def source_event(self, kind: str, resource: str) -> None:
        """The API source reported ``kind`` for ``resource`` ("services", ...)."""
        self.add("source", f"{resource}: {SOURCE_EVENTS.get(kind, kind)}")

    def reload_failed(self, error: ManifestError) -> None:
        """Manifests could not be reloaded (the last good state keeps serving): the first
        problem, and how many more the log lists."""
        first = error.problems[0] if error.problems else "unknown problem"
        more = len(error.problems) - 1
        also = f" (and {more} more problems)" if more > 0 else ""
        self.add("reload", f"manifests not reloaded, keeping the last good state: {first}{also}")

    def note_counts(self, old: EndpointCount | None, new: EndpointCount | None) -> None:
        """A Service port's endpoint counts changed (``EndpointCountLog.on_change``, from
        the plans as they are applied): an event when its ready count did."""
        before = old.ready if old is not None else 0
        if new is None:
            if old is not None and before:
                self._note(f"{port_label(old.spn)} {before} -> 0 ready endpoints (port removed)")
        elif new.ready != before:
            self._note(f"{port_label(new.spn)} {before} -> {new.ready} ready endpoints")

    def _note(self, message: str) -> None:
        self._noted += 1
        self._notes.append(message)

    def synced(self, status: SyncStatus) -> None:
        """One sync ended: its summary, then what it changed, then what failed."""
        if status.services_changed or status.slices_changed or self._noted:
            self.add(
                "sync",
                f"sync {status.syncs}: {status.services_changed} Service and "
                f"{status.slices_changed} EndpointSlice changes, {status.services_planned} "
                f"Services planned in {status.last_duration * 1000:.1f} ms",
            )
        if self._noted > len(self._notes):
            self.add("endpoints", f"{self._noted - len(self._notes)} more port changes not shown")
        for message in self._notes:
            self.add("endpoints", message)
        self._notes.clear()
        self._noted = 0
        if status.failed_services:
            self.add("error", f"{status.failed_services} Services could not be applied")

    def as_json(self) -> list[Json]:
        return [event.as_json() for event in self.events]
