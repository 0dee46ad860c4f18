"""A coalescing sync runner, after kube-proxy's BoundedFrequencyRunner.

``request()`` asks for a sync; requests that arrive while one is waiting are merged into
it.  Syncs run at most once per ``min_interval`` on average, with a burst of ``burst``
back-to-back syncs allowed (a token bucket), and at least once per ``max_interval`` even
when nothing asks.  ``min_interval == 0`` runs a sync for every wake-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from userproxy.control.clock import Clock, MonotonicClock

log = logging.getLogger(__name__)


class SyncRunner:
    def __init__(
        self,
        sync: Callable[[], None],
        *,
        min_interval: float,
        max_interval: float,
        burst: int = 2,
        clock: Clock | None = None,
    ) -> None:
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("sync intervals must be positive (min_interval may be 0)")
        self._sync = sync
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._burst = burst
        self._clock = clock or MonotonicClock()
        self._tokens = float(burst)
        self._refilled_at = self._clock.now()
        self._requested = False
        self._wakeup: asyncio.Future[None] | None = None
        self.runs = 0

    def request(self) -> None:
        """Ask for a sync soon; cheap and callable from any handler."""
        self._requested = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def run(self) -> None:
        """Run syncs forever (until cancelled)."""
        last_run = self._clock.now()
        while True:
            if not self._requested:
                await self._wait(last_run + self._max_interval - self._clock.now())
            await self._take_token()
            self._requested = False
            last_run = self._clock.now()
            self.runs += 1
            try:
                self._sync()
            except Exception:
                # A bug in one sync must not end syncing: log it and retry at the next
                # period with the state the sync left.
                log.exception("sync failed")

    async def _wait(self, delay: float) -> None:
        if delay <= 0:
            return
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        sleeper = asyncio.ensure_future(self._clock.sleep(delay))
        try:
            await asyncio.wait({sleeper, self._wakeup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            self._wakeup = None

    async def _take_token(self) -> None:
        if self._min_interval == 0:
            return
        now = self._clock.now()
        rate = 1.0 / self._min_interval
        self._tokens = min(float(self._burst), self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        if self._tokens < 1.0:
            await self._clock.sleep((1.0 - self._tokens) / rate)
            now = self._clock.now()
            self._tokens = min(float(self._burst), self._tokens + (now - self._refilled_at) * rate)
            self._refilled_at = now
        self._tokens -= 1.0
