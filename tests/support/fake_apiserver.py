"""A fake Kubernetes API server speaking the real wire protocol, for the watch source's tests.

It serves cluster-wide (and namespaced) LIST and WATCH of Services, EndpointSlices and
Nodes over plain HTTP on 127.0.0.1, the way the API server does it (and the pods'
port-forward WebSocket: fake_portforward.py):

* LIST answers ``{kind: XList, apiVersion, metadata: {resourceVersion[, continue]}, items}``
  (items without kind/apiVersion), with ``labelSelector`` (``key``, ``!key``, ``key=value``,
  ``key==value``, ``key!=value``, comma-separated), ``fieldSelector`` (``metadata.name``,
  ``metadata.namespace``) and paging (``limit``/``continue``).
* ``watch=1``/``watch=true`` streams newline-delimited JSON events ``{type, object}`` of the
  changes after ``resourceVersion``; an object that stops (starts) matching the selectors
  arrives as DELETED (ADDED), as the API server's watch cache does it.  BOOKMARK events
  when ``allowWatchBookmarks`` (every ``bookmark_interval`` seconds and on
  :meth:`FakeApiServer.bookmark`).  A resourceVersion older than the kept history gets an
  ``ERROR`` event with a 410 Status.  ``timeoutSeconds`` ends the stream;
  :meth:`FakeApiServer.send_raw` writes any line a test wants on the open watches.

Objects are stored as given (nothing is validated), so a test can inject malformed ones.
Every change gets the next resourceVersion of one cluster-wide counter, like etcd's.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import random
from collections import Counter, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aiohttp import web

from tests.support.fake_portforward import portforward_handler

__all__ = ["FakeApiServer", "RecordedRequest", "write_kubeconfig"]


@dataclass(frozen=True, slots=True)
class _Kind:
    api_version: str
    kind: str
    namespaced: bool


KINDS: Final[dict[str, _Kind]] = {
    "services": _Kind("v1", "Service", True),
    "endpointslices": _Kind("discovery.k8s.io/v1", "EndpointSlice", True),
    "nodes": _Kind("v1", "Node", False),
}

_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One LIST or WATCH request as the server received it."""

    resource: str
    watch: bool
    query: Mapping[str, str]

    @property
    def label_selector(self) -> str | None:
        return self.query.get("labelSelector")

    @property
    def field_selector(self) -> str | None:
        return self.query.get("fieldSelector")

    @property
    def resource_version(self) -> str | None:
        return self.query.get("resourceVersion")


@dataclass(frozen=True, slots=True)
class _Change:
    rv: int
    old: dict[str, object] | None
    new: dict[str, object] | None
    deleted: bool = False


class _Selector:
    """A parsed label selector plus field selector; raises ValueError for unsupported ones."""

    def __init__(self, labels: str | None, fields: str | None) -> None:
        self.labels: list[tuple[str, str, str | None]] = []
        self.fields: list[tuple[str, str, str]] = []
        for raw_term in (labels or "").split(","):
            term = raw_term.strip()
            if not term:
                continue
            if term.startswith("!"):
                self.labels.append(("!", term[1:].strip(), None))
            elif "!=" in term:
                key, value = term.split("!=", 1)
                self.labels.append(("!=", key.strip(), value.strip()))
            elif "=" in term:
                key, value = term.replace("==", "=").split("=", 1)
                self.labels.append(("=", key.strip(), value.strip()))
            elif any(c in term for c in " ()<>"):
                raise ValueError(f"unsupported label selector term {term!r}")
            else:
                self.labels.append(("exists", term, None))
        for raw_term in (fields or "").split(","):
            term = raw_term.strip()
            if not term:
                continue
            op = "!=" if "!=" in term else "="
            key, value = term.replace("==", "=").split(op, 1)
            if key not in ("metadata.name", "metadata.namespace"):
                raise ValueError(f"field label not supported: {key}")
            self.fields.append((op, key, value))

    def matches(self, obj: Mapping[str, object]) -> bool:
        meta = obj.get("metadata")
        meta = meta if isinstance(meta, Mapping) else {}
        raw_labels = meta.get("labels")
        labels = raw_labels if isinstance(raw_labels, Mapping) else {}
        for op, key, value in self.labels:
            present = key in labels
            if op == "!" and present:
                return False
            if op == "exists" and not present:
                return False
            if op == "=" and labels.get(key) != value:
                return False
            if op == "!=" and present and labels.get(key) == value:
                return False
        for op, key, value in self.fields:
            actual = meta.get(key.removeprefix("metadata."))
            if (actual == value) != (op == "="):
                return False
        return True


