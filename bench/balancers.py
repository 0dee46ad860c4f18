"""The balancers side by side: heterogeneous backends, Maglev's disruption, and the CPU
cost per connection of each balancer against round-robin.  Needs nothing beyond Python.

    .venv/bin/python -m bench.balancers [--seconds 6] [--clients 16] [--rounds 3]
                                        [--connections 3000] [--no-write]

* **Heterogeneous backends**: one proxy process (userproxy, uvloop) serves one Service per
  balancer, all over the same three backends in a child process: ``normal`` (2 ms per
  request), ``slow`` (40 ms: 20x) and ``flaky`` (2 ms, but resets one connection in ten
  on accept); each serves one request at a time (a single worker), so what it is sent
  beyond its pace queues.  ``--clients`` closed-loop clients (each from its own
  127.0.99.x source address, so Maglev spreads them) send one request per new connection
  for ``--seconds``: p50/p99 latency of the answered requests, answered requests per
  second, errors (resets), and each backend's share of the answers.
* **Maglev's disruption**, offline: 100 000 client IPs over 10 endpoints, one removed;
  the fraction that moves and the fraction that moves between two endpoints that stay,
  next to a modulo hash (``hash % N``), and the table build times.
* **CPU per connection**: ``--connections`` connections per balancer to three instant
  backends (a second port of the same Services), balancers in a rotating order for
  ``--rounds`` rounds; the proxy's utime + stime (``/proc/PID/stat``) per connection, the
  median over rounds, and its ratio to round-robin.

Prints a table and (unless ``--no-write``) replaces its section of docs/benchmarks.md and
writes the chart docs/balancers.png.  Addresses: Services 127.0.97.x, backends
127.0.98.x, client sources 127.0.99.x.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import random
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench import peers, report
from bench.procs import Procs, can_connect, cpu_seconds, python, wait_until

ROOT = Path(__file__).resolve().parent.parent
BALANCERS = ("round-robin", "random", "least-connections", "power-of-two", "maglev")
#: name -> (backend IP, service time in s, fraction of connections reset on accept)
BACKENDS = {
    "normal": ("127.0.98.1", 0.002, 0.0),
    "slow": ("127.0.98.2", 0.040, 0.0),
    "flaky": ("127.0.98.3", 0.002, 0.1),
}
HET, FAST = 9001, 9002  # backend ports: heterogeneous, instant
SERVICE_PORT_HET, SERVICE_PORT_FAST = 8080, 8081
READING = """How to read it:

- Each backend serves one request at a time, so round-robin and random queue a third of
  all requests behind the slow one, and its queue sets their p99 and throughput.
  least-connections and power-of-two read the connections open to each backend: the
  slow one holds as many as the others while serving 20x fewer, so it gets a few percent
  of the requests. Their p50 is higher than round-robin's because the fast backends do
  the work that round-robin left waiting at the slow one.
- The flaky backend fails fast, so it looks idle to the load-aware balancers and gets
  about as much as the normal one (HAProxy's leastconn has the same blind spot). Outlier
  ejection counts a reset before any byte as a failed dial, but ejects only after 5 in a
  row; resetting 10 % of connections at random, the flaky backend rarely gets there.
- Maglev is not load-aware: it spreads clients, not load (16 client addresses here), and
  keeps each client on its endpoint; its figures depend on where those 16 hash.
- CPU per connection is the proxy's utime + stime over the connections of a run; the
  kernel counts it in 10 ms ticks, so a figure moves by a few percent from run to run."""


# -- the backends (a child process: ``python -m bench.balancers --serve``) ------------------


class _Backend:
    """One backend's two ports: paced (one request at a time, some resets) and instant."""

    def __init__(self, name: str, pace: float, flaky: float) -> None:
        self.name = name.encode() + b"\n"
        self.pace = pace
        self.flaky = flaky
        self.lock = asyncio.Lock()
        self.rng = random.Random(name)

    async def paced(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.rng.random() < self.flaky:
            # A reset on accept: SO_LINGER 0, then close.
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return
        with contextlib.suppress(OSError):
            while await reader.readline():
                async with self.lock:  # one request at a time: a single worker
                    await asyncio.sleep(self.pace)
                writer.write(self.name)
        writer.close()

    async def instant(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while await reader.readline():
                writer.write(self.name)
        writer.close()


async def _serve() -> None:
    servers = []
    for name, (ip, pace, flaky) in BACKENDS.items():
        backend = _Backend(name, pace, flaky)
        servers.append(await asyncio.start_server(backend.paced, ip, HET, backlog=1024))
        servers.append(await asyncio.start_server(backend.instant, ip, FAST, backlog=1024))
    await asyncio.Event().wait()


# -- the proxy's manifests --------------------------------------------------------------------


def manifests() -> dict[str, Any]:
    items: list[dict[str, Any]] = []
    ports = {"het": (SERVICE_PORT_HET, HET), "fast": (SERVICE_PORT_FAST, FAST)}
    for i, balancer in enumerate(BALANCERS):
        name = f"lb-{balancer}"
        items.append({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "default",
                         "annotations": {"userproxy.io/balancer": balancer}},
            "spec": {"clusterIP": f"127.0.97.{i + 1}", "ports": [
                {"name": p, "protocol": "TCP", "port": sp, "targetPort": p}
                for p, (sp, _) in ports.items()]},
        })  # fmt: skip
        items.append({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": f"{name}-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": name}},
            "addressType": "IPv4",
            "ports": [{"name": p, "protocol": "TCP", "port": bp} for p, (_, bp) in ports.items()],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}}
                          for ip, _, _ in BACKENDS.values()],
        })  # fmt: skip
    return {"apiVersion": "v1", "kind": "List", "items": items}


