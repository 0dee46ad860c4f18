"""What clients see while the proxy is replaced under load: a userproxy handoff
(``--handoff-socket``) next to HAProxy's seamless reload (``-x``: the listening sockets
passed over its stats socket), a plain userproxy restart, and a crash.

Each scenario: ``wrk -t1 -c32 -d20s -H "Connection: close"`` (a new connection per
request) through the proxy to the nginx backend, and at 10 s the replacement.  Reported:
wrk's socket errors (connect, read, write, timeout), non-2xx answers and requests done,
and how long the new process took to serve (a handoff: from its start to its takeover
line; a restart or a crash: from the old process's end to the first connection accepted,
probed every 10 ms).  One round: these are error counts, not rates.

Usage: ``python -m bench.handoff [--no-write]`` (starts the backends of bench/peers.py if
it runs alone); ``python -m bench`` runs it too and writes its section of
docs/benchmarks.md.  Addresses: the proxies on 127.0.92.1-4, the backends on 127.0.91.1 as
for every bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import report
from bench.peers import (
    BACKEND,
    HTTP,
    Peer,
    _wait_peer,
    max_proxied,
    start_backends,
    userproxy_argv,
    userproxy_manifests,
)
from bench.procs import Procs, can_connect, wait_until

ROOT = Path(__file__).resolve().parent.parent
SECONDS, AT = 20, 10

_TOTAL = re.compile(r"(\d+) requests in ")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True)
class Outcome:
    """One scenario: wrk's counts, and seconds until the new process served."""

    name: str
    requests: int
    connect: int
    read: int
    write: int
    timeout: int
    non2xx: int
    serving_after: float
    note: str = ""


