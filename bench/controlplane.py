"""Control plane: many Services from manifests, and how fast an EndpointSlice change
reaches new connections."""

from __future__ import annotations

import json
import random
import socket
import statistics
import time
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

from bench.measure import Sample
from bench.peers import userproxy_argv
from bench.procs import Procs, can_connect, cpu_seconds, python, rss_bytes, wait_until

METRICS = ("127.0.90.9", 10249)
PROBE_IP, PROBE_PORT = "127.0.89.1", 80
NAMESRV = {"A": "127.0.92.1", "B": "127.0.92.2"}
NAME_PORT = 7001


def _service_ip(i: int) -> str:
    return f"127.20.{i // 250}.{i % 250 + 1}"


def _service(name: str, ip: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "clusterIP": ip,
            "ports": [{"name": "tcp", "protocol": "TCP", "port": 80, "targetPort": "tcp"}],
        },
    }


def _slice(service: str, addresses: list[str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "tcp", "protocol": "TCP", "port": port}],
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
    }


def _write(path: Path, items: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    tmp.replace(path)


def write_manifests(mdir: Path, services: int, endpoints: int) -> None:
    """``services`` Services in all: the probe (one endpoint, a name server) and
    ``services - 1`` others with ``endpoints`` endpoints each, 1 000 a file."""
    mdir.mkdir(parents=True, exist_ok=True)
    bulk = services - 1
    eps = [f"127.0.93.{k + 1}" for k in range(endpoints)]
    for start in range(0, bulk, 1000):
        idx = range(start, min(bulk, start + 1000))
        _write(
            mdir / f"svc-{start // 1000:03d}.json", [_service(f"s{i}", _service_ip(i)) for i in idx]
        )
        _write(mdir / f"eps-{start // 1000:03d}.json", [_slice(f"s{i}", eps, 7000) for i in idx])
    _write(mdir / "probe.json", [_service("probe", PROBE_IP)])
    set_probe(mdir, "A")


def set_probe(mdir: Path, name: str) -> None:
    _write(mdir / "probe-eps.json", [_slice("probe", [NAMESRV[name]], NAME_PORT)])


def listeners_open() -> int:
    """The sum of ``userproxy_listeners_open`` (-1 while the metrics server is not up)."""
    url = f"http://{METRICS[0]}:{METRICS[1]}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    except OSError:
        return -1
    total = 0.0
    for line in text.splitlines():
        if line.startswith("userproxy_listeners_open{"):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def _hex_address(ip: str, port: int) -> str:
    """``ip:port`` as /proc/net/tcp spells a local address (IPv4, host byte order)."""
    a, b, c, d = (int(x) for x in ip.split("."))
    return f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"


def listening(pid: int, wanted: set[str]) -> int:
    """How many of ``wanted`` (``_hex_address`` spellings) are in LISTEN state in the
    network namespace of ``pid``: the kernel's view, read without asking the proxy (a
    /metrics scrape with 10 000 Services costs the proxy about 2 s of CPU, which polling
    it would add to the very start-up being timed)."""
    found = 0
    try:
        with open(f"/proc/{pid}/net/tcp", encoding="ascii") as table:
            next(table)
            for line in table:
                fields = line.split(None, 4)
                if fields[3] == "0A" and fields[1] in wanted:
                    found += 1
    except OSError:
        return -1
    return found


def _reached() -> str:
    try:
        with socket.create_connection((PROBE_IP, PROBE_PORT), timeout=1) as s:
            s.settimeout(1)
            return s.recv(16).decode(errors="replace")
    except OSError:
        return ""


def change_to_traffic(mdir: Path, changes: int, budget: float) -> list[float]:
    """Seconds from each rewrite of the probe's EndpointSlice until a new connection
    reaches the new backend (polled every millisecond)."""
    delays: list[float] = []
    deadline = time.monotonic() + budget
    current = "A"
    for _ in range(changes):
        if time.monotonic() > deadline:
            break
        # Start at a random phase of the manifest poll.
        time.sleep(random.uniform(0.0, 0.25))
        target = "B" if current == "A" else "A"
        set_probe(mdir, target)
        t0 = time.monotonic()
        while _reached() != target:
            if time.monotonic() - t0 > 15:
                raise TimeoutError(f"the probe did not follow its slice to {target} in 15s")
            time.sleep(0.001)
        delays.append(time.monotonic() - t0)
        current = target
    return delays


def run(
    procs: Procs,
    tmp: Path,
    *,
    services: int,
    changes: int,
    budget: float,
    big_budget: float,
) -> Sample:
    sample: Sample = {}
    for name, ip in NAMESRV.items():
        procs.start(
            f"namesrv-{name}", [python(), "-m", "bench.servers", "name", ip, str(NAME_PORT), name]
        )
        wait_until(partial(can_connect, (ip, NAME_PORT)), 15, f"name server {name}")

    # One Service: the cost of noticing a change (the manifest poll) and applying it.
    small = tmp / "cp-small"
    write_manifests(small, 1, 1)
    proc = procs.start("userproxy-cp-small", userproxy_argv(small, "--metrics-bind-address="))
    try:
        wait_until(lambda: _reached() == "A", 20, "userproxy serving the probe Service")
        delays = change_to_traffic(small, changes, budget)
    finally:
        procs.stop(proc)
    sample |= _delays("change_1svc", delays)

    # Many Services.
    big = tmp / "cp-big"
    write_manifests(big, services, 10)
    last = (_service_ip(services - 2), 80)
    metrics = f"--metrics-bind-address={METRICS[0]}:{METRICS[1]}"
    t0 = time.monotonic()
    proc = procs.start("userproxy-cp-big", userproxy_argv(big, metrics))
    try:

        def served() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"userproxy exited:\n{procs.log_tail('userproxy-cp-big')}")
            return can_connect(last, 0.2) and can_connect((PROBE_IP, PROBE_PORT), 0.2)

        wait_until(served, 120, f"{services} Services served", step=0.01)
        first = time.monotonic() - t0
        assert proc.pid is not None
        pid = proc.pid
        wanted = {_hex_address(_service_ip(i), 80) for i in range(services - 1)}
        wanted.add(_hex_address(PROBE_IP, PROBE_PORT))
        wait_until(lambda: listening(pid, wanted) >= services, 120, "all listening", step=0.1)
        sample["cp_served_s"] = time.monotonic() - t0
        # CPU time moves far less with the machine's load than the wall-clock time does.
        sample["cp_served_cpu_s"] = cpu_seconds(pid)
        sample["cp_last_listener_s"] = first
        # The proxy's own count agrees (one scrape, after the timing).
        wait_until(lambda: listeners_open() >= services, 120, "all listeners open", step=1.0)
        time.sleep(1.0)
        assert proc.pid is not None
        sample["cp_rss_mib"] = rss_bytes(proc.pid) / 2**20
        sample["cp_services"] = float(services)
        delays = change_to_traffic(big, changes, big_budget)
    finally:
        procs.stop(proc)
    sample |= _delays("change_many", delays)
    sample |= node_stalls(services)
    return sample


def node_stalls(services: int) -> Sample:
    """``bench/node_update.py --json``: the longest loop stall of a Node label change, a
    zone change and (as root) a node address change, with ``services`` Services loaded."""
    import subprocess

    done = subprocess.run(
        [python(), "-m", "bench.node_update", "--services", str(services), "--json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        cwd=Path(__file__).resolve().parent.parent,
    )
    if done.returncode != 0 or not done.stdout.strip():
        raise RuntimeError(f"bench.node_update failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {str(k): float(v) for k, v in result.items()}


def _delays(prefix: str, delays: list[float]) -> Sample:
    if not delays:
        return {}
    ms = sorted(d * 1000 for d in delays)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {
        f"{prefix}_p50_ms": statistics.median(ms),
        f"{prefix}_p99_ms": p99,
        f"{prefix}_max_ms": ms[-1],
        f"{prefix}_n": float(len(ms)),
    }
