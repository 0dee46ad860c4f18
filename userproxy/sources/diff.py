"""Delivering the difference between two views of a resource to the handlers.

Both sources keep a view (key -> object) per resource and, after a reload or re-list,
call the handlers only for what changed: equal objects cause no call at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

_K = TypeVar("_K")
_V = TypeVar("_V")


def diff_steps(
    old: Mapping[_K, _V],
    new: Mapping[_K, _V],
    add: Callable[[_V], None],
    update: Callable[[_V, _V], None],
    delete: Callable[[_V], None],
) -> Iterator[bool]:
    """Call the handlers for what changed between two maps, yielding after each key
    whether it made a call (so a caller can yield to the event loop in between)."""
    for key, value in old.items():
        gone = key not in new
        if gone:
            delete(value)
        yield gone
    for key, value in new.items():
        previous = old.get(key)
        if previous is None:
            add(value)
            yield True
        elif previous is not value and previous != value:
            update(previous, value)
            yield True
        else:
            yield False


def deliver_diff(
    old: Mapping[_K, _V],
    new: Mapping[_K, _V],
    add: Callable[[_V], None],
    update: Callable[[_V, _V], None],
    delete: Callable[[_V], None],
) -> int:
    """Call the handlers for what changed between two maps; returns how many calls."""
    return sum(diff_steps(old, new, add, update, delete))


def diff_keys(
    old: Mapping[_K, _V],
    new: Mapping[_K, _V],
    add: Callable[[_V], None],
    update: Callable[[_V, _V], None],
    delete: Callable[[_V], None],
    *,
    keys: Iterable[_K],
) -> Iterator[bool]:
    """:func:`diff_steps` over ``keys`` only, for a caller that knows every other key maps
    to the same object in both (a reload that re-read a few files): deletions first, then
    additions and updates, as there; work in proportion to ``keys``, not to the maps."""
    keys = list(keys)
    for key in keys:
        gone = key not in new and key in old
        if gone:
            delete(old[key])
        yield gone
    for key in keys:
        value = new.get(key)
        if value is None:
            continue
        previous = old.get(key)
        if previous is None:
            add(value)
            yield True
        elif previous is not value and previous != value:
            update(previous, value)
            yield True
        else:
            yield False
