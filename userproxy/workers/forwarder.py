"""The parent's handlers: keep what the source delivered, send every call to every worker.

``Forwarder`` implements ``control/handlers.py``'s ``Handlers`` for the parent's one source.
It keeps the current Services, EndpointSlices and Node and which initial listings are in,
so that a worker started later (or restarted) gets ``replay()``: the current objects as adds
and the synced calls, after which it sees exactly what a worker that was there all along
has.  Invariant: ``replay()`` followed by every later ``send`` call describes the source's
current view; nothing is awaited between them, so no change falls in between.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from userproxy.model import EndpointSlice, Node, Service
from userproxy.workers.channel import Call

Send = Callable[[Call], None]


class Forwarder:
    def __init__(self, send: Send) -> None:
        #: Called with every handler call, in order (the supervisor's broadcast).
        self.send = send
        self.services: dict[tuple[str, str], Service] = {}
        self.slices: dict[tuple[str, str], EndpointSlice] = {}
        self.node: Node | None = None
        self.synced: set[str] = set()
        #: Handler calls forwarded since the start (the status and a test read it).
        self.calls = 0

    def _call(self, method: str, *args: object) -> None:
        self.calls += 1
        self.send(Call(method, args))

    def replay(self) -> Iterator[Call]:
        """The current view as handler calls, for a worker that starts now."""
        for service in self.services.values():
            yield Call("on_service_add", (service,))
        if "services" in self.synced:
            yield Call("on_services_synced", ())
        for endpoint_slice in self.slices.values():
            yield Call("on_endpointslice_add", (endpoint_slice,))
        if "endpointslices" in self.synced:
            yield Call("on_endpointslices_synced", ())
        if self.node is not None:
            yield Call("on_node_add", (self.node,))
        if "node" in self.synced:
            yield Call("on_node_synced", ())

    def on_service_add(self, service: Service) -> None:
        self.services[service.namespace, service.name] = service
        self._call("on_service_add", service)

    def on_service_update(self, old: Service, new: Service) -> None:
        self.services[new.namespace, new.name] = new
        self._call("on_service_update", old, new)

    def on_service_delete(self, service: Service) -> None:
        self.services.pop((service.namespace, service.name), None)
        self._call("on_service_delete", service)

    def on_services_synced(self) -> None:
        self.synced.add("services")
        self._call("on_services_synced")

    def on_endpointslice_add(self, endpoint_slice: EndpointSlice) -> None:
        self.slices[endpoint_slice.namespace, endpoint_slice.name] = endpoint_slice
        self._call("on_endpointslice_add", endpoint_slice)

    def on_endpointslice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        self.slices[new.namespace, new.name] = new
        self._call("on_endpointslice_update", old, new)

    def on_endpointslice_delete(self, endpoint_slice: EndpointSlice) -> None:
        self.slices.pop((endpoint_slice.namespace, endpoint_slice.name), None)
        self._call("on_endpointslice_delete", endpoint_slice)

    def on_endpointslices_synced(self) -> None:
        self.synced.add("endpointslices")
        self._call("on_endpointslices_synced")

    def on_node_add(self, node: Node) -> None:
        self.node = node
        self._call("on_node_add", node)

    def on_node_update(self, old: Node, new: Node) -> None:
        self.node = new
        self._call("on_node_update", old, new)

    def on_node_delete(self, node: Node) -> None:
        self.node = None
        self._call("on_node_delete", node)

    def on_node_synced(self) -> None:
        self.synced.add("node")
        self._call("on_node_synced")
