"""The manifest source: Services, EndpointSlices and Nodes from files, followed as they change.

Reading and validating files is ``manifest_files.py``; this module delivers a
:class:`ManifestState` through the handler interface and then polls the files (woken at
once by inotify where it works), reloading what changed and delivering only the
differences.  A broken edit keeps the last good state.

Invariants of a reload (the event loop keeps serving connections while it runs):

- The loop is never held for long.  Files to re-read totalling at most
  :data:`INLINE_BYTES` are parsed on the loop (a few milliseconds).  Larger ones are read,
  parsed and validated by a child process (``manifest_worker.worker_main``): a worker
  thread would hold the GIL in pure-Python parsing and starve the loop thread (the
  convoy effect), a process cannot.  Its results arrive as small pickle frames,
  unpickled one at a time, and the differences are delivered to the handlers in slices
  of at most :data:`SLICE_SECONDS`, yielding to the loop in between.  (So, as with a
  Kubernetes watch, the proxier may sync between two slices of one large reload.)
- Nothing blocks: files are opened only when regular, with ``O_NONBLOCK``; the child is
  killed when the reload is cancelled (shutdown) or runs longer than
  :data:`WORKER_TIMEOUT`.
- A failed reload (any problem, or the child failing) keeps the last good state; the
  bounded error is logged once per distinct failure.  Directory entries that are not
  regular files (a FIFO ...) are skipped and logged as errors once; the other files work.
- Valid objects that would be dropped without a word (``manifest_warnings.py``) are
  logged as warnings naming file, document and object: each distinct one once, not at
  every reload, at most ``LOGGED_PER_CATEGORY`` lines per category and reload.  The checks
  across objects run in slices too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from userproxy.control.handlers import Handlers
from userproxy.model import Node
from userproxy.slices import Slicer
from userproxy.sources.diff import deliver_diff
from userproxy.sources.inotify import Inotify, watch_directories
from userproxy.sources.manifest_files import (
    MANIFEST_SUFFIXES,
    RACY_NS,
    FileContents,
    ManifestCache,
    ManifestError,
    ManifestState,
    StatKey,
    collect_file,
    list_manifest_files,
    load_manifests,
    merge,
    size_problems,
    stat_key,
)
from userproxy.sources.manifest_warnings import WarningLog, cross_check
from userproxy.sources.manifest_worker import FRAME_LENGTH, FrameReader

__all__ = [
    "MANIFEST_SUFFIXES",
    "ManifestCache",
    "ManifestError",
    "ManifestSource",
    "ManifestState",
    "load_manifests",
]

logger = logging.getLogger(__name__)

#: With inotify, how often the files are polled anyway (file systems that report nothing).
FALLBACK_POLL_INTERVAL = 2.0

#: Files to re-read totalling at most this many bytes are parsed on the event loop: YAML
#: parses at a few MB/s, so this is a few milliseconds, cheaper than starting a process.
INLINE_BYTES = 32 * 1024
#: A reload with this many Services is bulk work (see userproxy.slices).
BULK_OBJECTS = 1000
#: Longest a child reading the manifests may take before it is killed (seconds).
WORKER_TIMEOUT = 120.0

#: Largest result frame accepted from the child (its frames hold 200 objects each).
MAX_FRAME_BYTES = 64 * 1024 * 1024

_WORKER_CODE = "from userproxy.sources.manifest_worker import worker_main; worker_main()"
#: The directory holding the ``userproxy`` package, put on the child's PYTHONPATH so it
#: imports this very copy (also when running from a source tree).
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

_K = TypeVar("_K")
_V = TypeVar("_V")


async def _deliver_sliced(
    old: Mapping[_K, _V],
    new: Mapping[_K, _V],
    add: Callable[[_V], None],
    update: Callable[[_V, _V], None],
    delete: Callable[[_V], None],
    *,
    slicer: Slicer,
) -> int:
    """``deliver_diff`` in slices: the same calls in the same order, yielding between.

    ``old`` and ``new`` must not change meanwhile (they are a state's frozen maps).
    """
    calls = 0
    for key, value in old.items():
        if key not in new:
            delete(value)
            calls += 1
        await slicer.tick()
    for key, value in new.items():
        previous = old.get(key)
        if previous is None:
            add(value)
            calls += 1
        elif previous is not value and previous != value:
            update(previous, value)
            calls += 1
        await slicer.tick()
    return calls


async def _read_in_worker(files: Sequence[Path], proxy_name: str | None) -> dict[str, FileContents]:
    """Read, parse and validate ``files`` in a child process; per path, what it holds.

    Raises ManifestError when the child fails; kills it when cancelled or too slow.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    what = _describe_files(files)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _WORKER_CODE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
    except OSError as exc:  # EMFILE, EAGAIN, ENOMEM ...: a failed reload, retried later
        raise ManifestError(
            [f"reading {what}: cannot start the reader process: {exc.strerror or exc}"]
        ) from None
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        reader = FrameReader(proxy_name)
        slicer = Slicer(bulk=True)  # only large reloads come through the child
        async with asyncio.timeout(WORKER_TIMEOUT):
            try:
                proc.stdin.write(pickle.dumps((proxy_name, tuple(str(path) for path in files))))
                await proc.stdin.drain()
                proc.stdin.close()
                while not reader.done:
                    header = await proc.stdout.readexactly(FRAME_LENGTH.size)
                    (length,) = FRAME_LENGTH.unpack(header)
                    if length > MAX_FRAME_BYTES:
                        raise ValueError(f"a frame of {length} bytes")
                    reader.feed(await proc.stdout.readexactly(length))
                    await slicer.check()
            except (asyncio.IncompleteReadError, ConnectionError):
                status = await proc.wait()
                raise ManifestError(
                    [f"reading {what} failed: the reader {_exit(status)}"]
                ) from None
            except ManifestError:
                raise
            except Exception as exc:  # an unreadable frame: never a traceback, never a crash
                raise ManifestError(
                    [f"reading {what} failed: unreadable result ({type(exc).__name__})"]
                ) from None
        await proc.wait()
    except TimeoutError:
        raise ManifestError([f"reading {what} took more than {WORKER_TIMEOUT:g}s"]) from None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return reader.results


def _describe_files(files: Sequence[Path]) -> str:
    if len(files) == 1:
        return str(files[0])
    return f"{files[0]} and {len(files) - 1} more files"


def _exit(status: int) -> str:
    if status < 0:
        try:
            return f"process was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"process was killed by signal {-status}"
    return f"process exited with status {status}"


@dataclass(frozen=True)
class _Signature:
    """A cheap fingerprint of the manifest paths: names, and per file what stat says."""

    entries: tuple[tuple[str, object], ...] = ()
    newest_mtime_ns: int = 0


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
                (name, stat_key(path / name))
                for name in names
                if Path(name).suffix in MANIFEST_SUFFIXES
            )
            newest = max([newest, *(key[0] for _, key in listing if key is not None)])
            entries.append((str(path), ("dir", listing)))
        else:
            key = stat_key(path)
            if key is not None:
                newest = max(newest, key[0])
            entries.append((str(path), ("file", key)))
    return _Signature(tuple(entries), newest)


