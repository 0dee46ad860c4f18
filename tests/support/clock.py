"""The one fake clock of the tests: time moves only when the test moves it.

Code that reads a clock takes a plain ``Callable[[], float]`` (the runner, the trackers,
the proxier, health, balancers, rate-limited logs) and is given the bound method
``clock.now``; the runner also takes ``sleep``, given ``clock.sleep``.  Like kube-proxy's
runner tests with ``k8s.io/utils/clock/testing``'s FakeClock, no test sleeps to let time
pass.

``settle()`` lets every task that a step of the clock woke run before the test looks.

Invariant: time never goes backwards (a monotonic clock); ``advance`` wakes every sleeper
whose deadline has come, in the order they went to sleep.
"""

from __future__ import annotations

import asyncio


class FakeClock:
    """A clock whose time moves only with ``advance`` or ``set``."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, delay: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + max(delay, 0.0), future))
        if delay <= 0:
            future.set_result(None)
        await future

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` and wake every sleeper now due."""
        self.set(self._now + seconds)

    def set(self, when: float) -> None:
        """Move time forward to ``when`` and wake every sleeper now due."""
        assert when >= self._now, f"a monotonic clock does not go back ({self._now} -> {when})"
        self._now = when
        waiting: list[tuple[float, asyncio.Future[None]]] = []
        for deadline, future in self._sleepers:
            if future.done():
                continue
            if deadline <= self._now:
                future.set_result(None)
            else:
                waiting.append((deadline, future))
        self._sleepers = waiting

    @property
    def pending(self) -> int:
        """Sleepers still waiting (cancelled ones do not count)."""
        return sum(1 for _, future in self._sleepers if not future.done())


async def settle(rounds: int = 10) -> None:
    """Let every ready task run until the loop is idle again."""
    for _ in range(rounds):
        await asyncio.sleep(0)
