"""Reading, parsing and validating manifest files: bounded, and never crashing or hanging.

``load_manifests`` reads YAML (multi-document, ``kind: List``) and JSON files and returns a
validated :class:`ManifestState`, or raises :class:`ManifestError` listing the problems.
Objects that are valid but would be dropped without a word (a misspelt kind, a Service
without a cluster IP ...) are not problems: they are ``ManifestState.warnings`` (see
``manifest_warnings.py``).
:class:`ManifestSource` (``manifests.py``) builds on this to follow changes.

Invariants, whatever the bytes in the files:

- Only regular files are opened, and only with ``O_NONBLOCK``: a FIFO, socket or device
  (named explicitly, or replacing a file between the listing and the read) is reported as
  a problem naming it, never opened in a way that could block.  In a directory, entries
  that are not regular files are skipped and listed in ``ManifestState.skipped``.
- Reading and parsing raise nothing but :class:`ManifestError`: a syntax error, a limit
  exceeded (:data:`MAX_FILE_BYTES`, :data:`MAX_TOTAL_BYTES`, :data:`MAX_DEPTH`,
  :data:`MAX_INT_CHARS`, :data:`MAX_NODES`) or any exception inside a parser (RecursionError,
  ValueError from a malformed scalar, MemoryError, UnicodeDecodeError ...) becomes one
  problem line naming the file (and the document when known).
- Nothing recurses with the input's nesting: YAML documents are composed from libyaml's
  event stream by an explicit stack with a depth limit; JSON is checked for depth before
  the (recursive) C parser sees it.  Integers are bounded in length before ``int()``.
- Messages are bounded: each problem line is at most :data:`MAX_PROBLEM_CHARS` characters
  and a :class:`ManifestError`'s text lists at most :data:`MAX_SHOWN_PROBLEMS` problems.

YAML is parsed by ``yaml_limits.py`` and JSON bounded by ``json_limits.py``; large reloads
are read by the child process of ``manifest_worker.py``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from userproxy.model import EndpointSlice, Node, Service, ServiceKey
from userproxy.sources.decode import (
    DecodeError,
    decode_endpoint_slice,
    decode_labels,
    decode_node,
    decode_service,
    is_selected,
    shorten,
)
from userproxy.sources.json_limits import (
    MAX_DEPTH,
    MAX_INT_CHARS,
    JsonLimitError,
    has_long_int,
    json_depth,
)
from userproxy.sources.manifest_warnings import (
    Category,
    ManifestWarning,
    cluster_ip_warning,
    cross_check,
    type_warning,
)
from userproxy.sources.yaml_limits import MAX_NODES, YamlProblem, exception_text, parse_yaml

__all__ = [
    "MANIFEST_SUFFIXES",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_INT_CHARS",
    "MAX_NODES",
    "MAX_PROBLEM_CHARS",
    "MAX_SHOWN_PROBLEMS",
    "MAX_TOTAL_BYTES",
    "ManifestCache",
    "ManifestError",
    "ManifestState",
    "load_manifests",
    "parse_documents",
    "read_manifest_file",
]

# One logger for everything the manifest source says, whichever module says it: operators
# (and tests) select "userproxy.sources.manifests".
logger = logging.getLogger("userproxy.sources.manifests")

#: File name endings read from a directory (a file named explicitly is read whatever its name).
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")

#: Largest manifest file read (bytes); 40 000 Services take about 9 MB of YAML.
MAX_FILE_BYTES = 16 * 1024 * 1024
#: Largest total of all manifest files (bytes).
MAX_TOTAL_BYTES = 64 * 1024 * 1024
#: Longest problem line (characters); longer ones end with an ellipsis.
MAX_PROBLEM_CHARS = 500
#: Most problems a ManifestError's text lists; the rest are counted ("... and N more").
MAX_SHOWN_PROBLEMS = 20

_SERVICE = ("v1", "Service")
_ENDPOINT_SLICE = ("discovery.k8s.io/v1", "EndpointSlice")
_NODE = ("v1", "Node")

_K = TypeVar("_K")
_V = TypeVar("_V")


class ManifestError(Exception):
    """One or more problems in the manifest files, one line each.

    Each line names the file, the document (numbered from 1, as the config file's
    messages do), the object and the field, e.g.
    ``web.yaml: document 2: Service default/web: spec.ports[0].port: 70000 is out of range
    1..65535``.  Invariant: every line in ``problems`` is at most :data:`MAX_PROBLEM_CHARS`
    long and ``str()`` shows at most :data:`MAX_SHOWN_PROBLEMS` of them, so the text stays
    bounded however broken the files are.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(shorten(p, MAX_PROBLEM_CHARS) for p in problems)
        super().__init__(self._text())

    def _text(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = [f"{len(self.problems)} problems in the manifests:"]
        lines.extend(f"  {problem}" for problem in self.problems[:MAX_SHOWN_PROBLEMS])
        hidden = len(self.problems) - MAX_SHOWN_PROBLEMS
        if hidden > 0:
            lines.append(f"  ... and {hidden} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self._text()

    def __reduce__(self) -> tuple[type[ManifestError], tuple[tuple[str, ...]]]:
        return (ManifestError, (self.problems,))


def _frozen_map(items: Mapping[_K, _V] | None = None) -> Mapping[_K, _V]:
    return MappingProxyType(dict(items or {}))


@dataclass(frozen=True)
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


# --------------------------------------------------------------------------- reading


def _file_type(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def read_manifest_file(path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of one regular file of at most ``limit`` bytes; else ManifestError.

    Never blocks on a FIFO or device: the path is checked with ``stat`` before it is
    opened, and opened with ``O_NONBLOCK`` and checked again with ``fstat`` (it may have
    been replaced in between).  A file that does not exist (any more) raises
    ``FileNotFoundError``: whether that is a problem is the caller's call.
    """
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise ManifestError([f"{path}: not a regular file ({_file_type(st.st_mode)})"])
        if st.st_size > limit:
            raise ManifestError([f"{path}: {st.st_size} bytes, more than the limit of {limit}"])
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ManifestError([f"{path}: not a regular file ({_file_type(st.st_mode)})"])
            chunks: list[bytes] = []
            size = 0
            while size <= limit:
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ManifestError([f"{path}: cannot read: {_os_reason(exc)}"]) from None
    if size > limit:  # it grew while being read
        raise ManifestError([f"{path}: more than the limit of {limit} bytes"])
    return b"".join(chunks)


# --------------------------------------------------------------------------- JSON


def _bounded_int(text: str) -> int:
    if len(text) > MAX_INT_CHARS:
        raise JsonLimitError(
            f"integer of {len(text)} characters (at most {MAX_INT_CHARS} are allowed)"
        )
    return int(text)


def _parse_json(path: Path, data: bytes) -> object:
    if json_depth(data) > MAX_DEPTH:
        raise ManifestError([f"{path}: nested more than {MAX_DEPTH} levels deep"])
    try:
        text = data.decode("utf-8")
        if not has_long_int(data):
            return json.loads(text)  # no integer can be too long: the fast path
        return json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as exc:
        raise ManifestError(
            [f"{path}: line {exc.lineno}, column {exc.colno}: JSON syntax error: {exc.msg}"]
        ) from None
    except JsonLimitError as exc:
        raise ManifestError([f"{path}: {exc}"]) from None
    except RecursionError:
        raise ManifestError([f"{path}: nested too deeply"]) from None
    except Exception as exc:  # anything else a parser raises: a problem, not a crash
        raise ManifestError([f"{path}: cannot parse: {exception_text(exc)}"]) from None


# --------------------------------------------------------------------------- either
def parse_documents(path: Path, data: bytes) -> list[object]:
    """The documents in one file's bytes (JSON for ``*.json``, else YAML).

    Raises only ManifestError (see the module's invariants).
    """
    try:
        if path.suffix == ".json":
            return [_parse_json(path, data)]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(
                [f"{path}: cannot read: not UTF-8 (byte {exc.start}: {exc.reason})"]
            ) from None
        return parse_yaml(path, text)
    except YamlProblem as exc:
        raise ManifestError([exc.problem]) from None
    except ManifestError:
        raise
    except Exception as exc:  # MemoryError, RecursionError in our own code ...: a problem
        raise ManifestError([f"{path}: cannot parse: {exception_text(exc)}"]) from None


def _read_documents(path: Path) -> list[object]:
    return parse_documents(path, read_manifest_file(path))


# --------------------------------------------------------------------------- validation


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
    return f"{shorten(kind, 60)} {shorten(who, 120)}"


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
                    shorten(api_version, 80),
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
                    f"{where}: {label}: key {shorten(repr(key), 80)} is not a string"
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
            unproxied = cluster_ip_warning(service, obj)
            if unproxied is not None:
                self.warnings.append(
                    ManifestWarning(Category.NO_CLUSTER_IP, where, label, unproxied)
                )
            return
        endpoint_slice = decode_endpoint_slice(obj)
        if endpoint_slice is None:
            logger.debug("%s: ignoring FQDN %s", where, label)
            return
        self.slices[(endpoint_slice.namespace, endpoint_slice.name)] = endpoint_slice


def collect_file(path: Path, proxy_name: str | None) -> FileContents:
    """Read, parse and validate one file; never raises (problems go into the result).

    A file removed since the directory was listed contributes nothing, as if the listing
    had come a moment later (the removal itself wakes the source for another reload).
    """
    collector = FileContents(proxy_name)
    try:
        documents = _read_documents(path)
    except FileNotFoundError:
        pass
    except ManifestError as exc:
        collector.problems.extend(exc.problems)
    else:
        collector.add_documents(path, documents)
    return collector


# --------------------------------------------------------------------------- files and cache

#: How long after a file's modification time its content may still change unnoticed: a
#: second write within the same timestamp tick that keeps the size leaves stat unchanged.
#: Files modified this recently are read again on the next poll (git's "racy" check).
RACY_NS = 1_000_000_000

#: What stat says about a file: (mtime_ns, size, inode); None when it cannot be stat'ed.
StatKey = tuple[int, int, int]


def stat_key(path: Path) -> StatKey | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(frozen=True)
class FileList:
    """The files to read (in order), problems with the paths, and skipped entries."""

    files: tuple[Path, ...]
    problems: tuple[str, ...]
    skipped: tuple[str, ...]


def list_manifest_files(paths: Sequence[Path]) -> FileList:
    """The files to read: directories expanded (non-recursively, sorted), explicit paths kept.

    A directory entry with a manifest suffix that is not a regular file (a FIFO, a socket,
    a device, a subdirectory) is skipped and named in ``skipped``; an explicit path that
    does not exist is a problem (an explicit non-regular file is reported when read).
    Only ``stat`` is used here, never ``open``.
    """
    files: list[Path] = []
    problems: list[str] = []
    skipped: list[str] = []
    for path in paths:
        if path.is_dir():
            try:
                children = sorted(path.iterdir())
            except OSError as exc:
                problems.append(f"{path}: cannot list directory: {_os_reason(exc)}")
                continue
            for child in children:
                if child.suffix not in MANIFEST_SUFFIXES:
                    continue
                try:
                    mode = child.stat().st_mode
                except OSError:
                    continue  # removed since the listing (or a dangling link): absent
                if stat.S_ISREG(mode):
                    files.append(child)
                else:
                    skipped.append(f"{child}: not a regular file ({_file_type(mode)})")
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or directory")
    return FileList(tuple(files), tuple(problems), tuple(skipped))


@dataclass
class _FileResult:
    """What one file contributed, kept while the file's stat stays the same."""

    key: StatKey | None
    collector: FileContents


class ManifestCache:
    """Decoded files by path, so a reload re-reads only the files whose stat changed.

    A file modified within the last second is read again even when its stat did not
    change (a second write in the same timestamp tick keeping the size is invisible to
    stat); everything else is trusted.  Not thread-safe: one reload at a time.
    """

    def __init__(self) -> None:
        self._files: dict[Path, _FileResult] = {}
        self.reads = 0

    def needs_read(self, path: Path, key: StatKey | None) -> bool:
        """Whether ``path`` (whose stat is ``key`` now) must be read again."""
        cached = self._files.get(path)
        return (
            cached is None or key is None or cached.key != key or key[0] >= time.time_ns() - RACY_NS
        )

    def store(self, path: Path, key: StatKey | None, collector: FileContents) -> None:
        """Remember what ``path`` contributed when its stat was ``key``."""
        self.reads += 1
        self._files[path] = _FileResult(key, collector)

    def collect(self, path: Path, proxy_name: str | None) -> FileContents:
        """What ``path`` contributes, read now unless the cached result is still valid."""
        key = stat_key(path)
        if not self.needs_read(path, key):
            return self._files[path].collector
        collector = collect_file(path, proxy_name)
        self.store(path, key, collector)
        return collector

    def cached(self, path: Path) -> FileContents:
        return self._files[path].collector

    def keep_only(self, files: Sequence[Path]) -> None:
        wanted = set(files)
        for path in [p for p in self._files if p not in wanted]:
            del self._files[path]


def size_problems(files: Sequence[Path]) -> list[str]:
    """A problem if the files together exceed :data:`MAX_TOTAL_BYTES`."""
    total = 0
    for path in files:
        key = stat_key(path)
        total += key[1] if key is not None else 0
    if total > MAX_TOTAL_BYTES:
        return [f"the manifests total {total} bytes, more than the limit of {MAX_TOTAL_BYTES}"]
    return []


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
    found = [
        warning
        for warning in cross_check(state.services, state.slices, state.locations)
        if warning is not None
    ]
    return dataclasses.replace(state, warnings=(*state.warnings, *found)) if found else state


def load_manifests(
    paths: Sequence[Path], proxy_name: str | None = None, cache: ManifestCache | None = None
) -> ManifestState:
    """Read and validate manifest files and directories, in this thread.

    Directories contribute their ``*.yaml``, ``*.yml`` and ``*.json`` regular files (not
    recursively, in sorted order).  Services and EndpointSlices are filtered with the
    proxy's label selector (:func:`userproxy.sources.decode.is_selected`).  Raises
    :class:`ManifestError` listing the problems found (and nothing else).  With a
    ``cache``, unchanged files are not read again.
    """
    listing = list_manifest_files(paths)
    cache = cache if cache is not None else ManifestCache()
    cache.keep_only(listing.files)
    problems = size_problems(listing.files)
    if problems:
        raise ManifestError([*listing.problems, *problems])
    return with_cross_checks(
        merge(listing, [cache.collect(path, proxy_name) for path in listing.files])
    )
