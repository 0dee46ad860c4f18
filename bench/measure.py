"""One measurement of one path: runs a client tool and parses its output into numbers.

Every measurement through a proxy also reads the proxying process's CPU time (utime +
stime, ``/proc/PID/stat``) before and after the client runs and divides it by the work
done: per new connection, per keep-alive request, per round trip, per datagram crossing
the proxy, per GB.  That ratio moves far less with the machine's load than the rates do.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from dataclasses import dataclass

from bench.peers import HTTP, IPERF, SP_TCP, SP_UDP, Peer, UdpBackend
from bench.procs import cpu_seconds

Sample = dict[str, float]


def per_unit(cpu_s: float, units: float, scale: float = 1e6) -> float:
    """``cpu_s`` seconds of CPU spread over ``units`` of work, times ``scale`` (default:
    microseconds per unit); NaN when no work was done."""
    return cpu_s * scale / units if units > 0 else float("nan")


def udp_crossings(server_received: int, client_received: int) -> int:
    """Datagrams that crossed the proxy in an echo run: each request the backend received
    crossed it once on the way in, each echo the client received once on the way back.
    (A datagram the proxy forwarded and the receiver then dropped is not counted, so the
    CPU per datagram errs high, alike for every proxy.)"""
    return server_received + client_received


class _Cpu:
    """The proxying process's CPU seconds since construction (0 for the direct path)."""

    def __init__(self, peer: Peer) -> None:
        self.pid = peer.pid
        self.start = cpu_seconds(self.pid) if self.pid else 0.0

    def used(self) -> float | None:
        return cpu_seconds(self.pid) - self.start if self.pid else None


@dataclass(frozen=True)
class Durations:
    """Seconds each client tool runs for."""

    iperf: float
    wrk: float
    latency: float
    udp: float


def _run(argv: list[str], timeout: float) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    return res.stdout + res.stderr


#: iperf3 errors that say the server was between two tests (``iperf3 -s`` serves one test
#: at a time and re-opens its listening socket after each), not that the path is broken.
_IPERF_RETRY = ("unable to connect to server", "the server is busy")


def iperf(peer: Peer, streams: int, seconds: float, attempts: int = 4) -> Sample:
    """Bulk TCP throughput (Gbit/s received) and the proxy's CPU seconds per GB.  A run
    the iperf3 server refused because it was between tests is tried again (up to
    ``attempts`` runs, a second apart); any other error ends the measurement."""
    argv = ["iperf3", "-c", peer.host, "-p", str(IPERF), "-t", f"{seconds:g}", "-P", str(streams)]
    for attempt in range(1, attempts + 1):
        meter = _Cpu(peer)
        out = _run([*argv, "-J"], timeout=seconds + 30)
        cpu = meter.used()
        data = json.loads(out[out.index("{") :]) if "{" in out else {}
        if "error" not in data and "end" in data:
            break
        error = str(data.get("error", out[-500:]))
        if attempt == attempts or not any(e in error for e in _IPERF_RETRY):
            raise RuntimeError(f"iperf3 through {peer.name}: {error}")
        time.sleep(1.0)
    received = data["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    sample = {f"tcp{streams}_gbps": received["bits_per_second"] / 1e9}
    if cpu is not None:
        sample[f"tcp{streams}_cpu_s_per_gb"] = per_unit(cpu, gbytes, scale=1.0)
    return sample


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_TOTAL = re.compile(r"(\d+) requests in ")
_WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(peer: Peer, seconds: float, *, close: bool, connections: int = 32) -> Sample:
    """Requests per second with wrk: a new connection per request (``Connection: close``)
    or keep-alive; and the proxy's CPU µs per request (= per connection with close)."""
    url = f"http://{peer.host}:{HTTP}/"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    meter = _Cpu(peer)
    out = _run([*argv, url], timeout=seconds + 30)
    cpu = meter.used()
    match, total = _WRK_RPS.search(out), _WRK_TOTAL.search(out)
    if match is None or total is None:
        raise RuntimeError(f"wrk through {peer.name}: no result:\n{out[-800:]}")
    errors = sum(int(x) for x in m.groups()) if (m := _WRK_ERR.search(out)) else 0
    errors += int(m.group(1)) if (m := _WRK_NON2XX.search(out)) else 0
    key = "conn" if close else "ka"
    sample = {f"{key}_rps": float(match.group(1)), f"{key}_rps_errors": float(errors)}
    if cpu is not None:
        sample[f"{key}_cpu_us"] = per_unit(cpu, int(total.group(1)))
    return sample


_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_VALID = re.compile(
    r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)"
)
#: The whole run, warm-up included: the span the CPU is read over.
_TOTAL = re.compile(
    r"\[Total Run\] RunTime=([\d.]+) sec;.*SentMessages=(\d+); ReceivedMessages=(\d+)"
)


