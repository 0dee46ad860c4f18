"""Logging setup (plain text for people, one JSON object per line for log pipelines) and
the one rate limiter for lines that repeat.

Invariant: one record never makes an unbounded log entry.  Both formatters cut a record's
message to :data:`MAX_MESSAGE_CHARS` characters and :data:`MAX_MESSAGE_LINES` lines, and
an exception's traceback to :data:`MAX_TRACEBACK_CHARS` and :data:`MAX_TRACEBACK_LINES`,
saying how much was left out.  This is a safety net: messages are meant to be bounded
where they are made (e.g. ``ManifestError`` lists at most 20 problems), but a value quoted
from an input somewhere must not turn into a 10 MB log line.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time
import types
from collections.abc import Callable, Hashable

MAX_MESSAGE_CHARS = 8192
MAX_MESSAGE_LINES = 64
#: Of a traceback, or of a stack.
MAX_TRACEBACK_CHARS = 16384
MAX_TRACEBACK_LINES = 200

_ExcInfo = tuple[type[BaseException], BaseException, types.TracebackType | None]


def bound_text(text: str, max_chars: int, max_lines: int) -> str:
    """``text`` cut to at most ``max_lines`` lines and ``max_chars`` characters.

    When something is cut, a note such as ``[... 9990000 more characters, 3 more lines]``
    is appended (not counted in the limits), so a reader knows the entry is incomplete.
    """
    if len(text) <= max_chars and text.count("\n") < max_lines:
        return text  # the common case: nothing to cut, no copy
    lines = text.split("\n", max_lines)
    more_lines = 0
    if len(lines) > max_lines:
        more_lines = lines[-1].count("\n") + 1
        lines = lines[:max_lines]
    kept = "\n".join(lines)[:max_chars]
    notes = [f"{len(text) - len(kept)} more characters"]
    if more_lines:
        notes.append(f"{more_lines} more lines")
    return f"{kept} [... {', '.join(notes)}]"


def bound_message(record: logging.LogRecord) -> str:
    """The record's formatted message, bounded (see the module's invariant)."""
    return bound_text(record.getMessage(), MAX_MESSAGE_CHARS, MAX_MESSAGE_LINES)


class BoundedFormatter(logging.Formatter):
    """A ``logging.Formatter`` that bounds the message and the traceback of each record.

    The record itself is not changed (other handlers, e.g. pytest's, see it whole): the
    formatter works on a shallow copy.
    """

    def format(self, record: logging.LogRecord) -> str:
        bounded = copy.copy(record)
        bounded.msg = bound_message(record)
        bounded.args = None
        bounded.exc_text = None  # computed again, bounded, from exc_info
        return super().format(bounded)

    def formatException(self, ei: _ExcInfo | tuple[None, None, None]) -> str:
        return bound_text(super().formatException(ei), MAX_TRACEBACK_CHARS, MAX_TRACEBACK_LINES)

    def formatStack(self, stack_info: str) -> str:
        return bound_text(stack_info, MAX_TRACEBACK_CHARS, MAX_TRACEBACK_LINES)


class JsonFormatter(BoundedFormatter):
    """One JSON object per record: ts, level, logger, msg (and exc), each bounded."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": bound_message(record),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class RateLimitedLog:
    """Lets one line through per ``interval`` seconds to ``logger``, counting what it held back:
    the one place that decides this for conditions that repeat per connection or retry.

    ``log`` is the common use; ``allow`` is the decision alone, for a caller that writes
    the line itself (e.g. a ``logging.Filter``).  With a ``key``, a line whose key differs
    from the last one let through passes at once (a new kind of failure is news), and the
    count of held-back lines starts again (they repeated the line already logged); the same
    key is held to the interval.  With ``interval=math.inf`` that is "once per distinct
    key, while it repeats".
    """

    __slots__ = ("_clock", "_interval", "_key", "_last", "_logger", "_suppressed")

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last = float("-inf")
        self._key: Hashable = None
        self._suppressed = 0

    def allow(self, key: Hashable = None) -> int | None:
        """None: hold this line back (counted); else let it through, and the number of
        lines held back since the last one let through."""
        now = self._clock()
        if key == self._key and now - self._last < self._interval:
            self._suppressed += 1
            return None
        held = self._suppressed if key == self._key else 0
        self._last, self._key, self._suppressed = now, key, 0
        return held

    def reset(self) -> None:
        """Forget the last line (the condition is over): the next one passes at once."""
        self._last, self._key, self._suppressed = float("-inf"), None, 0

    def log(self, level: int, msg: str, *args: object, key: Hashable = None) -> bool:
        """Log ``msg % args`` at ``level`` unless held back; True when it was logged.

        A line after held-back ones says so: ``(N similar messages suppressed)``.
        """
        held = self.allow(key)
        if held is None:
            return False
        if held:
            msg += " (%d similar messages suppressed)"
            args = (*args, held)
        self._logger.log(level, msg, *args)
        return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(BoundedFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
