"""Suite-wide configuration: which event loops the async tests run on."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop
from hypothesis import settings

# Property tests assert behaviour, never speed: no per-example deadline (on a loaded
# machine hypothesis' default 200 ms fails examples that are merely slow).
settings.register_profile("userproxy", deadline=None)
settings.load_profile("userproxy")

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Data-path tests (marked ``both_loops``) run once on each loop; the rest on asyncio."""
    if item.get_closest_marker("both_loops") is not None:
        return LOOPS
    return {"asyncio": asyncio.new_event_loop}
