"""The outlier detectors of the listener set: one per TCP Service port, shared by all the
port's listeners (an endpoint failing through the ClusterIP is avoided through the
NodePort too) and fed the union of their pools.  UDP has no dial to fail, so no detector.

Invariants: a detector exists exactly while some listener of its port is owned by the
port's Service; every such TCP listener holds it (``listener.outliers``); the ejections
of a detector that went are added to ``_retired``, so the counts never go backwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from userproxy.dataplane.listener import ListenerKey, TotalsKey, port_key
from userproxy.dataplane.outliers import (
    Ejection,
    EventSink,
    OutlierDetector,
    OutlierSettings,
    union,
)
from userproxy.dataplane.tcp_listener import TcpListener
from userproxy.model import Endpoint, ListenerSpec, Protocol, ServiceKey, ServicePortName

__all__ = ["EjectionCounts", "PortOutliers"]

#: Per Service port and protocol: ejections so far, and the endpoints ejected now.
EjectionCounts = dict[TotalsKey, tuple[int, list[Ejection]]]


class PortOutliers:
    """The detectors by Service port; ``on_event`` is told of ejections and returns."""

    def __init__(self, settings: OutlierSettings, on_event: EventSink) -> None:
        self.settings = settings
        self.on_event = on_event
        self._detectors: dict[ServicePortName, OutlierDetector] = {}
        self._of: dict[ServiceKey, set[ServicePortName]] = {}
        self._retired: dict[TotalsKey, int] = {}

    def update(
        self,
        service: ServiceKey,
        owned: Mapping[ListenerKey, ListenerSpec],
        listeners: Mapping[ListenerKey, object],
    ) -> None:
        """The detectors of ``service``'s TCP ports, for the listeners it owns (``owned``,
        found in ``listeners``), fed the endpoints of all their pools."""
        pools: dict[ServicePortName, list[tuple[Endpoint, ...]]] = {}
        for spec in owned.values():
            if spec.spn.protocol is Protocol.TCP:
                lists = pools.setdefault(spec.spn, [])
                lists.append(spec.pool.endpoints)
                if spec.node_pool is not None:
                    lists.append(spec.node_pool.endpoints)
        for spn in self._of.get(service, set()) - pools.keys():
            gone = self._detectors.pop(spn)
            port = port_key(spn)
            self._retired[port] = self._retired.get(port, 0) + gone.ejections
        for spn, lists in pools.items():
            detector = self._detectors.get(spn)
            if detector is None:
                detector = self._detectors[spn] = OutlierDetector(str(spn), self.settings)
                detector.on_event = self.on_event
            detector.set_endpoints(union(lists))
        for key, spec in owned.items():
            listener = listeners.get(key)
            if isinstance(listener, TcpListener):
                listener.outliers = self._detectors[spec.spn]
        if pools:
            self._of[service] = set(pools)
        else:
            self._of.pop(service, None)

    def get(self, spn: ServicePortName) -> OutlierDetector | None:
        return self._detectors.get(spn)

    def detectors(self) -> list[OutlierDetector]:
        return list(self._detectors.values())

    def ports(self) -> list[ServicePortName]:
        """The Service ports with a detector now."""
        return list(self._detectors)

    def ejections(
        self, part: Sequence[ServicePortName] | None = None, into: EjectionCounts | None = None
    ) -> EjectionCounts:
        """Per Service port and protocol: ejections so far (removed ports' included) and the
        endpoints ejected now, with their return times.  With ``part`` (of ``ports()``),
        only those ports are added, to ``into``."""
        if into is None:
            into = {key: (count, []) for key, count in self._retired.items()}
        for spn in self._detectors if part is None else part:
            if (detector := self._detectors.get(spn)) is not None:
                key = port_key(spn)
                into[key] = (into.get(key, (0, []))[0] + detector.ejections, detector.status())
        return into
