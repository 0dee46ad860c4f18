"""``--endpoint-drain DURATION``: reset TCP connections whose endpoint left its pool.

kube-proxy keeps an established connection to an endpoint that left its Service (conntrack
goes on forwarding it) until one side ends it; so does userproxy by default.  Envoy and
HAProxy can drain instead: after a grace, connections to a removed host are closed, which
frees the old pod to terminate and moves long-lived clients (database pools, gRPC
channels, WebSockets) to the current endpoints.  The price: those clients see a reset and
must reconnect, so DURATION should be longer than the longest ordinary request.

Invariants: ``_since`` holds exactly the (listener, endpoint address) pairs the last sweep
found with an open connection and the endpoint out of the listener's pools (a closed
listener, whose Service or address went away, has none), with the time a sweep first saw
the pair so; a connection is reset (``ENDPOINT_DRAINED``, both sides, never a clean end:
a FIN mid-stream would make a cut transfer look complete) once its pair has been out for
``after`` seconds.  An endpoint that comes back before that keeps its connections.  UDP
needs none of this: a session whose endpoint left moves to a current one at its next
datagram (``endpoint_removed``), as kube-proxy clears a removed endpoint's UDP conntrack.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from userproxy.dataplane.access_log import ENDPOINT_DRAINED
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.slices import Slicer

log = logging.getLogger(__name__)

__all__ = ["EndpointDrain"]

_Pair = tuple[int, tuple[str, int]]  # (id of the listener, endpoint address)


class EndpointDrain:
    """Resets connections to endpoints out of their pool for ``after`` seconds (None: off)."""

    def __init__(self, after: float | None = None) -> None:
        self.after = after
        self._since: dict[_Pair, float] = {}

    async def sweep(self, now: float, listeners: Iterable[object], slicer: Slicer) -> int:
        """One pass over ``listeners``' TCP connections; the number reset."""
        after = self.after
        if after is None:
            self._since.clear()
            return 0
        seen: dict[_Pair, float] = {}
        reset = 0
        for listener in listeners:
            await slicer.tick()
            if not isinstance(listener, TcpListener) or not listener.connections:
                continue
            current: set[tuple[str, int]] = set()
            if not listener.closed:
                for pool in (listener.pool, listener.node_pool):
                    if pool is not None:
                        current.update(e.address for e in pool.spec.endpoints)
            for conn in list(listener.connections):
                endpoint = conn.endpoint
                if conn.finished or endpoint is None or endpoint.address in current:
                    continue
                pair = (id(listener), endpoint.address)
                since = seen[pair] = self._since.get(pair, now)
                if now - since >= after:
                    conn.abort(ENDPOINT_DRAINED)
                    reset += 1
        self._since = seen
        if reset:
            log.info(
                "reset %d connections to endpoints that left their pool %gs or more ago "
                "(--endpoint-drain)",
                reset,
                after,
            )
        return reset