def latency(peer: Peer, seconds: float, rate: int = 2000, size: int = 64) -> Sample:
    """Round-trip latency of a small TCP request/response at a fixed rate (sockperf
    ping-pong, ``--full-rtt``), percentiles in microseconds; the proxy's CPU µs per round
    trip (a fixed load: the same work for every proxy)."""
    argv = ["sockperf", "ping-pong", "--tcp", "-i", peer.host, "-p", str(SP_TCP)]
    argv += ["-m", str(size), "-t", f"{seconds:g}", "--mps", str(rate), "--full-rtt"]
    meter = _Cpu(peer)
    out = _run(argv, timeout=seconds + 30)
    cpu = meter.used()
    pct = {float(p): float(v) for p, v in _PCT.findall(out)}
    total = _TOTAL.search(out)
    if 50.0 not in pct or 99.0 not in pct or total is None:
        raise RuntimeError(f"sockperf ping-pong through {peer.name}: no result:\n{out[-800:]}")
    sample = {"lat_p50_us": pct[50.0], "lat_p99_us": pct[99.0]}
    if cpu is not None:
        sample["lat_cpu_us"] = per_unit(cpu, int(total[3]))
    return sample


def _under_load(
    peer: Peer, backend: UdpBackend, size: int, seconds: float, mps: str
) -> tuple[float, int, int, float]:
    """sockperf under-load through ``peer`` against a fresh counting backend: (valid
    runtime, sent, received, and the proxy's CPU µs per datagram crossing it or NaN)."""
    argv = ["sockperf", "under-load", "-i", peer.host, "-p", str(SP_UDP), "-m", str(size)]
    argv += ["-t", f"{seconds:g}", "--mps", mps, "--reply-every", "1"]
    with backend.counting() as server:
        meter = _Cpu(peer)
        out = _run(argv, timeout=seconds + 30)
        cpu = meter.used()
    match, total = _VALID.search(out), _TOTAL.search(out)
    if match is None or total is None:
        raise RuntimeError(f"sockperf under-load through {peer.name}: no result:\n{out[-800:]}")
    crossed = udp_crossings(server.received, int(total[3]))
    us = per_unit(cpu, crossed) if cpu is not None else float("nan")
    return float(match[1]), int(match[2]), int(match[3]), us


def udp(peer: Peer, backend: UdpBackend, size: int, seconds: float) -> Sample:
    """UDP datagrams per second and loss: sockperf under-load at its maximum send rate,
    every datagram answered by the server, so each one crosses the proxy both ways.
    Received = answers back at the client per second; and the proxy's CPU per datagram."""
    runtime, sent, received, us = _under_load(peer, backend, size, seconds, "max")
    sample = {
        f"udp{size}_rx_per_s": received / runtime,
        f"udp{size}_sent_per_s": sent / runtime,
        f"udp{size}_loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
    }
    if peer.pid:
        sample[f"udp{size}_cpu_us"] = us
    return sample


def udp_at_rate(
    peer: Peer, backend: UdpBackend, seconds: float, rate: int = 50_000, size: int = 64
) -> Sample:
    """One busy UDP client at a fixed rate (a DNS forwarder's shape: one socket, many
    datagrams): sockperf under-load at ``rate`` datagrams/s, every one echoed.  Reported:
    what was sent per second, the loss (1 - received/sent) in percent, and the proxy's
    CPU per datagram (a fixed load: the same work for every proxy)."""
    runtime, sent, received, us = _under_load(peer, backend, size, seconds, str(rate))
    sample = {
        "udp_rate_sent_per_s": sent / runtime,
        "udp_rate_loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
    }
    if peer.pid:
        sample["udp_rate_cpu_us"] = us
    return sample