def service_address(balancer: str, port: int) -> tuple[str, int]:
    return (f"127.0.97.{BALANCERS.index(balancer) + 1}", port)


# -- the clients ------------------------------------------------------------------------------


async def closed_loop(
    address: tuple[str, int], clients: int, *, seconds: float = 0.0, count: int = 0
) -> tuple[list[float], int, Counter[str], float]:
    """Clients sending one request per new connection, back to back, for ``seconds`` or
    ``count`` connections: sorted latencies of the answered ones, errors, answers by
    backend name, elapsed time."""
    latencies: list[float] = []
    answers: Counter[str] = Counter()
    errors = 0
    left = count
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal errors, left
        source = (f"127.0.99.{k + 1}", 0)
        while (time.perf_counter() < deadline) if seconds else left > 0:
            left -= 1
            started = time.perf_counter()
            try:
                reader, writer = await asyncio.open_connection(*address, local_addr=source)
                writer.write(b"req\n")
                line = await reader.readline()
                writer.close()
            except OSError:
                errors += 1
                continue
            if not line:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)
            answers[line.decode().strip()] += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return sorted(latencies), errors, answers, time.perf_counter() - started


def pct(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))] if values else float("nan")


# -- Maglev's disruption, offline -------------------------------------------------------------


def disruption() -> dict[str, float]:
    from userproxy.balancers.maglev import Maglev, build_table, client_hash
    from userproxy.model import Endpoint

    endpoints = [Endpoint(f"10.4.0.{n}", 8080) for n in range(1, 11)]
    clients = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(100_000)]
    gone = endpoints[3]
    rest = [e for e in endpoints if e != gone]
    out: dict[str, float] = {}
    full, fewer = Maglev(endpoints), Maglev(rest)
    hashes = [client_hash(ip) for ip in clients]

    def modulo(pool: list[Endpoint], h: int) -> Endpoint:
        return pool[h % len(pool)]

    for kind, before, after in (
        ("maglev", [full.pick(ip) for ip in clients], [fewer.pick(ip) for ip in clients]),
        ("modulo", [modulo(endpoints, h) for h in hashes], [modulo(rest, h) for h in hashes]),
    ):
        pairs = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
        out[f"{kind}_moved"] = len(pairs) / len(clients)
        out[f"{kind}_between"] = sum(gone not in p for p in pairs) / len(clients)
    for n in (3, 10, 100):
        names = tuple(f"10.5.{i // 250}.{i % 250}:80" for i in range(n))
        times = []
        for _ in range(3):
            build_table.cache_clear()
            started = time.perf_counter()
            build_table(names)
            times.append(time.perf_counter() - started)
        out[f"build_ms_{n}"] = min(times) * 1000
    return out


# -- the run ----------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="userproxy-bench-balancers-"))
    procs = Procs(tmp)
    results: dict[str, Any] = {"het": {}, "cpu": {b: [] for b in BALANCERS}}
    try:
        procs.start("backends", [python(), "-m", "bench.balancers", "--serve"])
        for ip, _, _ in BACKENDS.values():
            wait_until(functools.partial(can_connect, (ip, FAST)), 15, f"backend {ip}")
        mdir = tmp / "manifests"
        mdir.mkdir()
        (mdir / "balancers.json").write_text(json.dumps(manifests()))
        proxy = procs.start("userproxy", peers.userproxy_argv(mdir, "--metrics-bind-address="))
        for balancer in BALANCERS:
            address = service_address(balancer, SERVICE_PORT_FAST)
            wait_until(functools.partial(can_connect, address), 20, f"userproxy on {address}")
        asyncio.run(closed_loop(service_address(BALANCERS[0], SERVICE_PORT_FAST), 4, count=200))
        for balancer in BALANCERS:
            het = service_address(balancer, SERVICE_PORT_HET)
            lat, errors, answers, took = asyncio.run(
                closed_loop(het, args.clients, seconds=args.seconds)
            )
            results["het"][balancer] = {
                "p50_ms": pct(lat, 0.5) * 1000, "p99_ms": pct(lat, 0.99) * 1000,
                "rate": len(lat) / took, "errors": errors / max(1, errors + len(lat)),
                "share": {n: answers[n] / max(1, len(lat)) for n in BACKENDS},
            }  # fmt: skip
            print(f"{balancer:>17}: {results['het'][balancer]}", file=sys.stderr)
        order = list(BALANCERS)
        for _ in range(args.rounds):
            for balancer in order:
                before = cpu_seconds(proxy.pid)
                _, _, answers, _ = asyncio.run(closed_loop(
                    service_address(balancer, SERVICE_PORT_FAST), args.clients,
                    count=args.connections))  # fmt: skip
                used = cpu_seconds(proxy.pid) - before
                results["cpu"][balancer].append(used / max(1, sum(answers.values())) * 1e6)
            order = order[1:] + order[:1]
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)  # its manifests and the processes' logs
    results["disruption"] = disruption()
    return results


