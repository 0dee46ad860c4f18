"""What ``userproxy connect`` watches: the Services and EndpointSlices of some namespaces.

The same reflectors, decoding and selection as ``userproxy run``'s API source
(sources/kubernetes.py), with three differences that suit a developer's machine and its
credentials:

- per namespace (``list_namespaced_*``) unless all are asked for: a developer may read
  their own namespace only; one reflector per namespace and resource, and each resource
  counts as synced once every namespace's first list is in;
- ``--selector`` narrows the Services, on the server (the slices of a Service left out
  have no Service to serve and are ignored downstream);
- no Node: this machine is none (and reading Nodes needs a cluster-wide permission), so
  the Node list is reported synced at once, with no Node in it;
- retries after an API error back off to at most ``BACKOFF_MAX`` seconds, not 30: one
  developer's watch is no load on an API server, and a laptop that wakes up or gets its
  VPN back should follow the cluster again at once.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from userproxy.control.handlers import Handlers
from userproxy.model import EndpointSlice, Service
from userproxy.sources.decode import decode_endpoint_slice, decode_service
from userproxy.sources.kubernetes import if_selected, label_selector
from userproxy.sources.list_watch import ListWatch
from userproxy.sources.reflector import OnEvent, Reflector, ReflectorOptions, ResourceHandlers

if TYPE_CHECKING:
    from kubernetes_asyncio.client import ApiClient

__all__ = ["BACKOFF_MAX", "ConnectSource"]

BACKOFF_MAX = 5.0


def _when_all(count: int, synced: Callable[[], None]) -> Callable[[], None]:
    """A ``synced`` handler that calls ``synced`` once ``count`` reflectors called it."""
    pending = [count]

    def one_synced() -> None:
        pending[0] -= 1
        if pending[0] == 0:
            synced()

    return one_synced


class ConnectSource:
    """Feeds ``handlers`` from ``api`` for ``namespaces`` (empty: all of them) until
    cancelled (:meth:`run`); ``on_event`` as ``KubernetesSource``'s.  The caller owns
    ``api``."""

    def __init__(
        self,
        api: ApiClient,
        handlers: Handlers,
        *,
        namespaces: Sequence[str] = (),
        selector: str | None = None,
        on_event: OnEvent | None = None,
        options: ReflectorOptions | None = None,
    ) -> None:
        from kubernetes_asyncio import client as k8s_client  # see sources/kubernetes.py

        options = options or ReflectorOptions(backoff_max=BACKOFF_MAX)
        core = k8s_client.CoreV1Api(api)
        discovery = k8s_client.DiscoveryV1Api(api)
        self.handlers = handlers
        common = label_selector(None)
        service_selector = f"{common},{selector}" if selector else common
        scopes: Sequence[str | None] = tuple(namespaces) or (None,)
        services_synced = _when_all(len(scopes), handlers.on_services_synced)
        slices_synced = _when_all(len(scopes), handlers.on_endpointslices_synced)
        self.reflectors: list[Reflector[Service] | Reflector[EndpointSlice]] = []
        for namespace in scopes:
            if namespace is None:
                list_services = core.list_service_for_all_namespaces
                list_slices = discovery.list_endpoint_slice_for_all_namespaces
            else:
                list_services = functools.partial(core.list_namespaced_service, namespace)
                list_slices = functools.partial(discovery.list_namespaced_endpoint_slice, namespace)
            h = handlers
            self.reflectors.append(
                Reflector(
                    ListWatch("services", "Service", True, list_services, service_selector),
                    functools.partial(if_selected, decode_service, None),
                    ResourceHandlers(
                        h.on_service_add, h.on_service_update, h.on_service_delete,
                        services_synced,
                    ),
                    options,
                    on_event,
                )
            )  # fmt: skip
            self.reflectors.append(
                Reflector(
                    ListWatch("endpointslices", "EndpointSlice", True, list_slices, common),
                    functools.partial(if_selected, decode_endpoint_slice, None),
                    ResourceHandlers(
                        h.on_endpointslice_add, h.on_endpointslice_update,
                        h.on_endpointslice_delete, slices_synced,
                    ),
                    options,
                    on_event,
                )
            )  # fmt: skip

    @property
    def synced(self) -> bool:
        return all(reflector.synced for reflector in self.reflectors)

    async def run(self) -> None:
        """List and watch until cancelled."""
        self.handlers.on_node_synced()  # no Node: see the module
        async with asyncio.TaskGroup() as tasks:
            for reflector in self.reflectors:
                tasks.create_task(reflector.run(), name=f"connect-{reflector.name}")
