"""Recorders: stand-ins for what the control plane is given, remembering every call.

``RecordingListeners`` is the listener set as the proxier sees it (a ``ListenerApplier``):
it records each ``apply``, keeps the last specs applied per Service, and raises for the
Services a test breaks (as a listener set out of descriptors would), after recording.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from userproxy.model import ListenerSpec, ServiceKey


@dataclass
class RecordingListeners:
    """A ``ListenerApplier`` that remembers every call and fails where told to."""

    calls: list[tuple[ServiceKey, tuple[ListenerSpec, ...]]] = field(default_factory=list)
    #: The specs last applied without error, per Service.
    applied: dict[ServiceKey, tuple[ListenerSpec, ...]] = field(default_factory=dict)
    #: Services whose apply raises this error.
    broken: dict[ServiceKey, Exception] = field(default_factory=dict)

    def apply(self, service: ServiceKey, specs: Sequence[ListenerSpec]) -> None:
        self.calls.append((service, tuple(specs)))
        error = self.broken.get(service)
        if error is not None:
            raise error
        self.applied[service] = tuple(specs)

    @property
    def keys(self) -> list[ServiceKey]:
        """The Services applied, in call order."""
        return [key for key, _ in self.calls]

    def take(self) -> dict[ServiceKey, tuple[ListenerSpec, ...]]:
        """The calls since the last take, by Service (one apply per Service per sync)."""
        calls, self.calls = self.calls, []
        result = dict(calls)
        assert len(result) == len(calls), "one apply per Service per sync"
        return result