_DROP: Final = "drop"
_ABORT: Final = "abort"
_BOOKMARK: Final = "bookmark"


@dataclass(eq=False)
class _Watcher:
    resource: str
    namespace: str | None
    selector: _Selector
    bookmarks: bool
    queue: asyncio.Queue[_Change | str | bytes] = field(default_factory=asyncio.Queue)


def write_kubeconfig(path: Path, server: str) -> Path:
    """Write a kubeconfig that points a client at ``server`` (plain http, no auth)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))
    return path


class FakeApiServer:
    """See the module docstring.  ``await start()``; ``await stop()`` (restartable)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        history_limit: int = 1000,
        bookmark_interval: float | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self._rv = 0
        self._objects: dict[str, dict[_Key, dict[str, object]]] = {r: {} for r in KINDS}
        self._history: dict[str, deque[_Change]] = {r: deque() for r in KINDS}
        #: Per resource: history holds every change after this resourceVersion.
        self._oldest: dict[str, int] = dict.fromkeys(KINDS, 0)
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self._unnamed = 0
        self._watch_gate = asyncio.Event()
        self._watch_gate.set()
        self._list_gates: dict[str, asyncio.Event] = {}
        for resource in KINDS:
            self._list_gates[resource] = asyncio.Event()
            self._list_gates[resource].set()
        self._changed = asyncio.Event()
        #: Requests received so far (LIST and WATCH), in order.
        self.requests: list[RecordedRequest] = []
        self.list_requests: Counter[str] = Counter()
        self.watch_requests: Counter[str] = Counter()
        #: Pods whose ports the port-forward endpoint reaches: (namespace, name) -> the
        #: local address their ports listen on (tests/support/fake_portforward.py).
        self.pods: dict[_Key, str] = {}
        #: Namespaces that exist besides those of the stored objects (GET
        #: /api/v1/namespaces/NAME answers 404 for any other).
        self.namespaces: set[str] = {"default", "kube-system"}

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    def kubeconfig(self, path: Path) -> Path:
        return write_kubeconfig(path, self.url)

    async def start(self) -> None:
        """Listen (on the same port as before after a :meth:`stop`)."""
        if self._runner is not None:
            return
        app = web.Application()
        app.router.add_get("/api/v1/services", self._handle("services"))
        app.router.add_get("/api/v1/namespaces/{namespace}/services", self._handle("services"))
        app.router.add_get(
            "/apis/discovery.k8s.io/v1/endpointslices", self._handle("endpointslices")
        )
        app.router.add_get(
            "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
            self._handle("endpointslices"),
        )
        app.router.add_get("/api/v1/nodes", self._handle("nodes"))
        app.router.add_get("/api/v1/namespaces/{name}", self._namespace)
        forward = portforward_handler(self.pods)
        app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}/portforward", forward)
        app.router.add_post("/api/v1/namespaces/{namespace}/pods/{name}/portforward", forward)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
            if self.port == 0:
                address = runner.addresses[0]
                assert isinstance(address, tuple)
                self.port = int(address[1])
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner

    async def stop(self) -> None:
        """Drop every watch, close every connection and stop listening (refuse)."""
        self.drop_watches(abort=True)
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release_watches()
        for resource in KINDS:
            self.release_lists(resource)
        await self.stop()

    # ------------------------------------------------------------------ objects

    @property
    def resource_version(self) -> int:
        """The current (latest) resourceVersion."""
        return self._rv

    def objects(self, resource: str) -> list[dict[str, object]]:
        return [copy.deepcopy(obj) for obj in self._objects[resource].values()]

    def create(self, resource: str, obj: Mapping[str, object]) -> dict[str, object]:
        """Store a new object (as given: no validation) and notify the watchers."""
        key = self._key(resource, obj)
        if key in self._objects[resource]:
            raise KeyError(f"{resource} {key} already exists")
        return self._store(resource, key, obj)

    def update(self, resource: str, obj: Mapping[str, object]) -> dict[str, object]:
        key = self._key(resource, obj)
        if key not in self._objects[resource]:
            raise KeyError(f"{resource} {key} does not exist")
        return self._store(resource, key, obj)

    def apply(self, resource: str, obj: Mapping[str, object]) -> dict[str, object]:
        """Create or update."""
        return self._store(resource, self._key(resource, obj), obj)

    def delete(self, resource: str, name: str, namespace: str = "default") -> None:
        self.delete_key(resource, (namespace if KINDS[resource].namespaced else "", name))

    def inject(self, resource: str, raw: Mapping[str, object]) -> _Key:
        """Store a raw (possibly malformed, even nameless) object; returns its key."""
        try:
            key = self._key(resource, raw)
        except ValueError:
            self._unnamed += 1
            key = ("", f"<unnamed-{self._unnamed}>")
        self._store(resource, key, raw)
        return key

    def delete_key(self, resource: str, key: _Key) -> None:
        old = self._objects[resource].pop(key)
        self._rv += 1
        final = copy.deepcopy(old)
        _metadata(final)["resourceVersion"] = str(self._rv)
        self._record(resource, _Change(self._rv, old, final, deleted=True))

    def _key(self, resource: str, obj: Mapping[str, object]) -> _Key:
        meta = obj.get("metadata")
        name = meta.get("name") if isinstance(meta, Mapping) else None
        namespace = meta.get("namespace") if isinstance(meta, Mapping) else None
        if not isinstance(name, str) or not name:
            raise ValueError("object without metadata.name")
        if not KINDS[resource].namespaced:
            return ("", name)
        return (namespace if isinstance(namespace, str) and namespace else "default", name)

    def _store(self, resource: str, key: _Key, obj: Mapping[str, object]) -> dict[str, object]:
        new = copy.deepcopy(dict(obj))
        if not isinstance(new.get("metadata"), dict):
            new["metadata"] = {}
        meta = _metadata(new)
        if KINDS[resource].namespaced and key[0] and "namespace" not in meta:
            meta["namespace"] = key[0]
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        old = self._objects[resource].get(key)
        self._objects[resource][key] = new
        self._record(resource, _Change(self._rv, old, new))
        return copy.deepcopy(new)

    def _record(self, resource: str, change: _Change) -> None:
        history = self._history[resource]
        history.append(change)
        while len(history) > self.history_limit:
            self._oldest[resource] = history.popleft().rv
        for watcher in self._watchers:
            if watcher.resource == resource:
                watcher.queue.put_nowait(change)

    # ------------------------------------------------------------------ test controls

    def compact(self) -> None:
        """Forget all history: resuming a watch from any older resourceVersion gets 410."""
        for resource in KINDS:
            self._history[resource].clear()
            self._oldest[resource] = self._rv

    def drop_watches(self, *, abort: bool = True) -> int:
        """End every open watch: reset the connection (``abort``) or end the stream cleanly."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(_ABORT if abort else _DROP)
        return len(self._watchers)

    def send_raw(self, resource: str, line: bytes) -> int:
        """Write ``line`` as it is on every open watch of ``resource``; returns how many.

        For what a real API server rarely sends: garbage, an ERROR event, an unknown type.
        """
        watchers = [w for w in self._watchers if w.resource == resource]
        for watcher in watchers:
            watcher.queue.put_nowait(line)
        return len(watchers)

    def bookmark(self) -> None:
        """Send a BOOKMARK at the current resourceVersion on every watch that allows them."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(_BOOKMARK)

    def hold_watches(self) -> None:
        """Make new WATCH requests wait (unanswered) until :meth:`release_watches`."""
        self._watch_gate.clear()

    def release_watches(self) -> None:
        self._watch_gate.set()

    def hold_lists(self, resource: str) -> None:
        """Make new LIST requests of ``resource`` wait until :meth:`release_lists`."""
        self._list_gates[resource].clear()

    def release_lists(self, resource: str) -> None:
        self._list_gates[resource].set()

    def open_watches(self, resource: str | None = None) -> int:
        return sum(1 for w in self._watchers if resource is None or w.resource == resource)

    async def wait_watching(self, resources: tuple[str, ...] = tuple(KINDS)) -> None:
        """Wait (at most 10 s) until each of ``resources`` has an open watch."""
        async with asyncio.timeout(10):
            while not all(self.open_watches(r) for r in resources):
                self._changed.clear()
                await self._changed.wait()

    def watch_requests_for(self, resource: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.resource == resource and r.watch]

    def list_requests_for(self, resource: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.resource == resource and not r.watch]

    # ------------------------------------------------------------------ HTTP

    async def _namespace(self, request: web.Request) -> web.StreamResponse:
        """A Namespace: one of ``namespaces`` or of a stored object's, else 404."""
        name = request.match_info["name"]
        known = self.namespaces | {key[0] for objects in self._objects.values() for key in objects}
        if name not in known:
            return _status(404, "NotFound", f'namespaces "{name}" not found')
        body = {"kind": "Namespace", "apiVersion": "v1", "metadata": {"name": name},
                "status": {"phase": "Active"}}  # fmt: skip
        return web.json_response(body)

    def _handle(self, resource: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            query = dict(request.query)
            watching = query.get("watch", "").lower() in ("1", "true")
            self.requests.append(RecordedRequest(resource, watching, query))
            namespace = request.match_info.get("namespace")
            try:
                selector = _Selector(query.get("labelSelector"), query.get("fieldSelector"))
            except ValueError as exc:
                return _status(400, "BadRequest", str(exc))
            if watching:
                self.watch_requests[resource] += 1
                return await self._watch(request, resource, namespace, selector, query)
            self.list_requests[resource] += 1
            return await self._list(resource, namespace, selector, query)

        return handler

    async def _list(
        self, resource: str, namespace: str | None, selector: _Selector, query: Mapping[str, str]
    ) -> web.StreamResponse:
        await self._list_gates[resource].wait()
        kind = KINDS[resource]
        rv = self._rv
        start: _Key | None = None
        token = query.get("continue")
        if token:
            try:
                decoded = json.loads(token)
                rv, start = int(decoded["rv"]), (decoded["ns"], decoded["name"])
            except (ValueError, KeyError, TypeError):
                return _status(400, "BadRequest", "invalid continue token")
            if rv < self._oldest[resource]:
                return _status(410, "Expired", "The provided continue parameter is too old")
        keys = sorted(
            key
            for key, obj in self._objects[resource].items()
            if (start is None or key > start)
            and (namespace is None or key[0] == namespace)
            and selector.matches(obj)
        )
        limit = int(query.get("limit") or 0)
        metadata: dict[str, object] = {"resourceVersion": str(rv)}
        if limit > 0 and len(keys) > limit:
            keys = keys[:limit]
            last = keys[-1]
            metadata["continue"] = json.dumps({"rv": rv, "ns": last[0], "name": last[1]})
        items = [_strip_type(self._objects[resource][key]) for key in keys]
        body = {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": metadata,
            "items": items,
        }
        return web.json_response(body)

    async def _watch(
        self,
        request: web.Request,
        resource: str,
        namespace: str | None,
        selector: _Selector,
        query: Mapping[str, str],
    ) -> web.StreamResponse:
        await self._watch_gate.wait()
        kind = KINDS[resource]
        timeout = float(query.get("timeoutSeconds") or random.uniform(1800, 3600))
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        raw_rv = query.get("resourceVersion") or ""
        try:
            since = int(raw_rv) if raw_rv not in ("", "0") else None
        except ValueError:
            return _status(400, "BadRequest", f"invalid resourceVersion {raw_rv!r}")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)

        async def send(event: Mapping[str, object]) -> None:
            await response.write(json.dumps(event).encode() + b"\n")

        if since is not None and since < self._oldest[resource]:
            await send(
                {
                    "type": "ERROR",
                    "object": {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"too old resource version: {since} ({self._oldest[resource]})",
                        "reason": "Expired",
                        "code": 410,
                    },
                }
            )
            await response.write_eof()
            return response

        watcher = _Watcher(resource, namespace, selector, bookmarks)
        if since is None:
            backlog = [
                _Change(self._rv, None, obj) for key, obj in sorted(self._objects[resource].items())
            ]
        else:
            backlog = [change for change in self._history[resource] if change.rv > since]
        for change in backlog:
            watcher.queue.put_nowait(change)
        self._watchers.add(watcher)
        self._changed.set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            async with contextlib.aclosing(self._items(watcher, deadline)) as items:
                async for item in items:
                    if isinstance(item, bytes):
                        await response.write(item)
                        continue
                    if item == _ABORT:
                        if request.transport is not None:
                            request.transport.abort()
                        return response
                    if item == _DROP:
                        break
                    if item == _BOOKMARK:
                        if watcher.bookmarks:
                            await send(
                                {
                                    "type": "BOOKMARK",
                                    "object": {
                                        "kind": kind.kind,
                                        "apiVersion": kind.api_version,
                                        "metadata": {"resourceVersion": str(self._rv)},
                                    },
                                }
                            )
                        continue
                    assert isinstance(item, _Change)
                    event = self._event(watcher, item)
                    if event is not None:
                        await send(event)
        except (ConnectionResetError, RuntimeError):
            return response  # the client went away
        finally:
            self._watchers.discard(watcher)
            self._changed.set()
        with contextlib.suppress(ConnectionResetError, RuntimeError):
            await response.write_eof()
        return response

    async def _items(
        self, watcher: _Watcher, deadline: float
    ) -> AsyncGenerator[_Change | str | bytes, None]:
        """What to send on a watch until its deadline (a BOOKMARK every bookmark_interval)."""
        loop = asyncio.get_running_loop()
        while (remaining := deadline - loop.time()) > 0:
            wait = remaining
            if self.bookmark_interval is not None:
                wait = min(wait, self.bookmark_interval)
            try:
                async with asyncio.timeout(wait):
                    item = await watcher.queue.get()
            except TimeoutError:
                if self.bookmark_interval is not None and loop.time() < deadline:
                    yield _BOOKMARK
                continue
            yield item

    def _event(self, watcher: _Watcher, change: _Change) -> dict[str, object] | None:
        def visible(obj: dict[str, object] | None) -> bool:
            if obj is None:
                return False
            if watcher.namespace is not None and _metadata(obj).get("namespace") != (
                watcher.namespace
            ):
                return False
            return watcher.selector.matches(obj)

        was, now = visible(change.old), visible(change.new)
        kind = KINDS[watcher.resource]
        if change.deleted:
            if not (was or now):
                return None
            event_type, obj = "DELETED", change.new
        elif was and now:
            event_type, obj = "MODIFIED", change.new
        elif now:
            event_type, obj = "ADDED", change.new
        elif was:  # left the selection: the watch cache reports a deletion
            event_type, obj = "DELETED", change.new
        else:
            return None
        assert obj is not None
        full = {"kind": kind.kind, "apiVersion": kind.api_version, **obj}
        return {"type": event_type, "object": full}


def _metadata(obj: dict[str, object]) -> dict[str, object]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
        obj["metadata"] = meta
    return meta


def _strip_type(obj: Mapping[str, object]) -> dict[str, object]:
    """A list item as the API server sends it (no kind/apiVersion)."""
    return {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}


def _status(code: int, reason: str, message: str) -> web.Response:
    return web.json_response(
        {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code,
        },
        status=code,
    )
