"""The clock the control plane reads, injectable so tests can step time without sleeping."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds."""

    async def sleep(self, delay: float) -> None:
        """Return after ``delay`` seconds of this clock."""


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(max(delay, 0.0))
