"""Bulk work on the event loop in slices, so the data plane is never held up for long.

A node's service proxy must keep relaying while it takes in 40 000 Services, so manifest
reloads and syncs work in slices of a few milliseconds with a yield to the loop between.
The slices alone are not enough: while a bulk change grows the heap, Python's cyclic
garbage collector walks all of it each time the long-lived objects grow by a quarter
(100-300 ms apiece with 40 000 Services).  So a bulk slicer moves everything alive into
the collector's permanent generation (``gc.freeze()``) at each yield: the long-lived
Services, plans and listeners are skipped, and reference counting still frees them.  The
cost: cyclic garbage that happens to be unreachable but not yet collected at one of
those instants is never collected.  So what a bulk change removes must be freed by
reference counting alone: no reference cycle in the model, the plans or the listeners
(a TcpListener and its compiled fast path referred to each other until ``close`` broke
it: 10-minute soaks writing big manifests grew to 1 GB that way).  What remains are the
few connections and tasks in flight at such an instant: bounded and small.
"""

from __future__ import annotations

import asyncio
import gc
import time

__all__ = ["SLICE_SECONDS", "Slicer"]

#: Work done between two yields to the loop (seconds).
SLICE_SECONDS = 0.005


class Slicer:
    """``await tick()`` after each unit of work; it yields once a slice is used up.

    The clock is read every ``every`` ticks, so a tick costs next to nothing.  A slice
    lasts ``seconds`` (default ``SLICE_SECONDS``).  With ``bulk=True`` each yield also
    freezes the heap.
    """

    __slots__ = ("_bulk", "_every", "_seconds", "_started", "_ticks")

    def __init__(
        self, *, every: int = 64, bulk: bool = False, seconds: float = SLICE_SECONDS
    ) -> None:
        self._started = time.perf_counter()
        self._ticks = 0
        self._every = every
        self._bulk = bulk
        self._seconds = seconds

    async def tick(self) -> None:
        self._ticks += 1
        if self._ticks % self._every == 0:
            await self.check()

    async def check(self) -> None:
        """Yield if the slice is used up."""
        if time.perf_counter() - self._started >= self._seconds:
            if self._bulk:
                gc.freeze()
            await asyncio.sleep(0)
            self._started = time.perf_counter()
