"""The manifest source: Services, EndpointSlices and Nodes from files, followed as they change.

Loading is ``manifest_read.py`` (which files, their bytes, their documents) and
``manifest_files.py`` (model objects, the per-file cache).  This module delivers a
:class:`ManifestState` through the handler interface, adds and then ``*_synced`` as an
informer does (client-go's reflector; ours is ``reflector.py``), and then polls the files (woken
at once by inotify where it works), delivering only the differences of each reload.

Invariants of a reload (the event loop keeps serving connections while it runs):

- It happens only when the listing (names and stamps) changed, a file is too fresh to
  trust its stamp, or a reload was requested; then only the stale files are read.
- The loop is never held for long: up to :data:`INLINE_BYTES` of files are parsed on it,
  more by a child process (``manifest_worker.py``); the differences and the checks across
  objects run in slices (``userproxy.slices``), so, as with a Kubernetes watch, the
  proxier may sync between two slices of one large reload.
- A failed reload keeps the last good state and is logged once per distinct failure;
  directory entries that are not regular files are skipped and logged once each.
- Warnings (``manifest_warnings.py``) are logged once each, bounded per category.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from userproxy.control.handlers import Handlers
from userproxy.model import Node
from userproxy.slices import Slicer
from userproxy.sources.diff import diff_keys, diff_steps
from userproxy.sources.inotify import Inotify, watch_directories
from userproxy.sources.manifest_changes import (
    ChangedKeys,
    CrossChecks,
    changed_keys,
    merge_slices_only,
    same_files,
)
from userproxy.sources.manifest_files import (
    FileContents,
    ManifestCache,
    ManifestState,
    collect_file,
    load_manifests,
)
from userproxy.sources.manifest_read import FileList, ManifestError, list_manifest_files
from userproxy.sources.manifest_warnings import WarningLog
from userproxy.sources.manifest_worker import read_in_worker

__all__ = [
    "ManifestCache",
    "ManifestError",
    "ManifestSource",
    "ManifestState",
    "deliver_all",
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


def _woken(notify: Inotify, wake: asyncio.Event) -> None:
    """inotify saw a change: empty its queue (so the reader fires once per burst), poll."""
    notify.drain()
    wake.set()


class ManifestSource:
    """Feeds the handlers from manifest files and follows changes to them.

    Call :meth:`initial_load` once (it raises :class:`ManifestError` if the files are bad),
    then run :meth:`run` as a task.  Only the Node named ``node_name`` is delivered.
    ``on_reload_error`` is called for every reload of changed files that fails,
    ``on_reload`` after every successful one.
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
        #: What the last poll saw; the next one reloads only when it sees something else.
        self._listing = FileList((), (), (), ())
        #: Some file was too fresh to trust its stamp: poll (and re-read it) again soon.
        self._recheck = False
        self._cache = ManifestCache()
        #: What each file contributed to the last good state: a reload diffs only the keys
        #: of the files whose contents are not these very objects.
        self._good: dict[Path, FileContents] = {}
        self._checks = CrossChecks()
        self._last_error: str | None = None
        self._skipped: tuple[str, ...] = ()
        self._warnings = WarningLog(logger)
        #: How many polls ran and how many reloads went through a child process (for tests,
        #: which wait for the next polls instead of sleeping, and diagnostics).
        self.polls = 0
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
        # Nothing is served yet, and decoding 10 000 Services allocates a million objects:
        # the cyclic collector would walk the growing heap again and again (a fifth of the
        # load's CPU), for garbage that reference counting frees anyway.  What is alive at
        # the end lives long: frozen, as userproxy.slices does at each bulk yield.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._initial_load()
        finally:
            gc.freeze()
            if collecting:
                gc.enable()

    def _initial_load(self) -> ManifestState:
        listing = list_manifest_files(self._paths)
        cache = self._cache
        for path, stamp in cache.to_read(listing):
            cache.store(path, stamp, collect_file(path, self._proxy_name))
        state = cache.merged(listing)
        for _ in self._checks.steps(state, None):
            pass
        state = state.with_warnings(self._checks.warnings())
        self._good = cache.contents(listing)
        self._listing = listing
        self._recheck = listing.racy()
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
        notify: Inotify | None = None
        try:
            notify = Inotify(watch_directories(self._paths))
        except OSError as exc:
            logger.info("no inotify (%s): polling the manifests every %.1fs", exc,
                        self._poll_interval)  # fmt: skip
        else:
            loop.add_reader(notify.fileno(), _woken, notify, wake)
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
        self.polls += 1
        listing = list_manifest_files(self._paths)
        changed = listing != self._listing
        forced, self._forced = self._forced, False
        if forced:
            # Forget what was read: every file is parsed again, not taken from the cache.
            self._cache = ManifestCache()
            logger.info("re-reading the manifests (reload requested)")
        elif not changed and not self._recheck:
            return
        self._listing = listing
        # A file written within the last second may change again without its stat changing:
        # read it once more on later polls until it is old enough to trust stat.
        self._recheck = listing.racy()
        await self._reload(listing, changed=changed or forced)

    async def _read(self, listing: FileList) -> None:
        """Bring the cache up to date with the listed files without holding the loop (see
        the module's invariants).  A file stale by its stamp whose bytes are those already
        parsed is kept as it is (``ManifestCache.keep_unchanged``): a file written within
        the last second is stale at every poll for that second."""
        cache = self._cache
        stale = []
        slicer = Slicer()
        for path, stamp in cache.to_read(listing):
            if not cache.keep_unchanged(path, stamp):
                stale.append((path, stamp))
            await slicer.check()
        if sum(stamp.size for _, stamp in stale if stamp is not None) > INLINE_BYTES:
            self.worker_reads += 1
            results = await read_in_worker([path for path, _ in stale], self._proxy_name)
            for path, stamp in stale:
                contents = results.get(str(path))
                if contents is None:  # the child skipped it: cannot happen, but never cache it
                    raise ManifestError([f"{path}: not read by the manifest reader process"])
                cache.store(path, stamp, contents)
        else:
            for path, stamp in stale:
                cache.store(path, stamp, collect_file(path, self._proxy_name))
                await slicer.check()

    async def _cross_check(self, state: ManifestState, keys: ChangedKeys) -> ManifestState:
        """``state`` with the warnings across objects, checked again for ``keys``, in
        slices."""
        slicer = Slicer(bulk=len(keys.services) + len(keys.slices) >= BULK_OBJECTS)
        for _ in self._checks.steps(state, keys):
            await slicer.tick()
        return state.with_warnings(self._checks.warnings())

    async def _reload(self, listing: FileList, *, changed: bool) -> None:
        try:
            await self._read(listing)
            files = self._cache.contents(listing)
            if self._unchanged(listing, files):
                return  # the same bytes in the same files: nothing to merge or deliver
            keys = changed_keys(self._good, files)
            state = None
            if self._state is not None and not listing.problems:
                # self._state and self._good always describe the same (last good) load.
                state = merge_slices_only(self._state, self._good, files, keys, listing.skipped)
            if state is None:
                state = self._cache.merged(listing)
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
        # Deliver first: the checks across objects only find warnings (never a failure),
        # and they walk every object, so they must not delay a change reaching the sync.
        calls = await self.apply(state, keys)
        self._good = files
        try:
            state = await self._cross_check(state, keys)
        except Exception:  # a bug in a check: no warnings, never a stopped source
            logger.exception("unexpected error while checking the manifests")
            self._checks = CrossChecks()  # checks everything next time
        self._state = state
        self._warnings.report(state.warnings)
        if (changed or calls) and self._on_reload is not None:
            self._on_reload()

    def _unchanged(self, listing: FileList, files: dict[Path, FileContents]) -> bool:
        """Whether the last good state stands as it is: no failure since, the same entries
        skipped and every listed file's contents the very objects it was built from."""
        current = self._state
        return (
            self._last_error is None
            and current is not None
            and listing.skipped == current.skipped
            and same_files(self._good, files)
        )

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

    async def apply(self, state: ManifestState, keys: ChangedKeys | None = None) -> int:
        """Deliver the differences between the current state and ``state``; make it current.

        With ``keys`` only those keys are compared (a reload knows which files it re-read,
        and every other key maps to the same object in both states), so a change to one
        file of 10 000 Services costs that file's keys, not 20 000 comparisons.
        Delivered in slices that yield to the loop (a large reload must not hold it);
        returns the number of handler calls made (0 when nothing changed).
        """
        old = self._state if self._state is not None else ManifestState()
        if keys is not None:
            steps = self._key_steps(old, state, keys)
            bulk = len(keys.services) + len(keys.slices) >= BULK_OBJECTS
        else:
            steps = self._all_steps(old, state)
            bulk = max(len(old.services), len(state.services)) >= BULK_OBJECTS
        slicer = Slicer(bulk=bulk)
        calls = 0
        for called in steps:
            calls += called
            await slicer.tick()
        self._state = state
        logger.log(
            logging.INFO if calls else logging.DEBUG,
            "manifests reloaded: %d changes delivered",
            calls,
        )
        return calls

    def _key_steps(
        self, old: ManifestState, new: ManifestState, keys: ChangedKeys
    ) -> Iterator[bool]:
        h = self._handlers
        own = [self._node_name] if self._node_name in keys.nodes else []
        return itertools.chain(
            diff_keys(old.services, new.services, h.on_service_add, h.on_service_update,
                      h.on_service_delete, keys=keys.services),
            diff_keys(old.slices, new.slices, h.on_endpointslice_add,
                      h.on_endpointslice_update, h.on_endpointslice_delete, keys=keys.slices),
            diff_keys(old.nodes, new.nodes, h.on_node_add, h.on_node_update, h.on_node_delete,
                      keys=own),
        )  # fmt: skip

    def _all_steps(self, old: ManifestState, state: ManifestState) -> Iterator[bool]:
        h = self._handlers
        # diff.deliver_diff's calls, one key at a time (a state's maps never change).
        return itertools.chain(
            diff_steps(
                old.services,
                state.services,
                h.on_service_add,
                h.on_service_update,
                h.on_service_delete,
            ),
            diff_steps(
                old.slices,
                state.slices,
                h.on_endpointslice_add,
                h.on_endpointslice_update,
                h.on_endpointslice_delete,
            ),
            diff_steps(
                _own_node(old, self._node_name),
                _own_node(state, self._node_name),
                h.on_node_add,
                h.on_node_update,
                h.on_node_delete,
            ),
        )