def _is_racy(signature: _Signature) -> bool:
    return signature.newest_mtime_ns >= time.time_ns() - RACY_NS


def deliver_all(state: ManifestState, handlers: Handlers, node_name: str) -> None:
    """Hand every object of ``state`` (and the own Node, if present) to ``handlers`` as
    additions, then the three ``*_synced`` calls: a first listing, complete."""
    for service in state.services.values():
        handlers.on_service_add(service)
    for endpoint_slice in state.slices.values():
        handlers.on_endpointslice_add(endpoint_slice)
    node = state.nodes.get(node_name)
    if node is not None:
        handlers.on_node_add(node)
    handlers.on_services_synced()
    handlers.on_endpointslices_synced()
    handlers.on_node_synced()


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
        self._skipped: tuple[str, ...] = ()
        self._warnings = WarningLog(logger)
        #: How many reloads went through a child process (for tests and diagnostics).
        self.worker_reads = 0
        #: Set by request_reload(): the next poll re-reads every file, changed or not.
        self._forced = False
        self._wake: asyncio.Event | None = None

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
        self._report_skipped(state)
        self._warnings.report(state.warnings)
        deliver_all(state, self._handlers, self._node_name)
        logger.info(
            "loaded manifests: %d services, %d endpoint slices, own node %s",
            len(state.services),
            len(state.slices),
            "found" if self._node_name in state.nodes else "not found",
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
        wake = self._wake = asyncio.Event()
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

    def request_reload(self) -> None:
        """Re-read every file at the next poll, whether or not its stat changed (SIGHUP).

        The reload itself runs in :meth:`run`'s task, so it never overlaps a reload that is
        already going on; an edit that kept size and mtime (``cp -p``, a coarse clock) is
        seen this way.  Cheap; callable from a signal handler on the loop."""
        self._forced = True
        if self._wake is not None:
            self._wake.set()

    async def poll(self) -> None:
        """Check the paths once and reload if they changed (what :meth:`run` repeats)."""
        signature = _signature(self._paths)
        changed = signature.entries != self._signature.entries
        forced, self._forced = self._forced, False
        if forced:
            # Forget what was read: every file is parsed again, not taken from the cache.
            self._cache = ManifestCache()
            logger.info("re-reading the manifests (reload requested)")
        elif not changed and not self._recheck:
            return
        self._signature = signature
        # A file written within the last second may change again without its stat changing:
        # read it once more on later polls until it is old enough to trust stat.
        self._recheck = _is_racy(signature)
        await self._reload(changed=changed or forced)

    async def _load(self) -> ManifestState:
        """Load the manifests without holding the loop (see the module's invariants)."""
        listing = list_manifest_files(self._paths)
        cache = self._cache
        cache.keep_only(listing.files)
        problems = size_problems(listing.files)
        if problems:
            raise ManifestError([*listing.problems, *problems])
        stale: list[tuple[Path, StatKey | None]] = []
        for path in listing.files:
            key = stat_key(path)
            if cache.needs_read(path, key):
                stale.append((path, key))
        size = sum(key[1] for _, key in stale if key is not None)
        if size > INLINE_BYTES:
            self.worker_reads += 1
            results = await _read_in_worker([path for path, _ in stale], self._proxy_name)
            for path, key in stale:
                contents = results.get(str(path))
                if contents is None:  # the child skipped it: cannot happen, but never cache it
                    raise ManifestError([f"{path}: not read by the manifest reader process"])
                cache.store(path, key, contents)
        else:
            slicer = Slicer()
            for path, key in stale:
                cache.store(path, key, collect_file(path, self._proxy_name))
                await slicer.check()
        state = merge(listing, [cache.cached(path) for path in listing.files])
        found = []
        slicer = Slicer(bulk=len(state.services) >= BULK_OBJECTS)
        for warning in cross_check(state.services, state.slices, state.locations):
            if warning is None:
                await slicer.tick()
            else:
                found.append(warning)
        return dataclasses.replace(state, warnings=(*state.warnings, *found)) if found else state

    async def _reload(self, *, changed: bool) -> None:
        try:
            state = await self._load()
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
        self._report_skipped(state)
        self._warnings.report(state.warnings)
        calls = await self.apply(state)
        if (changed or calls) and self._on_reload is not None:
            self._on_reload()

    def _report_skipped(self, state: ManifestState) -> None:
        """Log directory entries newly skipped (not regular files), once each."""
        for entry in state.skipped:
            if entry not in self._skipped:
                logger.error("manifest skipped: %s", entry)
        self._skipped = state.skipped

    def _failed(self, error: ManifestError, *, changed: bool, log: bool = True) -> None:
        text = str(error)
        distinct = text != self._last_error
        if log and distinct:
            logger.error("manifests not reloaded, keeping the last good state: %s", text)
        self._last_error = text
        # A re-read of unchanged files that fails the same way is not a new failure.
        if (changed or distinct) and self._on_reload_error is not None:
            self._on_reload_error(error)

    async def apply(self, state: ManifestState) -> int:
        """Deliver the differences between the current state and ``state``; make it current.

        Delivered in slices that yield to the loop (a large reload must not hold it);
        returns the number of handler calls made (0 when nothing changed).
        """
        old = self._state if self._state is not None else ManifestState()
        handlers = self._handlers
        bulk = max(len(old.services), len(state.services)) >= BULK_OBJECTS
        slicer = Slicer(bulk=bulk)
        calls = await _deliver_sliced(
            old.services,
            state.services,
            handlers.on_service_add,
            handlers.on_service_update,
            handlers.on_service_delete,
            slicer=slicer,
        )
        calls += await _deliver_sliced(
            old.slices,
            state.slices,
            handlers.on_endpointslice_add,
            handlers.on_endpointslice_update,
            handlers.on_endpointslice_delete,
            slicer=slicer,
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
