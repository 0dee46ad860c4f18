"""``python -m bench``: run every measurement and write docs/benchmarks.md and the chart.

Use ``bench/run``, which checks the tools first.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from bench import (
    chart,
    controlplane,
    handoff,
    measure,
    memory,
    peers,
    profile,
    report,
    workers,
)
from bench.procs import Procs, raise_nofile

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("haproxy", "nginx", "iperf3", "wrk", "sockperf")
PACKAGES = {
    "haproxy": "haproxy",
    "nginx": "nginx",
    "iperf3": "iperf3",
    "wrk": "wrk",
    "sockperf": "sockperf",
}


def missing_packages() -> list[str]:
    missing = [PACKAGES[t] for t in TOOLS if shutil.which(t) is None]
    if shutil.which("nginx") is not None and not peers.STREAM_MODULE.exists():
        import subprocess

        v = subprocess.run(["nginx", "-V"], capture_output=True, text=True, check=False)
        if "--with-stream " not in v.stderr + " ":
            missing.append("libnginx-mod-stream")
    return missing


def machine() -> dict[str, str]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    try:
        import uvloop

        uv = str(getattr(uvloop, "__version__", "?"))
    except ImportError:
        uv = "not installed"
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    out = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPU": f"{cpu}, {os.cpu_count()} logical cores",
        "memory": f"{int(mem) / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "Python": platform.python_version(),
        "uvloop": uv,
    }
    out |= peers.versions()
    out["load average at start"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return out


class Stop(Exception):
    pass


class _Only(Exception):
    """A partial run (``--only``) is done with its steps."""


#: The ``--only`` names of the steps, in order.
STEP_KEYS = ("iperf1", "iperf4", "close", "keepalive", "latency", "udp64", "udp1400", "udprate")


def _on_term(signum: int, frame: FrameType | None) -> None:
    raise Stop(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~2 min)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 3; quick 1)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--profiles", type=Path, default=ROOT / "bench" / "profiles")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    parser.add_argument("--no-control-plane", action="store_true")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated steps (iperf1,iperf4,close,keepalive,latency,udp64,udp1400,"
        "udprate): run just those, print the table, write nothing",
    )
    args = parser.parse_args(argv)
    only = {key for key in args.only.split(",") if key}
    if only - set(STEP_KEYS):
        parser.error(f"--only: unknown steps {sorted(only - set(STEP_KEYS))}")
    quick: bool = args.quick
    rounds: int = args.rounds or (1 if quick else 3)
    d = (
        measure.Durations(iperf=2, wrk=2, latency=2, udp=2)
        if quick
        else measure.Durations(iperf=4, wrk=4, latency=4, udp=3)
    )
    services = 2000 if quick else 10_000
    changes = 20 if quick else 100

    missing = missing_packages()
    if missing:
        print(f"missing tools; install: apt-get install -y {' '.join(missing)}", file=sys.stderr)
        return 1
    limit = raise_nofile()
    if limit < 2 * 10_000 + 1000:
        print(f"note: RLIMIT_NOFILE is {limit}; the memory test opens fewer connections")
    # 10 000, unless the descriptor limit (which a container may cap) allows fewer.
    idle_conns = 2000 if quick else min(10_000, peers.max_proxied() - 500)
    signal.signal(signal.SIGTERM, _on_term)
    started = time.monotonic()
    desc = machine()
    tmp = Path(tempfile.mkdtemp(prefix="userproxy-bench-"))
    procs = Procs(tmp)
    results: report.Results = {p: {} for p in report.PEERS}
    cp: dict[str, float] = {}

    def log(text: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {text}", flush=True)

    def add(peer: str, sample: measure.Sample) -> None:
        for k, v in sample.items():
            results[peer].setdefault(k, []).append(v)

    try:
        log(f"temp dir {tmp}; starting backends")
        peers.start_backends(procs, tmp, http_workers=1)
        udp = peers.UdpBackend(procs)
        up = peers.start_userproxy(procs, tmp)
        ha = peers.start_haproxy(procs, tmp)
        ng = peers.start_nginx_stream(procs, tmp)
        rl = peers.start_relay(procs)
        everyone = [up, ha, ng, rl, peers.direct()]
        log("userproxy, HAProxy, nginx stream, the python relay up")
        steps: list[tuple[str, bool, Callable[[peers.Peer], measure.Sample]]] = [
            ("iperf3 1 stream", False, lambda p: measure.iperf(p, 1, d.iperf)),
            ("iperf3 4 streams", False, lambda p: measure.iperf(p, 4, d.iperf)),
            ("wrk Connection: close", False, lambda p: measure.wrk(p, d.wrk, close=True)),
            ("wrk keep-alive", False, lambda p: measure.wrk(p, d.wrk, close=False)),
            ("sockperf TCP latency", False, lambda p: measure.latency(p, d.latency)),
            ("sockperf UDP 64 B", True, lambda p: measure.udp(p, udp, 64, d.udp)),
            ("sockperf UDP 1400 B", True, lambda p: measure.udp(p, udp, 1400, d.udp)),
            ("sockperf UDP 50 000/s", True, lambda p: measure.udp_at_rate(p, udp, d.udp)),
        ]
        if only:
            steps = [s for s, key in zip(steps, STEP_KEYS, strict=True) if key in only]
        for r in range(rounds):
            turn = r % len(everyone)
            order = everyone[turn:] + everyone[:turn]
            for name, udp_only, step in steps:
                for peer in order:
                    if udp_only and not peer.udp:
                        continue
                    sample = step(peer)
                    add(peer.name, sample)
                    shown = ", ".join(f"{k}={v:.4g}" for k, v in sample.items())
                    log(f"round {r + 1}/{rounds} {name:22} {peer.name:9} {shown}")
        if only:
            raise _Only
        for peer in (up, ha, ng, rl):
            sample = memory.idle_connections(procs, peer, idle_conns)
            add(peer.name, sample)
            log(f"memory {peer.name:9} " + ", ".join(f"{k}={v:.4g}" for k, v in sample.items()))
        if not args.no_profile:
            assert up.pid is not None
            secs = 4 if quick else 8
            for name, title, load in (
                (
                    "connections",
                    "userproxy under wrk -c32 Connection: close",
                    profile.run_wrk(up.host, peers.HTTP, secs),
                ),
                (
                    "udp",
                    "userproxy under sockperf under-load UDP 64 B",
                    profile.run_udp(up.host, peers.SP_UDP, secs, udp),
                ),
            ):
                path = profile.record(
                    procs,
                    tmp=tmp,
                    pid=up.pid,
                    name=name,
                    seconds=secs + 1,
                    load=load,
                    out_dir=args.profiles,
                    title=title,
                )
                log(f"profile {name}: {path}")
        for peer in (up, ha, ng, rl):
            assert peer.proc is not None
            procs.stop(peer.proc)
        workers_text = workers.run(procs, tmp, seconds=d.wrk, rounds=rounds, log=log)
        handoff_text = handoff.run(procs, tmp, log=log)
        if not args.no_control_plane:
            log(f"control plane: {services} Services")
            cp = controlplane.run(
                procs,
                tmp,
                services=services,
                changes=changes,
                budget=30 if quick else 60,
                big_budget=20 if quick else 75,
            )
            log("control plane " + ", ".join(f"{k}={v:.4g}" for k, v in cp.items()))
    except _Only:
        pass
    except (KeyboardInterrupt, Stop) as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): stopping everything", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.monotonic() - started
    if only:  # a partial run: the table only, the documents stay as they are
        print(report.stdout_table(report.medians(results), {}))
        return 0
    desc["load average at end"] = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    settings = {
        "run": f"{'--quick' if quick else 'full'}, {rounds} round(s), {elapsed / 60:.1f} min",
        "durations": f"iperf3 {d.iperf:g} s, wrk {d.wrk:g} s, latency {d.latency:g} s, "
        f"UDP {d.udp:g} s per run",
        "idle connections": str(idle_conns),
    }
    m = report.medians(results)
    reproduce = (ROOT / "bench" / "README.md").read_text()
    text = report.markdown(m, cp, desc, settings, reproduce)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    text = report.keep_sections(args.output, text)  # bench.balancers', bench.status' figures
    args.output.write_text(text)
    workers.write_section(workers_text, args.output)  # --workers 1 vs 2: bench/workers.py
    handoff.write_section(handoff_text, args.output)  # replacing the proxy: bench/handoff.py
    png = args.output.with_suffix(".png")
    try:
        chart.chart(m, cp, png)
    except ImportError:
        print("matplotlib is not installed: no chart (pip install -e '.[bench]')", file=sys.stderr)
    print()
    print(report.stdout_table(m, cp))
    print(f"\nwrote {args.output} and {png} in {elapsed / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
