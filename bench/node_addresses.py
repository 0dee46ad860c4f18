"""How long reading the node's addresses stalls the event loop: main's blocking read next
to this branch's awaited read, on the stock asyncio loop and on uvloop.

    sudo .venv/bin/python -m bench.node_addresses [--addresses 2000] [--reads 10]

It creates a network namespace (``upx-bench-<random>``, always deleted at the end), puts
``--addresses`` /32s on a dummy device there (an empty bridge where the kernel has no
dummy driver), and runs itself inside it.  There, per loop and per way of reading, a
ticker task sleeping 1 ms records the longest gap between its wake-ups (the loop's
longest stall) while ``--reads`` reads run one after another:

- ``blocking``: pyroute2's sync ``IPRoute`` on a worker thread the loop waits for (what
  main's ``_outside_event_loop`` did: the watcher's first read, every ``AddressManager``
  call, and every read without a watcher);
- ``to_thread``: the same read on ``asyncio.to_thread`` (main's watcher after its first
  read: the loop runs, but competes for the GIL with pyroute2's decoding);
- ``awaited``: ``host_addresses.read_host`` (this branch: ``AsyncIPRoute`` on the loop,
  at most one 4 KiB datagram decoded per loop turn).

``idle`` is the ticker with no read at all: this machine's noise floor.  Every read
dumps links and addresses; the numbers are the longest stall (over all reads, and the
median of each read's longest: noise and rare collector passes move the first), the
median read time, and the longest pass of the cyclic garbage collector, which stops every
thread: with the read awaited, the stall left is mostly these passes, freeing pyroute2's
decoded messages (each holds a reference to itself, so only the collector frees them).
This machine's load moves every number: compare the rows of one run, not runs.
Needs root (CAP_SYS_ADMIN for the namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import gc
import json
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("idle", "blocking", "to_thread", "awaited")
LOOPS = ("asyncio", "uvloop")


def _ip(*args: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *args], input=stdin, text=True, check=True, capture_output=True)


def _sync_read() -> int:
    """main's read: links and addresses through the sync IPRoute."""
    from pyroute2 import IPRoute  # type: ignore[import-untyped]

    with IPRoute() as ipr:
        links = {int(m["index"]): m.get_attr("IFLA_IFNAME") for m in ipr.link("dump")}
        addresses = [m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS") for m in ipr.addr("dump")]
    return len(links) + len(addresses)


def _blocking() -> Awaitable[object]:
    async def read() -> object:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(_sync_read).result()  # the loop waits: what is measured

    return read()


def _to_thread() -> Awaitable[object]:
    return asyncio.to_thread(_sync_read)


def _awaited() -> Awaitable[object]:
    from userproxy.hostnet.host_addresses import read_host

    return read_host(routes=False)


async def _idle() -> object:
    await asyncio.sleep(0.02)
    return None


READS: dict[str, Callable[[], Awaitable[object]]] = {
    "idle": _idle,
    "blocking": _blocking,
    "to_thread": _to_thread,
    "awaited": _awaited,
}


async def _measure(way: str, reads: int) -> dict[str, float]:
    """The longest gap of a 1 ms ticker during ``reads`` reads (the longest over all, and the
    median over the reads of each read's longest), the median read time, and
        the longest pass of Python's cyclic garbage collector meanwhile (it holds every thread
        up; pyroute2's decoded messages are cyclic garbage, about 36 objects an address)."""
    longest = 0.0
    collector = {"started": 0.0, "longest": 0.0}

    def gc_pass(phase: str, _info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            collector["started"] = now
        else:
            collector["longest"] = max(collector["longest"], now - collector["started"])

    async def tick() -> None:
        nonlocal longest
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    times, stalls = [], []
    gc.callbacks.append(gc_pass)
    try:
        for _ in range(reads):
            longest = 0.0
            start = time.perf_counter()
            await READS[way]()
            times.append(time.perf_counter() - start)
            await asyncio.sleep(0.005)  # the ticker notices a stall that ended the read
            stalls.append(longest)
    finally:
        gc.callbacks.remove(gc_pass)
        ticker.cancel()
    return {
        "stall_ms": max(stalls) * 1000,
        "median_stall_ms": statistics.median(stalls) * 1000,
        "read_ms": statistics.median(times) * 1000,
        "gc_ms": collector["longest"] * 1000,
    }


def inside(reads: int) -> None:
    """In the namespace: every loop and way, one JSON line each."""
    import uvloop

    for loop in LOOPS:
        for way in WAYS:
            factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
            with asyncio.Runner(loop_factory=factory) as runner:
                result = runner.run(_measure(way, reads))
            print(json.dumps({"loop": loop, "way": way, **result}), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.node_addresses", description=__doc__)
    parser.add_argument("--addresses", type=int, default=2000)
    parser.add_argument("--reads", type=int, default=10)
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inside:
        inside(args.reads)
        return 0
    netns = f"upx-bench-{secrets.token_hex(4)}"
    try:
        _ip("netns", "add", netns)
    except subprocess.CalledProcessError as exc:
        print(f"cannot create a network namespace (run as root): {exc.stderr}", file=sys.stderr)
        return 1
    try:
        _ip("-n", netns, "link", "set", "lo", "up")
        try:
            _ip("-n", netns, "link", "add", "upxmany", "type", "dummy")
        except subprocess.CalledProcessError:
            _ip("-n", netns, "link", "add", "upxmany", "type", "bridge")
        _ip("-n", netns, "link", "set", "upxmany", "up")
        n = args.addresses
        batch = "".join(f"addr add 10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}/32 dev upxmany\n"
                        for i in range(1, n + 1))  # fmt: skip
        _ip("-n", netns, "-batch", "-", stdin=batch)
        command = ["ip", "netns", "exec", netns, sys.executable, "-m", "bench.node_addresses"]
        command += ["--inside", "--reads", str(args.reads)]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        rows = [json.loads(line) for line in done.stdout.splitlines()]
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False)
    print(f"{n} addresses on one device, {args.reads} reads of links + addresses per row:")
    print(f"  {'loop':8} {'way':10} {'stall: longest':>15} {'median':>9}", end="")
    print(f" {'median read':>12} {'longest gc pass':>16}")
    for row in rows:
        print(
            f"  {row['loop']:8} {row['way']:10} {row['stall_ms']:12.1f} ms "
            f"{row['median_stall_ms']:6.1f} ms {row['read_ms']:9.1f} ms {row['gc_ms']:13.1f} ms"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
