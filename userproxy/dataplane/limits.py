"""Process-wide limits of the data plane: open files and concurrent connections."""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: File descriptors kept free for listeners, the admin servers, logs and the API client.
FD_RESERVE = 128


def raise_nofile_limit() -> int:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return soft


def default_udp_sessions(nofile: int) -> int:
    """UDP sessions hold one descriptor each; they get a quarter of the budget."""
    return max(16, min(10_000, (nofile - FD_RESERVE) // 4))


def default_max_connections(nofile: int, udp_sessions: int = 0) -> int:
    """Each proxied TCP connection holds two descriptors (downstream and upstream); what
    the reserve and the UDP sessions leave is shared out."""
    return max(16, min(100_000, (nofile - FD_RESERVE - udp_sessions) // 2))


class RateLimitedLog:
    """Logs a message at most once per ``interval`` seconds, counting what it held back."""

    __slots__ = ("_clock", "_interval", "_last", "_suppressed")

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._suppressed = 0

    def __call__(self, logger: logging.Logger, level: int, msg: str, *args: object) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            self._suppressed += 1
            return
        self._last = now
        if self._suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        logger.log(level, msg, *args)


class ConnectionLimit:
    """Counts open proxied connections across all listeners and pauses accepting at the max.

    Listeners register a pause and a resume callback; when ``active`` reaches ``maximum``
    every listener stops accepting (clients wait in the kernel's backlog, as with HAProxy's
    maxconn) and resumes once a connection closes.
    """

    __slots__ = ("_emptied", "_listeners", "active", "maximum")

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.active = 0
        self._emptied: asyncio.Future[None] | None = None
        self._listeners: dict[object, tuple[Callable[[], None], Callable[[], None]]] = {}

    @property
    def full(self) -> bool:
        return self.active >= self.maximum

    def register(
        self, owner: object, pause: Callable[[], None], resume: Callable[[], None]
    ) -> None:
        self._listeners[owner] = (pause, resume)

    def unregister(self, owner: object) -> None:
        self._listeners.pop(owner, None)

    def acquire(self) -> None:
        self.active += 1
        if self.active == self.maximum:
            log.warning("connection limit %d reached; accepting paused", self.maximum)
            for pause, _ in list(self._listeners.values()):
                pause()

    def release(self) -> None:
        self.active -= 1
        if self.active == 0 and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)
        if self.active == self.maximum - 1:
            for _, resume in list(self._listeners.values()):
                resume()

    async def wait_empty(self) -> None:
        """Return once no connection is open."""
        if self.active == 0:
            return
        if self._emptied is None or self._emptied.done():
            self._emptied = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._emptied)
