"""Delivering the difference between two views of a resource to the handlers.

Both sources keep a view (key -> object) per resource and, after a reload or re-list,
call the handlers only for what changed: equal objects cause no call at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


def deliver_diff(
    old: Mapping[_K, _V],
    new: Mapping[_K, _V],
    add: Callable[[_V], None],
    update: Callable[[_V, _V], None],
    delete: Callable[[_V], None],
) -> int:
    """Call the handlers for what changed between two maps; returns how many calls."""
    calls = 0
    for key, value in old.items():
        if key not in new:
            delete(value)
            calls += 1
    for key, value in new.items():
        previous = old.get(key)
        if previous is None:
            add(value)
            calls += 1
        elif previous != value:
            update(previous, value)
            calls += 1
    return calls
