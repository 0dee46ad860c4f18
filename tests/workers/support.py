"""Running ``userproxy run --workers 2`` as a child for the tests of tests/workers/.

Addresses: 127.241.0.0/16 only.  Each test takes a fresh third octet (``fresh_net``,
offset by the pid so two runs rarely meet): 127.241.N.1 is the Service, 127.241.N.11...
the backends, 127.241.N.200 the proxy's metrics server, 127.241.N.250 a fake API server.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support.proxyrun import proxy_process, wait_until

_nets = itertools.count(1 + (os.getpid() % 25) * 10)

ADMIN_PORT = 10249


def fresh_net() -> int:
    """A third octet for 127.241.N.x no other test of this process uses."""
    return next(_nets) % 254 + 1


def admin_url(net: int) -> str:
    return f"http://127.241.{net}.200:{ADMIN_PORT}"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        text: str = response.read().decode()
        return text


def samples(metrics: str, family: str) -> dict[str, float]:
    """``{worker: value}`` of the samples of ``family`` (summed over their other labels)."""
    found: dict[str, float] = {}
    for line in metrics.splitlines():
        match = re.match(rf"{family}\{{(.*)\}} (\S+)$", line)
        if match is None:
            continue
        worker = re.search(r'worker="([^"]*)"', match.group(1))
        if worker is not None:
            found[worker.group(1)] = found.get(worker.group(1), 0.0) + float(match.group(2))
    return found


def worker_rows(net: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = get_json(admin_url(net) + "/status")["workers"]
    return rows


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> set[int]:
    """The pids whose parent is ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.add(int(entry.name))
    return found


def wait_serving(net: int, workers: int = 2, within: float = 30.0) -> list[dict[str, Any]]:
    """Wait until every worker runs and has applied a sync (its listeners are open); the
    parent's rows of the workers."""

    def synced() -> bool:
        metrics = get_text(admin_url(net) + "/metrics")
        syncs = samples(metrics, "kubeproxy_sync_proxy_rules_duration_seconds_count")
        rows = worker_rows(net)
        return all(row["alive"] for row in rows) and all(
            syncs.get(str(n), 0) >= 1 for n in range(workers)
        )

    wait_until(synced, within, "every worker synced")
    rows = worker_rows(net)
    assert len(rows) == workers, rows
    return rows


@contextlib.contextmanager
def workers_proxy(
    source: Sequence[str], net: int, log: Path, loop: str, *extra: str, workers: int = 2
) -> Iterator[subprocess.Popen[str]]:
    """``userproxy run --workers N`` on ``source``; at exit it is stopped (SIGTERM) and no
    process it started may be left."""
    args = [
        "run",
        *source,
        "--workers",
        str(workers),
        "--loop",
        loop,
        "--hostname",
        "n1",
        "--min-sync-period",
        "0",
        "--shutdown-grace",
        "1",
        "--metrics-bind-address",
        f"127.241.{net}.200:{ADMIN_PORT}",
        *extra,
    ]
    seen: set[int] = set()
    with proxy_process(args, log=log) as proc:
        try:
            yield proc
        finally:
            seen = children(proc.pid)
    # proxy_process stopped it; every worker it ever had is gone with it, and so is the
    # directory of their admin sockets.
    wait_until(lambda: not any(alive(pid) for pid in seen), 15.0, "no worker left")
    sockets = {Path(m).parent for m in re.findall(r"listening on (/\S+\.sock)", log.read_text())}
    assert sockets, "no worker logged its admin socket"
    assert not [path for path in sockets if path.exists()], sockets


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while alive(pid):
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.01)
