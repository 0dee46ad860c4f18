"""``--workers 1`` against ``--workers 2``: new TCP connections/s and CPU per connection,
keep-alive requests/s and CPU per request, through userproxy to the nginx backend.

Usage: ``python -m bench.workers [--seconds 4] [--rounds 3] [--no-write]`` (the backends of
bench/peers.py are started if it runs alone); ``python -m bench`` runs it too and writes its
section of docs/benchmarks.md.  Addresses: userproxy on 127.241.200.1 (one worker) and
127.241.200.2 (two); the backends on 127.0.91.1 as for every bench.

CPU is the utime + stime of every process of the proxy (the parent and its workers, from
/proc), read before and after each wrk run.  wrk runs with two threads for both, so the
client is not what limits the two workers; it shares the two cores with them and the
backend, which bounds the gain (docs/workers.md, bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from bench import report
from bench.peers import HTTP, Peer, _wait_peer, start_backends, userproxy_argv, userproxy_manifests
from bench.procs import Procs, children, cpu_seconds, wait_until

ROOT = Path(__file__).resolve().parent.parent
HOSTS = {1: "127.241.200.1", 2: "127.241.200.2"}

_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_TOTAL = re.compile(r"(\d+) requests in ")
_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

Sample = dict[str, float]


def start(procs: Procs, tmp: Path, workers: int) -> Peer:
    """userproxy with ``--workers N`` on its own address, serving once every worker has
    opened its listeners."""
    host = HOSTS[workers]
    manifests = tmp / f"workers-{workers}"
    manifests.mkdir(exist_ok=True)
    (manifests / "bench.json").write_text(json.dumps(userproxy_manifests(host)))
    argv = userproxy_argv(manifests, "--metrics-bind-address=", "--workers", str(workers))
    name = f"userproxy-workers-{workers}"
    peer = Peer(name, host, udp=True, proc=procs.start(name, argv))
    _wait_peer(procs, peer)
    if workers > 1:
        assert peer.proc is not None
        pid = peer.proc.pid
        wait_until(lambda: _listening(host) >= workers, 20, f"{workers} workers on {host}")
        assert len(children(pid)) == workers
    return peer


def _listening(host: str) -> int:
    """Listening TCP sockets on ``host``:HTTP (one per worker with SO_REUSEPORT)."""
    port = f"{HTTP:04X}"
    address = "".join(f"{int(part):02X}" for part in reversed(host.split(".")))
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return sum(
        1 for row in rows if row.split()[1] == f"{address}:{port}" and row.split()[3] == "0A"
    )


def _cpu(peer: Peer) -> float:
    """CPU seconds of the proxy's processes: the parent and every worker it has now."""
    assert peer.proc is not None
    pids = [peer.proc.pid, *children(peer.proc.pid)]
    return sum(cpu_seconds(pid) for pid in pids)


