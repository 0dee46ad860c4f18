"""The admin servers' aiohttp logger: a malformed request is the client's fault, not ours.

aiohttp's ``RequestHandler`` answers a request it cannot parse with 400 and closes the
connection, and logs it through its ``logger`` ("Error handling request from <peer>") with
the parser's exception and traceback attached: at ERROR for most malformed requests (bad
request line, invalid or oversized headers, bad chunked encoding), at DEBUG when the very
first request has an unknown method.  A port scanner or a broken prober would fill the log
with tracebacks.

Every admin server (health, metrics, the Service health-check ports) hands aiohttp the
logger ``http_logger(name)`` instead of ``aiohttp.server``.  Its filter turns a record
caused by the client (an ``HttpProcessingError``, a payload error, a dropped connection)
into one line, no traceback, at WARNING at most (DEBUG ones stay DEBUG), naming the server,
the peer and the parser's reason, and lets at most one such line per second through for
all the admin servers together, counting the ones held back.  Any other record (a bug in a
handler) passes unchanged.
"""

from __future__ import annotations

import logging

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from userproxy.logs import RateLimitedLog

#: Exceptions a client causes; anything else in a record is ours and keeps its traceback.
CLIENT_ERRORS: tuple[type[BaseException], ...] = (
    HttpProcessingError,
    RequestPayloadError,
    ConnectionError,
)
#: At most one line per this many seconds for all admin servers together.
LOG_INTERVAL = 1.0
_REASON_LIMIT = 160


#: The budget every admin server's filter shares (its logger is unused: filters write
#: the record themselves).
_budget = RateLimitedLog(logging.getLogger(__name__), LOG_INTERVAL)


def reason(exc: BaseException) -> str:
    """The first line of what the parser said, shortened (it may quote the client's bytes)."""
    if isinstance(exc, HttpProcessingError):
        text = exc.message or type(exc).__name__
    else:
        text = str(exc) or type(exc).__name__
    first = text.strip().splitlines()[0].rstrip(": ") if text.strip() else type(exc).__name__
    if len(first) > _REASON_LIMIT:
        first = first[:_REASON_LIMIT] + "..."
    return first


class ClientErrorFilter(logging.Filter):
    """Rewrites client-caused records of one admin server's aiohttp logger (see module)."""

    def __init__(self, server: str, budget: RateLimitedLog | None = None) -> None:
        super().__init__()
        self.server = server
        self._budget = budget or _budget

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not isinstance(exc, CLIENT_ERRORS):
            return True
        held = self._budget.allow()
        if held is None:
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        peer = args[0] if args else "?"
        record.msg = "%s server: malformed request from %s: %s (answered 400 and closed)%s"
        record.args = (
            self.server,
            peer,
            reason(exc),
            f" ({held} similar held back)" if held else "",
        )
        if record.levelno > logging.WARNING:
            record.levelno = logging.WARNING
            record.levelname = logging.getLevelName(logging.WARNING)
        record.exc_info = None
        record.exc_text = None
        record.stack_info = None
        return True


def http_logger(server: str) -> logging.Logger:
    """The logger to give aiohttp's request handler (``logger=``) for admin server ``server``."""
    logger = logging.getLogger(f"{__name__}.{server}")
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter(server))
    return logger
