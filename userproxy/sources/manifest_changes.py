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

from userproxy.model import ServiceKey
from userproxy.sources.manifest_files import FileContents, ManifestState
from userproxy.sources.manifest_warnings import ManifestWarning, check_slice, service_conflicts

__all__ = ["ChangedKeys", "CrossChecks", "changed_keys", "same_files"]


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