def wrk(peer: Peer, seconds: float, *, close: bool) -> Sample:
    """wrk -t2 -c32 through ``peer``: requests/s and the proxy's CPU µs per request (a new
    connection per request with ``close``)."""
    argv = ["wrk", "-t2", "-c32", f"-d{seconds:g}s", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    before = _cpu(peer)
    result = subprocess.run(
        [*argv, f"http://{peer.host}:{HTTP}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=False,
    )
    used = _cpu(peer) - before
    out = result.stdout + result.stderr
    rps, total = _RPS.search(out), _TOTAL.search(out)
    if rps is None or total is None:
        raise RuntimeError(f"wrk through {peer.name}: no result:\n{out[-800:]}")
    errors = sum(int(x) for x in m.groups()) if (m := _ERRORS.search(out)) else 0
    key = "conn" if close else "ka"
    return {
        f"{key}_rps": float(rps.group(1)),
        f"{key}_cpu_us": used * 1e6 / max(int(total.group(1)), 1),
        f"{key}_errors": float(errors),
    }


def run(
    procs: Procs, tmp: Path, *, seconds: float, rounds: int, log: Callable[[str], None] = print
) -> str:
    """Measure both and return the markdown of the section (backends already started)."""
    load_start = _load()
    peers = {n: start(procs, tmp, n) for n in (1, 2)}
    results: dict[int, dict[str, list[float]]] = {1: {}, 2: {}}
    try:
        for r in range(rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for close in (True, False):
                for n in order:
                    sample = wrk(peers[n], seconds, close=close)
                    for key, value in sample.items():
                        results[n].setdefault(key, []).append(value)
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in sample.items())
                    log(f"workers round {r + 1}/{rounds} --workers {n}: {shown}")
    finally:
        for peer in peers.values():
            assert peer.proc is not None
            procs.stop(peer.proc)
    text = table(
        {n: {k: statistics.median(v) for k, v in m.items()} for n, m in results.items()},
        seconds,
        rounds,
    )
    return f"Load average at start and end: {load_start}, {_load()} (a shared machine).\n\n" + text


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def table(m: dict[int, dict[str, float]], seconds: float, rounds: int) -> str:
    one, two = m[1], m[2]
    rows = [
        ("new TCP connections/s (wrk -t2 -c32, Connection: close)", "conn_rps", "{:.0f}"),
        ("CPU µs per new connection (parent + workers)", "conn_cpu_us", "{:.1f}"),
        ("keep-alive requests/s (wrk -t2 -c32)", "ka_rps", "{:.0f}"),
        ("CPU µs per keep-alive request (parent + workers)", "ka_cpu_us", "{:.1f}"),
    ]
    lines = [
        f"Medians of {rounds} round(s) of {seconds:g} s per run; wrk errors: "
        f"{one.get('conn_errors', 0) + one.get('ka_errors', 0):.0f} (1 worker), "
        f"{two.get('conn_errors', 0) + two.get('ka_errors', 0):.0f} (2 workers).",
        "",
        "| measurement | `--workers 1` | `--workers 2` | 2 / 1 |",
        "|---|---:|---:|---:|",
    ]
    for sample in (one, two):  # cores the proxy got: rate x CPU per unit
        sample["conn_cores"] = sample["conn_rps"] * sample["conn_cpu_us"] / 1e6
        sample["ka_cores"] = sample["ka_rps"] * sample["ka_cpu_us"] / 1e6
    rows += [
        (
            "cores the proxy used, new connections (rate x CPU per connection)",
            "conn_cores",
            "{:.2f}",
        ),
        ("cores the proxy used, keep-alive", "ka_cores", "{:.2f}"),
    ]
    for title, key, fmt in rows:
        ratio = two[key] / one[key] if one.get(key) else float("nan")
        lines.append(
            f"| {title} | {fmt.format(one[key])} | {fmt.format(two[key])} | {ratio:.2f}x |"
        )
    return "\n".join(lines)


READING = """\
How to read it: the rate the proxy reaches is the cores it gets times the work per core,
so the last two rows say why the rates moved. The machine has 2 cores and wrk (2 threads)
and the nginx backend run on them too (and, during these runs, other work on the machine):
two workers never get two free cores. A second worker can only take CPU time the others
leave idle, or win it from them: the scheduler shares the cores between runnable threads,
so on a busy machine two workers get a larger share than one, which is most of what a rate
gain here is. CPU per new connection rises with two workers (1.0-1.25x in the runs so far;
per keep-alive request 1.0-1.25x): each worker does the same work per connection, but the
cores are oversubscribed (two workers, two wrk threads and nginx on two cores), so the
processes pay in context switches and colder caches, and each worker's accept loop finds
fewer connections waiting per wake-up (SO_REUSEPORT splits the queue), so the cost of a
wake-up is spread over fewer connections. The workers share nothing on the data path (each
has its own SO_REUSEPORT accept queue, loop, pools and counters; the parent idles), so
with a free core per worker the rate grows with the workers until the client or the
backend is the limit; this machine cannot show that."""


def write_section(text: str, doc: Path) -> None:
    """Replace this bench's section of ``doc`` (or append it)."""
    section = f"## Workers (`python -m bench.workers`)\n\n{text}\n\n{READING}"
    report.replace_section(doc, "workers", section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workers", description=__doc__)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    for tool in ("nginx", "wrk", "iperf3", "sockperf"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: see bench/README.md", file=sys.stderr)
            return 1
    tmp = Path(tempfile.mkdtemp(prefix="userproxy-bench-workers-"))
    procs = Procs(tmp)
    try:
        start_backends(procs, tmp, http_workers=1)
        text = run(procs, tmp, seconds=args.seconds, rounds=args.rounds)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
