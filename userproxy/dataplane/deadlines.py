"""The deadlines of open TCP connections, enforced by the listener set's sweep once a
second: ``--tcp-fin-timeout`` (half-closed too long) and ``--tcp-idle-timeout`` (nothing
moved too long).  (``--endpoint-drain``, the third, is in endpoint_drain.py.)

Invariants: the walk goes over a snapshot of each listener's connections, in slices, and
skips a connection that ended since (its transports are gone: a reset through one could
touch a reused descriptor); a connection past a deadline is reset on both sides (``abort``)
with the deadline as its end, never closed cleanly.  Activity is seen through the relays'
``active`` flag, which the sweep clears: a connection is idle once a whole ``idle`` has
passed since a sweep found it inactive, so idleness is measured to about a second.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from userproxy.dataplane.access_log import HALF_CLOSE_TIMEOUT, IDLE_TIMEOUT
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.slices import Slicer

log = logging.getLogger(__name__)

__all__ = ["TcpTimeouts", "sweep_timeouts"]


@dataclass(frozen=True, slots=True)
class TcpTimeouts:
    """``fin`` bounds a half-closed connection; ``idle`` (None = off) an idle one.  A
    removed listener's connections have no deadline of their own (listener_set.py)."""

    fin: float = 120.0
    idle: float | None = None


async def sweep_timeouts(
    now: float, listeners: Iterable[object], timeouts: TcpTimeouts, slicer: Slicer
) -> None:
    """Reset the connections of ``listeners`` past their half-close or idle deadline."""
    fin, idle = timeouts.fin, timeouts.idle
    for listener in listeners:
        await slicer.tick()
        if not isinstance(listener, TcpListener) or not listener.connections:
            continue
        for conn in list(listener.connections):
            await slicer.tick()
            if conn.finished:
                continue  # ended since the snapshot: its transports are gone
            if conn.half_closed_at is not None and now - conn.half_closed_at >= fin:
                log.debug("closing a connection half-closed for %.0fs", fin)
                conn.abort(HALF_CLOSE_TIMEOUT)
                continue
            if idle is not None:
                if conn.active:
                    conn.active = False
                    conn.idle_since = now
                elif now - conn.idle_since >= idle:
                    log.debug("closing a connection idle for %.0fs", idle)
                    conn.abort(IDLE_TIMEOUT)
