"""A reflector: list and watch ONE Kubernetes resource and deliver its changes to handlers.

Modelled on client-go's tools/cache/reflector.go (``Reflector.ListAndWatch``), with the
handlers in the place of client-go's store.  :meth:`Reflector.run` is its state machine:

* LIST (paged, ``limit``/``continue``) with the resource's selectors, decode every item on
  its own, deliver the difference against the reflector's view (the first list: all adds),
  then call the ``synced`` handler once.
* WATCH from the list's ``resourceVersion`` with bookmarks and a server-side timeout,
  tracking the resourceVersion of every event (bookmarks included), so that a watch that
  ends or breaks is resumed where it stopped, without a re-list.
* On ``410 Gone`` (an ERROR event with code 410, or an HTTP 410) and every
  ``resync_period`` seconds, re-list and reconcile: unchanged objects cause no handler
  call, objects missing from the new list are deleted.  The first 410 re-lists at once;
  another before a watch has run to its end waits a backoff.
* Any other failure is logged (rate-limited), reported through ``on_event`` and retried
  after a capped exponential backoff with full jitter, which starts afresh as soon as a
  watch delivers something.  :meth:`Reflector.run` never ends but by cancellation.

Invariants: ``view`` is exactly what the handlers were given (key -> last delivered
object); an object that fails validation is skipped with a warning naming it and the field,
and its last good version, if any, stays in the view.  The requests are ``list_watch.py``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import aiohttp

from userproxy.logs import RateLimitedLog
from userproxy.model import EndpointSlice, Node, Service
from userproxy.sources.decode import DecodeError
from userproxy.sources.diff import deliver_diff
from userproxy.sources.list_watch import (
    LIST_PAGE_SIZE,
    ApiError,
    Gone,
    ListWatch,
    WatchBroken,
    metadata_str,
    str_mapping,
)

logger = logging.getLogger(__name__)

#: What ``on_event(kind, resource)`` is called with as ``kind``:
#: ``watch_restart``: an established watch broke or ended early and is resumed;
#: ``relist``: the watch could not be resumed (410 Gone), a re-list follows (periodic
#: resyncs are not counted); ``invalid_object``: an object was skipped because it failed
#: validation; ``api_error``: a LIST or WATCH request failed (unreachable, an HTTP error, an
#: ERROR event other than 410, a broken response) and is retried after a backoff.
EventKind = Literal["watch_restart", "relist", "invalid_object", "api_error"]
OnEvent = Callable[[EventKind, str], None]
#: Why a reflector lists: the first time, a periodic resync, or the watch's 410 Gone.
_ListReason = Literal["initial", "resync", "gone"]

#: At most one warning per resource and cause in this many seconds (the rest go to debug).
_WARN_INTERVAL = 30.0
#: Invalid objects remembered as warned about, per resource, before the memory is reset.
_MAX_WARNED = 10_000

_T = TypeVar("_T", Service, EndpointSlice, Node)
_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ResourceHandlers(Generic[_T]):
    """The handlers of one resource (see :mod:`userproxy.control.handlers`)."""

    add: Callable[[_T], None]
    update: Callable[[_T, _T], None]
    delete: Callable[[_T], None]
    synced: Callable[[], None]


@dataclass(frozen=True, slots=True)
class ReflectorOptions:
    """Timing of a reflector; the constructor checks the ranges (ValueError)."""

    resync_period: float = 900.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    watch_timeout: float = 300.0
    page_size: int = LIST_PAGE_SIZE

    def __post_init__(self) -> None:
        if self.resync_period < 0:
            raise ValueError(f"resync_period must be >= 0, got {self.resync_period}")
        if self.backoff_initial <= 0 or self.backoff_max < self.backoff_initial:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        if self.watch_timeout < 1:
            raise ValueError(f"watch_timeout must be >= 1 s, got {self.watch_timeout}")
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")


def _describe_error(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


class Reflector(Generic[_T]):
    """Lists and watches one resource and delivers its changes; :meth:`run` until cancelled.

    ``convert`` turns a raw object into a model object, None for one that is not this
    proxy's, and raises :class:`~userproxy.sources.decode.DecodeError` for an invalid one.
    """

    def __init__(
        self,
        list_watch: ListWatch,
        convert: Callable[[dict[str, object]], _T | None],
        handlers: ResourceHandlers[_T],
        options: ReflectorOptions,
        on_event: OnEvent | None = None,
    ) -> None:
        self.list_watch = list_watch
        self.name = list_watch.resource
        self._convert: Callable[[dict[str, object]], _T | None] = convert
        self._handlers: ResourceHandlers[_T] = handlers
        self._options = options
        self._on_event = on_event
        #: What the handlers were given: key -> the last delivered object.
        self.view: dict[_Key, _T] = {}
        #: Where the next watch resumes; None until the first list.
        self.resource_version: str | None = None
        #: Whether the first list has been delivered (and ``synced`` called).
        self.synced = False
        #: One rate limiter per cause of warnings (see :meth:`_warn`).
        self._limits: dict[str, RateLimitedLog] = {}
        #: (key, error) of invalid objects already warned about, so resyncs do not repeat it.
        self._warned: set[tuple[_Key | None, str]] = set()
        self._backoff = _Backoff(options.backoff_initial, options.backoff_max)
        #: Failed attempts since the watch last delivered anything, and when the first of
        #: them failed (loop time; the length of the outage in the "resumed" line).
        self._failures = 0
        self._failing_since = 0.0

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """List, then watch, until cancelled (client-go's ListAndWatch in its retry loop)."""
        loop = asyncio.get_running_loop()
        relist: _ListReason | None = "initial"  # None: the next round only watches
        next_resync: float | None = None
        gone_in_a_row = 0
        while True:  # until cancelled; every failure sleeps a backoff delay
            try:
                if relist is not None or self.resource_version is None:
                    await self._relist(relist or "initial")
                    relist = None
                    if self._options.resync_period > 0:
                        next_resync = loop.time() + self._options.resync_period
                resync = asyncio.timeout_at(next_resync)
                try:
                    async with resync:
                        routine = await self._watch()
                except TimeoutError:
                    if not resync.expired():
                        raise
                    logger.debug("%s: periodic resync", self.name)
                    relist = "resync"
                    continue
                gone_in_a_row = 0
                if routine:
                    continue
                # The server ended the stream long before its timeout: resume after a delay.
                self._event("watch_restart")
                self._warn("watch", "%s: watch closed early by the server; resuming", self.name)
            except Gone as exc:
                self._event("relist")
                self._warn(
                    "gone",
                    "%s: cannot resume the watch at resourceVersion %s (%s); re-listing",
                    self.name,
                    self.resource_version,
                    exc,
                )
                relist = "gone"
                gone_in_a_row += 1
                if gone_in_a_row == 1:
                    continue  # re-list at once; a repeated 410 waits like any failure
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
            if not self._failures:
                self._failing_since = loop.time()
            self._failures += 1
            delay = self._backoff.next_delay()
            logger.debug("%s: retrying in %.2f s", self.name, delay)
            await asyncio.sleep(delay)

    def _warn(self, cause: str, message: str, *args: object) -> None:
        """A warning, at most one per cause every ``_WARN_INTERVAL`` seconds.  The held-back
        ones still go to debug: an operator chasing an API problem can see every attempt."""
        limit = self._limits.setdefault(cause, RateLimitedLog(logger, _WARN_INTERVAL))
        if not limit.log(logging.WARNING, message, *args):
            logger.debug(message, *args)

    def _event(self, kind: EventKind) -> None:
        if self._on_event is not None:
            self._on_event(kind, self.name)

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, WatchBroken):
            self._event("watch_restart")
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            self._warn("watch", "%s: watch broke (%s); resuming", self.name, _describe_error(cause))
            return
        self._event("api_error")
        if isinstance(exc, ApiError | aiohttp.ClientError | OSError | TimeoutError):
            self._warn("api", "%s: API request failed: %s", self.name, _describe_error(exc))
        else:
            logger.error("%s: unexpected error, retrying", self.name, exc_info=exc)

    def _working(self) -> None:
        """The watch delivered something: it works, so the next failure starts afresh."""
        self._backoff.reset()
        if self._failures:
            # INFO, not WARNING: the end of an outage is good news an operator looks for
            # after the warnings that reported it (client-go logs its reconnects alike).
            logger.info(
                "%s: watch resumed after an outage of %.1f s (%d failed attempts)",
                self.name,
                asyncio.get_running_loop().time() - self._failing_since,
                self._failures,
            )
            self._failures = 0

    # ------------------------------------------------------------------ LIST

    async def list_once(self) -> None:
        """One LIST, decoded and delivered as ``run``'s first one (then ``synced``), with
        no watch and no retry: a failure raises (``userproxy explain --kubeconfig``)."""
        await self._relist("initial")

    async def _relist(self, reason: _ListReason) -> None:
        """LIST, reconcile the view with it and deliver the differences."""
        rv, items = await self.list_watch.list_items(self._options.page_size)
        new: dict[_Key, _T] = {}
        invalid = 0
        for raw in items:
            decoded = self._decode(raw)
            if decoded.error is not None:
                invalid += 1
                self._invalid(decoded, "in the list")
                if decoded.key is not None and decoded.key in self.view:
                    new[decoded.key] = self.view[decoded.key]  # keep the last good version
                continue
            if decoded.key is not None and decoded.value is not None:
                new[decoded.key] = decoded.value
        handlers = self._handlers
        calls = deliver_diff(self.view, new, handlers.add, handlers.update, handlers.delete)
        self.view = new
        self.resource_version = rv
        if not self.synced:
            self.synced = True
            handlers.synced()
            logger.info(
                "%s: initial list: %d delivered, %d invalid skipped (resourceVersion %s)",
                self.name,
                len(new),
                invalid,
                rv,
            )
        elif reason == "resync":
            logger.log(
                logging.INFO if calls else logging.DEBUG,
                "%s: resync: %d objects, %d changes delivered",
                self.name,
                len(new),
                calls,
            )
        else:
            self._warn(
                "relist",
                "%s: re-listed (%s): %d objects, %d changes delivered",
                self.name,
                reason,
                len(new),
                calls,
            )

    # ------------------------------------------------------------------ decoding

    def _decode(self, raw: object) -> _Decoded[_T]:
        kind = self.list_watch.kind
        obj = str_mapping(raw)
        if obj is None:
            return _Decoded(None, f"{kind} <unknown>", error="not a JSON object")
        name = metadata_str(obj, "name")
        namespace = ""
        if self.list_watch.namespaced:
            namespace = metadata_str(obj, "namespace") or "default"
        where = f"{kind} {namespace}/" if namespace else f"{kind} "
        if name is None:
            return _Decoded(None, f"{where}<unnamed>", error="metadata.name: is required")
        key = (namespace, name)
        try:
            return _Decoded(key, where + name, self._convert(obj))
        except DecodeError as exc:
            return _Decoded(key, where + name, error=str(exc))

    def _invalid(self, decoded: _Decoded[_T], where: str) -> None:
        """Count an invalid object; warn once per object and error, the rest at debug."""
        self._event("invalid_object")
        error = decoded.error or "invalid"
        marker = (decoded.key, error)
        if marker in self._warned:
            logger.debug("%s: skipping invalid %s (%s): %s", self.name, decoded.label, where, error)
            return
        if len(self._warned) > _MAX_WARNED:
            self._warned.clear()
        self._warned.add(marker)
        logger.warning("%s: skipping invalid %s (%s): %s", self.name, decoded.label, where, error)

    # ------------------------------------------------------------------ WATCH

    async def _watch(self) -> bool:
        """One WATCH from the current resourceVersion until the stream ends.

        Returns whether the end was routine (the server ended the stream near its
        timeout).  Raises Gone for 410, WatchBroken when an established stream broke.
        """
        seconds = int(self._options.watch_timeout * (1 + random.random()))
        loop = asyncio.get_running_loop()
        started = loop.time()
        working = False
        events = self.list_watch.watch_events(self.resource_version, seconds)
        async with contextlib.aclosing(events):
            async for kind, obj in events:
                self._handle_event(kind, obj)
                if not working:
                    working = True
                    self._working()
        return loop.time() - started >= seconds / 2

    def _handle_event(self, kind: object, obj: dict[str, object]) -> None:
        """One watch event: a BOOKMARK only moves the resourceVersion."""
        rv = metadata_str(obj, "resourceVersion")
        if kind == "BOOKMARK":
            if rv is not None:
                self.resource_version = rv
                logger.debug("%s: bookmark at resourceVersion %s", self.name, rv)
            return
        if kind not in ("ADDED", "MODIFIED", "DELETED"):
            self._warn("type", "%s: ignoring watch event of type %r", self.name, kind)
            return
        self._apply(str(kind), obj)
        if rv is not None:
            self.resource_version = rv

    def _apply(self, kind: str, obj: dict[str, object]) -> None:
        """Deliver one ADDED, MODIFIED or DELETED event and update the view."""
        decoded = self._decode(obj)
        key = decoded.key
        logger.debug("%s: %s %s", self.name, kind, decoded.label)
        if decoded.error is not None:
            self._invalid(decoded, f"watch event {kind}")
            if kind != "DELETED":
                return  # its last good version, if any, stays
        if key is None:
            return
        old = self.view.get(key)
        new = decoded.value
        if kind == "DELETED" or new is None:  # deleted (whatever it was), or no longer ours
            if old is not None:
                del self.view[key]
                self._handlers.delete(old)
            return
        self.view[key] = new
        if old is None:
            self._handlers.add(new)
        elif old != new:
            self._handlers.update(old, new)
