"""Event-loop lag: how late the loop runs a callback that asked to run at a given time.

Every callback of the proxy (accepts, relays, syncs, scrapes) runs on one thread; a callback
that blocks (a slow sync, a large status page, a stray blocking call) delays all the others.
``LoopLagProbe`` measures that delay the way Node.js's ``monitorEventLoopDelay`` and
uvloop-era "loop lag" monitors do: a task sleeps ``interval`` seconds, again and again, and
records by how much each wake-up came later than asked.  A healthy loop wakes within a
millisecond or so; a stall of N seconds shows as one sample of about N seconds.

The probe costs one timer per ``interval`` (4 a second by default), nothing per connection.
"""

from __future__ import annotations

import asyncio
import platform
import sys
from collections.abc import Callable

from userproxy import __version__

#: How often the probe wakes (seconds): frequent enough to catch a stall of a fraction of
#: a second, rare enough to cost nothing measurable.
LAG_INTERVAL = 0.25


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """The running loop, "uvloop 0.x.y" or "asyncio" (what ``--loop`` resolved to)."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        uvloop = sys.modules.get("uvloop")
        version = getattr(uvloop, "__version__", "") if uvloop is not None else ""
        return f"uvloop {version}".strip()
    return "asyncio"


def build_line(loop: asyncio.AbstractEventLoop) -> str:
    """The start-up line: "userproxy 0.1.0 on uvloop 0.21.0, Python 3.11.2"."""
    return f"userproxy {__version__} on {loop_name(loop)}, Python {platform.python_version()}"


class LoopLagProbe:
    """Reports the lateness of a periodic wake-up to ``observe`` (seconds, >= 0).

    Invariants: one sample per wake-up; the lateness of a wake-up is measured against the
    time it asked for (the previous wake-up plus ``interval``), so a stall is reported once,
    in full, by the first wake-up after it, and the schedule then starts afresh (no burst
    of catch-up samples after a long stall).
    """

    def __init__(self, observe: Callable[[float], None], interval: float = LAG_INTERVAL):
        if interval <= 0:
            raise ValueError("interval must be positive")
        self.interval = interval
        self._observe = observe
        #: The largest lateness seen so far, and the last one (for tests and status pages).
        self.max_lag = 0.0
        self.last_lag = 0.0

    async def run(self) -> None:
        """Forever (until cancelled): sleep ``interval``, record how late the wake-up was."""
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            self.sample(loop.time() - due)

    def sample(self, lag: float) -> None:
        lag = max(0.0, lag)  # timers may fire a hair early (clock resolution)
        self.last_lag = lag
        self.max_lag = max(self.max_lag, lag)
        self._observe(lag)
