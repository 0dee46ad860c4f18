"""A source that reads Services, EndpointSlices and Nodes from manifest files.

``load_manifests`` reads YAML (multi-document, ``kind: List``) and JSON files and returns a
validated :class:`ManifestState`; every problem in every file is collected into one
:class:`ManifestError`.  :class:`ManifestSource` delivers a state through the handler
interface and then polls the files, reloading everything when they change and delivering
only the differences.  A broken edit keeps the last good state.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

import yaml

from userproxy.control.handlers import Handlers
from userproxy.model import EndpointSlice, Node, Service, ServiceKey
from userproxy.sources.decode import (
    DecodeError,
    decode_endpoint_slice,
    decode_labels,
    decode_node,
    decode_service,
    is_selected,
)
from userproxy.sources.diff import deliver_diff
from userproxy.sources.inotify import Inotify, watch_directories

__all__ = [
    "MANIFEST_SUFFIXES",
    "ManifestError",
    "ManifestSource",
    "ManifestState",
    "load_manifests",
]

logger = logging.getLogger(__name__)

#: With inotify, how often the files are polled anyway (file systems that report nothing).
FALLBACK_POLL_INTERVAL = 2.0

#: File name endings read from a directory (a file named explicitly is read whatever its name).
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

_SERVICE = ("v1", "Service")
_ENDPOINT_SLICE = ("discovery.k8s.io/v1", "EndpointSlice")
_NODE = ("v1", "Node")

_K = TypeVar("_K")
_V = TypeVar("_V")


class ManifestError(Exception):
    """One or more problems in the manifest files, one line each.

    Each line names the file, the document (0-based), the object and the field, e.g.
    ``web.yaml: document 2: Service default/web: spec.ports[0].port: 70000 is out of range
    1..65535``.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{len(self.problems)} problems in the manifests:"]
        lines.extend(f"  {problem}" for problem in self.problems)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._text()


def _frozen_map(items: Mapping[_K, _V] | None = None) -> Mapping[_K, _V]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
class ManifestState:
    """Every selected object the manifests define.

    ``slices`` is keyed by (namespace, name); ``nodes`` by name.  Headless and ExternalName
    Services are included: the control plane skips them (``Service.is_proxied``).
    """

    services: Mapping[ServiceKey, Service] = field(default_factory=_frozen_map)
    slices: Mapping[tuple[str, str], EndpointSlice] = field(default_factory=_frozen_map)
    nodes: Mapping[str, Node] = field(default_factory=_frozen_map)


# --------------------------------------------------------------------------- loading


