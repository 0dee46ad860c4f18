"""The Kubernetes API source: list and watch Services, EndpointSlices and the own Node.

Per resource this does what client-go's reflector does for kube-proxy's informers:

* LIST (paged) with the proxy's label selector, decode every item on its own, deliver the
  difference against the source's current view of that resource (the first list: all adds),
  then call the resource's ``*_synced`` handler once.
* WATCH from the list's ``resourceVersion`` with bookmarks and a server-side timeout,
  tracking the resourceVersion of every event (bookmarks included) so that a watch that
  ends or breaks is resumed where it stopped, without a re-list.
* On ``410 Gone`` (an ERROR event with code 410, or an HTTP 410), re-list and reconcile:
  unchanged objects cause no handler call, objects missing from the new list are deleted.
* Every ``resync_period`` seconds re-list and reconcile the same way (no churn when nothing
  changed).

Responses are read as raw JSON (``_preload_content=False``), never through
kubernetes-asyncio's typed models, which reject a whole list or stream when one object
has a field of the wrong type.  Each object is validated by
:mod:`userproxy.sources.decode`; an invalid one is skipped with a warning naming it and the
field (the last good version of it, if any, stays in effect).

Failures never end :meth:`KubernetesSource.run`: they are logged (rate-limited), reported
through ``on_event`` and retried with capped exponential backoff and full jitter.  The
proxy keeps serving its last state meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import aiohttp
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client import ApiClient

from userproxy.config import ConfigError
from userproxy.control.handlers import Handlers
from userproxy.model import EndpointSlice, Node, Service
from userproxy.sources import json_limits
from userproxy.sources.decode import (
    HEADLESS_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    DecodeError,
    decode_endpoint_slice,
    decode_labels,
    decode_node,
    decode_service,
    is_selected,
)
from userproxy.sources.diff import deliver_diff

__all__ = [
    "EVENT_KINDS",
    "RESOURCES",
    "KubernetesSource",
    "label_selector",
    "load_client_configuration",
    "make_api_client",
]

logger = logging.getLogger(__name__)

#: The ``kind`` values ``on_event(kind, resource)`` is called with.
EVENT_KINDS = ("watch_restart", "relist", "invalid_object", "api_error")
#: The ``resource`` values ``on_event(kind, resource)`` is called with.
RESOURCES = ("services", "endpointslices", "nodes")

#: Page size of LIST requests (the API server may ignore it, e.g. for resourceVersion=0).
LIST_PAGE_SIZE = 500
#: Upper bound on pages of one LIST; a server that keeps sending continue tokens is broken.
_MAX_PAGES = 10_000
#: Timeout of one LIST page and of connecting for a WATCH (seconds).
_LIST_TIMEOUT = 60.0
_CONNECT_TIMEOUT = 10.0
#: Extra time past the server-side watch timeout before a silent watch counts as dead.
_WATCH_READ_SLACK = 30.0
#: At most one warning per resource and cause in this many seconds (the rest go to debug).
_WARN_INTERVAL = 30.0
#: How much of an error body goes into an error message.
_ERROR_BODY_LIMIT = 4096

_T = TypeVar("_T", Service, EndpointSlice, Node)
_Key = tuple[str, str]
OnEvent = Callable[[str, str], None]


#: Where a pod's ServiceAccount token is mounted (what the in-cluster configuration reads).
SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


async def load_client_configuration(kubeconfig: Path | None) -> k8s_client.Configuration:
    """The API client configuration of ``kubeconfig``, or the in-cluster one when None.

    Called before anything starts, so that a kubeconfig that cannot be used, or a pod
    without a ServiceAccount token, stops the process with one line (``ConfigError``, whose
    ``setting`` is ``kubeconfig``) instead of failing inside the running source.  The
    checks made here first (readable, YAML, a mapping, a current-context that exists) give
    the cause in userproxy's words; whatever else kubernetes-asyncio rejects keeps its text.
    """
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
    _check_kubeconfig(kubeconfig)
    try:
        await k8s_config.load_kube_config(
            config_file=str(kubeconfig),
            client_configuration=configuration,
            persist_config=False,
        )
    except (k8s_config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        problem = f"{kubeconfig} cannot be used: {exc}"
        raise ConfigError(
            f"--kubeconfig: {problem}", setting="kubeconfig", problem=problem
        ) from None
    return configuration


def _check_kubeconfig(path: Path) -> None:
    """The kubeconfig is a readable YAML mapping whose current-context is among its contexts."""

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
    current = document.get("current-context")
    if not current:
        raise fail("has no current-context (set one with kubectl config use-context)")
    contexts = document.get("contexts")
    contexts = contexts if isinstance(contexts, list) else []
    names = [c.get("name") for c in contexts if isinstance(c, dict)]
    if current not in names:
        raise fail(f"current-context {current!r} is not among its contexts {names}")


async def make_api_client(kubeconfig: Path | None) -> ApiClient:
    """An ApiClient for ``kubeconfig``, or for the in-cluster configuration when None.

    The caller owns the client (``await client.close()``; :meth:`KubernetesSource.close`
    does it for the client given to the source).
    """
    return ApiClient(configuration=await load_client_configuration(kubeconfig))


def label_selector(proxy_name: str | None) -> str:
    """The label selector of the Service and EndpointSlice lists and watches."""
    if proxy_name is None:
        return f"!{HEADLESS_LABEL},!{SERVICE_PROXY_NAME_LABEL}"
    return f"!{HEADLESS_LABEL},{SERVICE_PROXY_NAME_LABEL}={proxy_name}"


# --------------------------------------------------------------------------- errors


class _Gone(Exception):
    """The resourceVersion to resume from is too old (410): re-list."""


class _ApiError(Exception):
    """The API server answered with an error (an HTTP status or an ERROR event)."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}" if status is not None else message)
        self.status = status


