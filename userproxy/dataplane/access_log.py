"""The access log (``--access-log PATH``, ``--access-log-format text|json``): one line per
finished TCP connection, per refused TCP client and per ended UDP session.

Modelled on HAProxy's ``option tcplog`` (client, frontend, backend server, connect time
``Tc``, total time ``Tt``, bytes, and a termination state) and Envoy's TCP proxy access log
(``%DOWNSTREAM_REMOTE_ADDRESS%``, ``%UPSTREAM_HOST%``, ``%BYTES_RECEIVED%``/``%BYTES_SENT%``,
``%DURATION%``, ``%RESPONSE_FLAGS%`` such as ``UF`` upstream connect failure or ``UO``
overflow).  The JSON field names are documented in docs/configuration.md, "Access log".

Invariants:

* The event loop never blocks on the log: ``record`` appends one tuple of values already
  at hand to a bounded deque (O(1), no formatting); a writer thread formats and writes
  them in batches.  When ``QUEUE_LIMIT`` records are waiting the new one is dropped and
  counted (``dropped``), and a warning says so at most once every ``DROP_LOG_INTERVAL``.
* With the log off nothing here runs: the data path holds ``None`` and checks it once per
  connection (``if log is not None``).
* ``close`` writes everything queued before it returns (the proxy's shutdown calls it
  after the drain, so connections aborted at shutdown are in the file).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import IO, Final, Literal

from userproxy.logs import RateLimitedLog
from userproxy.model import Endpoint, ServicePortName

log = logging.getLogger(__name__)

AccessLogFormat = Literal["text", "json"]
ACCESS_LOG_FORMATS: Final[tuple[AccessLogFormat, ...]] = ("text", "json")

#: Records waiting for the writer at most; beyond this new ones are dropped (counted).
QUEUE_LIMIT: Final = 65_536
#: How often the writer thread wakes to write what has queued (the loop never signals it:
#: a wake-up per line would cost a lock per connection).
WRITE_INTERVAL: Final = 0.05
DROP_LOG_INTERVAL: Final = 5.0

# -- how a connection or session ended (the JSON "end" field; the text line's last word) ----
CLIENT_CLOSED: Final = "client_closed"  # the client sent the first FIN (HAProxy "--")
ENDPOINT_CLOSED: Final = "endpoint_closed"  # the endpoint sent the first FIN
CLIENT_RESET: Final = "client_reset"  # HAProxy "CD": the client aborted
ENDPOINT_RESET: Final = "endpoint_reset"  # HAProxy "SD": the server aborted
IDLE_TIMEOUT: Final = "idle_timeout"  # --tcp-idle-timeout / --udp-idle-timeout
HALF_CLOSE_TIMEOUT: Final = "half_close_timeout"  # --tcp-fin-timeout
DRAINED: Final = "drained"  # still open at the end of the shutdown grace
NO_ENDPOINT_REACHABLE: Final = "no_endpoint_reachable"  # Envoy "UF": every dial failed
SOURCE_RANGE_REFUSED: Final = "source_range_refused"  # loadBalancerSourceRanges
NO_ENDPOINTS_FOR_CLASS: Final = "no_endpoints_for_class"  # e.g. eTP Local, no local pod
CONNECTION_LIMIT_REFUSED: Final = "connection_limit_refused"  # Envoy "UO": over its share
PROXY_ERROR: Final = "proxy_error"  # HAProxy "P": the compiled relay itself failed; both reset
ENDPOINT_DRAINED: Final = "endpoint_drained"  # --endpoint-drain: its endpoint left the pool
# UDP only.
EVICTED: Final = "evicted"  # the least recently used session, at --udp-max-sessions
ENDPOINT_UNREACHABLE: Final = "endpoint_unreachable"  # ICMP port unreachable
ENDPOINT_REMOVED: Final = "endpoint_removed"  # its endpoint left the pool
LISTENER_CLOSED: Final = "listener_closed"  # the Service's port or address went away

#: One record: (unix time, protocol, client ip, client port, listener ip, listener port,
#: Service port, endpoint or None, dial attempts, connect seconds or -1, duration seconds,
#: bytes from the client, bytes to the client, end).  Objects, not text: the writer thread
#: formats them, so the loop's cost per line is this tuple.
Record = tuple[
    float,
    str,
    str,
    int,
    str,
    int,
    ServicePortName,
    Endpoint | None,
    int,
    float,
    float,
    int,
    int,
    str,
]


@dataclass(slots=True, eq=False)
class ConnTrace:
    """The access log's extra state of one TCP connection, made only while the log is on.

    ``started`` and ``connected`` are loop times; ``connected`` is None until an upstream
    is joined; ``attempts`` counts the endpoints dialled so far.
    """

    client_port: int
    started: float
    connected: float | None = None
    attempts: int = 0


def _text(r: Record) -> str:
    # HAProxy tcplog's order: client, listener, Service port, endpoint, Tc/Tt, bytes, end.
    connect = f"{r[9] * 1000:.1f}ms" if r[9] >= 0 else "-"
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(r[0])) + f".{int(r[0] % 1 * 1000):03d}Z"
    client = f"[{r[2]}]:{r[3]}" if ":" in r[2] else f"{r[2]}:{r[3]}"
    listener = f"[{r[4]}]:{r[5]}" if ":" in r[4] else f"{r[4]}:{r[5]}"
    return (
        f"{when} {r[1]} {client} -> {listener} {r[6]} endpoint={r[7] or '-'} "
        f"attempts={r[8]} connect={connect} duration={r[10] * 1000:.1f}ms "
        f"bytes_in={r[11]} bytes_out={r[12]} end={r[13]}"
    )


def _json(r: Record) -> str:
    # Built by hand, not json.dumps of a dict (a third of the writer's time): every value is
    # a number, an address, a constant or a Service port name (DNS labels, no quotes or
    # backslashes); the name still goes through json.dumps, so the line is always JSON.
    client = f"[{r[2]}]:{r[3]}" if ":" in r[2] else f"{r[2]}:{r[3]}"
    listener = f"[{r[4]}]:{r[5]}" if ":" in r[4] else f"{r[4]}:{r[5]}"
    endpoint = f'"{r[7]}"' if r[7] is not None else "null"
    connect = f"{r[9] * 1000:.3f}" if r[9] >= 0 else "null"
    return (
        f'{{"time":{r[0]:.3f},"protocol":"{r[1]}","client":"{client}",'
        f'"listener":"{listener}","service_port":{json.dumps(str(r[6]))},"endpoint":{endpoint},'
        f'"attempts":{r[8]},"connect_ms":{connect},"duration_ms":{r[10] * 1000:.3f},'
        f'"bytes_in":{r[11]},"bytes_out":{r[12]},"end":"{r[13]}"}}'
    )


class AccessLog:
    """A bounded queue of records and the thread that writes them to ``path`` (``-``:
    stderr), appended to, one line each, flushed after every batch."""

    def __init__(self, path: str, fmt: AccessLogFormat = "text") -> None:
        self.path = path
        self._format = _json if fmt == "json" else _text
        self._stream: IO[str] = (
            sys.stderr if path == "-" else open(path, "a", encoding="utf-8")  # noqa: SIM115
        )
        self._queue: deque[Record] = deque()
        #: Lines dropped because the writer was behind, written, and lost to write errors
        #: (``userproxy_access_log_lines_total``); each changed by one side only.
        self.dropped = 0
        self.written = 0
        self.failed = 0
        self._drop_log = RateLimitedLog(log, DROP_LOG_INTERVAL)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="access-log", daemon=True)
        self._thread.start()

    def record(self, record: Record) -> None:
        """Queue one line (on the loop: O(1), never blocks)."""
        queue = self._queue
        if len(queue) >= QUEUE_LIMIT:
            self.dropped += 1
            self._drop_log.log(
                logging.WARNING,
                "access log %s: the writer is behind by %d lines; dropped %d lines so far",
                self.path,
                QUEUE_LIMIT,
                self.dropped,
            )
            return
        queue.append(record)

    # -- the writer thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(WRITE_INTERVAL):
            self._write_batch()
        self._write_batch()

    def _write_batch(self) -> None:
        queue = self._queue
        if not queue:
            return
        lines = []
        fmt = self._format
        # popleft is atomic with the loop's append; taking only what is there now.
        for _ in range(len(queue)):
            lines.append(fmt(queue.popleft()))
        lines.append("")
        try:
            self._stream.write("\n".join(lines))
            self._stream.flush()
        except (OSError, ValueError) as exc:  # disk full, file closed: keep the proxy going
            self._drop_log.log(logging.WARNING, "access log %s: cannot write: %s", self.path, exc)
            self.failed += len(lines) - 1
            return
        self.written += len(lines) - 1

    def close(self) -> None:
        """Write what is queued, stop the thread and close the file (idempotent)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self._stream is not sys.stderr:
            self._stream.close()
