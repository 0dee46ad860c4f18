"""The admin servers' aiohttp logger: a malformed request is the client's fault, not ours.

aiohttp answers a request it cannot parse with 400, closes the connection and logs "Error
handling request from <peer>" with the parser's traceback (at ERROR for most), so a port
scanner would fill the log with tracebacks.  Every admin server (health, metrics, the
Service health-check ports) hands aiohttp ``http_logger(name)`` instead: client-caused
records become one line, no traceback, at WARNING at most, one a second for all the admin
servers together (counting those held back).  Any other record (a bug in a handler) passes
unchanged.
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
    text = (exc.message if isinstance(exc, HttpProcessingError) else str(exc)).strip()
    first = text.splitlines()[0].rstrip(": ") if text else type(exc).__name__
    return first[:_REASON_LIMIT] + "..." if len(first) > _REASON_LIMIT else first


class ClientErrorFilter(logging.Filter):
    """Rewrites client-caused records of one admin server's aiohttp logger (see module)."""

    def __init__(self, server: str) -> None:
        super().__init__()
        self.server = server

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not isinstance(exc, CLIENT_ERRORS):
            return True
        held = _budget.allow()
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
        record.exc_info = record.exc_text = record.stack_info = None
        return True


def http_logger(server: str) -> logging.Logger:
    """The logger to give aiohttp's request handler (``logger=``) for admin server ``server``."""
    logger = logging.getLogger(f"{__name__}.{server}")
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter(server))
    return logger
