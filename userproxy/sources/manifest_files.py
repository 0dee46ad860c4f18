"""Loading manifests: what a set of paths holds, as userproxy's model objects.

``load_manifests`` reads YAML (multi-document, ``kind: List``) and JSON files
(``manifest_read.py``) and returns a validated :class:`ManifestState` (whose ``warnings``
are the valid objects that would be dropped without a word), or raises
:class:`ManifestError` listing the problems.  ``manifests.py`` builds on this to follow
changes.

Invariants: validation raises nothing but :class:`ManifestError` (a bug inside it becomes
a problem line, never a crash); a file's contribution is a :class:`FileContents`, kept by
:class:`ManifestCache` while the file is not stale (``manifest_read.is_stale``), so a
reload re-reads only what changed; duplicates across files are problems however the files
were read (here, in the source's slices, or in the child of ``manifest_worker.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from userproxy.model import EndpointSlice, Node, Service, ServiceKey
from userproxy.sources import decode
from userproxy.sources.manifest_read import (
    FileList,
    ManifestError,
    Stamp,
    is_stale,
    list_manifest_files,
    parse_documents,
    read_manifest_file,
)
from userproxy.sources.manifest_warnings import (
    Category,
    ManifestWarning,
    cluster_ip_warning,
    cross_check,
    type_warning,
)
from userproxy.sources.yaml_limits import exception_text

__all__ = [
    "FileContents",
    "ManifestCache",
    "ManifestState",
    "collect_file",
    "load_manifests",
    "merge",
]

# One logger for everything the manifest source says, whichever module says it: operators
# (and tests) select "userproxy.sources.manifests".
logger = logging.getLogger("userproxy.sources.manifests")

_SERVICE = ("v1", "Service")
_ENDPOINT_SLICE = ("discovery.k8s.io/v1", "EndpointSlice")
_NODE = ("v1", "Node")

_K = TypeVar("_K")
_V = TypeVar("_V")


def _frozen_map(items: Mapping[_K, _V] | None = None) -> Mapping[_K, _V]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True, slots=True)
class ManifestState:
    """Every selected object the manifests define.

    ``slices`` is keyed by (namespace, name); ``nodes`` by name.  Headless and ExternalName
    Services are included: the control plane skips them (``Service.is_proxied``).
    ``skipped`` names the directory entries that were not read because they are not
    regular files (e.g. ``web.yaml: not a regular file (a FIFO)``).  ``warnings`` are the
    valid-but-dropped findings of ``manifest_warnings.py`` (they never fail a load);
    ``locations`` says where each object, (kind, namespace, name), is defined
    ("FILE: document N"), for messages.
    """

    services: Mapping[ServiceKey, Service] = field(default_factory=_frozen_map)
    slices: Mapping[tuple[str, str], EndpointSlice] = field(default_factory=_frozen_map)
    nodes: Mapping[str, Node] = field(default_factory=_frozen_map)
    skipped: tuple[str, ...] = ()
    warnings: tuple[ManifestWarning, ...] = ()
    locations: Mapping[tuple[str, str, str], str] = field(default_factory=_frozen_map)

    def with_warnings(self, found: Sequence[ManifestWarning]) -> ManifestState:
        """This state with ``found`` (say, the checks across objects) added to its warnings."""
        return dataclasses.replace(self, warnings=(*self.warnings, *found)) if found else self


# --------------------------------------------------------------------------- one file


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


def _label(kind: str, namespace: str, name: str) -> str:
    # Names are unvalidated here: shortened, so a huge one cannot blow up a message.
    who = f"{namespace}/{name}" if namespace else name
    return f"{decode.shorten(kind, 60)} {decode.shorten(who, 120)}"


@dataclass
class FileContents:
    """What one file contributes: decoded objects, where each identity is defined, problems
    (which fail the load) and warnings (which do not: objects that are valid but would be
    dropped without a word, see ``manifest_warnings.py``)."""

    proxy_name: str | None
    services: dict[ServiceKey, Service] = field(default_factory=dict)
    slices: dict[tuple[str, str], EndpointSlice] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seen: dict[tuple[str, str, str], str] = field(default_factory=dict)
    warnings: list[ManifestWarning] = field(default_factory=list)
    #: :func:`digest` of the bytes these contents were read from (empty: not read).
    digest: bytes = b""

    def keys(self) -> tuple[set[ServiceKey], set[tuple[str, str]], set[str]]:
        """The keys of the Services, EndpointSlices and Nodes this file defines."""
        return set(self.services), set(self.slices), set(self.nodes)

    def add_documents(self, path: Path, documents: list[object]) -> None:
        # Numbered from 1, as people count (and as the config file's messages do).
        for index, document in enumerate(documents, start=1):
            self.add_object(document, f"{path}: document {index}")

    def add_object(
        self, raw: object, where: str, default_type: tuple[str, str] | None = None
    ) -> None:
        """Add one raw object; ``default_type`` is (apiVersion, kind) for typed-list items.

        Never raises: a bad object becomes a problem line.  (Lists nested in lists recurse,
        at most ``MAX_DEPTH / 2`` times: each level is two levels of the document.)
        """
        try:
            self._add_object(raw, where, default_type)
        except Exception as exc:  # a bug in validation must not crash the reader
            self.problems.append(f"{where}: cannot validate: {exception_text(exc)}")

    def _add_object(self, raw: object, where: str, default_type: tuple[str, str] | None) -> None:
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
                self._add_object(item, f"{where}, items[{i}]", item_type)
            return

        namespace, name = _raw_identity(raw)
        if (api_version, kind) not in (_SERVICE, _ENDPOINT_SLICE, _NODE):
            unread = type_warning(api_version, kind)
            if unread is not None:
                # Probably meant to be read (a misspelt kind, an old apiVersion, v1
                # Endpoints): say so rather than ignore it quietly like a Deployment.
                category, message = unread
                label = _label(kind, namespace, name)
                self.warnings.append(ManifestWarning(category, where, label, message))
                return
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug(
                    "%s: ignoring %s %s",
                    where,
                    decode.shorten(api_version, 80),
                    _label(kind, namespace, name),
                )
            return
        if (api_version, kind) == _NODE:
            namespace = ""
        label = _label(kind, namespace, name)
        obj: dict[str, object] = {}
        for key, value in raw.items():
            if not isinstance(key, str):
                self.problems.append(
                    f"{where}: {label}: key {decode.shorten(repr(key), 80)} is not a string"
                )
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
        except decode.DecodeError as exc:
            self.problems.append(f"{where}: {label}: {exc}")

    def _decode(self, kind: str, obj: Mapping[str, object], where: str, label: str) -> None:
        if kind == "Node":
            node = decode.decode_node(obj)
            self.nodes[node.name] = node
            return
        if not decode.is_selected(decode.decode_labels(obj), self.proxy_name):
            logger.debug("%s: %s is not selected by this proxy's label selector", where, label)
            return
        if kind == "Service":
            service = decode.decode_service(obj)
            self.services[service.key] = service
            unproxied = cluster_ip_warning(service, obj)
            if unproxied is not None:
                self.warnings.append(
                    ManifestWarning(Category.NO_CLUSTER_IP, where, label, unproxied)
                )
            return
        endpoint_slice = decode.decode_endpoint_slice(obj)
        if endpoint_slice is None:
            logger.debug("%s: ignoring FQDN %s", where, label)
            return
        self.slices[(endpoint_slice.namespace, endpoint_slice.name)] = endpoint_slice


def digest(data: bytes) -> bytes:
    """What tells two versions of a file apart: a 128-bit BLAKE2b of its bytes."""
    return hashlib.blake2b(data, digest_size=16).digest()


def collect_file(path: Path, proxy_name: str | None) -> FileContents:
    """Read, parse and validate one file; never raises (problems go into the result).

    A file removed since the directory was listed contributes nothing, as if the listing
    had come a moment later (the removal itself wakes the source for another reload).
    The result's ``digest`` is that of the bytes parsed (so an unchanged file can be
    recognised by reading it again, without parsing it: :meth:`ManifestCache.keep_unchanged`).
    """
    collector = FileContents(proxy_name)
    try:
        data = read_manifest_file(path)
        collector.digest = digest(data)
        documents = parse_documents(path, data)
    except FileNotFoundError:
        pass
    except ManifestError as exc:
        collector.problems.extend(exc.problems)
    else:
        collector.add_documents(path, documents)
    return collector


# --------------------------------------------------------------------------- many files


class ManifestCache:
    """What each file contributed, by path, so a reload re-reads only the stale files.

    Not thread-safe: one reload at a time.
    """

    def __init__(self) -> None:
        self._files: dict[Path, tuple[Stamp | None, FileContents]] = {}
        #: How many files were stored (read), for tests and diagnostics.
        self.reads = 0
        #: How many stale files were found unchanged by their bytes (not parsed again).
        self.rechecks = 0

    def to_read(self, listing: FileList) -> list[tuple[Path, Stamp | None]]:
        """The files of ``listing`` to read (``is_stale``), with their stamps; forgets the
        files no longer listed.  ManifestError when the files are too large together."""
        for path in self._files.keys() - set(listing.files):
            del self._files[path]
        problems = listing.size_problems()
        if problems:
            raise ManifestError([*listing.problems, *problems])
        return [
            (path, stamp)
            for path, stamp in zip(listing.files, listing.stamps, strict=True)
            if is_stale(self._files[path][0] if path in self._files else None, stamp)
        ]

    def store(self, path: Path, stamp: Stamp | None, contents: FileContents) -> None:
        self.reads += 1
        self._files[path] = (stamp, contents)

    def keep_unchanged(self, path: Path, stamp: Stamp | None) -> bool:
        """Whether ``path``, stale by its stamp, still holds the bytes its cached contents
        were parsed from; if so the cached contents are kept (the very same object) under
        the new stamp, so the file is not parsed again.  A file modified within the last
        second is stale at every poll (``is_stale``): this is what makes those re-reads
        cost a read and a hash instead of a parse, a merge and a diff."""
        cached = self._files.get(path)
        if cached is None or not cached[1].digest or stamp is None:
            return False
        try:
            data = read_manifest_file(path)
        except (OSError, ManifestError):
            return False  # let the full read report it
        if digest(data) != cached[1].digest:
            return False
        self.rechecks += 1
        self._files[path] = (stamp, cached[1])
        return True

    def contents(self, listing: FileList) -> dict[Path, FileContents]:
        """The cached contents of the listed files, by path (every one must be stored)."""
        return {path: self._files[path][1] for path in listing.files}

    def merged(self, listing: FileList) -> ManifestState:
        """:func:`merge` of the listed files' contributions (every one must be stored)."""
        return merge(listing, [self._files[path][1] for path in listing.files])


