"""One measurement of one path: runs a client tool and parses its output into numbers."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

from bench.peers import HTTP, IPERF, SP_TCP, SP_UDP, Peer
from bench.procs import cpu_seconds

Sample = dict[str, float]


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


def iperf(peer: Peer, streams: int, seconds: float) -> Sample:
    """Bulk TCP throughput (Gbit/s received) and the proxy's CPU seconds per GB."""
    pid = peer.pid
    cpu0 = cpu_seconds(pid) if pid else 0.0
    argv = ["iperf3", "-c", peer.host, "-p", str(IPERF), "-t", f"{seconds:g}", "-P", str(streams)]
    out = _run([*argv, "-J"], timeout=seconds + 30)
    cpu = (cpu_seconds(pid) - cpu0) if pid else 0.0
    data = json.loads(out[out.index("{") :]) if "{" in out else {}
    if "error" in data or "end" not in data:
        raise RuntimeError(f"iperf3 through {peer.name}: {data.get('error', out[-500:])}")
    received = data["end"]["sum_received"]
    gbytes = received["bytes"] / 1e9
    sample = {f"tcp{streams}_gbps": received["bits_per_second"] / 1e9}
    if pid:
        sample[f"tcp{streams}_cpu_s_per_gb"] = cpu / gbytes if gbytes else float("nan")
    return sample


_WRK_RPS = re.compile(r"Requests/sec:\s+([\d.]+)")
_WRK_ERR = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def wrk(peer: Peer, seconds: float, *, close: bool, connections: int = 32) -> Sample:
    """Requests per second with wrk: a new connection per request (``Connection: close``)
    or keep-alive."""
    url = f"http://{peer.host}:{HTTP}/"
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "2s"]
    if close:
        argv += ["-H", "Connection: close"]
    out = _run([*argv, url], timeout=seconds + 30)
    match = _WRK_RPS.search(out)
    if match is None:
        raise RuntimeError(f"wrk through {peer.name}: no result:\n{out[-800:]}")
    errors = sum(int(x) for x in m.groups()) if (m := _WRK_ERR.search(out)) else 0
    errors += int(m.group(1)) if (m := _WRK_NON2XX.search(out)) else 0
    key = "conn_rps" if close else "ka_rps"
    return {key: float(match.group(1)), f"{key}_errors": float(errors)}


_PCT = re.compile(r"percentile\s+([\d.]+)\s*=\s*([\d.]+)")
_VALID = re.compile(
    r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)"
)


def latency(peer: Peer, seconds: float, rate: int = 2000, size: int = 64) -> Sample:
    """Round-trip latency of a small TCP request/response at a fixed rate (sockperf
    ping-pong, ``--full-rtt``), percentiles in microseconds."""
    argv = ["sockperf", "ping-pong", "--tcp", "-i", peer.host, "-p", str(SP_TCP)]
    argv += ["-m", str(size), "-t", f"{seconds:g}", "--mps", str(rate), "--full-rtt"]
    out = _run(argv, timeout=seconds + 30)
    pct = {float(p): float(v) for p, v in _PCT.findall(out)}
    if 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf ping-pong through {peer.name}: no result:\n{out[-800:]}")
    return {"lat_p50_us": pct[50.0], "lat_p99_us": pct[99.0]}


def udp(peer: Peer, size: int, seconds: float) -> Sample:
    """UDP datagrams per second and loss: sockperf under-load at its maximum send rate,
    every datagram answered by the server, so each one crosses the proxy both ways.
    Received = answers back at the client per second."""
    argv = ["sockperf", "under-load", "-i", peer.host, "-p", str(SP_UDP), "-m", str(size)]
    argv += ["-t", f"{seconds:g}", "--mps", "max", "--reply-every", "1"]
    out = _run(argv, timeout=seconds + 30)
    match = _VALID.search(out)
    if match is None:
        raise RuntimeError(f"sockperf under-load through {peer.name}: no result:\n{out[-800:]}")
    runtime, sent, received = float(match[1]), int(match[2]), int(match[3])
    return {
        f"udp{size}_rx_per_s": received / runtime,
        f"udp{size}_sent_per_s": sent / runtime,
        f"udp{size}_loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
    }


def udp_at_rate(peer: Peer, seconds: float, rate: int = 50_000, size: int = 64) -> Sample:
    """One busy UDP client at a fixed rate (a DNS forwarder's shape: one socket, many
    datagrams): sockperf under-load at ``rate`` datagrams/s, every one echoed.  Reported:
    what was sent per second and the loss (1 - received/sent), in percent."""
    argv = ["sockperf", "under-load", "-i", peer.host, "-p", str(SP_UDP), "-m", str(size)]
    argv += ["-t", f"{seconds:g}", "--mps", str(rate), "--reply-every", "1"]
    out = _run(argv, timeout=seconds + 30)
    match = _VALID.search(out)
    if match is None:
        raise RuntimeError(f"sockperf under-load through {peer.name}: no result:\n{out[-800:]}")
    runtime, sent, received = float(match[1]), int(match[2]), int(match[3])
    return {
        "udp_rate_sent_per_s": sent / runtime,
        "udp_rate_loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
    }
