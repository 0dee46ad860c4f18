"""The handler interfaces between the sources and the control plane.

A source (manifest files, the Kubernetes API) converts what it reads into
``userproxy.model`` objects and calls these methods.  They are plain functions: cheap, no
I/O, never awaited, so a source can call them from anywhere on the event loop.  The
``*_synced`` calls say that the source's initial listing has been fully delivered; the proxy
serves nothing until both Services and EndpointSlices are synced.
"""

from __future__ import annotations

from typing import Protocol

from userproxy.model import EndpointSlice, Node, Service


class ServiceHandler(Protocol):
    def on_service_add(self, service: Service) -> None:
        """A Service appeared (in the initial listing, or created later)."""

    def on_service_update(self, old: Service, new: Service) -> None:
        """A Service changed; ``old`` is what this source delivered last."""

    def on_service_delete(self, service: Service) -> None:
        """A Service is gone; ``service`` is its last delivered state."""

    def on_services_synced(self) -> None:
        """The initial listing of Services has been delivered in full."""


class EndpointSliceHandler(Protocol):
    def on_endpointslice_add(self, endpoint_slice: EndpointSlice) -> None:
        """An EndpointSlice appeared (it names its Service in ``service_name``)."""

    def on_endpointslice_update(self, old: EndpointSlice, new: EndpointSlice) -> None:
        """An EndpointSlice changed: endpoints, conditions, hints or ports."""

    def on_endpointslice_delete(self, endpoint_slice: EndpointSlice) -> None:
        """An EndpointSlice is gone; its endpoints leave its Service's pools."""

    def on_endpointslices_synced(self) -> None:
        """The initial listing of EndpointSlices has been delivered in full."""


class NodeHandler(Protocol):
    def on_node_add(self, node: Node) -> None:
        """The proxy's own Node appeared (its zone feeds topology hints)."""

    def on_node_update(self, old: Node, new: Node) -> None:
        """The own Node changed: its zone (re-plans every Service) or its deletion state
        (feeds /healthz only)."""

    def on_node_delete(self, node: Node) -> None:
        """The own Node is gone."""

    def on_node_synced(self) -> None:
        """The initial listing of Nodes has been delivered (the own Node is optional)."""


class Handlers(ServiceHandler, EndpointSliceHandler, NodeHandler, Protocol):
    """Everything a source feeds; the control plane's ``ChangeRecorder`` implements it."""
