"""The Kubernetes API source: Services, EndpointSlices and the own Node, fed to the handlers.

This module only wires: one :class:`~userproxy.sources.reflector.Reflector` per resource
(client-go's reflector, which lists, watches, re-lists on 410 Gone, resyncs and backs off)
is given what to list (the list call and its selectors), how to convert an object and
which handlers to call.  kube-proxy does the same with its informers
(cmd/kube-proxy/app/server.go: a label selector that leaves out headless Services and those
of another service proxy; a field selector for the own Node).

Each object received is checked against the label selector again (the server filters
already; this guards against one that ignores a selector): one that does not match is
not this proxy's, and one that stops matching is deleted.

Besides: the API client configuration (:func:`load_client_configuration`).

kubernetes-asyncio is imported where it is used, not with this module: importing it takes
about 0.4 s of CPU, which a proxy reading manifests (and every ``userproxy`` command that
only imports this module) would pay at start for nothing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import yaml

from userproxy.config import ConfigError
from userproxy.control.handlers import Handlers
from userproxy.model import EndpointSlice, Node, Service
from userproxy.sources.decode import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    decode_endpoint_slice,
    decode_labels,
    decode_node,
    decode_service,
    is_selected,
)
from userproxy.sources.list_watch import LIST_PAGE_SIZE, ListWatch
from userproxy.sources.reflector import OnEvent, Reflector, ReflectorOptions, ResourceHandlers

if TYPE_CHECKING:
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio.client import ApiClient

    from userproxy.config import Settings

__all__ = [
    "KubernetesSource",
    "if_selected",
    "kubeconfig_context",
    "label_selector",
    "load_client_configuration",
    "make_api_client",
]

_M = TypeVar("_M", Service, EndpointSlice)

#: Where a pod's ServiceAccount token is mounted (what the in-cluster configuration reads).
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


async def load_client_configuration(
    kubeconfig: Path | None, context: str | None = None
) -> k8s_client.Configuration:
    """The API client configuration of ``kubeconfig`` (its ``context``, else its current
    context), or the in-cluster one when None.

    Called before anything starts, so that an unusable kubeconfig, or a pod without a
    ServiceAccount token, stops the process with one line (``ConfigError``, ``setting``
    ``kubeconfig``) instead of failing inside the running source.  :func:`kubeconfig_context`
    gives the common causes in userproxy's words; whatever else kubernetes-asyncio rejects
    keeps its text.
    """
    from kubernetes_asyncio import client as k8s_client  # imported here: see the module
    from kubernetes_asyncio import config as k8s_config

    configuration = k8s_client.Configuration()
    if kubeconfig is None:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException as exc:
            raise ConfigError(
                f"in-cluster configuration: {exc} (a pod needs its ServiceAccount token at "
                f"{SERVICE_ACCOUNT_TOKEN}: is automountServiceAccountToken false?); "
                "or give --kubeconfig",
                setting="kubeconfig",
                problem=f"in-cluster configuration: {exc}",
            ) from None
        return configuration
    kubeconfig_context(kubeconfig, context)
    try:
        await k8s_config.load_kube_config(
            config_file=str(kubeconfig),
            context=context,
            client_configuration=configuration,
            persist_config=False,
        )
    except (k8s_config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        problem = f"{kubeconfig} cannot be used: {exc}"
        raise ConfigError(
            f"--kubeconfig: {problem}", setting="kubeconfig", problem=problem
        ) from None
    return configuration


def kubeconfig_context(path: Path, context: str | None = None) -> dict[str, object]:
    """The ``context`` entry (None: the current-context) of the kubeconfig at ``path``,
    e.g. its ``namespace``; ConfigError unless the file is a readable YAML mapping that
    has that context."""

    def fail(problem: str) -> ConfigError:
        problem = f"{path}: {problem}"
        return ConfigError(f"--kubeconfig: {problem}", setting="kubeconfig", problem=problem)

    try:
        document: object = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise fail(f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise fail("not a kubeconfig (not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise fail(f"not a kubeconfig (YAML syntax error{at})") from None
    if not isinstance(document, dict):
        raise fail("not a kubeconfig (not a YAML mapping)")
    current = context or document.get("current-context")
    if not current:
        raise fail("has no current-context (set one with kubectl config use-context)")
    contexts = document.get("contexts")
    contexts = contexts if isinstance(contexts, list) else []
    names = [c.get("name") for c in contexts if isinstance(c, dict)]
    if current not in names:
        which = "context" if context else "current-context"
        raise fail(f"{which} {current!r} is not among its contexts {names}")
    entry = contexts[names.index(current)].get("context")
    return entry if isinstance(entry, dict) else {}


async def make_api_client(kubeconfig: Path | None) -> ApiClient:
    """An ApiClient for ``kubeconfig`` (None: in-cluster); the caller closes it."""
    from kubernetes_asyncio.client import ApiClient  # imported here: see the module

    return ApiClient(configuration=await load_client_configuration(kubeconfig))


def label_selector(proxy_name: str | None) -> str:
    """The label selector of the Service and EndpointSlice lists and watches."""
    if proxy_name is None:
        return f"!{HEADLESS_LABEL},!{SERVICE_PROXY_NAME_LABEL}"
    return f"!{HEADLESS_LABEL},{SERVICE_PROXY_NAME_LABEL}={proxy_name}"


def if_selected(
    decode: Callable[[dict[str, object]], _M | None], proxy_name: str | None, obj: dict[str, object]
) -> _M | None:
    return decode(obj) if is_selected(decode_labels(obj), proxy_name) else None


def _if_own_node(node_name: str, obj: dict[str, object]) -> Node | None:
    node = decode_node(obj)
    return node if node.name == node_name else None


class KubernetesSource:
    """Feeds ``handlers`` from the Kubernetes API; :meth:`run` until cancelled.

    ``api`` is owned by the source from here on: :meth:`close` closes it.
    ``on_event(kind, resource)`` is called with ``kind`` a
    :data:`~userproxy.sources.reflector.EventKind` and ``resource`` "services",
    "endpointslices" or "nodes".  The timing arguments are those of
    :class:`~userproxy.sources.reflector.ReflectorOptions` (ValueError when out of range).
    """

    def __init__(
        self,
        api: ApiClient,
        handlers: Handlers,
        *,
        node_name: str,
        proxy_name: str | None = None,
        resync_period: float = 900.0,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        on_event: OnEvent | None = None,
        watch_timeout: float = 300.0,
        page_size: int = LIST_PAGE_SIZE,
    ) -> None:
        options = ReflectorOptions(
            resync_period, backoff_initial, backoff_max, watch_timeout, page_size
        )
        from kubernetes_asyncio import client as k8s_client  # imported here: see the module

        self._api = api
        core = k8s_client.CoreV1Api(api)
        discovery = k8s_client.DiscoveryV1Api(api)
        selector = label_selector(proxy_name)
        h = handlers
        self.services: Reflector[Service] = Reflector(
            ListWatch("services", "Service", True, core.list_service_for_all_namespaces, selector),
            functools.partial(if_selected, decode_service, proxy_name),
            ResourceHandlers(
                h.on_service_add, h.on_service_update, h.on_service_delete, h.on_services_synced
            ),
            options,
            on_event,
        )
        self.endpoint_slices: Reflector[EndpointSlice] = Reflector(
            ListWatch(
                "endpointslices",
                "EndpointSlice",
                True,
                discovery.list_endpoint_slice_for_all_namespaces,
                selector,
            ),
            functools.partial(if_selected, decode_endpoint_slice, proxy_name),
            ResourceHandlers(
                h.on_endpointslice_add,
                h.on_endpointslice_update,
                h.on_endpointslice_delete,
                h.on_endpointslices_synced,
            ),
            options,
            on_event,
        )
        self.nodes: Reflector[Node] = Reflector(
            ListWatch(
                "nodes", "Node", False, core.list_node, field_selector=f"metadata.name={node_name}"
            ),
            functools.partial(_if_own_node, node_name),
            ResourceHandlers(h.on_node_add, h.on_node_update, h.on_node_delete, h.on_node_synced),
            options,
            on_event,
        )

    @property
    def synced(self) -> bool:
        """Whether all three resources have completed their first list."""
        return self.services.synced and self.endpoint_slices.synced and self.nodes.synced

    async def run(self) -> None:
        """List and watch the three resources until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            for reflector in (self.services, self.endpoint_slices, self.nodes):
                tasks.create_task(reflector.run(), name=f"k8s-{reflector.name}")

    async def close(self) -> None:
        """Close the API client (call after :meth:`run` has ended)."""
        await self._api.close()


async def run_api_source(
    configuration: k8s_client.Configuration,
    handlers: Handlers,
    settings: Settings,
    on_event: OnEvent | None = None,
) -> None:
    """``userproxy run``'s API source until cancelled: a client for ``configuration`` and
    a ``KubernetesSource`` with the settings' node, proxy name and resync period (used by
    the single process and by the workers' parent alike)."""
    from kubernetes_asyncio.client import ApiClient

    api = ApiClient(configuration=configuration)
    try:
        source = KubernetesSource(
            api,
            handlers,
            node_name=settings.hostname,
            proxy_name=settings.service_proxy_name,
            resync_period=settings.config_sync_period,
            on_event=on_event,
        )
        await source.run()
    finally:
        await api.close()