class _WatchBroken(Exception):
    """An established watch stream broke (connection lost, read timeout, garbage)."""


def _status_message(body: bytes) -> str:
    """The ``message`` of a v1 Status body, else the body's start."""
    text = body[:_ERROR_BODY_LIMIT].decode("utf-8", "replace")
    try:
        status = json_limits.loads(body)
    except ValueError:
        return text.strip() or "(no body)"
    if isinstance(status, dict):
        message = status.get("message") or status.get("reason")
        if isinstance(message, str) and message:
            return message
    return text.strip()


# --------------------------------------------------------------------------- helpers


class _Backoff:
    """Capped exponential backoff with full jitter (delay uniform in [0, cap])."""

    def __init__(self, initial: float, maximum: float) -> None:
        self._initial = initial
        self._maximum = maximum
        self._attempts = 0

    def reset(self) -> None:
        self._attempts = 0

    def next_delay(self) -> float:
        cap = min(self._maximum, self._initial * 2 ** min(self._attempts, 30))
        self._attempts += 1
        return random.uniform(0, cap)


class _Throttle:
    """Logs a warning per cause at most every ``_WARN_INTERVAL`` seconds, the rest at debug."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, cause: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(cause)
        if last is not None and now - last < _WARN_INTERVAL:
            self._suppressed[cause] = self._suppressed.get(cause, 0) + 1
            logger.debug(message, *args)
            return
        self._last[cause] = now
        suppressed = self._suppressed.pop(cause, 0)
        if suppressed:
            logger.warning(message + " (%d similar messages suppressed)", *args, suppressed)
        else:
            logger.warning(message, *args)


def _str_mapping(value: object) -> dict[str, object] | None:
    """``value`` as a mapping with string keys, or None if it is not one."""
    if not isinstance(value, Mapping):
        return None
    result: dict[str, object] = {}
    for key, item in value.items():
        if not isinstance(key, str):
            return None
        result[key] = item
    return result


def _resource_version(obj: Mapping[str, object]) -> str | None:
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        rv = meta.get("resourceVersion")
        if isinstance(rv, str) and rv:
            return rv
    return None


@dataclass(frozen=True, slots=True)
class _Decoded(Generic[_T]):
    """One raw object after decoding.

    ``key`` is (namespace, name), None when the object has no usable name; ``value`` is
    None when the object is not this proxy's (not selected, FQDN slice, another node) or
    invalid; ``error`` says why it is invalid.
    """

    key: _Key | None
    label: str
    value: _T | None = None
    error: str | None = None


@dataclass(eq=False)
class _Resource(Generic[_T]):
    """One listed and watched resource and the source's current view of it."""

    name: str
    kind: str
    namespaced: bool
    list_func: Callable[..., Awaitable[object]]
    label_selector: str | None
    field_selector: str | None
    convert: Callable[[dict[str, object]], _T | None]
    on_add: Callable[[_T], None]
    on_update: Callable[[_T, _T], None]
    on_delete: Callable[[_T], None]
    on_synced: Callable[[], None]
    view: dict[_Key, _T] = field(default_factory=dict)
    resource_version: str | None = None
    synced: bool = False
    throttle: _Throttle = field(default_factory=_Throttle)
    #: (key, error) of invalid objects already warned about, so resyncs do not repeat it.
    warned: set[tuple[_Key | None, str]] = field(default_factory=set)
    backoff: _Backoff = field(default_factory=lambda: _Backoff(0.5, 30.0))
    #: Failed attempts since the watch last delivered anything.
    failures: int = 0

    def selectors(self) -> dict[str, str]:
        params: dict[str, str] = {}
        if self.label_selector is not None:
            params["label_selector"] = self.label_selector
        if self.field_selector is not None:
            params["field_selector"] = self.field_selector
        return params

    def decode(self, raw: object) -> _Decoded[_T]:
        obj = _str_mapping(raw)
        if obj is None:
            return _Decoded(None, f"{self.kind} <unknown>", error="not a JSON object")
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        if not self.namespaced:
            namespace = ""
        elif not isinstance(namespace, str) or not namespace:
            namespace = "default"
        if not isinstance(name, str) or not name:
            label = f"{self.kind} {namespace}/<unnamed>" if namespace else f"{self.kind} <unnamed>"
            return _Decoded(None, label, error="metadata.name: is required")
        label = f"{self.kind} {namespace}/{name}" if namespace else f"{self.kind} {name}"
        key = (namespace, name)
        try:
            return _Decoded(key, label, self.convert(obj))
        except DecodeError as exc:
            return _Decoded(key, label, error=str(exc))