class _Loader(yaml.SafeLoader):
    """A safe loader that keeps timestamps as strings, as Kubernetes' YAML decoding does."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _manifest_files(paths: Sequence[Path]) -> tuple[list[Path], list[str]]:
    """The files to read (directories expanded, non-recursively, sorted) and problems."""
    files: list[Path] = []
    problems: list[str] = []
    for path in paths:
        if path.is_dir():
            try:
                children = sorted(path.iterdir())
            except OSError as exc:
                problems.append(f"{path}: cannot list directory: {exc.strerror or exc}")
                continue
            files.extend(
                child for child in children if child.suffix in MANIFEST_SUFFIXES and child.is_file()
            )
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return files, problems


def _parse_file(path: Path) -> list[object]:
    """The documents of one file; raises ManifestError for unreadable or malformed files."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ManifestError([f"{path}: cannot read: {reason}"]) from None
    if path.suffix == ".json":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise ManifestError(
                [f"{path}: line {exc.lineno}, column {exc.colno}: JSON syntax error: {exc.msg}"]
            ) from None
    try:
        return list(yaml.load_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise ManifestError([f"{path}: {where}YAML syntax error: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"{path}: YAML syntax error: {exc}"]) from None


def _raw_identity(obj: Mapping[object, object]) -> tuple[str, str]:
    """Best-effort (namespace, name) of a raw object, for messages and duplicate checks."""
    meta = obj.get("metadata")
    name = namespace = None
    if isinstance(meta, Mapping):
        name = meta.get("name")
        namespace = meta.get("namespace")
    return (
        namespace if isinstance(namespace, str) and namespace else "default",
        name if isinstance(name, str) and name else "<unnamed>",
    )


@dataclass
class _Collector:
    proxy_name: str | None
    services: dict[ServiceKey, Service] = field(default_factory=dict)
    slices: dict[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def add_documents(self, path: Path, documents: list[object]) -> None:
        for index, document in enumerate(documents):
            self.add_object(document, f"{path}: document {index}")

    def add_object(
        self, raw: object, where: str, default_type: tuple[str, str] | None = None
    ) -> None:
        """Add one raw object; ``default_type`` is (apiVersion, kind) for typed-list items."""
        if raw is None:
            return  # an empty document
        if not isinstance(raw, Mapping):
            self.problems.append(f"{where}: expected a mapping (a Kubernetes object)")
            return
        api_version = raw.get("apiVersion")
        kind = raw.get("kind")
        if default_type is not None:
            api_version = api_version or default_type[0]
            kind = kind or default_type[1]
        if not isinstance(kind, str) or not kind:
            self.problems.append(f"{where}: kind: is required")
            return
        if not isinstance(api_version, str) or not api_version:
            self.problems.append(f"{where}: apiVersion: is required")
            return
        if kind.endswith("List"):
            # kind: List (kubectl) holds typed items; a ServiceList's items have no kind.
            item_type = None if kind == "List" else (api_version, kind.removesuffix("List"))
            items = raw.get("items")
            if items is None:
                return
            if not isinstance(items, list):
                self.problems.append(f"{where}: items: expected a list")
                return
            for i, item in enumerate(items):
                self.add_object(item, f"{where}, items[{i}]", item_type)
            return

        namespace, name = _raw_identity(raw)
        if (api_version, kind) not in (_SERVICE, _ENDPOINT_SLICE, _NODE):
            logger.debug("%s: ignoring %s %s (%s/%s)", where, api_version, kind, namespace, name)
            return
        if (api_version, kind) == _NODE:
            namespace = ""
        label = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
        obj: dict[str, object] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                self.problems.append(f"{where}: {label}: key {key!r} is not a string")
                return
            obj[key] = value

        identity = (kind, namespace, name)
        if identity in self.seen:
            self.problems.append(
                f"{where}: {label}: duplicate object (first defined in {self.seen[identity]})"
            )
            return
        self.seen[identity] = where

        try:
            self._decode(kind, obj, where, label)
        except DecodeError as exc:
            self.problems.append(f"{where}: {label}: {exc}")

    def _decode(self, kind: str, obj: Mapping[str, object], where: str, label: str) -> None:
        if kind == "Node":
            node = decode_node(obj)
            self.nodes[node.name] = node
            return
        if not is_selected(decode_labels(obj), self.proxy_name):
            logger.debug("%s: %s is not selected by this proxy's label selector", where, label)
            return
        if kind == "Service":
            service = decode_service(obj)
            self.services[service.key] = service
            return
        endpoint_slice = decode_endpoint_slice(obj)
        if endpoint_slice is None:
            logger.debug("%s: ignoring FQDN %s", where, label)
            return
        self.slices[(endpoint_slice.namespace, endpoint_slice.name)] = endpoint_slice


@dataclass
class _FileResult:
    """What one file contributed, kept while the file's stat stays the same."""

    key: tuple[int, int, int] | None
    collector: _Collector


class ManifestCache:
    """Decoded files by path, so a reload re-reads only the files whose stat changed.

    A file modified within the last second is read again even when its stat did not
    change (a second write in the same timestamp tick keeping the size is invisible to
    stat); everything else is trusted.  Not thread-safe: one reload at a time.
    """

    def __init__(self) -> None:
        self._files: dict[Path, _FileResult] = {}
        self.reads = 0

    def collect(self, path: Path, proxy_name: str | None) -> _Collector:
        key = _stat_key(path)
        cached = self._files.get(path)
        if (
            cached is not None
            and key is not None
            and cached.key == key
            and key[0] < time.time_ns() - _RACY_NS
        ):
            return cached.collector
        self.reads += 1
        collector = _Collector(proxy_name)
        try:
            documents = _parse_file(path)
        except ManifestError as exc:
            collector.problems.extend(exc.problems)
        else:
            collector.add_documents(path, documents)
        self._files[path] = _FileResult(key, collector)
        return collector

    def keep_only(self, files: Sequence[Path]) -> None:
        wanted = set(files)
        for path in [p for p in self._files if p not in wanted]:
            del self._files[path]


def load_manifests(
    paths: Sequence[Path], proxy_name: str | None = None, cache: ManifestCache | None = None
) -> ManifestState:
    """Read and validate manifest files and directories.

    Directories contribute their ``*.yaml``, ``*.yml`` and ``*.json`` files (not recursively,
    in sorted order).  Services and EndpointSlices are filtered with the proxy's label
    selector (:func:`userproxy.sources.decode.is_selected`).  Raises :class:`ManifestError`
    listing every problem found.  With a ``cache``, unchanged files are not read again.
    """
    files, problems = _manifest_files(paths)
    cache = cache if cache is not None else ManifestCache()
    cache.keep_only(files)
    services: dict[ServiceKey, Service] = {}
    slices: dict[tuple[str, str], EndpointSlice] = {}
    nodes: dict[str, Node] = {}
    seen: dict[tuple[str, str, str], str] = {}
    for path in files:
        collector = cache.collect(path, proxy_name)
        problems.extend(collector.problems)
        for identity, where in collector.seen.items():
            first = seen.setdefault(identity, where)
            if first is not where:
                kind, namespace, name = identity
                label = f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"
                problems.append(f"{where}: {label}: duplicate object (first defined in {first})")
        services.update(collector.services)
        slices.update(collector.slices)
        nodes.update(collector.nodes)
    if problems:
        raise ManifestError(problems)
    return ManifestState(
        services=_frozen_map(services),
        slices=_frozen_map(slices),
        nodes=_frozen_map(nodes),
    )


# --------------------------------------------------------------------------- the source

#: How long after a file's modification time its content may still change unnoticed: a
#: second write within the same timestamp tick that keeps the size leaves stat unchanged.
#: Files modified this recently are read again on the next poll (git's "racy" check).
_RACY_NS = 1_000_000_000


@dataclass(frozen=True)
class _Signature:
    """A cheap fingerprint of the manifest paths: names, and per file what stat says."""

    entries: tuple[tuple[str, object], ...] = ()
    newest_mtime_ns: int = 0


def _stat_key(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _signature(paths: Sequence[Path]) -> _Signature:
    entries: list[tuple[str, object]] = []
    newest = 0
    for path in paths:
        if path.is_dir():
            try:
                names = sorted(os.listdir(path))
            except OSError:
                entries.append((str(path), "unlistable"))
                continue
            listing = tuple(
                (name, _stat_key(path / name))
                for name in names
                if Path(name).suffix in MANIFEST_SUFFIXES
            )
            newest = max([newest, *(key[0] for _, key in listing if key is not None)])
            entries.append((str(path), ("dir", listing)))
        else:
            key = _stat_key(path)
            if key is not None:
                newest = max(newest, key[0])
            entries.append((str(path), ("file", key)))
    return _Signature(tuple(entries), newest)


def _is_racy(signature: _Signature) -> bool:
    return signature.newest_mtime_ns >= time.time_ns() - _RACY_NS


def _own_node(state: ManifestState, node_name: str) -> dict[str, Node]:
    node = state.nodes.get(node_name)
    return {node_name: node} if node is not None else {}


class ManifestSource:
    """Feeds the handlers from manifest files and follows changes to them.

    Call :meth:`initial_load` once (it raises :class:`ManifestError` if the files are bad),
    then run :meth:`run` as a task.  Only the Node named ``node_name`` is delivered.
    ``on_reload_error`` is called for every reload of changed files that fails (the last
    good state stays; the error is logged once per distinct failure), ``on_reload`` after
    every successful reload of changed files.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        handlers: Handlers,
        *,
        node_name: str,
        proxy_name: str | None = None,
        poll_interval: float = 0.2,
        on_reload_error: Callable[[ManifestError], None] | None = None,
        on_reload: Callable[[], None] | None = None,
    ) -> None:
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        self._paths = tuple(Path(p) for p in paths)
        self._handlers = handlers
        self._node_name = node_name
        self._proxy_name = proxy_name
        self._poll_interval = poll_interval
        self._on_reload_error = on_reload_error
        self._on_reload = on_reload
        self._state: ManifestState | None = None
        self._signature = _Signature()
        self._recheck = False
        self._cache = ManifestCache()
        self._last_error: str | None = None

    @property
    def state(self) -> ManifestState | None:
        """The last good state (None before :meth:`initial_load`)."""
        return self._state

    def initial_load(self) -> ManifestState:
        """Load the manifests and deliver everything, then the three ``*_synced`` calls."""
        signature = _signature(self._paths)
        state = load_manifests(self._paths, self._proxy_name, self._cache)
        self._signature = signature
        self._recheck = _is_racy(signature)
        self._state = state
        handlers = self._handlers
        for service in state.services.values():
            handlers.on_service_add(service)
        for endpoint_slice in state.slices.values():
            handlers.on_endpointslice_add(endpoint_slice)
        node = state.nodes.get(self._node_name)
        if node is not None:
            handlers.on_node_add(node)
        handlers.on_services_synced()
        handlers.on_endpointslices_synced()
        handlers.on_node_synced()
        logger.info(
            "loaded manifests: %d services, %d endpoint slices, own node %s",
            len(state.services),
            len(state.slices),
            "found" if node is not None else "not found",
        )
        return state

    async def run(self) -> None:
        """Poll the paths every ``poll_interval`` and apply changes; runs until cancelled.

        Calls :meth:`initial_load` first if it has not been called (its ManifestError then
        propagates).
        """
        if self._state is None:
            self.initial_load()
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        try:
            notify: Inotify | None = Inotify(watch_directories(self._paths))
        except OSError as exc:
            notify = None
            logger.info("no inotify (%s): polling the manifests every %.1fs", exc,
                        self._poll_interval)  # fmt: skip
        if notify is not None:
            watcher = notify

            def changed() -> None:
                watcher.drain()
                wake.set()

            loop.add_reader(watcher.fileno(), changed)
        try:
            while True:
                # With inotify, polling is only the fallback (and the re-reads of files
                # modified in the last second); without it, polling is how changes are seen.
                trusted = notify is not None and not self._recheck
                try:
                    async with asyncio.timeout(
                        FALLBACK_POLL_INTERVAL if trusted else self._poll_interval
                    ):
                        await wake.wait()
                except TimeoutError:
                    pass
                wake.clear()
                await self.poll()
        finally:
            if notify is not None:
                loop.remove_reader(notify.fileno())
                notify.close()

    async def poll(self) -> None:
        """Check the paths once and reload if they changed (what :meth:`run` repeats)."""
        signature = _signature(self._paths)
        changed = signature.entries != self._signature.entries
        if not changed and not self._recheck:
            return
        self._signature = signature
        # A file written within the last second may change again without its stat changing:
        # read it once more on later polls until it is old enough to trust stat.
        self._recheck = _is_racy(signature)
        await self._reload(changed=changed)

    async def _reload(self, *, changed: bool) -> None:
        try:
            state = await asyncio.to_thread(
                load_manifests, self._paths, self._proxy_name, self._cache
            )
        except ManifestError as exc:
            self._failed(exc, changed=changed)
            return
        except Exception as exc:  # a bug must not stop the source; keep the last state
            logger.exception("unexpected error while reloading the manifests")
            self._last_error = None
            self._failed(ManifestError([f"unexpected error: {exc!r}"]), changed=True, log=False)
            return
        if self._last_error is not None:
            logger.info("manifests are valid again")
            self._last_error = None
            changed = True
        calls = self.apply(state)
        if (changed or calls) and self._on_reload is not None:
            self._on_reload()

    def _failed(self, error: ManifestError, *, changed: bool, log: bool = True) -> None:
        text = str(error)
        distinct = text != self._last_error
        if log and distinct:
            logger.error("manifests not reloaded, keeping the last good state: %s", text)
        self._last_error = text
        # A re-read of unchanged files that fails the same way is not a new failure.
        if (changed or distinct) and self._on_reload_error is not None:
            self._on_reload_error(error)

    def apply(self, state: ManifestState) -> int:
        """Deliver the differences between the current state and ``state``; make it current.

        Returns the number of handler calls made (0 when nothing changed).
        """
        old = self._state if self._state is not None else ManifestState()
        handlers = self._handlers
        calls = deliver_diff(
            old.services,
            state.services,
            handlers.on_service_add,
            handlers.on_service_update,
            handlers.on_service_delete,
        )
        calls += deliver_diff(
            old.slices,
            state.slices,
            handlers.on_endpointslice_add,
            handlers.on_endpointslice_update,
            handlers.on_endpointslice_delete,
        )
        calls += deliver_diff(
            _own_node(old, self._node_name),
            _own_node(state, self._node_name),
            handlers.on_node_add,
            handlers.on_node_update,
            handlers.on_node_delete,
        )
        self._state = state
        logger.log(
            logging.INFO if calls else logging.DEBUG,
            "manifests reloaded: %d changes delivered",
            calls,
        )
        return calls