def _wrk(host: str) -> subprocess.Popen[str]:
    argv = ["wrk", "-t1", "-c32", f"-d{SECONDS}s", "--timeout", "2s"]
    argv += ["-H", "Connection: close", f"http://{host}:{HTTP}/"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outcome(name: str, wrk: subprocess.Popen[str], serving_after: float, note: str) -> Outcome:
    out, _ = wrk.communicate(timeout=SECONDS + 30)
    total = _TOTAL.search(out)
    if total is None:
        raise RuntimeError(f"wrk ({name}) printed no result:\n{out[-800:]}")
    errors = [int(x) for x in m.groups()] if (m := _ERRORS.search(out)) else [0, 0, 0, 0]
    non2xx = int(m.group(1)) if (m := _NON2XX.search(out)) else 0
    connect, read, write, timeout = errors
    return Outcome(
        name, int(total.group(1)), connect, read, write, timeout, non2xx, serving_after, note
    )


def _until_serving(host: str, since: float, within: float = 30.0) -> float:
    """Seconds from ``since`` until a connection to ``host`` is accepted (every 10 ms)."""
    deadline = time.monotonic() + within
    while not can_connect((host, HTTP)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing serves {host}:{HTTP} after {within} s")
        time.sleep(0.01)
    return time.monotonic() - since


def _userproxy(procs: Procs, tmp: Path, host: str, name: str, *extra: str) -> Peer:
    manifests = tmp / f"handoff-{host}"
    manifests.mkdir(exist_ok=True)
    (manifests / "bench.json").write_text(json.dumps(userproxy_manifests(host)))
    argv = userproxy_argv(manifests, "--metrics-bind-address=", "--log-level", "info", *extra)
    return Peer(name, host, udp=False, proc=procs.start(name, argv))


def userproxy_handoff(procs: Procs, tmp: Path) -> Outcome:
    host = "127.0.92.1"
    run = tmp / "handoff-run"
    run.mkdir(mode=0o700)
    flags = ("--handoff-socket", str(run / "handoff.sock"), "--shutdown-grace", "5s")
    old = _userproxy(procs, tmp, host, "handoff-old", *flags)
    _wait_peer(procs, old)
    wait_until(lambda: "handoff: listening" in procs.log_tail("handoff-old", 50), 20, "old")
    wrk = _wrk(host)
    time.sleep(AT)
    started = time.monotonic()
    new = _userproxy(procs, tmp, host, "handoff-new", *flags)
    wait_until(lambda: "handoff: took over" in procs.log_tail("handoff-new", 50), 30, "takeover")
    took = time.monotonic() - started
    result = _outcome("userproxy `--handoff-socket`", wrk, took, "")
    assert old.proc is not None
    assert new.proc is not None
    code = old.proc.wait(15)
    procs.stop(new.proc)
    note = f"the old process drained and exited {code} by itself"
    return dataclasses.replace(result, note=note)


_HAPROXY = """\
global
  nbthread 1
  maxconn {maxconn}
  stats socket {sock} mode 600 expose-fd listeners level admin
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
listen http
  bind {host}:{port}
  server s1 {backend}:{port}
"""


def haproxy_reload(procs: Procs, tmp: Path) -> Outcome:
    host = "127.0.92.2"
    sock = tmp / "haproxy-stats.sock"
    cfg = tmp / "haproxy-handoff.cfg"
    conf = _HAPROXY.format(sock=sock, host=host, port=HTTP, backend=BACKEND, maxconn=max_proxied())
    cfg.write_text(conf)
    old = procs.start("haproxy-old", ["haproxy", "-db", "-f", str(cfg)])
    wait_until(lambda: can_connect((host, HTTP)) and sock.exists(), 20, "haproxy")
    wrk = _wrk(host)
    time.sleep(AT)
    started = time.monotonic()
    argv = ["haproxy", "-db", "-f", str(cfg), "-x", str(sock), "-sf", str(old.pid)]
    new = procs.start("haproxy-new", argv)
    code = old.wait(30)  # -sf: the old one stops once the new one listens, then drains
    took = time.monotonic() - started
    result = _outcome("HAProxy reload (`-x` socket transfer, `-sf`)", wrk, took, "")
    procs.stop(new)
    note = f"until the old process exited ({code}); the new one served before"
    return dataclasses.replace(result, note=note)


def userproxy_restart(procs: Procs, tmp: Path, *, crash: bool) -> Outcome:
    host = "127.0.92.3" if crash else "127.0.92.4"
    label = "crash" if crash else "restart"
    old = _userproxy(procs, tmp, host, f"{label}-old", "--shutdown-grace", "5s")
    _wait_peer(procs, old)
    wrk = _wrk(host)
    time.sleep(AT)
    assert old.proc is not None
    os.kill(old.proc.pid, signal.SIGKILL if crash else signal.SIGTERM)
    if crash:
        old.proc.wait(10)
    else:  # the old one stops accepting at once; its connections drain meanwhile
        wait_until(lambda: not can_connect((host, HTTP)), 10, "the old one to stop accepting")
    ended = time.monotonic()
    new = _userproxy(procs, tmp, host, f"{label}-new")
    took = _until_serving(host, ended)
    name = "userproxy crash (SIGKILL), started again" if crash else "userproxy plain restart"
    note = "refused meanwhile" if crash else "SIGTERM, then a new process; refused meanwhile"
    result = _outcome(name, wrk, took, note)
    assert new.proc is not None
    procs.stop(new.proc)
    procs.stop(old.proc)
    return result


def run(procs: Procs, tmp: Path, log: Callable[[str], None] = print) -> str:
    """Every scenario, one after the other; the markdown of the section."""
    outcomes = []
    scenarios: list[Callable[[], Outcome]] = [
        functools.partial(userproxy_handoff, procs, tmp),
        functools.partial(haproxy_reload, procs, tmp),
        functools.partial(userproxy_restart, procs, tmp, crash=False),
        functools.partial(userproxy_restart, procs, tmp, crash=True),
    ]
    for scenario in scenarios:
        outcome = scenario()
        outcomes.append(outcome)
        log(
            f"handoff: {outcome.name}: {outcome.requests} requests, errors connect "
            f"{outcome.connect} read {outcome.read} write {outcome.write} timeout "
            f"{outcome.timeout}, non-2xx {outcome.non2xx}, serving after "
            f"{outcome.serving_after:.2f} s"
        )
    return table(outcomes)


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| what happens at 10 s | requests | connect errors | read | write | timeout | "
        "non-2xx | the new process serves after | |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for o in outcomes:
        rows.append(
            f"| {o.name} | {o.requests} | {o.connect} | {o.read} | {o.write} | {o.timeout} | "
            f"{o.non2xx} | {o.serving_after:.2f} s | {o.note} |"
        )
    return (
        f'`wrk -t1 -c32 -d{SECONDS}s -H "Connection: close"` through each proxy to the nginx '
        f"backend; at {AT} s the proxy is replaced. One run (counts, not rates).\n\n"
        + "\n".join(rows)
    )


READING = """\
How to read it: a handoff passes the listening sockets themselves, so the kernel never
has a moment without a listener on the address: no connection is refused and none is cut
(the old process finishes what it accepted). HAProxy's `-x` does the same over its stats
socket. A restart closes the listening socket and opens a new one: the kernel refuses
every connection until the new process has read its configuration and listened (wrk counts
a refused connection as a `write` error: its connect does not block, so the refusal shows
at the first write), and a crash does so too, and also cuts what was open (`read`
errors). The handoff's time is the new process's start-up and first sync, during which the
old one serves on."""


def write_section(text: str, doc: Path) -> None:
    """Replace this bench's section of ``doc`` (or append it)."""
    title = "## Handoff under load (`python -m bench.handoff`)"
    section = f"{title}\n\n{text}\n\n{READING}"
    report.replace_section(doc, "handoff", section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.handoff", description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk", "haproxy", "iperf3", "sockperf"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: see bench/README.md", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="userproxy-bench-handoff-"))
    procs = Procs(tmp)
    try:
        start_backends(procs, tmp, http_workers=1)
        text = run(procs, tmp)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
