"""How long ``/status`` takes, and how long it holds the event loop, with many Services.

``python -m bench.status [--services 10000] [--endpoints 3] [--loop uvloop|asyncio]``

One proxy runs in this process on manifests with ``--services`` ClusterIP Services (each
with ``--endpoints`` endpoints, so every one has an open listener), its metrics server on
127.0.0.1.  A task wakes every millisecond and records how late it woke (the loop's
longest stall, in wall-clock time and in the loop thread's CPU time), and the collector's
callbacks time every collection.  The client is one Python process started before the
Services are loaded, fetching each URL three times as this process asks: its reading and
parsing never compete with the loop, and no process is forked per request (a fork of
this process, grown to 1 GB by 10 000 Services, held the loop 10-25 ms by itself: the
stall an earlier version of this script blamed on the paged requests).

Per URL it prints the fastest and slowest answer, its size, the longest stall while it
was built and sent (wall clock, and the loop's own CPU, the figure this code can cause),
and the longest garbage collection then (and whether a full one ran).  The issue's bar:
under 1 s for the whole ``/status``, no stall over 20 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import socket
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from bench.controlplane import write_manifests
from userproxy.config import Settings
from userproxy.proxy import Proxy

URLS = (
    "/status",
    "/status?page=50&page_size=100",
    "/status?q=s9999",
    "/?page=50",
    "/metrics",
)

#: Reads "URL" lines; answers "seconds bytes status" per line.
CLIENT = """
import sys, time, urllib.request
for line in sys.stdin:
    started = time.perf_counter()
    with urllib.request.urlopen(line.strip(), timeout=120) as response:
        size = len(response.read())
        print(f"{time.perf_counter() - started:.6f} {size} {response.status}", flush=True)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Collections:
    """The longest collection since ``reset()`` and whether a full one (generation 2) ran."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.full = 0
        self._started = 0.0

    def reset(self) -> None:
        self.longest = 0.0
        self.full = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        self.longest = max(self.longest, time.perf_counter() - self._started)
        self.full += info["generation"] == 2


class StallMeter:
    """Wakes every millisecond; ``worst`` is the longest lateness since ``reset()`` (wall
    clock), ``worst_cpu`` the most CPU time the loop's thread used between two wakes: on a
    busy machine the wall figure also counts time the process was not scheduled, the CPU
    figure only what the loop itself did (the stall this code can cause); ``wakes`` counts
    the wake-ups since ``reset()``.  tests/admin/test_status_stall.py uses it too."""

    def __init__(self) -> None:
        self.worst = self.worst_cpu = 0.0
        self.wakes = 0

    def reset(self) -> None:
        self.worst = self.worst_cpu = 0.0
        self.wakes = 0

    async def run(self) -> None:
        while True:
            before, cpu = time.perf_counter(), time.thread_time()
            await asyncio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - before - 0.001)
            self.worst_cpu = max(self.worst_cpu, time.thread_time() - cpu)
            self.wakes += 1


class Client:
    """The client process (see the module docstring)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls) -> Client:
        return cls(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                CLIENT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
        )

    async def get(self, url: str) -> tuple[float, int]:
        """(seconds, bytes) of one GET."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(f"{url}\n".encode())
        await stdin.drain()
        seconds, size, code = (await stdout.readline()).decode().split()
        if code != "200":
            raise RuntimeError(f"{url}: HTTP {code}")
        return float(seconds), int(size)

    async def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        await self.process.wait()


Row = tuple[str, float, float, int, float, float, float, int]


async def main(services: int, endpoints: int) -> None:
    port = _free_port()
    client = await Client.start()  # before the heap grows: see the module docstring
    collections = Collections()
    gc.callbacks.append(collections)
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
        rows: list[Row] = []

        def reset() -> None:
            meter.reset()
            collections.reset()

        def row(path: str, fastest: float, slowest: float, size: int) -> Row:
            return (path, fastest, slowest, size, meter.worst, meter.worst_cpu,
                    collections.longest, collections.full)  # fmt: skip

        try:
            async with asyncio.timeout(300):
                await proxy.metrics_ready.wait()
                while len(proxy.proxier.plans) < services:  # every Service planned
                    await proxy.wait_sync(proxy.proxier.status.syncs)
            await asyncio.sleep(1.0)
            reset()
            await asyncio.sleep(2.0)
            rows.append(row("(no request, 2 s)", 0.0, 0.0, 0))
            # The first answer builds every Service's endpoint rows (kept until they change).
            reset()
            seconds, size = await client.get(f"http://127.0.0.1:{port}/status")
            rows.append(row("/status (first)", seconds, seconds, size))
            for path in URLS:
                times = []
                worst = worst_cpu = longest_gc = 0.0
                full = size = 0
                for _ in range(3):
                    reset()
                    seconds, size = await client.get(f"http://127.0.0.1:{port}{path}")
                    times.append(seconds)
                    worst = max(worst, meter.worst)
                    worst_cpu = max(worst_cpu, meter.worst_cpu)
                    longest_gc = max(longest_gc, collections.longest)
                    full += collections.full
                rows.append((path, min(times), max(times), size, worst, worst_cpu, longest_gc,
                             full))  # fmt: skip
        finally:
            ticker.cancel()
            gc.callbacks.remove(collections)
            proxy.stop()
            await task
            await client.close()
    print(
        f"{services} Services x {endpoints} endpoints, loop "
        f"{type(asyncio.get_running_loop()).__module__}"
    )
    print(
        f"{'URL':30} {'fastest':>9} {'slowest':>9} {'bytes':>10}  {'longest stall':>13} "
        f"{'(loop CPU)':>10}  {'longest gc':>10} {'full':>4}"
    )
    for path, fastest, slowest, size, worst, worst_cpu, longest_gc, full in rows:
        print(
            f"{path:30} {fastest * 1000:6.0f} ms {slowest * 1000:6.0f} ms {size:10d}  "
            f"{worst * 1000:10.1f} ms {worst_cpu * 1000:7.1f} ms  {longest_gc * 1000:7.1f} ms "
            f"{full:4d}"
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
