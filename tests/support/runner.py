"""A ``SyncRunner`` on a ``FakeClock``, stepped by hand (the runner and retry tests).

The sync it runs records the clock's time and answers what the test's ``outcome`` says
for the n-th sync (from 1): True (applied), False (retry) or an exception (raised).
Every runner a test starts is in the ``harnesses`` list (tests/control/conftest.py),
cancelled and awaited at teardown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.clock import FakeClock, settle
from userproxy.control.runner import SyncRunner


@dataclass
class Harness:
    clock: FakeClock
    runner: SyncRunner
    task: asyncio.Task[None]
    syncs: list[float] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.syncs)

    async def request(self) -> None:
        """Ask for a sync and let the runner act on it."""
        self.runner.request()
        await settle()

    async def step(self, seconds: float) -> None:
        """Move the clock and let the runner act on it."""
        self.clock.advance(seconds)
        await settle()

    async def step_until(self, end: float, step: float = 0.25) -> None:
        """Step the clock ``step`` at a time until ``end``."""
        while self.clock.now() < end:
            await self.step(step)


async def start_runner(
    started: list[Harness],
    *,
    min_interval: float = 1.0,
    max_interval: float = 30.0,
    burst: int = 2,
    outcome: Callable[[int], bool | Exception] = lambda n: True,
) -> Harness:
    """Start ``SyncRunner.run`` on a fake clock at 0 and let it reach its first wait."""
    clock = FakeClock()
    syncs: list[float] = []

    def sync() -> bool:
        syncs.append(clock.now())
        result = outcome(len(syncs))
        if isinstance(result, Exception):
            raise result
        return result

    runner = SyncRunner(
        sync,
        min_interval=min_interval,
        max_interval=max_interval,
        burst=burst,
        clock=clock.now,
        sleep=clock.sleep,
    )
    harness = Harness(clock, runner, asyncio.create_task(runner.run()), syncs)
    started.append(harness)
    await settle()
    return harness
