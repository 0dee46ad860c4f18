"""Endpoint counts per Service port: each endpoint in exactly one state, the change line,
and the per-sync bound on INFO lines (table-driven, no sockets)."""

from __future__ import annotations

import logging

import pytest

from userproxy.control.endpoint_counts import (
    EndpointCount,
    EndpointCountLog,
    count_endpoints,
    describe,
)
from userproxy.model import Endpoint, Protocol, ServicePortName

WEB = ServicePortName("default", "web", "http", Protocol.TCP)


@pytest.mark.parametrize(
    ("ready", "serving", "terminating", "state"),
    [
        (True, True, False, "ready"),
        (True, True, True, "ready"),  # ready wins, as upstream reads the conditions
        (False, True, True, "serving_terminating"),
        (False, False, True, "not_ready"),
        (False, True, False, "not_ready"),
        (False, False, False, "not_ready"),
    ],
)
def test_each_endpoint_is_in_one_state(
    ready: bool, serving: bool, terminating: bool, state: str
) -> None:
    endpoint = Endpoint("10.0.0.1", 80, ready=ready, serving=serving, terminating=terminating)
    counts = dict(count_endpoints(WEB, [endpoint]).by_state())
    assert counts == {s: int(s == state) for s in counts}


@pytest.mark.parametrize(
    ("old", "new", "line"),
    [
        (None, EndpointCount(WEB, 3), "default/web:http/TCP: 0 -> 3 ready endpoints"),
        (EndpointCount(WEB, 3), EndpointCount(WEB, 3), None),
        (
            EndpointCount(WEB, 3),
            EndpointCount(WEB, 2, 1, 0),
            "default/web:http/TCP: 3 -> 2 ready endpoints (1 serving terminating)",
        ),
        (
            EndpointCount(WEB, 2, 1, 0),
            EndpointCount(WEB, 2, 0, 1),  # ready unchanged: still a change, still a line
            "default/web:http/TCP: 2 -> 2 ready endpoints (1 not ready)",
        ),
        (
            EndpointCount(WEB, 1),
            None,
            "default/web:http/TCP: 1 -> 0 ready endpoints (port removed)",
        ),
    ],
)
def test_the_change_line(
    old: EndpointCount | None, new: EndpointCount | None, line: str | None
) -> None:
    assert describe(old, new) == line
    assert EndpointCount(WEB).service_port == "default/web:http"


def test_a_sync_logs_at_most_its_share_at_info(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="userproxy.control.endpoint_counts")
    log = EndpointCountLog(enabled=True, lines=3)
    for i in range(5):
        spn = ServicePortName("default", f"s{i}", "", Protocol.TCP)
        log.note((), (EndpointCount(spn, 1),))
    log.flush(7)
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert info == [
        "default/s0/TCP: 0 -> 1 ready endpoints",
        "default/s1/TCP: 0 -> 1 ready endpoints",
        "default/s2/TCP: 0 -> 1 ready endpoints",
        "sync 7: 2 more Service ports changed their endpoint counts (logged at DEBUG; all are "
        "in /metrics as userproxy_endpoints)",
    ]
    assert debug == [
        "default/s3/TCP: 0 -> 1 ready endpoints",
        "default/s4/TCP: 0 -> 1 ready endpoints",
    ]
    # The next sync starts with its full share again; a disabled log says nothing.
    caplog.clear()
    log.note((EndpointCount(WEB, 1),), (EndpointCount(WEB, 2),))
    log.flush(8)
    assert [r.getMessage() for r in caplog.records] == [
        "default/web:http/TCP: 1 -> 2 ready endpoints"
    ]
    caplog.clear()
    quiet = EndpointCountLog()
    quiet.note((), (EndpointCount(WEB, 1),))
    quiet.flush(1)
    assert caplog.records == []
