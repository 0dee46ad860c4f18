"""Which keys a manifest reload can have changed, from the files it re-read.

A reload keeps each unchanged file's contents as the very same object
(``ManifestCache``), and a good state defines every object in exactly one file (a duplicate
fails the load).  So the objects whose value may differ between the last good state and
the new one are exactly those defined, before or after, by a file whose contents object is
not the same one: only their keys need comparing.  With 10 000 Services in files of 1 000,
an edit of one slice file compares a thousand keys, and a re-read that found the same
bytes compares none.

The checks across objects (``manifest_warnings.py``) follow the same keys: a slice's
warnings depend on the slice, where it is defined and its Service, so a reload that changed
no Service checks only the changed slices again (:class:`CrossChecks`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from userproxy.model import ServiceKey
from userproxy.sources.manifest_files import FileContents, ManifestState
from userproxy.sources.manifest_warnings import ManifestWarning, check_slice, service_conflicts

_K = TypeVar("_K")
_V = TypeVar("_V")

__all__ = ["ChangedKeys", "CrossChecks", "changed_keys", "merge_slices_only", "same_files"]


@dataclass(frozen=True, slots=True)
class ChangedKeys:
    """Keys that may have changed, each kind in a fixed order (old files' keys first)."""

    services: tuple[ServiceKey, ...] = ()
    slices: tuple[tuple[str, str], ...] = ()
    nodes: frozenset[str] = frozenset()


def same_files(old: Mapping[Path, FileContents], new: Mapping[Path, FileContents]) -> bool:
    """The same files, in the same order, each with the very same contents object."""
    return list(old) == list(new) and all(new[path] is old[path] for path in new)


def changed_keys(old: Mapping[Path, FileContents], new: Mapping[Path, FileContents]) -> ChangedKeys:
    """The keys defined, in ``old`` or in ``new``, by a file whose contents changed (or
    which appeared or went away)."""
    services: dict[ServiceKey, None] = {}
    slices: dict[tuple[str, str], None] = {}
    nodes: set[str] = set()
    paths = [*old, *(path for path in new if path not in old)]
    for path in paths:
        before, after = old.get(path), new.get(path)
        if before is after:
            continue
        for contents in (before, after):
            if contents is not None:
                services.update(dict.fromkeys(contents.services))
                slices.update(dict.fromkeys(contents.slices))
                nodes.update(contents.nodes)
    return ChangedKeys(tuple(services), tuple(slices), frozenset(nodes))


class CrossChecks:
    """The warnings across objects of the last state checked, kept per slice so a reload
    that changed only slices re-checks only those.

    Invariant: after ``steps(state, keys)`` has run to its end, ``warnings()`` is what
    ``manifest_warnings.cross_check`` finds for ``state`` (as a set: the order may differ),
    provided ``keys`` names every key that differs from the state checked before (None:
    check everything).  ``checked`` counts the objects checked, for tests.
    """

    def __init__(self) -> None:
        self._conflicts: list[ManifestWarning] = []
        self._slices: dict[tuple[str, str], list[ManifestWarning]] = {}
        #: False until a check of everything has run to its end.
        self._complete = False
        self.checked = 0

    def steps(self, state: ManifestState, keys: ChangedKeys | None) -> Iterator[None]:
        """Check what ``keys`` may have changed, yielding after each object (so a caller
        can yield to the loop).  A changed Service can change the warnings of any slice and
        any other Service (an address both claim): then everything is checked."""
        services, locations = state.services, state.locations
        if keys is None or keys.services or not self._complete:
            self._complete = False
            conflicts = []
            for warning in service_conflicts(services, locations):
                if warning is None:
                    self.checked += 1
                    yield
                else:
                    conflicts.append(warning)
            self._conflicts = conflicts
            self._slices = {}
            slice_keys: Iterator[tuple[str, str]] | tuple[tuple[str, str], ...] = iter(state.slices)
        else:
            slice_keys = keys.slices
        for key in slice_keys:
            endpoint_slice = state.slices.get(key)
            found = (
                check_slice(key, endpoint_slice, services, locations)
                if endpoint_slice is not None
                else []
            )
            if found:
                self._slices[key] = found
            else:
                self._slices.pop(key, None)
            self.checked += 1
            yield
        self._complete = True

    def warnings(self) -> list[ManifestWarning]:
        return [*self._conflicts, *(w for found in self._slices.values() for w in found)]


def merge_slices_only(
    old: ManifestState,
    old_files: Mapping[Path, FileContents],
    new_files: Mapping[Path, FileContents],
    keys: ChangedKeys,
    skipped: tuple[str, ...],
) -> ManifestState | None:
    """``manifest_files.merge`` of ``new_files`` worked out from ``old`` (their merge)
    when no Service changed: the Services are the same map, the slices and Nodes a copy
    with the changed files' keys replaced, so the cost follows the changed files, not the
    10 000 objects.  None when a full merge is needed: a Service changed, or some
    identity might be defined twice (the full merge words the problem).  The one
    difference: a re-defined slice moves to the end of ``slices``' order, which only
    orders warnings and deliveries."""
    if keys.services:
        return None
    changed = [path for path in new_files if new_files[path] is not old_files.get(path)]
    gone = [path for path in old_files if path not in new_files]
    before: dict[tuple[str, str, str], str] = {}
    for path in [*changed, *gone]:
        if path in old_files:
            before.update(old_files[path].seen)
    after: dict[tuple[str, str, str], str] = {}
    for path in changed:
        seen = new_files[path].seen
        if after.keys() & seen.keys():
            return None  # defined twice among the changed files
        after.update(seen)
    for identity in after:
        if identity in old.locations and identity not in before:
            return None  # also defined by a file that did not change
    # A mapping proxy's copy() is its dict's: the stored hashes are reused, not recomputed.
    slices = _copy(old.slices)
    nodes = _copy(old.nodes)
    locations = _copy(old.locations)
    for path in [*changed, *gone]:
        contents = old_files.get(path)
        if contents is not None:
            for key in contents.slices:
                slices.pop(key, None)
            for name in contents.nodes:
                nodes.pop(name, None)
    for identity in before:
        locations.pop(identity, None)
    for path in changed:
        contents = new_files[path]
        if contents.problems:
            return None
        slices.update(contents.slices)
        nodes.update(contents.nodes)
    locations.update(after)
    return ManifestState(
        services=old.services,
        slices=MappingProxyType(slices),
        nodes=MappingProxyType(nodes),
        skipped=skipped,
        warnings=tuple(w for contents in new_files.values() for w in contents.warnings),
        locations=MappingProxyType(locations),
    )


def _copy(mapping: Mapping[_K, _V]) -> dict[_K, _V]:
    if isinstance(mapping, MappingProxyType):
        return mapping.copy()
    return dict(mapping)