def merge(listing: FileList, collectors: Sequence[FileContents]) -> ManifestState:
    """One state from the files' contributions (in order); ManifestError on any problem.

    Duplicates across files are found with set intersections, so merging 40 000 objects
    costs a few C-level dict operations, not a Python loop over every object.  The state's
    warnings are the files' own; the checks across objects are :func:`with_cross_checks`
    (or, in slices, the manifest source's).
    """
    problems = list(listing.problems)
    warnings: list[ManifestWarning] = []
    services: dict[ServiceKey, Service] = {}
    slices: dict[tuple[str, str], EndpointSlice] = {}
    nodes: dict[str, Node] = {}
    seen: dict[tuple[str, str, str], str] = {}
    for collector in collectors:
        problems.extend(collector.problems)
        warnings.extend(collector.warnings)
        again = seen.keys() & collector.seen.keys()
        first = {identity: seen[identity] for identity in again}
        seen.update(collector.seen)
        seen.update(first)
        for identity in sorted(again, key=collector.seen.__getitem__):
            kind, namespace, name = identity
            problems.append(
                f"{collector.seen[identity]}: {_label(kind, namespace, name)}: "
                f"duplicate object (first defined in {first[identity]})"
            )
        services.update(collector.services)
        slices.update(collector.slices)
        nodes.update(collector.nodes)
    if problems:
        raise ManifestError(problems)
    return ManifestState(
        services=_frozen_map(services),
        slices=_frozen_map(slices),
        nodes=_frozen_map(nodes),
        skipped=listing.skipped,
        warnings=tuple(warnings),
        locations=MappingProxyType(seen),  # built here and not kept: no copy needed
    )


def with_cross_checks(state: ManifestState) -> ManifestState:
    """``state`` with the warnings that need more than one object added (in this thread)."""
    checks = cross_check(state.services, state.slices, state.locations)
    return state.with_warnings([warning for warning in checks if warning is not None])


def load_manifests(
    paths: Sequence[Path], proxy_name: str | None = None, cache: ManifestCache | None = None
) -> ManifestState:
    """Read and validate manifest files and directories (``manifest_read.py``), in this thread.

    Services and EndpointSlices are filtered with the proxy's label selector
    (:func:`userproxy.sources.decode.is_selected`).  Raises :class:`ManifestError` listing
    the problems found (and nothing else).  With a ``cache``, only stale files are read.
    """
    listing = list_manifest_files(paths)
    cache = cache if cache is not None else ManifestCache()
    for path, stamp in cache.to_read(listing):
        cache.store(path, stamp, collect_file(path, proxy_name))
    return with_cross_checks(cache.merged(listing))
