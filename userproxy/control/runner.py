"""A coalescing sync runner, after kube-proxy's BoundedFrequencyRunner.

``request()`` asks for a sync; requests that arrive while one is waiting are merged into
it.  Syncs run at most once per ``min_interval`` on average, with a burst of ``burst``
back-to-back syncs allowed (a token bucket), and at least once per ``max_interval`` even
when nothing asks.  ``min_interval == 0`` runs a sync for every wake-up.

A sync that fails (returns False, or raises) is retried, as kube-proxy's proxiers call
``RetryAfter`` on the runner after a failed sync: after ``retry_min`` seconds, doubling up
to ``retry_max`` while the syncs keep failing; any sync that runs meanwhile (asked for,
periodic) counts as the retry.  ``retry_after`` lets others ask the same.  The retries
still take tokens, so they never run more often than ``min_interval`` allows.  An exception
is logged with its traceback the first time it is seen, then in one line at most once a
minute.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

#: Delay before retrying a failed sync, doubled after each failure up to RETRY_MAX.
RETRY_MIN = 0.5
RETRY_MAX = 5.0
#: A repeated identical exception is logged (one line) at most this often.
REPEAT_LOG_INTERVAL = 60.0


class SyncRunner:
    def __init__(
        self,
        sync: Callable[[], bool | Awaitable[bool | None] | None],
        *,
        min_interval: float,
        max_interval: float,
        burst: int = 2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_min: float = RETRY_MIN,
        retry_max: float = RETRY_MAX,
    ) -> None:
        """``sync`` returns False (or raises) when it could not apply everything.
        ``clock`` and ``sleep`` are injected so tests step time without sleeping."""
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("sync intervals must be positive (min_interval may be 0)")
        self._sync = sync
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._refilled_at = self._clock()
        self._requested = False
        self._wakeup: asyncio.Future[None] | None = None
        self._retry_min = retry_min
        self._retry_cap = retry_max
        self._retry_max = max(retry_min, min(retry_max, max_interval))
        self._retry_delay = retry_min
        #: When a retry is due (clock time), None when none is.
        self.retry_at: float | None = None
        self._rescheduled = False
        #: Consecutive failed syncs (0 after a sync that applied everything).
        self.failures = 0
        self._last_error: str | None = None
        self._last_error_logged = float("-inf")
        self.runs = 0

    def set_intervals(self, min_interval: float, max_interval: float) -> None:
        """New ``min_interval``/``max_interval`` (a reload of the settings), effective from
        the next wait: the token bucket keeps its tokens, so a shorter ``min_interval``
        never grants more than ``burst`` syncs at once, and a wait already begun under the
        old ``max_interval`` is woken so that it measures against the new one."""
        if min_interval < 0 or max_interval <= 0:
            raise ValueError("sync intervals must be positive (min_interval may be 0)")
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._retry_max = max(self._retry_min, min(self._retry_cap, max_interval))
        self._rescheduled = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def request(self) -> None:
        """Ask for a sync soon; cheap and callable from any handler."""
        self._requested = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def retry_after(self, delay: float) -> None:
        """Make sure a sync runs within ``delay`` seconds (upstream's ``RetryAfter``);
        the earliest of several asks wins."""
        at = self._clock() + max(delay, 0.0)
        if self.retry_at is not None and self.retry_at <= at:
            return
        self.retry_at = at
        self._rescheduled = True
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def run(self) -> None:
        """Run syncs forever (until cancelled)."""
        last_run = self._clock()
        while True:
            if not self._requested:
                deadline = last_run + self._max_interval
                if self.retry_at is not None:
                    deadline = min(deadline, self.retry_at)
                self._rescheduled = False
                await self._wait(deadline - self._clock())
                if self._rescheduled and not self._requested:
                    continue  # woken by retry_after: wait for the new deadline
            await self._take_token()
            self._requested = False
            self.retry_at = None  # this sync is the retry
            last_run = self._clock()
            self.runs += 1
            try:
                result = self._sync()
                if inspect.isawaitable(result):  # a sync that yields to the loop as it goes
                    result = await result
                complete = result is not False
            except Exception as exc:
                # A bug in one sync must not end syncing: log it and retry soon with the
                # state the sync left.
                self._log_error(exc)
                complete = False
            if complete:
                self.failures = 0
                self._retry_delay = self._retry_min
                self._last_error = None
            else:
                self.failures += 1
                self.retry_after(self._retry_delay)
                self._retry_delay = min(self._retry_delay * 2, self._retry_max)

    def _log_error(self, exc: Exception) -> None:
        what = f"{type(exc).__name__}: {exc}"
        now = self._clock()
        if what != self._last_error:
            self._last_error = what
            self._last_error_logged = now
            log.error("sync failed (retrying in %.1fs)", self._retry_delay, exc_info=exc)
        elif now - self._last_error_logged >= REPEAT_LOG_INTERVAL:
            self._last_error_logged = now
            log.error("sync failed again: %s (%d failed syncs in a row)", what, self.failures + 1)

    async def _wait(self, delay: float) -> None:
        if delay <= 0:
            return
        loop = asyncio.get_running_loop()
        self._wakeup = loop.create_future()
        sleeper = asyncio.ensure_future(self._sleep(delay))
        try:
            await asyncio.wait({sleeper, self._wakeup}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            self._wakeup = None

    async def _take_token(self) -> None:
        if self._min_interval == 0:
            return
        now = self._clock()
        rate = 1.0 / self._min_interval
        self._tokens = min(float(self._burst), self._tokens + (now - self._refilled_at) * rate)
        self._refilled_at = now
        if self._tokens < 1.0:
            await self._sleep((1.0 - self._tokens) / rate)
            now = self._clock()
            self._tokens = min(float(self._burst), self._tokens + (now - self._refilled_at) * rate)
            self._refilled_at = now
        self._tokens -= 1.0