def table(results: dict[str, Any], args: argparse.Namespace) -> str:
    het, cpu, dis = results["het"], results["cpu"], results["disruption"]
    rr_cpu = statistics.median(cpu["round-robin"])
    lines = [
        f"{args.clients} closed-loop clients, one request per connection, {args.seconds:g} s per "
        "balancer; backends: normal 2 ms, slow 40 ms (20x), flaky 2 ms resetting 10 % of "
        "connections on accept; each serves one request at a time.",
        "",
        "| balancer | p50 ms | p99 ms | answered/s | errors | normal | slow | flaky "
        "| CPU µs/conn | vs round-robin |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for balancer in BALANCERS:
        h = het[balancer]
        c = statistics.median(cpu[balancer])
        share = " | ".join(f"{h['share'][n]:.0%}" for n in BACKENDS)
        lines.append(
            f"| {balancer} | {h['p50_ms']:.1f} | {h['p99_ms']:.1f} | {h['rate']:.0f} "
            f"| {h['errors']:.1%} | {share} | {c:.0f} | {c / rr_cpu:.2f} |"
        )
    lines += [
        "",
        f"CPU per connection: {args.connections} connections per balancer to three instant "
        f"backends, median of {args.rounds} rounds in rotating order.",
        "",
        "| 100 000 clients, 1 of 10 endpoints removed | moved | moved between staying |",
        "|---|---:|---:|",
        f"| maglev (M = 65 537) | {dis['maglev_moved']:.2%} | {dis['maglev_between']:.3%} |",
        f"| modulo hash | {dis['modulo_moved']:.2%} | {dis['modulo_between']:.2%} |",
        "",
        "Maglev table build (M = 65 537, cached per endpoint set): "
        + ", ".join(f"N = {n}: {dis[f'build_ms_{n}']:.0f} ms" for n in (3, 10, 100))
        + ".",
    ]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    het = results["het"]
    fig, (lat_ax, rate_ax, share_ax) = plt.subplots(1, 3, figsize=(14, 4.2))
    xs = range(len(BALANCERS))
    lat_ax.bar([x - 0.2 for x in xs], [het[b]["p50_ms"] for b in BALANCERS], 0.4, label="p50")
    lat_ax.bar([x + 0.2 for x in xs], [het[b]["p99_ms"] for b in BALANCERS], 0.4, label="p99")
    lat_ax.set_ylabel("request latency, ms")
    lat_ax.legend()
    rate_ax.bar(xs, [het[b]["rate"] for b in BALANCERS], color="tab:green")
    rate_ax.set_ylabel("answered requests/s")
    bottom = [0.0] * len(BALANCERS)
    for name in BACKENDS:
        values = [het[b]["share"][name] * 100 for b in BALANCERS]
        share_ax.bar(xs, values, bottom=bottom, label=name)
        bottom = [a + b for a, b in zip(bottom, values, strict=True)]
    share_ax.set_ylabel("share of answers, %")
    share_ax.legend()
    for ax in (lat_ax, rate_ax, share_ax):
        ax.set_xticks(list(xs), [b.replace("-", "-\n") for b in BALANCERS], fontsize=8)
    fig.suptitle("Balancers over normal, slow (20x) and flaky backends (bench/balancers.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def write_section(text: str, doc: Path) -> None:
    """Replace this bench's section of ``doc`` (or append it)."""
    section = (
        f"## Balancers (`python -m bench.balancers`)\n\n{text}\n\n"
        f"![balancers](balancers.png)\n\n{READING}\n"
    )
    report.replace_section(doc, "balancers", section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.balancers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=3000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve())
        return 0
    results = run(args)
    text = table(results, args)
    print(text)
    if not args.no_write:
        write_section(text, ROOT / "docs" / "benchmarks.md")
        chart(results, ROOT / "docs" / "balancers.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