# --------------------------------------------------------------------------- the source


class KubernetesSource:
    """Feeds ``handlers`` from the Kubernetes API; :meth:`run` until cancelled.

    ``api`` is owned by the source from here on: :meth:`close` closes it.
    ``on_event(kind, resource)`` is called with ``kind`` one of :data:`EVENT_KINDS`:

    * ``watch_restart``: an established watch broke or ended early and is resumed;
    * ``relist``: the watch could not be resumed (410 Gone), a re-list follows (periodic
      resyncs are not counted);
    * ``invalid_object``: an object was skipped because it failed validation;
    * ``api_error``: a LIST or WATCH request failed (unreachable, an HTTP error, an ERROR
      event other than 410, a broken response) and is retried after a backoff;

    and ``resource`` one of :data:`RESOURCES`.
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
        if resync_period < 0:
            raise ValueError(f"resync_period must be >= 0, got {resync_period}")
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if watch_timeout < 1:
            raise ValueError(f"watch_timeout must be >= 1 s, got {watch_timeout}")
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        self._api = api
        self._handlers = handlers
        self._node_name = node_name
        self._proxy_name = proxy_name
        self._resync_period = resync_period
        self._on_event = on_event
        self._watch_timeout = watch_timeout
        self._page_size = page_size

        core = k8s_client.CoreV1Api(api)
        discovery = k8s_client.DiscoveryV1Api(api)
        selector = label_selector(proxy_name)
        self.services: _Resource[Service] = _Resource(
            name="services",
            kind="Service",
            namespaced=True,
            list_func=core.list_service_for_all_namespaces,
            label_selector=selector,
            field_selector=None,
            convert=self._convert_service,
            on_add=handlers.on_service_add,
            on_update=handlers.on_service_update,
            on_delete=handlers.on_service_delete,
            on_synced=handlers.on_services_synced,
            backoff=_Backoff(backoff_initial, backoff_max),
        )
        self.endpoint_slices: _Resource[EndpointSlice] = _Resource(
            name="endpointslices",
            kind="EndpointSlice",
            namespaced=True,
            list_func=discovery.list_endpoint_slice_for_all_namespaces,
            label_selector=selector,
            field_selector=None,
            convert=self._convert_slice,
            on_add=handlers.on_endpointslice_add,
            on_update=handlers.on_endpointslice_update,
            on_delete=handlers.on_endpointslice_delete,
            on_synced=handlers.on_endpointslices_synced,
            backoff=_Backoff(backoff_initial, backoff_max),
        )
        self.nodes: _Resource[Node] = _Resource(
            name="nodes",
            kind="Node",
            namespaced=False,
            list_func=core.list_node,
            label_selector=None,
            field_selector=f"metadata.name={node_name}",
            convert=self._convert_node,
            on_add=handlers.on_node_add,
            on_update=handlers.on_node_update,
            on_delete=handlers.on_node_delete,
            on_synced=handlers.on_node_synced,
            backoff=_Backoff(backoff_initial, backoff_max),
        )

    # ------------------------------------------------------------------ conversions

    def _convert_service(self, obj: dict[str, object]) -> Service | None:
        if not is_selected(decode_labels(obj), self._proxy_name):
            return None
        return decode_service(obj)

    def _convert_slice(self, obj: dict[str, object]) -> EndpointSlice | None:
        if not is_selected(decode_labels(obj), self._proxy_name):
            return None
        return decode_endpoint_slice(obj)

    def _convert_node(self, obj: dict[str, object]) -> Node | None:
        node = decode_node(obj)
        return node if node.name == self._node_name else None

    # ------------------------------------------------------------------ public API

    @property
    def synced(self) -> bool:
        """Whether all three resources have completed their first list."""
        return self.services.synced and self.endpoint_slices.synced and self.nodes.synced

    async def run(self) -> None:
        """List and watch the three resources until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._run_resource(self.services), name="k8s-services")
            tasks.create_task(self._run_resource(self.endpoint_slices), name="k8s-endpointslices")
            tasks.create_task(self._run_resource(self.nodes), name="k8s-nodes")

    async def close(self) -> None:
        """Close the API client (call after :meth:`run` has ended)."""
        await self._api.close()

    # ------------------------------------------------------------------ the loop

    def _event(self, kind: str, resource: _Resource[_T]) -> None:
        if self._on_event is not None:
            self._on_event(kind, resource.name)

    async def _run_resource(self, res: _Resource[_T]) -> None:
        loop = asyncio.get_running_loop()
        relist: str | None = "initial"
        next_resync: float | None = None
        gone_in_a_row = 0
        while True:  # until cancelled; every failure sleeps a backoff delay
            try:
                if relist is not None or res.resource_version is None:
                    await self._relist(res, relist or "initial")
                    relist = None
                    if self._resync_period > 0:
                        next_resync = loop.time() + self._resync_period
                resync = asyncio.timeout_at(next_resync)
                try:
                    async with resync:
                        routine = await self._watch(res)
                except TimeoutError:
                    if not resync.expired():
                        raise
                    logger.debug("%s: periodic resync", res.name)
                    relist = "resync"
                    continue
                gone_in_a_row = 0
                if routine:
                    continue
                # The server ended the stream long before its timeout: resume after a delay.
                self._event("watch_restart", res)
                res.throttle.warning(
                    "watch", "%s: watch closed early by the server; resuming", res.name
                )
            except _Gone as exc:
                self._event("relist", res)
                res.throttle.warning(
                    "gone",
                    "%s: cannot resume the watch at resourceVersion %s (%s); re-listing",
                    res.name,
                    res.resource_version,
                    exc,
                )
                relist = "gone"
                gone_in_a_row += 1
                if gone_in_a_row == 1:
                    continue  # re-list at once; a repeated 410 waits like any failure
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(res, exc)
            res.failures += 1
            delay = res.backoff.next_delay()
            logger.debug("%s: retrying in %.2f s", res.name, delay)
            await asyncio.sleep(delay)

    def _failed(self, res: _Resource[_T], exc: Exception) -> None:
        """Report one failed LIST or WATCH attempt."""
        if isinstance(exc, _WatchBroken):
            self._event("watch_restart", res)
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            res.throttle.warning(
                "watch", "%s: watch broke (%s); resuming", res.name, _describe_error(cause)
            )
            return
        self._event("api_error", res)
        if isinstance(exc, _ApiError | aiohttp.ClientError | OSError | TimeoutError):
            res.throttle.warning(
                "api", "%s: API request failed: %s", res.name, _describe_error(exc)
            )
        else:
            logger.error("%s: unexpected error, retrying", res.name, exc_info=exc)

    def _working(self, res: _Resource[_T]) -> None:
        """The watch delivered something: it works, so the next failure starts afresh."""
        res.backoff.reset()
        if res.failures:
            logger.info("%s: watching again after %d failed attempts", res.name, res.failures)
            res.failures = 0

    # ------------------------------------------------------------------ LIST

    async def _request(
        self, res: _Resource[_T], client_timeout: aiohttp.ClientTimeout, **params: object
    ) -> aiohttp.ClientResponse:
        """One GET with the resource's selectors; raises for any status but 200."""
        response: object = await res.list_func(
            **res.selectors(), **params, _preload_content=False, _request_timeout=client_timeout
        )
        if not isinstance(response, aiohttp.ClientResponse):
            raise TypeError(f"expected an aiohttp response, got {type(response).__name__}")
        if response.status == 200:
            return response
        try:
            body = await response.content.read(_ERROR_BODY_LIMIT)
        finally:
            response.release()
        message = _status_message(body)
        if response.status == 410:
            raise _Gone(message)
        raise _ApiError(response.status, message)

    async def _list(self, res: _Resource[_T]) -> tuple[str, list[object]]:
        """All items of a (paged) LIST and its resourceVersion."""
        timeout = aiohttp.ClientTimeout(total=_LIST_TIMEOUT, sock_connect=_CONNECT_TIMEOUT)
        items: list[object] = []
        token: str | None = None
        for _page in range(_MAX_PAGES):
            params: dict[str, object] = {"limit": self._page_size}
            if token is not None:
                params["_continue"] = token
            try:
                response = await self._request(res, timeout, **params)
            except _Gone:
                if token is None:
                    raise
                # The continue token expired between pages: start over.
                logger.debug("%s: list continue token expired, listing again", res.name)
                items, token = [], None
                continue
            try:
                body = await response.read()
            finally:
                response.release()
            page = self._parse_list(res, body)
            items.extend(page[1])
            token = page[2]
            if token is None:
                return page[0], items
        raise _ApiError(None, f"list of {res.name} did not end after {_MAX_PAGES} pages")

    @staticmethod
    def _parse_list(res: _Resource[_T], body: bytes) -> tuple[str, list[object], str | None]:
        try:
            document = _str_mapping(json_limits.loads(body))
        except ValueError as exc:
            raise _ApiError(200, f"list of {res.name} is not JSON: {exc}") from None
        if document is None:
            raise _ApiError(200, f"list of {res.name} is not a JSON object")
        meta = document.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        if not isinstance(rv, str) or not rv:
            raise _ApiError(200, f"list of {res.name} has no metadata.resourceVersion")
        token = meta.get("continue") if isinstance(meta, Mapping) else None
        raw_items = document.get("items")
        if raw_items is None:
            raw_items = []
        if not isinstance(raw_items, list):
            raise _ApiError(200, f"list of {res.name}: items is not a list")
        return rv, raw_items, token if isinstance(token, str) and token else None

    async def _relist(self, res: _Resource[_T], reason: str) -> None:
        """LIST, reconcile the view with it and deliver the differences."""
        rv, items = await self._list(res)
        new: dict[_Key, _T] = {}
        invalid = 0
        for raw in items:
            decoded = res.decode(raw)
            if decoded.error is not None:
                invalid += 1
                self._invalid(res, decoded, "in the list")
                if decoded.key is not None and decoded.key in res.view:
                    new[decoded.key] = res.view[decoded.key]  # keep the last good version
                continue
            if decoded.key is not None and decoded.value is not None:
                new[decoded.key] = decoded.value
        calls = deliver_diff(res.view, new, res.on_add, res.on_update, res.on_delete)
        res.view = new
        res.resource_version = rv
        if not res.synced:
            res.synced = True
            res.on_synced()
            logger.info(
                "%s: initial list: %d delivered, %d invalid skipped (resourceVersion %s)",
                res.name,
                len(new),
                invalid,
                rv,
            )
        elif reason == "resync":
            logger.log(
                logging.INFO if calls else logging.DEBUG,
                "%s: resync: %d objects, %d changes delivered",
                res.name,
                len(new),
                calls,
            )
        else:
            res.throttle.warning(
                "relist",
                "%s: re-listed (%s): %d objects, %d changes delivered",
                res.name,
                reason,
                len(new),
                calls,
            )

    def _invalid(self, res: _Resource[_T], decoded: _Decoded[_T], where: str) -> None:
        self._event("invalid_object", res)
        error = decoded.error or "invalid"
        marker = (decoded.key, error)
        if marker in res.warned:
            logger.debug("%s: skipping invalid %s (%s): %s", res.name, decoded.label, where, error)
            return
        if len(res.warned) > 10_000:
            res.warned.clear()
        res.warned.add(marker)
        logger.warning("%s: skipping invalid %s (%s): %s", res.name, decoded.label, where, error)

    # ------------------------------------------------------------------ WATCH

    async def _watch(self, res: _Resource[_T]) -> bool:
        """One WATCH from the current resourceVersion until the stream ends.

        Returns whether the end was routine (the server ended the stream near its
        timeout).  Raises _Gone for 410, _WatchBroken when an established stream broke.
        """
        seconds = int(self._watch_timeout * (1 + random.random()))
        timeout = aiohttp.ClientTimeout(
            total=None,
            connect=_CONNECT_TIMEOUT,
            sock_connect=_CONNECT_TIMEOUT,
            sock_read=seconds + _WATCH_READ_SLACK,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await self._request(
            res,
            timeout,
            watch=True,
            resource_version=res.resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=seconds,
        )
        logger.debug("%s: watching from resourceVersion %s", res.name, res.resource_version)
        working = False
        try:
            while True:  # bounded by the server's timeoutSeconds and the read timeout
                try:
                    line = await response.content.readline()
                except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                    raise _WatchBroken(str(exc)) from exc
                if not line:
                    break
                if line.strip():
                    self._handle_line(res, line)
                    if not working:
                        working = True
                        self._working(res)
        finally:
            response.close()  # never return a half-read stream to the connection pool
        return loop.time() - started >= seconds / 2

    def _handle_line(self, res: _Resource[_T], line: bytes) -> None:
        try:
            event = _str_mapping(json_limits.loads(line))
        except ValueError:
            event = None
        if event is None:
            raise _WatchBroken("the watch stream carried something that is not a JSON object")
        kind = event.get("type")
        obj = _str_mapping(event.get("object"))
        if kind == "ERROR":
            code = obj.get("code") if obj is not None else None
            message = obj.get("message") if obj is not None else None
            text = message if isinstance(message, str) else "no message"
            if code == 410:
                raise _Gone(text)
            raise _ApiError(code if isinstance(code, int) else None, f"watch error: {text}")
        if obj is None:
            raise _WatchBroken(f"watch event {kind!r} without an object")
        rv = _resource_version(obj)
        if kind == "BOOKMARK":
            if rv is not None:
                res.resource_version = rv
                logger.debug("%s: bookmark at resourceVersion %s", res.name, rv)
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            res.throttle.warning("type", "%s: ignoring watch event of type %r", res.name, kind)
            return
        self._apply(res, kind, obj)
        if rv is not None:
            res.resource_version = rv

    def _apply(self, res: _Resource[_T], kind: str, obj: dict[str, object]) -> None:
        decoded = res.decode(obj)
        key = decoded.key
        old = res.view.get(key) if key is not None else None
        logger.debug("%s: %s %s", res.name, kind, decoded.label)
        if decoded.error is not None:
            self._invalid(res, decoded, f"watch event {kind}")
            if kind == "DELETED" and key is not None and old is not None:
                del res.view[key]  # gone, whatever its last state looked like
                res.on_delete(old)
            return
        if key is None:
            return
        new = decoded.value
        if kind == "DELETED" or new is None:
            if old is not None:
                del res.view[key]
                res.on_delete(old)
            return
        res.view[key] = new
        if old is None:
            res.on_add(new)
        elif old != new:
            res.on_update(old, new)


def _describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
