"""Fixtures of the control-plane tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.runner import Harness


@pytest.fixture
async def harnesses() -> AsyncIterator[list[Harness]]:
    """Runners started by a test (``start_runner``), cancelled and awaited at teardown."""
    started: list[Harness] = []
    yield started
    for h in started:
        h.task.cancel()
    for h in started:
        with pytest.raises(asyncio.CancelledError):
            await h.task
