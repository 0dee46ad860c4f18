"""How long ``/status`` takes, and how long it holds the event loop, with many Services.

``python -m bench.status [--services 10000] [--endpoints 3] [--loop uvloop|asyncio]``

One proxy runs in this process on manifests with ``--services`` ClusterIP Services (each
with ``--endpoints`` endpoints, so every one has an open listener), its metrics server on
127.0.0.1.  A task wakes every millisecond and records how late it woke (the loop's
longest stall, in wall-clock time and in the loop thread's CPU time).  ``curl``, in its own
process (so neither its reading nor its parsing competes with the loop), fetches each URL
three times; the script
prints per URL the fastest and slowest answer, its size and the longest stall while it
was built and sent.  The issue's bar: under 1 s for the whole ``/status``, no stall over
20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path

import uvloop

from bench.controlplane import write_manifests
from userproxy.config import Settings
from userproxy.proxy import Proxy

URLS = ("/status", "/status?page=50&page_size=100", "/status?q=s9999", "/?page=50")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class StallMeter:
    """Wakes every millisecond; ``worst`` is the longest lateness since ``reset()`` (wall
    clock), ``worst_cpu`` the most CPU time the loop's thread used between two wakes: on a
    busy machine the wall figure also counts time the process was not scheduled, the CPU
    figure only what the loop itself did (the stall this code can cause)."""

    def __init__(self) -> None:
        self.worst = self.worst_cpu = 0.0

    def reset(self) -> None:
        self.worst = self.worst_cpu = 0.0

    async def run(self) -> None:
        while True:
            before, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - before - 0.001)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu)


async def _curl(url: str) -> tuple[float, int]:
    """(seconds, bytes) of one GET by curl."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{time_total} %{size_download} %{http_code}",
        url, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await process.communicate()
    seconds, size, code = out.decode().split()
    if code != "200":
        raise RuntimeError(f"{url}: HTTP {code}")
    return float(seconds), int(size)


async def main(services: int, endpoints: int) -> None:
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="userproxy-status-") as tmp:
        mdir = Path(tmp)
        write_manifests(mdir, services, endpoints)
        settings = Settings(
            hostname="bench-node",
            manifests=(mdir,),
            min_sync_period=0.0,
            manifest_poll_interval=0.05,
            healthz_bind_address="",
            metrics_bind_address=f"127.0.0.1:{port}",
            log_level="warning",
        )
        proxy = Proxy(settings)
        task = asyncio.create_task(proxy.run())
        meter = StallMeter()
        ticker = asyncio.create_task(meter.run())
        rows = []
        try:
            async with asyncio.timeout(300):
                await proxy.metrics_ready.wait()
                while len(proxy.proxier.plans) < services:  # every Service planned
                    await proxy.wait_sync(proxy.proxier.status.syncs)
            await asyncio.sleep(1.0)
            meter.reset()
            await asyncio.sleep(2.0)
            rows.append(("(no request, 2 s)", 0.0, 0.0, 0, meter.worst, meter.worst_cpu))
            # The first answer builds every Service's endpoints (kept until they change).
            meter.reset()
            seconds, size = await _curl(f"http://127.0.0.1:{port}/status")
            rows.append(("/status (first)", seconds, seconds, size, meter.worst, meter.worst_cpu))
            for path in URLS:
                times = []
                worst = worst_cpu = 0.0
                size = 0
                for _ in range(3):
                    meter.reset()
                    seconds, size = await _curl(f"http://127.0.0.1:{port}{path}")
                    times.append(seconds)
                    worst = max(worst, meter.worst)
                    worst_cpu = max(worst_cpu, meter.worst_cpu)
                rows.append((path, min(times), max(times), size, worst, worst_cpu))
        finally:
            ticker.cancel()
            proxy.stop()
            await task
    print(
        f"{services} Services x {endpoints} endpoints, loop "
        f"{type(asyncio.get_running_loop()).__module__}"
    )
    print(
        f"{'URL':34} {'fastest':>9} {'slowest':>9} {'bytes':>10} {'longest stall':>14} "
        f"{'(loop CPU)':>11}"
    )
    for path, fastest, slowest, size, worst, worst_cpu in rows:
        print(
            f"{path:34} {fastest * 1000:6.0f} ms {slowest * 1000:6.0f} ms {size:10d} "
            f"{worst * 1000:11.1f} ms {worst_cpu * 1000:8.1f} ms"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--endpoints", type=int, default=3)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    args = parser.parse_args()
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.services, args.endpoints))
